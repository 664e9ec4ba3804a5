"""data_pipeline: the data a run streams, and nothing of models beyond a tokenizer or an image processor.

Specs (``data_spec``: one pydantic union of the text, image and labelled ``data`` sections, each with its ``kind``)
-> sources and shards (``sources`` for text files / HF datasets, ``image_sources`` for image folders, tars, HF and
Fashion-MNIST) -> one resumable, mixed, sharded stream per rank (``stream``), decoded per kind (``text_stream``:
tokenize and pack into blocks; ``image_stream``: decode and augment) with an exact O(1) cursor; labelled text for
fine-tuning (``labelled``); the built-in corpora (``fetch``: from the package registries; ``builtin`` and
``corpora/``: converted once into JSONL shards); one atomic-write helper (``files``) and the errors (``errors``).
Imports nothing of ``launcher`` (checked by import-linter).
"""
