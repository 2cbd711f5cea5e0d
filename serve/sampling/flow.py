"""Per-request flow-matching samplers: `timesteps`, then `step(model_output, sample)` once per timestep.

Each request owns its sampler (UniPC keeps a history of model outputs), so requests at different
steps can later share a transformer batch without sharing sampler state.
"""

from __future__ import annotations

from typing import Protocol

import torch

from serve.engine.request import GenerationParams
from serve.sampling.presets import get_preset, shift_sigma

NUM_TRAIN_TIMESTEPS = 1000


class Sampler(Protocol):
    timesteps: torch.Tensor  # one per step, on the 0..1000 scale the transformer is trained on

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor: ...


def flow_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """Wan's shifted flow sigmas, num_steps values then a final 0.

    Same formula as diffusers' UniPC with `use_flow_sigmas` (and the official FlowUniPC):
    uniform sigmas in (0, 1], then sigma' = shift*s / (1 + (shift-1)*s), which spends more
    steps at high noise as the shift grows.
    """
    sigmas = torch.linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, num_steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift_sigma(sigmas, shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


class EulerSampler:
    """First-order flow matching: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v."""

    def __init__(self, sigmas: torch.Tensor) -> None:
        self.sigmas = sigmas
        self.timesteps = sigmas[:-1] * NUM_TRAIN_TIMESTEPS
        self._index = 0

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        dt = self.sigmas[self._index + 1] - self.sigmas[self._index]
        self._index += 1
        # Accumulate in fp32 whatever the transformer's dtype: the update is tiny next to the sample.
        return (sample.float() + dt * model_output.float()).to(sample.dtype)


class UniPCSampler:
    """diffusers' UniPCMultistepScheduler, as the checkpoint configures it, one instance per request.

    We reuse diffusers' implementation rather than rewrite it: it is the reference the Wan repos
    were converted against, so matching it numerically is the point.
    """

    def __init__(self, scheduler_config: dict, num_steps: int) -> None:
        from diffusers import UniPCMultistepScheduler

        self._scheduler = UniPCMultistepScheduler.from_config(scheduler_config)
        self._scheduler.set_timesteps(num_steps)
        self._scheduler.set_begin_index(0)
        self.timesteps = self._scheduler.timesteps
        # Samplers with the same schedule at the same step can step together (`step_all`).
        self.schedule = (repr(sorted(scheduler_config.items())), num_steps)

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[self._scheduler.step_index or 0]
        return self._scheduler.step(model_output, t, sample, return_dict=False)[0]


def step_all(samplers: list[Sampler], outputs: list[torch.Tensor], samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each sampler's step on its own output and sample; UniPC samplers in lockstep (same schedule,
    same step, same history) take theirs as one step over their stacked tensors.

    A UniPC step is some twenty small tensor ops per request; for eight requests of a small
    latent that is most of a step's time next to the batched forward. Every op is elementwise
    across the batch (the coefficients come from the shared sigmas), so each request's result is
    bit-identical to its own step (tests/sampling/test_step_all.py).
    """
    groups: dict[tuple, list[int]] = {}
    for i, sampler in enumerate(samplers):
        key = _lockstep_key(sampler)
        groups.setdefault((i,) if key is None else key, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(samplers)
    for members in groups.values():
        if len(members) == 1:
            i = members[0]
            out[i] = samplers[i].step(outputs[i], samples[i])
            continue
        stepped = _unipc_together(
            [samplers[i] for i in members], [outputs[i] for i in members], [samples[i] for i in members]
        )
        for i, result in zip(members, stepped, strict=True):
            out[i] = result
    return out


def _lockstep_key(sampler: Sampler) -> tuple | None:
    """What must agree for UniPC samplers to step together; None for other samplers."""
    if not isinstance(sampler, UniPCSampler):
        return None
    s = sampler._scheduler
    history = (tuple(m is None for m in s.model_outputs), s.last_sample is None)
    # `this_order` exists only after a scheduler's first step.
    return sampler.schedule, s.step_index, s.lower_order_nums, getattr(s, "this_order", None), history


def _unipc_together(samplers: list[UniPCSampler], outputs: list[torch.Tensor], samples: list[torch.Tensor]):
    """One step of the first sampler's scheduler with every member's history stacked into it, then
    each member's share of the new history handed back (copies: a view would keep the whole
    stack alive for as long as any member still holds it)."""
    schedulers = [s._scheduler for s in samplers]
    lead = schedulers[0]
    sizes = [o.shape[0] for o in outputs]
    lead.model_outputs = [
        None if m is None else torch.cat([s.model_outputs[k] for s in schedulers])
        for k, m in enumerate(lead.model_outputs)
    ]
    if lead.last_sample is not None:
        lead.last_sample = torch.cat([s.last_sample for s in schedulers])
    stepped = samplers[0].step(torch.cat(outputs), torch.cat(samples))
    histories = [[None] * len(sizes) if m is None else _pieces(m, sizes) for m in lead.model_outputs]
    last = _pieces(lead.last_sample, sizes)
    for j, s in enumerate(schedulers):
        s.model_outputs = [h[j] for h in histories]
        s.last_sample = last[j]
        s.timestep_list = list(lead.timestep_list)
        s.this_order, s.lower_order_nums, s._step_index = lead.this_order, lead.lower_order_nums, lead._step_index
    return _pieces(stepped, sizes)


def _pieces(stacked: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [piece.clone() for piece in stacked.split(sizes)]


def explicit_sampler(sigmas: list[float]) -> EulerSampler:
    """Euler over a given sigma list (ending in 0), as distilled few-step models are sampled.

    Distilled models were trained on exactly these timesteps, so we take them as given rather
    than derive them from a step count (diffusers' schedulers cannot reproduce them, see
    reference/wan22-formats.md 5.3).
    """
    if len(sigmas) < 2 or sigmas[-1] != 0 or any(a <= b for a, b in zip(sigmas, sigmas[1:], strict=False)):
        raise ValueError(f"explicit sigmas must decrease strictly and end at 0, got {sigmas}")
    return EulerSampler(torch.tensor(sigmas, dtype=torch.float32))


def make_sampler(name: str, scheduler_config: dict, num_steps: int) -> Sampler:
    """`unipc` follows the checkpoint's scheduler config; `euler` uses the same shifted sigmas."""
    if name == "unipc":
        return UniPCSampler(scheduler_config, num_steps)
    if name == "euler":
        return EulerSampler(flow_sigmas(num_steps, float(scheduler_config.get("flow_shift", 1.0))))
    raise ValueError(f"unknown sampler {name!r}; choose 'unipc' or 'euler'")


def sampler_for(params: GenerationParams, scheduler_config: dict) -> Sampler:
    """The request's own sampler: its preset's explicit schedule, else the named sampler."""
    if params.preset is not None:
        return explicit_sampler(get_preset(params.preset).sigmas())
    return make_sampler(params.sampler, scheduler_config, params.num_inference_steps)
