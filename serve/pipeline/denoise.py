"""Stage: one denoising step. Picks the expert from the timestep and runs cond+uncond as one batch
(`cfg_mode` "batched"), or as two passes of half the rows each ("sequential": half the activation
memory, for cards where the batched pass does not fit; the planner picks it, serve/loader/planner.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from serve.lora.runtime import LoraRegistry, LoraSet, apply_loras
from serve.pipeline.step_cache import StepCache
from serve.sampling.guidance import split_cfg

# (model, hidden, timesteps, embeds, per-request caches, expert) -> velocity: the model family's
# way of running its transformer with the first-block cache (models/wan/step_cache.py for Wan).
CachedForward = Callable[
    [torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Sequence[StepCache], int], torch.Tensor
]
# (model, chunks) -> None: the family's way of running its blocks in sequence chunks
# (models/wan/chunked_block.py for Wan).
BlockChunker = Callable[[torch.nn.Module, int], None]


class DenoiseStage:
    def __init__(
        self,
        experts: list[torch.nn.Module],
        boundary_timestep: float | None,
        cached_forward: CachedForward | None = None,
        block_chunker: BlockChunker | None = None,
    ) -> None:
        """`experts[0]` is the high-noise `transformer`, `experts[1]` (if any) the low-noise `transformer_2`.
        `cached_forward`: how the family runs a forward with the first-block cache (None: no cache).
        `block_chunker`: how the family runs its blocks in sequence chunks (None: it cannot)."""
        if boundary_timestep is not None and len(experts) < 2:
            raise ValueError("a boundary timestep needs two experts")
        self.experts = experts
        self.boundary_timestep = boundary_timestep
        self.cached_forward = cached_forward
        self.block_chunker = block_chunker
        self.lora_registry: LoraRegistry | None = None  # set by the runner when per-request LoRAs are allowed
        self.cfg_mode = "batched"  # set by the worker from the memory plan
        # A worker group's CFG split (serve/worker/group.py `CfgSplit.local_rows`): of a forward of
        # n rows, the slice this rank runs (None: all). The LoRA hooks see only those rows.
        self.local_rows: Callable[[int], slice | None] | None = None

    def set_activation_plan(self, cfg_mode: str, block_chunks: int) -> None:
        """How the memory plan runs CFG ("batched" or "sequential") and how many sequence chunks each
        transformer block's token-wise work takes (1: whole)."""
        if block_chunks > 1 and self.block_chunker is None:
            raise ValueError("this model cannot run its blocks in sequence chunks; use --block-chunks 1")
        self.cfg_mode = cfg_mode
        if self.block_chunker is not None:
            for expert in self.experts:
                self.block_chunker(expert, block_chunks)

    def forwards_per_step(self, guidance: bool) -> int:
        """Transformer forward passes a step makes: two with sequential CFG, else one."""
        return 2 if guidance and self.cfg_mode == "sequential" else 1

    def expert_index(self, t: float) -> int:
        """0 while t >= boundary (high noise), then 1 (the reference pipeline's rule, boundary included)."""
        if self.boundary_timestep is None or t >= self.boundary_timestep:
            return 0
        return 1

    @torch.inference_mode()
    def predict(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        guidance: list[float] | None,
        expert: int | None = None,
        *,
        step_caches: Sequence[StepCache] | None = None,
        loras: Sequence[LoraSet] = (),
    ) -> torch.Tensor:
        """Velocity for a batch of `n` transformer inputs (n, C, F, H, W), each at its own timestep:
        (n,), or (n, tokens) for per-token timesteps.

        With guidance (one scale per sample), `embeds` holds [cond_1..cond_n; uncond_1..uncond_n]
        (2n rows) and the latents run twice in the same forward pass; without, `embeds` has n rows.
        `expert` defaults to the first sample's timestep; a batch never mixes experts.
        `step_caches` and `loras` hold one entry per sample (its first-block cache, its LoRA set).
        """
        index = self.expert_index(float(timesteps[0])) if expert is None else expert
        model = self.experts[index]
        # diffusers' `ModelMixin.dtype`: the first floating parameter outside `_keep_in_fp32_modules`. The first
        # parameter of a Wan transformer is `scale_shift_table`, kept fp32, so a bf16 model got fp32 inputs
        # and its patch embedding refused them (found by bench/gpu_check.py --cpu).
        dtype = model.dtype
        hidden, t = latents.to(dtype), timesteps.to(latents.device)
        embeds = embeds.to(dtype)
        if guidance is not None and self.cfg_mode == "sequential":
            velocity = self._sequential_cfg(model, index, hidden, t, embeds, step_caches, loras)
        else:
            if guidance is not None:
                hidden, t = torch.cat([hidden, hidden]), torch.cat([t, t])
            with apply_loras(model, self._row_loras(index, loras, hidden.shape[0])):
                velocity = self._forward(model, index, hidden, t, embeds, step_caches).float()
        if guidance is None:
            return velocity
        scales = torch.tensor(guidance, dtype=velocity.dtype, device=velocity.device)
        return split_cfg(velocity, scales.view(-1, *([1] * (velocity.dim() - 1))))

    def _sequential_cfg(self, model, expert: int, hidden, t, embeds, step_caches, loras) -> torch.Tensor:
        """[cond; uncond] velocities from two passes of n rows each instead of one of 2n rows."""
        if step_caches is not None:
            # the first-block cache decides per request from its cond and uncond rows together
            raise ValueError("sequential CFG does not combine with the step cache; use --cfg-mode batched")
        row_loras = self._row_loras(expert, loras, hidden.shape[0])  # the same n rows in both passes
        halves = []
        for rows in embeds.chunk(2):
            with apply_loras(model, row_loras):
                halves.append(self._forward(model, expert, hidden, t, rows, None).float())
        return torch.cat(halves)

    def _forward(self, model, expert: int, hidden, t, embeds, step_caches: Sequence[StepCache] | None):
        if step_caches is None:
            return model(hidden_states=hidden, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
        if self.cached_forward is None:
            raise ValueError("this model has no first-block cache")
        return self.cached_forward(model, hidden, t, embeds, step_caches, expert)

    def _row_loras(self, expert: int, loras: Sequence[LoraSet], num_rows: int) -> list:
        """Each row's (LoRA, scale) list; rows are [cond_1..cond_n; uncond_1..uncond_n]."""
        if not any(loras):
            return []
        if self.lora_registry is None:
            raise ValueError("this server applies no per-request LoRAs; start it with --lora-dir")
        per_sample = [self.lora_registry.for_expert(s, expert) for s in loras]
        rows = [per_sample[row % len(per_sample)] for row in range(num_rows)]
        mine = self.local_rows(num_rows) if self.local_rows is not None else None
        return rows if mine is None else rows[mine]
