"""The first-block cache on diffusers' `WanTransformer3DModel`: its forward loops over
`self.blocks` calling `block(hidden, encoder_hidden_states, timestep_proj, rotary_emb)`, so for
one forward we swap in `cached_blocks` (serve/pipeline/step_cache.py) and call the model as is.
Embeddings, per-token timesteps (TI2V), output norm and unpatchify stay diffusers' own code."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from serve.pipeline.step_cache import StepCache, cached_blocks


@torch.inference_mode()
def cached_forward(
    model: torch.nn.Module,
    hidden_states: torch.Tensor,
    timestep: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    caches: Sequence[StepCache],
    expert: int,
) -> torch.Tensor:
    """`model(hidden_states, timestep, encoder_hidden_states)[0]` with per-request block skipping;
    `caches[r]` belongs to the r-th request (rows as in `request_rows`)."""
    blocks = model.blocks
    model.blocks = cached_blocks(blocks, caches, expert)
    try:
        return model(
            hidden_states=hidden_states,
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
        )[0]
    finally:
        model.blocks = blocks
