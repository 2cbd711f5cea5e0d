"""Stage: one denoising step. Picks the expert from the timestep and runs cond+uncond as one batch."""

from __future__ import annotations

import torch

from serve.sampling.guidance import split_cfg


class DenoiseStage:
    def __init__(self, experts: list[torch.nn.Module], boundary_timestep: float | None) -> None:
        """`experts[0]` is the high-noise `transformer`, `experts[1]` (if any) the low-noise `transformer_2`."""
        if boundary_timestep is not None and len(experts) < 2:
            raise ValueError("a boundary timestep needs two experts")
        self.experts = experts
        self.boundary_timestep = boundary_timestep

    def expert_index(self, t: float) -> int:
        """0 while t >= boundary (high noise), then 1 (the reference pipeline's rule, boundary included)."""
        if self.boundary_timestep is None or t >= self.boundary_timestep:
            return 0
        return 1

    @torch.inference_mode()
    def predict(
        self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, guidance: float | None
    ) -> torch.Tensor:
        """The model's velocity for `latents` (B, C, F, H, W) at timestep `t`.

        With guidance, `embeds` holds [cond; uncond] (2B rows) and the latents are duplicated so
        both branches run in one forward pass; without, `embeds` has B rows.
        """
        model = self.experts[self.expert_index(float(t))]
        dtype = next(model.parameters()).dtype
        hidden = latents.to(dtype)
        if guidance is not None:
            hidden = torch.cat([hidden, hidden])
        timestep = t.to(latents.device).expand(hidden.shape[0])
        out = model(hidden_states=hidden, timestep=timestep, encoder_hidden_states=embeds.to(dtype), return_dict=False)
        velocity = out[0].float()
        return velocity if guidance is None else split_cfg(velocity, guidance)
