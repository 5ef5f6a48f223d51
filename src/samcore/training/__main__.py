"""``python -m samcore.training``: see `samcore.training.command`."""

import sys

from .command import main

sys.exit(main())
