"""Server flags that change the model (quantization, LoRA, presets) reach the worker: the served
frames equal the in-process runner built with the same options (lossless MP4, bit-exact)."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from models.wan.spec import read_spec
from serve.config import ServerConfig
from serve.engine.request import GenerationParams
from serve.lora.config import LoraConfig
from serve.lora.options import LoraOptions
from serve.pipeline.mp4 import decode_mp4
from serve.quant.config import QuantizationConfig
from serve.quant.schemes import QuantPolicy
from serve.sampling.config import SamplingConfig
from serve.sampling.presets import apply_preset
from serve.worker.model_runner import ModelRunner
from tests.api.conftest import LiveServer
from tests.lora.conftest import write_lora

BODY = {"prompt": "a red square", "height": 32, "width": 32, "num_frames": 5, "fps": 8, "seed": 3, "lossless": True}


def params(**overrides) -> GenerationParams:
    fields = {k: v for k, v in BODY.items() if k != "lossless"}
    return GenerationParams(
        negative_prompt="",
        num_inference_steps=4,
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        lossless=True,
        **fields | overrides,
    )


def served_frames(server: LiveServer, **extra) -> tuple[np.ndarray, dict]:
    with server.client() as http:
        response = http.post("/generate", json=BODY | extra)
    assert response.status_code == 200, response.text
    return decode_mp4(response.content)[0], response.headers


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, tiny_model_dir) -> Path:
    root = tmp_path_factory.mktemp("loras")
    runner = ModelRunner.from_checkpoint(tiny_model_dir)
    write_lora(root / "style" / "high_noise_model.safetensors", runner.denoise.experts[0], "peft", seed=1)
    write_lora(root / "style" / "low_noise_model.safetensors", runner.denoise.experts[1], "original", seed=2)
    return root


@pytest.fixture(scope="module")
def configured_server(tiny_model_dir, lora_dir):
    config = ServerConfig(
        model_dir=tiny_model_dir,
        quant=QuantizationConfig(policy="high=w8a8-int8,low=none"),
        lora=LoraConfig(dirs=(lora_dir,)),
        sampling=SamplingConfig(step_cache_threshold=0.0),
    )
    with LiveServer_app(config) as server:
        yield server


def LiveServer_app(config: ServerConfig) -> LiveServer:
    from serve.api.app import create_app

    return LiveServer(create_app(config))


def test_quantization_and_a_per_request_lora_reach_the_worker(configured_server, tiny_model_dir, lora_dir):
    quant = QuantPolicy.parse("high=w8a8-int8,low=none", read_spec(tiny_model_dir).expert_names)
    runner = ModelRunner.from_checkpoint(
        tiny_model_dir, quant=quant, lora=LoraOptions(lora_dirs=(lora_dir,), per_request=True), step_cache_threshold=0.0
    )
    plain, _ = served_frames(configured_server)
    np.testing.assert_array_equal(plain, runner.generate(params()).frames)
    with_lora, _ = served_frames(configured_server, loras=[{"name": "style", "scale": 0.8}])
    np.testing.assert_array_equal(with_lora, runner.generate(params(loras=(("style", 0.8),))).frames)
    assert not np.array_equal(plain, with_lora)
    unquantized = ModelRunner.from_checkpoint(tiny_model_dir).generate(params()).frames
    assert not np.array_equal(plain, unquantized)  # the policy really was applied


def test_a_lora_outside_the_directories_is_422(configured_server):
    with configured_server.client() as http:
        response = http.post("/generate", json=BODY | {"loras": [{"name": "../../etc/passwd"}]})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "loras", 0, "name"] and "leaves the LoRA directory" in error["msg"]


def test_preset_overrides_steps_and_guidance_and_says_so(real_server, tiny_model_dir):
    frames, headers = served_frames(real_server, preset="lightning-4step", num_inference_steps=30)
    adjusted = headers["X-Reelserve-Adjusted"]
    assert "num_inference_steps=30->4 (preset lightning-4step)" in adjusted and "guidance_scale=" in adjusted
    expected = ModelRunner.from_checkpoint(tiny_model_dir).generate(apply_preset(params(preset="lightning-4step")))
    np.testing.assert_array_equal(frames, expected.frames)


def test_unknown_preset_and_loras_without_a_directory_are_422(real_server):
    with real_server.client() as http:
        response = http.post("/generate", json=BODY | {"preset": "turbo", "loras": [{"name": "x"}]})
    assert response.status_code == 422
    messages = {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}
    assert "unknown preset 'turbo'" in messages[("body", "preset")]
    assert "--lora-dir" in messages[("body", "loras", 0, "name")]


def test_dtype_is_unchanged_by_options(tiny_model_dir):
    # guard: the comparison runners above load fp32 like the server's default
    assert ModelRunner.from_checkpoint(tiny_model_dir).denoise.experts[0].proj_out.weight.dtype == torch.float32


def test_step_cache_steps_are_counted_in_metrics(configured_server):
    served_frames(configured_server)  # 4 steps, threshold 0: every step computed, none skipped
    with configured_server.client() as http:
        text = http.get("/metrics").text
    computed = re.search(r'^reelserve:step_cache_steps_total\{.*outcome="computed"\} (\S+)$', text, re.MULTILINE)
    skipped = re.search(r'^reelserve:step_cache_steps_total\{.*outcome="skipped"\} (\S+)$', text, re.MULTILINE)
    assert float(computed[1]) >= 4 and float(skipped[1]) == 0
