"""Step-level batching changes no request's output: the scheduler and the real runner in one process.

Tolerance: the oracle's (tests/pipeline/test_oracle.py), 2e-5 on frames in [0, 1]. A batched
forward does the same per-row arithmetic; only BLAS blocking may differ, measured ~1e-6.
"""

import dataclasses

import pytest
import torch

from models.tiny import write_tiny_checkpoint
from serve.engine.request import GenerationParams, Request
from serve.engine.scheduler import Scheduler, SchedulerConfig, UnitResult
from serve.worker.model_runner import ModelRunner
from tests.models.wan.reference import make_condition_image
from tests.requests import tokens

ATOL = 2e-5


def params(seed: int, prompt: str, guidance: float = 4.0) -> GenerationParams:
    return GenerationParams(prompt, "blurry", 64, 48, 9, 16, 6, guidance, guidance - 1.0, seed, "unipc")


class InProcessWorker:
    """Executes scheduler units with the runner directly; keeps decoded float frames."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.states, self.frames, self.batches = runner, {}, {}, []

    def run(self, unit, requests) -> UnitResult:
        if unit.kind == "encode":
            states = self.runner.start([requests[rid].params for rid in unit.request_ids])
            self.states.update(zip(unit.request_ids, states, strict=True))
            return UnitResult(unit, experts={rid: self.runner.experts_of(self.states[rid]) for rid in unit.request_ids})
        if unit.kind == "denoise":
            batch = [self.states[rid] for rid in unit.request_ids]
            self.batches.append({rid: self.states[rid].step for rid in unit.request_ids})
            self.runner.denoise_step(batch, unit.expert)
            return UnitResult(unit)
        for rid in unit.request_ids:
            self.frames[rid] = self.runner.final_frames(self.states.pop(rid))
        return UnitResult(unit)


def test_a_request_batched_with_others_at_different_steps_matches_it_alone(tiny_model_dir):
    runner = ModelRunner.from_checkpoint(tiny_model_dir)
    target = params(seed=5, prompt="a red square moving left")
    others = [params(seed=10 + i, prompt=f"a blue disc {i}", guidance=3.0 + i) for i in range(3)]
    run_staggered_and_compare(runner, target, others)


@pytest.mark.parametrize(
    ("layout", "width", "text_only"),
    # TI2V: sizes are multiples of 32 (16x VAE, patch 2); a text-only request shares the image requests' batches
    [("i2v-a14b", 48, ()), ("ti2v-5b", 64, (1,))],
)
def test_image_requests_batched_at_different_steps_match_each_alone(tmp_path, layout, width, text_only):
    runner = ModelRunner.from_checkpoint(write_tiny_checkpoint(tmp_path / layout, layout=layout))
    colours = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40)]
    requests = [
        dataclasses.replace(
            params(seed=5 + i, prompt=f"a disc {i}", guidance=3.0 + i),
            width=width,
            image=None if i in text_only else make_condition_image(width, 64, square_rgb=colour),
        )
        for i, colour in enumerate(colours)
    ]
    run_staggered_and_compare(runner, requests[2], requests[:2] + requests[3:])


def run_staggered_and_compare(runner: ModelRunner, target: GenerationParams, others: list[GenerationParams]) -> None:
    """Requests join the scheduler at different iterations, so batches hold requests at different
    steps; every decoded video must equal the same request run alone."""
    alone = runner.decode_float(target)
    scheduler = Scheduler(SchedulerConfig(max_batch_size=4, expert_policy="fcfs"), 1, tokens)
    worker = InProcessWorker(runner)
    arrivals = {0: others[0], 2: others[1], 3: target, 5: others[2]}  # iteration -> request joining
    ids = {}
    for now in range(200):
        if now in arrivals:
            request = Request(arrivals[now], arrival_time=float(now))
            scheduler.add_request(request)
            ids[request.request_id] = arrivals[now]
        out = scheduler.schedule([0], float(now))
        results = [worker.run(u, scheduler.requests) for u in out.units]
        scheduler.update_from_output(results)
        if now > 5 and not scheduler.requests:
            break
    (target_id,) = [rid for rid, p in ids.items() if p is target]
    shared = [b for b in worker.batches if target_id in b and len(b) > 1]
    # it really was batched, with requests at other steps than its own
    assert shared and any(len(set(b.values())) > 1 for b in shared)
    torch.testing.assert_close(worker.frames[target_id], alone, atol=ATOL, rtol=0)
    for rid, p in ids.items():  # and so is everyone else
        torch.testing.assert_close(worker.frames[rid], runner.decode_float(p), atol=ATOL, rtol=0)


def test_decoding_requests_together_matches_decoding_each_alone(tiny_model_dir):
    runner = ModelRunner.from_checkpoint(tiny_model_dir)
    latents = torch.randn(3, 16, 3, 8, 6, generator=torch.Generator().manual_seed(0))
    together = runner.decode.batch(latents)
    assert together.shape == (3, 9, 64, 48, 3)
    for i in range(3):
        torch.testing.assert_close(together[i], runner.decode(latents[i : i + 1]), atol=ATOL, rtol=0)
