"""launcher: the runs — the ``crate`` command line (``cli``) over the training core (``train``), what it reports
(``metrics``), the models it builds (``models``, through the architecture registry in ``architectures``), the run
config (``config``), where runs execute (``cluster``) and how they are read afterwards (``analysis``).

Layering (checked by import-linter, CONTRIBUTING.md): cli > cluster | analysis > train > metrics | models > config >
architectures > errors. Imports ``crate_lm`` and ``data_pipeline``; they never import it.
"""
