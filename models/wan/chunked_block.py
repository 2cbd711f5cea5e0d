"""Sequence-chunked `WanTransformerBlock`s, running diffusers' own forward: less activation memory.

Everything in the Wan block but the self-attention works token by token (modulation, the fp32
residual adds, cross-attention from each token to the text, the FFN), and those fp32 lines hold the
block's peak (serve/loader/memory_model.py). So the block runs in two passes over token chunks,
each calling the class's own `forward` on a slice:

1. capture: the forward runs up to its self-attention, whose input (norm1 of the chunk, modulated) is
   written into one whole-sequence buffer; the attention call then stops that chunk's forward;
2. the self-attention runs once on the whole buffer (every query sees every key, as unchunked);
3. replay: the forward runs again per chunk, the self-attention answering with its precomputed
   rows; the modulation, residuals, cross-attention and FFN then hold one chunk's worth at a time.

Arithmetic is the unchunked block's; only matmuls over fewer rows may round differently. Module
names, parameters, hooks on the block (residency, LoRA) are untouched: only the block's `forward`
attribute is replaced, and the self-attention's for the duration of one pass.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch


class _AttentionInput(Exception):
    """Stops a capture pass at the self-attention, carrying its input."""

    def __init__(self, hidden_states: torch.Tensor) -> None:
        super().__init__()
        self.hidden_states = hidden_states


def set_block_chunks(transformer: torch.nn.Module, chunks: int) -> None:
    """Run every block of `transformer` in `chunks` sequence chunks (1: diffusers' forward as is)."""
    for block in transformer.blocks:
        block.__dict__.pop("forward", None)  # back to the class's forward
        if chunks > 1:
            block.forward = types.MethodType(_chunked_forward(chunks), block)


def token_spans(tokens: int, chunks: int) -> list[slice]:
    size = -(-tokens // chunks)
    return [slice(start, min(start + size, tokens)) for start in range(0, tokens, size)]


def _chunked_forward(chunks: int):
    def forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb):
        whole = type(block).forward
        spans = token_spans(hidden_states.shape[1], chunks)
        normed = torch.empty_like(hidden_states)
        for span in spans:
            normed[:, span] = _attention_input(block, hidden_states[:, span], encoder_hidden_states, _rows(temb, span))
        attended = block.attn1(normed, None, None, rotary_emb)
        del normed  # the attention's input is not needed past it
        out = torch.empty_like(hidden_states)
        for span in spans:
            with _attention_answers(block.attn1, attended[:, span]):
                chunk = hidden_states[:, span]
                out[:, span] = whole(block, chunk, encoder_hidden_states, _rows(temb, span), rotary_emb)
        return out

    return forward


def _rows(temb: torch.Tensor, span: slice) -> torch.Tensor:
    """Per-token modulation (TI2V: batch, tokens, 6, dim) follows the chunk; per-sample is shared."""
    return temb[:, span] if temb.ndim == 4 else temb


def _attention_input(block, hidden, encoder_hidden_states, temb) -> torch.Tensor:
    def stop(hidden_states, *args, **kwargs):
        raise _AttentionInput(hidden_states)

    with _forward_replaced(block.attn1, stop):
        try:
            type(block).forward(block, hidden, encoder_hidden_states, temb, None)
        except _AttentionInput as captured:
            return captured.hidden_states
    raise RuntimeError("the block's forward never called its self-attention")


@contextlib.contextmanager
def _attention_answers(attention: torch.nn.Module, rows: torch.Tensor) -> Iterator[None]:
    with _forward_replaced(attention, lambda *args, **kwargs: rows):
        yield


@contextlib.contextmanager
def _forward_replaced(module: torch.nn.Module, forward) -> Iterator[None]:
    module.forward = forward
    try:
        yield
    finally:
        del module.forward
