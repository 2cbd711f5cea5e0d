"""`step_all`: UniPC samplers in lockstep step as one batch, and every request's latents are
bit-identical (torch.equal, no tolerance) to stepping it alone, through requests that join late,
leave early, or use another sampler or step count."""

import torch
from diffusers import UniPCMultistepScheduler

from serve.sampling.flow import UniPCSampler, make_sampler, step_all

CONFIG = dict(UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0).config)
SHAPE = (1, 4, 2, 3, 3)


def velocity(request: int, step: int) -> torch.Tensor:
    """A made-up model output, the same for a request's step whichever way it is stepped."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1000 * request + step))


def run(samplers: dict[int, object], schedule: list[list[int]], together: bool) -> dict[int, torch.Tensor]:
    """Step the requests named in each round of `schedule`; their final latents."""
    latents = {r: torch.randn(SHAPE, generator=torch.Generator().manual_seed(r)) for r in samplers}
    steps = dict.fromkeys(samplers, 0)
    for members in schedule:
        outputs = [velocity(r, steps[r]) for r in members]
        if together:
            stepped = step_all([samplers[r] for r in members], outputs, [latents[r] for r in members])
        else:
            stepped = [samplers[r].step(o, latents[r]) for r, o in zip(members, outputs, strict=True)]
        for r, new in zip(members, stepped, strict=True):
            latents[r], steps[r] = new, steps[r] + 1
    return latents


def samplers() -> dict[int, object]:
    """Requests 0-3 on UniPC with 6 steps, 4 on UniPC with 5, 5 on Euler with 6."""
    out = {r: make_sampler("unipc", CONFIG, 6) for r in range(4)}
    out[4] = make_sampler("unipc", CONFIG, 5)
    out[5] = make_sampler("euler", CONFIG, 6)
    return out


def test_lockstep_and_mixed_batches_equal_stepping_alone():
    # 0 and 1 start together; 2 joins two steps later; 3 runs alone for a step, then joins; 4 and 5
    # share every batch but never a lockstep group; 1 leaves the batch for its last steps.
    schedule = [
        [0, 1, 3, 4, 5],
        [0, 1, 4, 5],
        [0, 1, 2, 3, 4, 5],
        [0, 1, 2, 3, 4, 5],
        [0, 2, 3, 4],
        [0, 2, 3, 5],
        [1, 2],
        [1, 2, 3],
    ]
    together, alone = run(samplers(), schedule, True), run(samplers(), schedule, False)
    for r in together:
        assert torch.equal(together[r], alone[r]), f"request {r}"


def test_a_lockstep_group_takes_one_scheduler_step():
    group = [make_sampler("unipc", CONFIG, 4) for _ in range(3)]
    calls = []
    lead = group[0]._scheduler
    original = lead.step

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    lead.step = counted  # counts calls on the real scheduler; the step itself runs unchanged
    step_all(group, [velocity(r, 0) for r in range(3)], [torch.zeros(SHAPE) for _ in range(3)])
    assert calls == [3]
    assert all(isinstance(s, UniPCSampler) and s._scheduler.step_index == 1 for s in group)
