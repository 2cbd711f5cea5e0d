"""Quantizing while streaming from disk, device bytes, and pre-quantized checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import serve.quant.loading as quant_loading
from serve.cli import main
from serve.loader import CheckpointError, load_component, read_header
from serve.loader.build import ALLOWED, build_empty
from serve.quant import QuantConfig, QuantLinear, QuantPolicy, held_bytes, quantize_module
from serve.quant.loading import SCHEME_KEY
from serve.quant.swap import eligible_linears, swap_linears
from serve.worker.model_runner import ModelRunner
from tests.requests import make_params

SCHEMES = ("int8-wo", "w8a8-int8", "fp8-wo", "w8a8-fp8")


def quant_layers(module: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in module.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture
def quantize_calls(monkeypatch) -> list[tuple[torch.device, torch.dtype]]:
    """Every weight the loader quantizes: where it was (device) and what it was (dtype)."""
    calls = []
    original = quant_loading.quantize_weight

    def spy(weight, storage):
        calls.append((weight.device, weight.dtype))
        return original(weight, storage)

    monkeypatch.setattr(quant_loading, "quantize_weight", spy)
    return calls


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_on_load_equals_quantizing_the_loaded_float_module(tiny_model_dir, scheme, quantize_calls):
    streamed = load_component(tiny_model_dir / "transformer", quant=QuantConfig(scheme))
    reference = quantize_module(load_component(tiny_model_dir / "transformer"), QuantConfig(scheme))
    layers = quant_layers(streamed)
    assert sorted(layers) == sorted(reference) and len(layers) == 20
    # Each quantized weight was read as float on the host, quantized there, exactly once.
    assert quantize_calls == [(torch.device("cpu"), torch.float32)] * 20
    for name, layer in layers.items():
        assert layer.weight.dtype == layer.scheme.storage and layer.weight_scale.dtype == torch.float32
        assert torch.equal(layer.weight.view(torch.int8), reference[name].weight.view(torch.int8))
        assert torch.equal(layer.weight_scale, reference[name].weight_scale)
    assert not any(type(m) is nn.Linear for n, m in streamed.named_modules() if n.startswith("blocks."))


def test_bf16_load_keeps_quantized_storage(tiny_model_dir):
    model = load_component(tiny_model_dir / "transformer", dtype=torch.bfloat16, quant=QuantConfig("fp8-wo"))
    layer = model.blocks[0].ffn.net[2]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16 and model.proj_out.weight.dtype == torch.bfloat16


def block_bytes(module: nn.Module) -> int:
    return held_bytes(module.blocks)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_blocks_take_at_most_055_of_bf16_bytes(mid_transformer_dir, scheme):
    bf16 = load_component(mid_transformer_dir, dtype=torch.bfloat16)
    quant = load_component(mid_transformer_dir, dtype=torch.bfloat16, quant=QuantConfig(scheme))
    ratio = block_bytes(quant) / block_bytes(bf16)
    # 1 byte per weight instead of 2, plus fp32 scales and bf16 biases (2 x 6 bytes per output
    # channel over 256..1024 inputs) and the blocks' float norms and modulation table: 0.51.
    assert ratio <= 0.55, ratio
    assert ratio >= 0.5  # below half would mean a weight went missing


def test_a14b_transformer_takes_at_most_055_of_bf16_bytes():
    """The whole real-size transformer, counted on meta (shapes and dtypes only, nothing allocated)."""
    config = {
        "_class_name": "WanTransformer3DModel",
        "patch_size": [1, 2, 2],
        "num_attention_heads": 40,
        "attention_head_dim": 128,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 4096,
        "freq_dim": 256,
        "ffn_dim": 13824,
        "num_layers": 40,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 1024,
    }
    model = build_empty(ALLOWED["WanTransformer3DModel"], config)
    bf16 = sum(p.numel() * 2 for p in model.parameters())
    names = eligible_linears(model, QuantConfig("w8a8-int8"), frozenset(model._keep_in_fp32_modules))
    swap_linears(model, names, QuantConfig("w8a8-int8").spec, torch.bfloat16)
    quant = sum(p.numel() * 2 for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    rope = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.startswith("rope."))
    ratio = (quant - rope) / bf16
    assert 0.5 < ratio <= 0.55, ratio  # measured 0.507: the skipped embedders and proj_out are 1.5% of A14B


# ---- pre-quantized checkpoints -------------------------------------------------------------------

PARAMS = make_params(height=48, width=48, seed=7)
POLICY = "high=w8a8-int8,low=fp8-wo"


@pytest.fixture(scope="module")
def prequantized_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prequant") / "wan-q"
    assert main(["quantize", str(tiny_model_dir), str(out), "--scheme", POLICY]) == 0
    return out


def test_written_checkpoint_layout(tiny_model_dir, prequantized_dir):
    for name in ("model_index.json", "vae", "text_encoder", "tokenizer", "scheduler", "transformer/config.json"):
        assert (prequantized_dir / name).exists()
    for expert, tag in (("transformer", "I8"), ("transformer_2", "F8_E4M3")):
        src = sorted(p.name for p in (tiny_model_dir / expert).glob("*.safetensors"))
        assert sorted(p.name for p in (prequantized_dir / expert).glob("*.safetensors")) == src
        index = json.loads((prequantized_dir / expert / "diffusion_pytorch_model.safetensors.index.json").read_text())
        headers = {}
        for shard in set(index["weight_map"].values()):
            headers.update(read_header(prequantized_dir / expert / shard))
            with safe_open(prequantized_dir / expert / shard, framework="pt") as f:
                assert f.metadata()[SCHEME_KEY] == index["metadata"][SCHEME_KEY]
        assert set(headers) == set(index["weight_map"])
        assert headers["blocks.1.ffn.net.0.proj.weight"].dtype == tag
        assert headers["blocks.1.ffn.net.0.proj.weight_scale"].dtype == "F32"
        assert headers["proj_out.weight"].dtype == "F32"  # skipped layers are copied as stored


def test_prequantized_loads_without_float_weights_and_matches_on_the_fly(
    tiny_model_dir, prequantized_dir, quantize_calls
):
    stored = ModelRunner.from_checkpoint(prequantized_dir)
    assert quantize_calls == []  # read as stored: nothing quantized (so nothing read as float) at load
    on_the_fly = ModelRunner.from_checkpoint(tiny_model_dir, quant=QuantPolicy.parse(POLICY))
    for a, b in zip(stored.denoise.experts, on_the_fly.denoise.experts, strict=True):
        assert {n: m.scheme.name for n, m in quant_layers(a).items()} == {
            n: m.scheme.name for n, m in quant_layers(b).items()
        }
    torch.testing.assert_close(stored.decode_float(PARAMS), on_the_fly.decode_float(PARAMS), rtol=0, atol=0)


def copy_component(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_shard(component: Path, tensor: str, change) -> Path:
    """Rewrite the shard holding `tensor` after `change(tensors, metadata)`; returns the shard path."""
    index = json.loads((component / "diffusion_pytorch_model.safetensors.index.json").read_text())
    path = component / index["weight_map"][tensor]
    with safe_open(path, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())  # noqa: SIM118 (not a dict)
    change(tensors, metadata)
    save_file(tensors, path, metadata=metadata)
    return path


def test_missing_scheme_metadata_names_the_file(prequantized_dir, tmp_path):
    comp = copy_component(prequantized_dir / "transformer", tmp_path / "transformer")
    path = rewrite_shard(comp, "blocks.0.attn1.to_q.weight_scale", lambda t, m: m.pop(SCHEME_KEY))
    with pytest.raises(CheckpointError, match=rf"{path}.*holds quantized tensors.*reelserve quantize"):
        load_component(comp)


def test_float_weight_next_to_a_scale_is_refused_before_reading(prequantized_dir, tmp_path):
    comp = copy_component(prequantized_dir / "transformer", tmp_path / "transformer")
    name = "blocks.0.attn1.to_q.weight"

    def to_float(tensors, metadata):
        tensors[name] = tensors[name].float()

    rewrite_shard(comp, name, to_float)
    with pytest.raises(CheckpointError, match=rf"'{name}' in .* is F32, expected I8 for a pre-quantized w8a8-int8"):
        load_component(comp)


def test_int8_weight_without_scale_is_refused(prequantized_dir, tmp_path):
    comp = copy_component(prequantized_dir / "transformer", tmp_path / "transformer")
    name = "blocks.0.attn2.to_k.weight_scale"
    rewrite_shard(comp, name, lambda t, m: t.pop(name))
    index_path = comp / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'blocks.0.attn2.to_k.weight' in .* is stored as I8 but .* no"):
        load_component(comp)


def test_policy_with_other_storage_is_refused_same_storage_is_allowed(prequantized_dir):
    with pytest.raises(CheckpointError, match="pre-quantized as w8a8-int8; --quant asks for fp8-wo"):
        load_component(prequantized_dir / "transformer", quant=QuantConfig("fp8-wo"))
    weight_only = load_component(prequantized_dir / "transformer", quant=QuantConfig("int8-wo"))
    assert {m.scheme.name for m in quant_layers(weight_only).values()} == {"int8-wo"}


def test_quantize_cli_errors(prequantized_dir, tiny_model_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_model_dir), str(tmp_path / "a"), "--scheme", "int3"]) == 2
    assert "unknown quantization scheme 'int3'" in capsys.readouterr().err
    assert main(["quantize", str(prequantized_dir), str(tmp_path / "b"), "--scheme", "w8a8-int8"]) == 2
    assert "is already quantized" in capsys.readouterr().err
