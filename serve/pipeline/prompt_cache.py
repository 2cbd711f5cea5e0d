"""A per-worker LRU of prompt embeddings, keyed by token ids, bounded in bytes.

Every CFG request carries a negative prompt, most of them the same one (the default ""), and
clients resend prompts; encoding each again costs a text-encoder pass (UMT5-XXL: 5.7B parameters)
for an answer already computed. The key is what the encoder actually sees, the tokenizer's ids,
plus the identity of the encoder and the length it pads to, so two spellings that tokenize alike
share an entry and nothing outlives a change of encoder.

Torch-free at module level: `TextEncodeConfig` is part of the config tree the API process imports.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

from pydantic import Field

from serve.frozen import FrozenConfig

MIB = 2**20


class TextEncodeConfig(FrozenConfig):
    """Text encoding in each worker."""

    prompt_cache_mb: float = Field(64.0, ge=0)
    """Memory each worker may keep prompt embeddings in, on the text encoder's device
    (`--prompt-cache-mb`; 0 turns the cache off). Only the real tokens are kept: an 80-token prompt
    of UMT5-XXL in bf16 is 0.6 MiB, so the default holds about a hundred prompts."""


class PromptEmbeddingCache:
    """Least recently used entries go first once the stored tensors exceed `max_bytes`.

    Values are stored as given (the caller hands in a tensor it will not modify) and returned as
    is; a tensor larger than the whole budget is not stored at all.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes={max_bytes} is negative; use 0 to turn the cache off")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> Any | None:
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes -= _nbytes(self._entries.pop(key))
        self._entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()
