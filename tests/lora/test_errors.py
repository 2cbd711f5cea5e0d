"""Malformed LoRA files fail at load with an error that names the file and the offending key."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from models.wan.lora_keys import to_diffusers_module
from serve.loader import load_component
from serve.lora.fuse import fuse_lora
from serve.lora.weights import LoraError, read_lora
from tests.lora.conftest import lora_tensors


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    return load_component(tiny_model_dir / "transformer", torch.device("cpu"), torch.float32)


def write(tmp_path, tensors, name="bad.safetensors"):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def good(transformer):
    return lora_tensors(transformer, "original", seed=0)


def test_a_good_file_reads(tmp_path, transformer):
    lora = read_lora(write(tmp_path, good(transformer)), transformer, rename=to_diffusers_module)
    assert len(lora.layers) == 10 * len(transformer.blocks)
    assert lora.layers["blocks.0.attn1.to_q"].scaling == 8.0 / 4  # alpha / rank


@pytest.mark.parametrize(
    "key",
    [
        "diffusion_model.blocks.0.self_attn.zz.lora_down.weight",  # no such module
        "diffusion_model.blocks.9.self_attn.q.lora_down.weight",  # more blocks than the model has
        "transformer.blocks.0.attn1.to_q.lora_magnitude_vector",  # DoRA: not a LoRA tensor we apply
    ],
)
def test_unknown_keys_are_named(tmp_path, transformer, key):
    path = write(tmp_path, good(transformer) | {key: torch.zeros(4, 24)})
    with pytest.raises(LoraError, match=rf"{tmp_path}.*{key.replace('.', '[.]')}"):
        read_lora(path, transformer, rename=to_diffusers_module)


def test_rank_mismatch_is_named(tmp_path, transformer):
    tensors = good(transformer)
    key = "diffusion_model.blocks.1.cross_attn.k.lora_up.weight"
    tensors[key] = tensors[key][:, :3]  # rank 3 up against rank 4 down
    with pytest.raises(LoraError, match=r"cross_attn\.k\.lora_up\.weight.*expected \(24, 4\).*rank 4"):
        read_lora(write(tmp_path, tensors), transformer, rename=to_diffusers_module)


def test_wrong_in_features_is_named(tmp_path, transformer):
    tensors = good(transformer)
    key = "diffusion_model.blocks.0.ffn.2.lora_down.weight"
    tensors[key] = torch.zeros(4, 7)
    with pytest.raises(LoraError, match=r"ffn\.2\.lora_down\.weight.*\(4, 7\).*expected \(rank, 32\)"):
        read_lora(write(tmp_path, tensors), transformer, rename=to_diffusers_module)


def test_missing_half_of_a_pair_is_named(tmp_path, transformer):
    tensors = good(transformer)
    del tensors["diffusion_model.blocks.0.self_attn.v.lora_up.weight"]
    with pytest.raises(LoraError, match=r"self_attn\.v\.lora_down\.weight.*no matching lora_up"):
        read_lora(write(tmp_path, tensors), transformer, rename=to_diffusers_module)


def test_lora_on_a_non_linear_is_refused(tmp_path, transformer):
    key = "transformer.patch_embedding.lora_A.weight"
    tensors = {key: torch.zeros(4, 16), "transformer.patch_embedding.lora_B.weight": torch.zeros(24, 4)}
    with pytest.raises(LoraError, match=r"patch_embedding\.lora_A\.weight.*Conv3d; LoRA needs a Linear"):
        read_lora(write(tmp_path, tensors), transformer, rename=to_diffusers_module)


def test_non_safetensors_and_garbage_files_are_refused(tmp_path, transformer):
    pickle = tmp_path / "lora.pt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(LoraError, match=r"lora\.pt: only \.safetensors"):
        read_lora(pickle, transformer, rename=to_diffusers_module)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a header")
    with pytest.raises(LoraError, match=r"garbage\.safetensors: not a readable safetensors file"):
        read_lora(garbage, transformer, rename=to_diffusers_module)


def test_diff_and_diff_b_are_full_deltas(tmp_path, transformer):
    """LightX2V's `.diff` / `.diff_b` keys: weight += scale*diff, bias += scale*diff_b, norms included."""
    model = copy.deepcopy(transformer)
    q, norm = model.blocks[0].attn1.to_q, model.blocks[0].attn1.norm_q
    before = (q.weight.clone(), q.bias.clone(), norm.weight.clone())
    diff, diff_b, norm_diff = torch.randn(24, 24), torch.randn(24), torch.randn(24)
    tensors = {
        "diffusion_model.blocks.0.self_attn.q.diff": diff,
        "diffusion_model.blocks.0.self_attn.q.diff_b": diff_b,
        "diffusion_model.blocks.0.self_attn.norm_q.diff": norm_diff,
    }
    fuse_lora(model, read_lora(write(tmp_path, tensors), model, rename=to_diffusers_module), scale=0.5)
    torch.testing.assert_close(q.weight, before[0] + 0.5 * diff)
    torch.testing.assert_close(q.bias, before[1] + 0.5 * diff_b)
    torch.testing.assert_close(norm.weight, before[2] + 0.5 * norm_diff)
