"""One-off converters of the built-in corpora: a corpus's raw cached files → its documents (in source order) and
the counts of rows skipped, by reason. One module per package the corpora come from; ``data_pipeline.builtin``
registers them in its table and writes the shards. What a document is, per corpus: ``data_pipeline.builtin``."""

from __future__ import annotations

from collections import Counter
from typing import Any

Document = dict[str, Any]
Converted = tuple[list[Document], Counter[str]]
