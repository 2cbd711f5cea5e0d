"""Stage: prompts -> UMT5 embeddings, padded with zeros past each prompt's true length (as Wan expects)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager

import torch

from serve.pipeline.prompt_cache import MIB, PromptEmbeddingCache, TextEncodeConfig

# Wan was trained with 512 text tokens; diffusers' WanPipeline.__call__ uses the same default.
MAX_SEQUENCE_LENGTH = 512

TokenIds = tuple[int, ...]


def clean_prompt(text: str) -> str:
    """The same cleaning diffusers applies (ftfy when installed, HTML unescape, whitespace)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


class TextEncodeStage:
    def __init__(
        self,
        tokenizer,
        text_encoder: torch.nn.Module,
        max_length: int = MAX_SEQUENCE_LENGTH,
        cache_bytes: int = int(TextEncodeConfig().prompt_cache_mb * MIB),
    ) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self.cache = PromptEmbeddingCache(cache_bytes)

    def set_cache_budget(self, max_bytes: int) -> None:
        """Start over with an empty cache of this size (the server's `--prompt-cache-mb`)."""
        self.cache = PromptEmbeddingCache(max_bytes)

    @torch.inference_mode()
    def __call__(
        self,
        prompts: list[str],
        encoding: Callable[[], AbstractContextManager] = contextlib.nullcontext,
    ) -> torch.Tensor:
        """(len(prompts), max_length, text_dim) embeddings on the text encoder's device.

        Each distinct prompt is encoded once, over its own tokens only, and kept in the cache; a
        prompt seen before (the default negative prompt of every CFG request) costs no encoder
        pass. `encoding` is entered around the encoder passes only (the residency manager's swap
        of the encoder onto the device), so a batch of cached prompts moves no weights.

        Not padding to 512 is exact: padded positions are masked out of UMT5's attention, so the
        real tokens' outputs do not depend on them, and the result is zero past each prompt's
        length anyway (diffusers encodes all 512 positions: for a 20-token prompt 25x the work;
        tests/pipeline/test_text_encode.py compares). Not padding to the batch's longest prompt
        either makes a prompt's embedding independent of its batch-mates (padding changes the
        reductions' length, hence the last bits), so a cached row equals a fresh encode.
        """
        ids = [self._token_ids(p) for p in prompts]
        rows: dict[TokenIds, torch.Tensor] = {}
        for token_ids in dict.fromkeys(ids):
            hit = self.cache.get(self._key(token_ids))
            if hit is not None:
                rows[token_ids] = hit
        missing = [t for t in dict.fromkeys(ids) if t not in rows]
        if missing:
            with encoding():
                rows.update(self._encode(missing))
        return self._padded([rows[t] for t in ids])

    def _token_ids(self, prompt: str) -> TokenIds:
        tokens = self.tokenizer(
            clean_prompt(prompt), max_length=self.max_length, truncation=True, add_special_tokens=True
        )
        return tuple(tokens.input_ids)

    def _key(self, token_ids: TokenIds) -> Hashable:
        """Token ids, and what else decides the embedding: this encoder (its weights) and dtype,
        and the length prompts are cut to."""
        dtype = next(self.text_encoder.parameters()).dtype
        return id(self.text_encoder), dtype, self.max_length, token_ids

    def _encode(self, distinct: list[TokenIds]) -> dict[TokenIds, torch.Tensor]:
        """One encoder pass per token length: prompts of equal length batch without padding."""
        by_length: dict[int, list[TokenIds]] = {}
        for token_ids in distinct:
            by_length.setdefault(len(token_ids), []).append(token_ids)
        device = next(self.text_encoder.parameters()).device
        out = {}
        for group in by_length.values():
            input_ids = torch.tensor(group, device=device)
            mask = torch.ones_like(input_ids)
            hidden = self.text_encoder(input_ids, mask).last_hidden_state
            for token_ids, row in zip(group, hidden, strict=True):
                row = row.clone()  # its own storage: the cache counts its bytes, not the batch's
                self.cache.put(self._key(token_ids), row)
                out[token_ids] = row
        return out

    def _padded(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Stack (length, dim) rows into (n, max_length, dim), zeros past each row's length (the
        transformer's cross-attention has no mask, so the padding must carry no signal)."""
        out = rows[0].new_zeros(len(rows), self.max_length, rows[0].shape[-1])
        for i, row in enumerate(rows):
            out[i, : row.shape[0]] = row
        return out
