"""What every reader checks of a record's text, and how it names a bad record."""

from __future__ import annotations

import re

SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (kept as surrogate escapes), or a lone \ud800

Problem = tuple[str, str]  # (kind, message) of a bad record
