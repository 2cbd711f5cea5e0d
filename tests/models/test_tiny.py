import json
from pathlib import Path

import pytest
from safetensors import safe_open

from models.tiny import write_tiny_checkpoint


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path, tiny_model_dir):
    again = write_tiny_checkpoint(tmp_path / "again")
    assert _files(again) == _files(tiny_model_dir)


def test_other_seed_gives_other_weights(tmp_path, tiny_model_dir):
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    shard = "transformer/diffusion_pytorch_model-00001-of-00007.safetensors"
    assert (other / shard).read_bytes() != (tiny_model_dir / shard).read_bytes()


def test_layout_matches_wan22_a14b(tiny_model_dir):
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["boundary_ratio"] == 0.875
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["transformer_2"] == ["diffusers", "WanTransformer3DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    sched = json.loads((tiny_model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "UniPCMultistepScheduler"
    assert sched["use_flow_sigmas"] and sched["prediction_type"] == "flow_prediction"
    assert (tiny_model_dir / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize("expert", ["transformer", "transformer_2"])
def test_transformers_are_sharded_with_an_index(tiny_model_dir, expert):
    folder = tiny_model_dir / expert
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    assert all((folder / s).is_file() for s in shards)


def test_experts_have_different_weights(tiny_model_dir):
    def first_tensor(expert):
        path = tiny_model_dir / expert / "diffusion_pytorch_model-00001-of-00007.safetensors"
        with safe_open(path, framework="pt") as f:
            key = sorted(f.keys())[0]
            return key, f.get_tensor(key)

    (k1, t1), (k2, t2) = first_tensor("transformer"), first_tensor("transformer_2")
    assert k1 == k2 and not t1.equal(t2)


def test_diffusers_loads_it(tiny_model_dir):
    import torch
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio == 0.875
    assert pipe.tokenizer("a red square").input_ids[-1] == pipe.tokenizer.eos_token_id
