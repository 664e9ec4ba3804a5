"""Where runs execute: the local process spawner behind ``crate pretrain``, ``crate submit`` (Slurm batch jobs) and
``crate sweep`` (grids of runs). The training core never imports it."""
