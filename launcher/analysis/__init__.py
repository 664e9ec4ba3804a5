"""Reading a run: ``crate compare`` (reports, scaling fits), ``crate whitebox``, ``crate eval``, ``crate generate``.
Reads run directories and exports; the training core never imports it."""
