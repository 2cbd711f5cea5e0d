"""First-block cache: skip transformer blocks 1..N at a step whose block-0 output barely changed.

Training-free, off by default. At every step block 0 runs; its residual (output minus input) is
compared with the residual at the last step that ran every block,

    diff = mean|r_now - r_prev| / mean|r_prev|,

and when diff < threshold the step reuses that step's residual of blocks 1..N (their output
minus block 0's output) instead of running them. This is diffusers' `FirstBlockCacheConfig`
rule (hooks/first_block_cache.py, after ParaAttention); TeaCache makes the same bet with a
calibrated polynomial on the timestep embedding instead. Comparing against the last *computed*
step, not the previous step, lets drift accumulate so skips cannot chain forever.

We write our own forward instead of using diffusers' hooks because their state is one global
per module; a server needs state per request and per expert (the two Wan2.2 experts see
different inputs), and a batch mixing requests that skip with requests that compute.
`cached_forward` is `WanTransformer3DModel.forward` (diffusers 0.42) line for line, with the
block loop split after block 0; with threshold 0 it never skips and is bit-identical.
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


@torch.inference_mode()
def cached_forward(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    caches: Sequence[StepCache],
    expert: int,
) -> torch.Tensor:
    """`model(hidden_states, timestep, encoder_hidden_states)[0]` with per-request block skipping.

    `caches[r]` belongs to the r-th request of the batch (rows as in `request_rows`). Each request
    decides on its own: blocks 1..N run only on the rows of requests that compute.
    """
    batch_size, _, num_frames, height, width = hidden_states.shape
    p_t, p_h, p_w = model.config.patch_size
    rotary_emb = model.rope(hidden_states)
    hidden = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()
    temb, timestep_proj, text, image = _embed_conditions(model, timestep, encoder_hidden_states)

    first = model.blocks[0](hidden, text, timestep_proj, rotary_emb)
    hidden = _tail_blocks(model, first, first - hidden, text, timestep_proj, rotary_emb, caches, expert)

    # 5. Output norm, projection & unpatchify (unchanged from diffusers).
    if temb.ndim == 3:
        shift, scale = (model.scale_shift_table.unsqueeze(0).to(temb.device) + temb.unsqueeze(2)).chunk(2, dim=2)
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
    shift, scale = shift.to(hidden.device), scale.to(hidden.device)
    hidden = (model.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
    hidden = model.proj_out(hidden)
    hidden = hidden.reshape(batch_size, num_frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
    hidden = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return hidden.flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _embed_conditions(model, timestep, encoder_hidden_states):
    """Condition embedder as diffusers calls it (per-token timesteps for TI2V included)."""
    ts_seq_len = timestep.shape[1] if timestep.ndim == 2 else None
    if ts_seq_len is not None:
        timestep = timestep.flatten()
    temb, timestep_proj, text, image = model.condition_embedder(
        timestep, encoder_hidden_states, None, timestep_seq_len=ts_seq_len
    )
    timestep_proj = timestep_proj.unflatten(2 if ts_seq_len is not None else 1, (6, -1))
    return temb, timestep_proj, text, image


def _tail_blocks(model, first, first_residual, text, timestep_proj, rotary_emb, caches, expert) -> torch.Tensor:
    """Blocks 1..N for the requests that compute, cached residuals for those that skip."""
    rows = request_rows(first.shape[0], len(caches))
    skip = [c.wants_skip(expert, first_residual[r]) for c, r in zip(caches, rows, strict=True)]
    if not any(skip):
        out = _run_blocks(model, first, text, timestep_proj, rotary_emb)  # full batch: exact
    else:
        out = first.clone()
        compute = [r for r, s in zip(rows, skip, strict=True) if not s]
        if compute:
            idx = torch.cat(compute)
            out[idx] = _run_blocks(model, first[idx], text[idx], timestep_proj[idx], rotary_emb)
    for cache, r, skipped in zip(caches, rows, skip, strict=True):
        state = cache.state(expert)
        if skipped:
            out[r] = first[r] + state.tail_residual
            cache.skipped += 1
        else:
            state.first_residual = first_residual[r]
            state.tail_residual = out[r] - first[r]
            cache.computed += 1
    return out


def _run_blocks(model, hidden, text, timestep_proj, rotary_emb) -> torch.Tensor:
    for block in model.blocks[1:]:
        hidden = block(hidden, text, timestep_proj, rotary_emb)
    return hidden
