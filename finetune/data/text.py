"""Text: what every reader checks of a record's text, how it names a bad record, and tokenizing in batches straight
from the Rust tokenizer (transformers' per-text conversion of the result costs as much as the tokenizing itself)."""

from __future__ import annotations

import re

SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes (kept as surrogate escapes), or a lone \ud800

Problem = tuple[str, str]  # (kind, message) of a bad record


def rust_tokenizer(tokenizer):
    """The tokenizer's Rust backend, when calling it directly gives what calling `tokenizer` does; else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None or backend.padding or backend.truncation else backend


def encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The token ids of `texts`, as `tokenizer(texts)["input_ids"]` gives them."""
    backend = rust_tokenizer(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    fast = getattr(backend, "encode_batch_fast", backend.encode_batch)  # without offsets (tokenizers >= 0.21)
    return [encoding.ids for encoding in fast(texts, add_special_tokens=add_special_tokens)]


def encode_with_offsets(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of `texts`, no special tokens added (a chat template writes them)."""
    backend = rust_tokenizer(tokenizer)
    if backend is None:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], enc["offset_mapping"]
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings], [e.offsets for e in encodings]
