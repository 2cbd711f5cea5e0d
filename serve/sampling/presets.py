"""Named few-step schedules for distilled Wan models, and how a preset rewrites a request.

No torch here: the API and the scheduler resolve presets too (step counts, CFG on/off and the
batch key all follow from the preset), and they must not import torch.

A preset is a distillation's "denoising step list" on the 0..1000 scale plus the flow shift it
was trained with. The sigmas are the step list divided by 1000 and then shifted,
sigma' = shift*s / (1 + (shift-1)*s), exactly as Wan2.2-Lightning's `EulerScheduler` and
LightX2V's `Wan22StepDistillScheduler` compute them (reference/wan22-formats.md section 5);
the sampler then takes plain Euler flow-matching steps down to sigma 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from serve.engine.request import GenerationParams

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class Preset:
    name: str
    step_list: tuple[float, ...]
    """Unshifted timesteps on the 0..1000 scale, highest first (LightX2V's `denoising_step_list`)."""
    shift: float
    """The flow shift the distilled model was trained with; applied to `step_list / 1000`."""
    description: str
    boundary_step_index: int | None = None
    """Steps before this index run on the high-noise expert. None: the checkpoint's boundary
    timestep decides (Lightning's rule). LightX2V switches by index; for its schedules both agree."""

    def sigmas(self) -> list[float]:
        """Shifted sigmas, one per step, then the final 0 the last Euler step lands on."""
        shifted = [shift_sigma(t / NUM_TRAIN_TIMESTEPS, self.shift) for t in self.step_list]
        return shifted + [0.0]

    def timesteps(self) -> list[float]:
        """What the transformer sees at each step: sigma * 1000."""
        return [s * NUM_TRAIN_TIMESTEPS for s in self.sigmas()[:-1]]

    @property
    def num_steps(self) -> int:
        return len(self.step_list)


def shift_sigma(sigma, shift: float):
    """Wan's flow shift, sigma' = shift*s / (1 + (shift-1)*s), for a float or a tensor of sigmas."""
    return shift * sigma / (1 + (shift - 1) * sigma)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="lightning-4step",
            step_list=(1000.0, 750.0, 500.0, 250.0),
            shift=5.0,
            description="Wan2.2-Lightning T2V/I2V A14B: 4 uniform steps shifted by 5 -> [1000, 937.5, 833.3, 625], "
            "no CFG, 2 steps per expert at boundary 0.875/0.9",
        ),
        Preset(
            name="lightx2v-4step",
            step_list=(1000.0, 750.0, 500.0, 250.0),
            shift=5.0,
            boundary_step_index=2,
            description="LightX2V wan_moe_*_distill configs: denoising_step_list [1000, 750, 500, 250], shift 5, "
            "no CFG, expert switch at step index 2 (same timesteps as lightning-4step)",
        ),
        Preset(
            name="fastwan-3step",
            step_list=(1000.0, 757.0, 522.0),
            shift=8.0,
            description="FastWan2.1-T2V-1.3B (FastVideo dmd_denoising_steps [1000, 757, 522], shift 8), no CFG. "
            "FastVideo re-noises between steps (DMD); this preset takes deterministic Euler steps",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def apply_preset(params: GenerationParams) -> GenerationParams:
    """The request as the preset runs it: its step count, Euler, guidance off.

    Distilled models are trained without CFG (Lightning: "4 steps without the need of CFG"), so a
    preset overrides whatever guidance the client asked for. Idempotent; no preset, no change.
    Resolve at admission so `Request.total_steps` and the batch key see the real step count.
    """
    if params.preset is None:
        return params
    preset = get_preset(params.preset)
    return dataclasses.replace(
        params, num_inference_steps=preset.num_steps, sampler="euler", guidance_scale=1.0, guidance_scale_2=1.0
    )
