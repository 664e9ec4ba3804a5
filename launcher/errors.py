"""The project's own error types: what a user's input, data or environment got wrong, as opposed to a bug.

``crate`` prints one of these (and ``data_pipeline.errors.DataError``) as one line, ``crate COMMAND: error:
MESSAGE``, and exits 2; every other exception is a bug or a fault of the machine and keeps its full traceback. The
message must therefore stand alone: it names the key, file, line or option at fault and, where it can, the fix.
Several also derive from the built-in type a caller would expect (``ValueError`` for bad values,
``FileNotFoundError`` for missing inputs)."""

from __future__ import annotations


class CrateError(Exception):
    """Base of the errors that are the user's to fix, printed as one line."""


class ConfigError(CrateError, ValueError):
    """A run config (or a sweep file, or a Slurm job option) that cannot be used; the message names the key."""


class InputError(CrateError, ValueError):
    """A command-line argument or an input file (a model directory, an evaluation file) that cannot be used."""


class MissingInputError(CrateError, FileNotFoundError):
    """An input that does not exist: a config file, a run directory, an exported model."""


class CheckpointError(CrateError):
    """A checkpoint that cannot be used (none intact, or not the run's model)."""


class NonFiniteError(CrateError, RuntimeError):
    """Too many steps in a row skipped for a non-finite loss or gradient."""


class ClusterError(CrateError, RuntimeError):
    """The cluster refused or cannot take a job (``sbatch`` missing or failing)."""


class OutOfMemoryError(CrateError, RuntimeError):
    """The accelerator ran out of memory; the message names the knobs that lower the footprint."""

    KNOBS = (
        "train.micro_batch_size (keep global_batch_size: more accumulation steps)",
        "train.activation_checkpointing: true",
        "zero.stage: 2 or 3",
        "zero.offload_optimizer: true",
        "zero.offload_params: true (ZeRO-3)",
        "data.seq_len",
    )

    @classmethod
    def during(cls, what: str, error: BaseException) -> OutOfMemoryError:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return cls(f"out of memory during {what} ({first[:200]}); lower one of: {'; '.join(cls.KNOBS)}")
