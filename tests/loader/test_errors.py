"""Every way a checkpoint directory can be broken gives a CheckpointError naming the file and tensor."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve.loader import CheckpointError, load_component

INDEX = "diffusion_pytorch_model.safetensors.index.json"
VAE_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def transformer_dir(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir / "transformer", tmp_path / "transformer"))


@pytest.fixture
def vae_dir(tiny_model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model_dir / "vae", tmp_path / "vae"))


def read_index(folder: Path) -> dict:
    return json.loads((folder / INDEX).read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / INDEX).write_text(json.dumps(index))


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / read_index(folder)["weight_map"][tensor]


def edit_file(path: Path, edit) -> None:
    """Rewrite a safetensors file with `edit(tensors)` applied (the tiny files fit in memory)."""
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def load_error(folder: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_component(folder)
    return str(info.value)


TENSOR = "blocks.1.ffn.net.0.proj.weight"


def test_tensor_missing_from_its_shard(transformer_dir):
    shard = shard_of(transformer_dir, TENSOR)
    edit_file(shard, lambda t: t.pop(TENSOR))
    message = load_error(transformer_dir)
    assert TENSOR in message and str(shard) in message and INDEX in message and "missing" in message


def test_tensor_missing_from_shard_and_index(transformer_dir):
    shard = shard_of(transformer_dir, TENSOR)
    edit_file(shard, lambda t: t.pop(TENSOR))
    index = read_index(transformer_dir)
    del index["weight_map"][TENSOR]
    write_index(transformer_dir, index)
    message = load_error(transformer_dir)
    assert TENSOR in message and str(transformer_dir / INDEX) in message and "missing" in message


def test_tensor_missing_from_single_file(vae_dir):
    edit_file(vae_dir / VAE_FILE, lambda t: t.pop("decoder.conv_in.bias"))
    message = load_error(vae_dir)
    assert "'decoder.conv_in.bias'" in message and str(vae_dir / VAE_FILE) in message


def test_unexpected_tensor_in_shard(transformer_dir):
    extra = "blocks.0.attn1.to_v2.weight"
    shard = shard_of(transformer_dir, TENSOR)
    edit_file(shard, lambda t: t.update({extra: torch.zeros(3)}))
    index = read_index(transformer_dir)
    index["weight_map"][extra] = shard.name
    write_index(transformer_dir, index)
    message = load_error(transformer_dir)
    assert extra in message and str(shard) in message and "unexpected" in message


def test_unexpected_tensor_in_single_file(vae_dir):
    edit_file(vae_dir / VAE_FILE, lambda t: t.update({"decoder.extra": torch.zeros(2)}))
    message = load_error(vae_dir)
    assert "'decoder.extra'" in message and str(vae_dir / VAE_FILE) in message


def test_keys_the_class_ignores_are_not_unexpected(transformer_dir):
    # WanTransformer3DModel._keys_to_ignore_on_load_unexpected = ["norm_added_q"]
    leftover = "blocks.0.attn2.norm_added_q.weight"
    shard = shard_of(transformer_dir, TENSOR)
    edit_file(shard, lambda t: t.update({leftover: torch.ones(24)}))
    index = read_index(transformer_dir)
    index["weight_map"][leftover] = shard.name
    write_index(transformer_dir, index)
    module = load_component(transformer_dir)
    assert leftover not in module.state_dict()


def test_wrong_shape(transformer_dir):
    shard = shard_of(transformer_dir, TENSOR)
    edit_file(shard, lambda t: t.update({TENSOR: t[TENSOR].T.contiguous()}))
    message = load_error(transformer_dir)
    assert TENSOR in message and str(shard) in message
    assert "[24, 32]" in message and "[32, 24]" in message  # found, expected


def test_shard_file_absent(transformer_dir):
    shard = shard_of(transformer_dir, TENSOR)
    shard.unlink()
    message = load_error(transformer_dir)
    listed = [t for t, s in read_index(transformer_dir)["weight_map"].items() if s == shard.name]
    assert str(shard) in message and any(repr(t) in message for t in listed) and "does not exist" in message


def test_truncated_shard(transformer_dir):
    shard = shard_of(transformer_dir, TENSOR)
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    header.pop("__metadata__", None)
    last = max(header, key=lambda name: header[name]["data_offsets"][1])
    message = load_error(transformer_dir)
    assert "truncated" in message and str(shard) in message and repr(last) in message


@pytest.mark.parametrize("where", ["length", "json"])
def test_corrupt_header(vae_dir, where):
    path = vae_dir / VAE_FILE
    data = bytearray(path.read_bytes())
    start = 0 if where == "length" else 8
    data[start : start + 16] = b"\xff\xfe garbage \x00\x01\x02\x03"
    path.write_bytes(bytes(data))
    message = load_error(vae_dir)
    assert str(path) in message and "not a valid safetensors file" in message and "re-download" in message


def test_tensor_stored_in_two_shards(transformer_dir):
    """The index places TENSOR in one shard; a second copy elsewhere would be filled twice."""
    home = shard_of(transformer_dir, TENSOR)
    other = next(p for p in sorted(transformer_dir.glob("*.safetensors")) if p != home)
    copy = load_file(home)[TENSOR]
    edit_file(other, lambda t: t.update({TENSOR: copy}))
    message = load_error(transformer_dir)
    assert TENSOR in message and str(other) in message and home.name in message


def test_missing_config(transformer_dir):
    (transformer_dir / "config.json").unlink()
    message = load_error(transformer_dir)
    assert str(transformer_dir / "config.json") in message and "component folder" in message


def test_class_not_allowed(transformer_dir):
    config = json.loads((transformer_dir / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (transformer_dir / "config.json").write_text(json.dumps(config))
    message = load_error(transformer_dir)
    assert str(transformer_dir / "config.json") in message and "'UNet2DConditionModel'" in message
    assert "WanTransformer3DModel" in message  # says what is supported


def test_pickle_weights_are_refused_unopened(transformer_dir):
    for path in transformer_dir.glob("diffusion_pytorch_model*"):
        path.unlink()
    # Not even a valid pickle: if anything tried to unpickle it, the error would be different.
    (transformer_dir / "diffusion_pytorch_model.bin").write_bytes(b"not a pickle")
    message = load_error(transformer_dir)
    assert "diffusion_pytorch_model.bin" in message and "safetensors only" in message
