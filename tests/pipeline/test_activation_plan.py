"""Sequential CFG and sequence-chunked blocks (the memory plan's ways to hold fewer activations)
give diffusers' WanPipeline frames on the tiny checkpoint.

Tolerance: fp32 on CPU, ATOL = 2e-5 as in test_oracle.py (10x the measured float-rounding gap of the
batched path, 1/20 of an 8-bit level): running cond and uncond apart, or a block's token-wise work
over fewer rows at a time, changes only the order of float operations.
"""

import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel

from models.inspect import write_header_fixture
from models.wan.chunked_block import set_block_chunks
from serve.loader.config import MemoryConfig
from serve.pipeline.denoise import DenoiseStage
from serve.worker.factory import RunnerConfig, load_model_runner, plan_memory
from serve.worker.model_runner import ModelRunner
from tests.pipeline.test_oracle import ATOL, params, reference_frames

PLANS = [("sequential", 1), ("batched", 3), ("sequential", 3)]


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner.from_checkpoint(tiny_model_dir)


@pytest.fixture(scope="module")
def oracle(tiny_model_dir) -> torch.Tensor:
    pipe = WanPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return reference_frames(pipe, params())


def _calls(module: torch.nn.Module, counter: list[int]):
    return module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))


@pytest.mark.parametrize(("cfg_mode", "chunks"), PLANS)
def test_plan_matches_diffusers(runner, oracle, cfg_mode, chunks) -> None:
    expert = runner.denoise.experts[0]
    forwards, ffn_calls = [0], [0]
    handles = [_calls(expert, forwards), _calls(expert.blocks[0].ffn, ffn_calls)]
    runner.denoise.set_activation_plan(cfg_mode, chunks)
    try:
        frames = runner.decode_float(params())
    finally:
        runner.denoise.set_activation_plan("batched", 1)
        for h in handles:
            h.remove()
    torch.testing.assert_close(frames, oracle, atol=ATOL, rtol=0)
    # The plan really ran: 2 high-noise steps, one forward each batched, two sequential; the first
    # block's FFN once per chunk of each forward.
    assert forwards[0] == 2 * (2 if cfg_mode == "sequential" else 1)
    assert ffn_calls[0] == forwards[0] * chunks


def test_batched_whole_blocks_are_back_after_a_plan(runner, oracle) -> None:
    runner.denoise.set_activation_plan("sequential", 3)
    runner.denoise.set_activation_plan("batched", 1)
    assert all("forward" not in vars(b) for e in runner.denoise.experts for b in e.blocks)
    torch.testing.assert_close(runner.decode_float(params()), oracle, atol=ATOL, rtol=0)


def test_sequential_cfg_refuses_the_step_cache(tmp_path) -> None:
    """The first-block cache decides per request from its cond and uncond rows together."""
    a14b, size = str(write_header_fixture(tmp_path / "a14b", "Wan2.2-T2V-A14B")), (720, 1280, 81)
    with pytest.raises(ValueError, match="--cfg-mode sequential does not combine with the step cache"):
        plan_memory(a14b, "cpu", MemoryConfig(cfg_mode="sequential"), size, step_cache=True)
    # 720p A14B in 12 GiB with bf16 weights fits only with CFG sequential (README table) ...
    short = MemoryConfig(vram="12GiB", ram="64GiB")
    residency, cfg_mode, *_ = plan_memory(a14b, "cuda:0", short, size)
    assert (residency.mode, cfg_mode) == ("block-offload", "sequential")
    # ... so with the step cache the planner finds nothing rather than run CFG sequential.
    with pytest.raises(ValueError, match="no memory mode fits"):
        plan_memory(a14b, "cuda:0", short, size, step_cache=True)


def test_a_model_without_a_chunker_refuses_chunks() -> None:
    stage = DenoiseStage([torch.nn.Linear(2, 2)], None)
    with pytest.raises(ValueError, match="--block-chunks 1"):
        stage.set_activation_plan("batched", 4)
    stage.set_activation_plan("sequential", 1)
    assert stage.cfg_mode == "sequential"


def test_the_worker_factory_applies_the_flags(tiny_model_dir) -> None:
    options = RunnerConfig(memory=MemoryConfig(cfg_mode="sequential", block_chunks=2))
    runner = load_model_runner(str(tiny_model_dir), "cpu", "float32", options)
    assert runner.denoise.cfg_mode == "sequential"
    assert all("forward" in vars(b) for e in runner.denoise.experts for b in e.blocks)


def test_chunked_blocks_follow_per_token_timesteps() -> None:
    """TI2V's per-token timesteps give each token its own modulation (temb: batch, tokens, 6, dim):
    each chunk must get its own tokens' rows. fp32: equal to the whole block within rounding."""
    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=16, ffn_dim=48, num_layers=2, cross_attn_norm=True,
    ).eval()  # fmt: skip
    latents = torch.randn(2, 4, 3, 8, 6)  # 3 * 4 * 3 = 36 tokens
    timesteps = torch.rand(2, 36) * 1000  # a different timestep per token, as TI2V's first frame has
    inputs = dict(hidden_states=latents, timestep=timesteps, encoder_hidden_states=torch.randn(2, 512, 8))
    with torch.inference_mode():
        whole = model(**inputs, return_dict=False)[0]
        set_block_chunks(model, 5)  # 36 tokens: chunks of 8, the last of 4
        chunked = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)
