"""``python -m samcore.training``: see `samcore.training.train`."""

import sys

from .train import main

sys.exit(main())
