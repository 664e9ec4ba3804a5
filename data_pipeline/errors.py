"""The data pipeline's own errors. Each message is one complete line naming the field, file or line at fault; the
``crate`` command line prints it as it is and exits 2. Any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class DataError(Exception):
    """Base of the errors caused by the user's data or data config (not by a bug)."""


class DataSpecError(DataError, ValueError):
    """A data config value that cannot be used; the message names the field."""


class BadDataError(DataError, RuntimeError):
    """Too many bad records in a stream (``data.max_bad_fraction``)."""


class MissingDataError(DataError, FileNotFoundError):
    """Data that is not there yet (a built-in corpus not prepared, a file that does not exist)."""


class FetchError(DataError, RuntimeError):
    """Data that could not be fetched from the package registries (the message says which and why)."""


class CorruptFileError(DataError, ValueError):
    """A data file whose format is broken (a bad header, a truncated array)."""
