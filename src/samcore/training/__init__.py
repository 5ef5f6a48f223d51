"""Training a small SAM from scratch on procedurally generated microscopy scenes.

Modules, one concept each:

* `scenes`: microscopy-like images with instance labels (built from `shapes`, `placement`,
  `tessellation` and `optics`);
* `batches`: scenes and the objects to prompt in them, per training step;
* `prompts`: simulated clicks, boxes and corrective clicks;
* `losses`: focal + dice mask losses and the IoU-score loss;
* `interactive`: one step's forward pass over several prompting rounds;
* `schedule`, `settings`, `checkpoints`: learning-rate schedule, run settings, resume and export;
* `train`: the loop; `command`: its command line.

Command line (``python -m samcore.training --help``)::

    OMP_WAIT_POLICY=PASSIVE python -m samcore.training --out runs/micro_v1 --seed 0 --minutes 110

``OMP_WAIT_POLICY=PASSIVE`` matters on a CPU shared with other jobs: without it, torch's
threads spin while waiting for each other and a step can take ten times longer.
"""
