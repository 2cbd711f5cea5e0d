"""The header reader gives shapes, dtypes and files without reading weights."""

import json

from safetensors import safe_open

from serve.loader import CheckpointIndex, read_header

DTYPE_TAGS = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


def test_header_matches_safe_open(tiny_model_dir):
    path = tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"
    header = read_header(path)
    with safe_open(path, framework="pt") as f:
        assert sorted(header) == sorted(f.keys())
        for name, info in header.items():
            tensor = f.get_tensor(name)
            assert info.shape == tuple(tensor.shape) and info.dtype == DTYPE_TAGS[str(tensor.dtype)]
            assert info.nbytes == tensor.nbytes and info.file == path


def test_index_follows_weight_map(tiny_model_dir):
    folder = tiny_model_dir / "transformer"
    index = CheckpointIndex.from_dir(folder)
    weight_map = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["weight_map"]
    assert {name: info.file.name for name, info in index.tensors.items()} == weight_map
    files = index.by_file()
    assert len(files) == 7 and sum(len(v) for v in files.values()) == len(weight_map)
    for infos in files.values():  # data order, so each file is read front to back
        assert [i.begin for i in infos] == sorted(i.begin for i in infos)
