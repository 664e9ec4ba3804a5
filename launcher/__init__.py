"""launcher: the runs — command line, training, checkpoints, export, metrics, Slurm submission, comparisons.

Imports ``crate_lm`` and ``data_pipeline``; they never import it.
"""
