"""First-block cache: exact when it never skips, and skips where the residual barely moves."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from models.wan.step_cache import cached_forward
from serve.engine.request import GenerationParams
from serve.loader import load_component
from serve.pipeline.step_cache import StepCache
from serve.worker.model_runner import ModelRunner
from tests.requests import make_params

params = partial(make_params, num_inference_steps=6, seed=5)


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner.from_checkpoint(tiny_model_dir)


def run(runner: ModelRunner, p: GenerationParams, threshold: float | None, cfg_mode: str | None = None):
    """(uint8 output with counters, float frames) with the runner's cache threshold set to `threshold`
    (and, given `cfg_mode`, that CFG layout: on a CPU the runner's default without the cache is
    sequential, and the cache's is batched)."""
    runner.step_cache_threshold = threshold
    if cfg_mode is not None:
        runner.denoise.set_activation_plan(cfg_mode, 1)
    try:
        return runner.generate(p), runner.decode_float(p)
    finally:
        runner.step_cache_threshold = None


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    return load_component(tiny_model_dir / "transformer", torch.device("cpu"), torch.float32)


def inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, 16, 2, 4, 4, generator=g)
    return hidden, torch.full((batch,), 900.0), torch.randn(batch, 8, 32, generator=g)


@torch.inference_mode()
def reference(model, hidden, t, text):
    return model(hidden_states=hidden, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def test_threshold_zero_is_bit_identical_to_the_model_forward(transformer):
    hidden, t, text = inputs(2)
    cache = StepCache(0.0)
    for _ in range(3):  # later calls have a previous residual to compare with; still no skip
        assert torch.equal(
            cached_forward(transformer, hidden, t, text, [cache], 0), reference(transformer, hidden, t, text)
        )
    assert (cache.skipped, cache.computed) == (0, 3)


@pytest.mark.parametrize("cfg", [False, True])
def test_threshold_zero_end_to_end_equals_uncached(runner, cfg):
    p = params() if cfg else params(preset="lightning-4step")
    out, frames = run(runner, p, 0.0)
    assert out.counters == {"step_cache_skipped": 0, "step_cache_computed": 6 if cfg else 4}
    assert torch.equal(frames, run(runner, p, None, cfg_mode="batched")[1])


def test_a_huge_threshold_skips_all_but_the_first_step_of_each_expert(runner):
    out, frames = run(runner, params(preset="lightning-4step"), 1e9)
    # 2 steps per expert; per-expert state means each expert's first step has nothing to reuse.
    assert out.counters == {"step_cache_skipped": 2, "step_cache_computed": 2}
    plain_out, plain = run(runner, params(preset="lightning-4step"), None)
    assert plain_out.counters == {}
    assert (frames - plain).abs().max() > 1e-3  # skipping does change the output


def test_a_skipped_step_reuses_the_cached_tail_residual(transformer):
    hidden, t, text = inputs(1)
    cache = StepCache(1e9)
    first = cached_forward(transformer, hidden, t, text, [cache], 0)
    # Same input again: block 0's residual is unchanged, so the step is skipped and, since the
    # tail residual was computed on this very input, the result is the full forward's.
    again = cached_forward(transformer, hidden, t, text, [cache], 0)
    assert (cache.skipped, cache.computed) == (1, 1)
    torch.testing.assert_close(again, first, atol=1e-6, rtol=0)


def test_requests_in_one_batch_decide_separately(transformer):
    """Request 0 has a primed cache and skips; request 1 is fresh and computes, on its rows only."""
    hidden, t, text = inputs(4, seed=1)
    primed, fresh = StepCache(1e9), StepCache(1e9)
    # With CFG each request owns two rows: [cond_0, cond_1, uncond_0, uncond_1].
    rows0 = torch.tensor([0, 2])
    cached_forward(transformer, hidden[rows0], t[rows0], text[rows0], [primed], 0)
    out = cached_forward(transformer, hidden, t, text, [primed, fresh], 0)
    assert (primed.skipped, fresh.skipped, fresh.computed) == (1, 0, 1)
    full = reference(transformer, hidden, t, text)
    torch.testing.assert_close(out[[1, 3]], full[[1, 3]], atol=1e-6, rtol=0)  # computed rows: the real forward
    torch.testing.assert_close(out[rows0], full[rows0], atol=1e-6, rtol=0)  # same input: reuse is exact


def test_switching_expert_drops_the_old_experts_state():
    cache = StepCache(0.1)
    cache.state(0).first_residual = torch.ones(1)
    cache.state(1)
    assert list(cache._states) == [1]


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_thresholds_are_refused(bad):
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        StepCache(bad)
