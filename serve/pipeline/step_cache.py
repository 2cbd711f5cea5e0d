"""First-block cache: skip transformer blocks 1..N at a step whose block-0 output barely changed.

Training-free, off by default. At every step block 0 runs; its residual (output minus input) is
compared with the residual at the last step that ran every block,

    diff = mean|r_now - r_prev| / mean|r_prev|,

and when diff < threshold the step reuses that step's residual of blocks 1..N (their output
minus block 0's output) instead of running them. This is diffusers' `FirstBlockCacheConfig`
rule (hooks/first_block_cache.py, after ParaAttention); TeaCache makes the same bet with a
calibrated polynomial on the timestep embedding instead. Comparing against the last *computed*
step, not the previous step, lets drift accumulate so skips cannot chain forever.

We do not use diffusers' hooks because their state is one global per module; a server needs
state per request and per expert (the two Wan2.2 experts see different inputs), and a batch
mixing requests that skip with requests that compute. Nor do we copy the transformer's forward:
`cached_blocks` builds a stand-in block list (block 0, then a tail that runs blocks 1..N only
for the requests that compute), and the model family swaps it in for one forward
(models/wan/step_cache.py). With threshold 0 it never skips and is bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class _ExpertState:
    first_residual: torch.Tensor | None = None  # block 0's residual at the last fully computed step
    tail_residual: torch.Tensor | None = None  # blocks 1..N output minus block 0 output, same step


@dataclass
class StepCache:
    """One request's cache: per-expert state plus counters. Create one per request.

    A request moves from the high-noise to the low-noise expert once and never back, so the
    state of an expert it has left is dropped (at 720p it is about 0.8 GB per tensor and row).
    """

    threshold: float
    skipped: int = 0
    computed: int = 0
    _states: dict[int, _ExpertState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.threshold >= 0 and math.isfinite(self.threshold)):
            raise ValueError(f"step cache threshold must be a finite number >= 0, got {self.threshold}")

    def state(self, expert: int) -> _ExpertState:
        for other in [e for e in self._states if e != expert]:
            del self._states[other]
        return self._states.setdefault(expert, _ExpertState())

    def wants_skip(self, expert: int, residual: torch.Tensor) -> bool:
        prev = self.state(expert).first_residual
        if prev is None or prev.shape != residual.shape or self.threshold == 0:
            return False
        diff = (residual.float() - prev.float()).abs().mean() / prev.float().abs().mean()
        return bool(diff < self.threshold)


def request_rows(num_rows: int, num_requests: int) -> list[torch.Tensor]:
    """Rows of each request in a batch laid out [cond r0..rR-1; uncond r0..rR-1] (or cond only)."""
    if num_requests < 1 or num_rows % num_requests:
        raise ValueError(f"a batch of {num_rows} rows cannot hold {num_requests} requests evenly")
    return [torch.arange(r, num_rows, num_requests) for r in range(num_requests)]


class FirstBlock(torch.nn.Module):
    """Runs block 0 and hands its residual (output minus input) to the `CachedTail` after it."""

    def __init__(self, block: torch.nn.Module, tail: CachedTail) -> None:
        super().__init__()
        self.block = block
        object.__setattr__(self, "_tail", tail)  # not a submodule: the tail is its own list entry

    def forward(self, hidden: torch.Tensor, *args):
        out = self.block(hidden, *args)
        self._tail.first_residual = out - hidden
        return out


class CachedTail(torch.nn.Module):
    """Stands in for blocks 1..N of one forward: runs them on the rows of requests that compute,
    and adds the cached residual for requests that skip. Each request decides on its own.

    Block arguments after the hidden states whose first dimension is the batch's rows (text
    embeddings, timestep projections) are sliced with the rows; others (rotary tables) are shared.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], caches: Sequence[StepCache], expert: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        self.caches, self.expert = caches, expert
        self.first_residual: torch.Tensor | None = None

    def forward(self, first: torch.Tensor, *args):
        rows = request_rows(first.shape[0], len(self.caches))
        skip = [c.wants_skip(self.expert, self.first_residual[r]) for c, r in zip(self.caches, rows, strict=True)]
        if not any(skip):
            out = self._run(first, args)  # full batch: exactly the uncached forward
        else:
            out = first.clone()
            compute = [r for r, s in zip(rows, skip, strict=True) if not s]
            if compute:
                idx = torch.cat(compute)
                out[idx] = self._run(first[idx], [_rows(a, idx, first.shape[0]) for a in args])
        for cache, r, skipped in zip(self.caches, rows, skip, strict=True):
            state = cache.state(self.expert)
            if skipped:
                out[r] = first[r] + state.tail_residual
                cache.skipped += 1
            else:
                state.first_residual = self.first_residual[r]
                state.tail_residual = out[r] - first[r]
                cache.computed += 1
        return out

    def _run(self, hidden: torch.Tensor, args) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden, *args)
        return hidden


def _rows(arg, idx: torch.Tensor, num_rows: int):
    return arg[idx] if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == num_rows else arg


def cached_blocks(blocks: Sequence[torch.nn.Module], caches: Sequence[StepCache], expert: int) -> torch.nn.ModuleList:
    """A block list equivalent to `blocks` for one forward, with per-request first-block caching:
    [block 0 (recording its residual), the cached tail]. A model whose forward loops over its
    block list runs unchanged with this list swapped in."""
    tail = CachedTail(list(blocks)[1:], caches, expert)
    return torch.nn.ModuleList([FirstBlock(blocks[0], tail), tail])
