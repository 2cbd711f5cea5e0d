"""`reelserve quantize IN_DIR OUT_DIR --scheme ...`: write a pre-quantized copy of a diffusers-layout checkpoint.

Each quantized expert keeps its layout (same shard file names, an index file when the source had
one); an eligible layer's `weight` becomes int8/fp8 and gains a `weight_scale` (fp32) in the same
shard, and every shard carries the scheme in its safetensors metadata. Everything else (other
components' folders, model_index.json, unquantized tensors) is copied unchanged. The source is
validated against config.json (headers only) before anything is written, and shards are converted
one at a time: peak host memory is one output shard.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.wan.spec import read_spec
from serve.loader.build import build_empty
from serve.loader.config_check import open_component
from serve.loader.errors import CheckpointError
from serve.loader.load import fp32_module_names, plan_load
from serve.quant.loading import SCALE, SCHEME_KEY, SKIP_KEY
from serve.quant.ops import quantize_weight
from serve.quant.schemes import QuantConfig, QuantPolicy
from serve.quant.swap import eligible_linears


def quantize_checkpoint(in_dir: str | Path, out_dir: str | Path, policy: QuantPolicy) -> Path:
    """Copy the checkpoint at `in_dir` to `out_dir`, quantizing the experts `policy` names."""
    src, dst = Path(in_dir), Path(out_dir)
    spec = read_spec(src)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"{dst} exists and is not empty; choose a new output directory")
    dst.mkdir(parents=True, exist_ok=True)
    for item in sorted(src.iterdir()):
        config = policy.for_expert(item.name) if item.name in spec.expert_names else None
        if config is not None:
            quantize_component(item, dst / item.name, config)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name)
        else:
            shutil.copy2(item, dst / item.name)
    return dst


def quantize_component(src: Path, dst: Path, config: QuantConfig) -> int:
    """Quantize one component folder; returns how many layers were quantized."""
    component, model_config, index = open_component(src)  # config vs headers checked before any build
    if any(n.endswith(f".{SCALE}") for n in index.tensors):
        raise CheckpointError(f"{src} is already quantized (it holds *.{SCALE} tensors); start from the float one")
    module = build_empty(component, model_config)
    plan_load(module, index)  # the same header checks as loading: fail before writing anything
    keep_fp32 = fp32_module_names(component, module, torch.bfloat16)
    weights = {f"{name}.weight" for name in eligible_linears(module, config, keep_fp32)}
    dst.mkdir(parents=True)
    for item in src.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".index.json")):
            shutil.copy2(item, dst / item.name)
    metadata = {"format": "pt", SCHEME_KEY: config.scheme, SKIP_KEY: json.dumps(list(config.skip))}
    weight_map: dict[str, str] = {}
    total = 0
    for path, infos in index.by_file().items():
        tensors = _quantized_shard(path, [i.name for i in infos], weights, config)
        save_file(tensors, dst / path.name, metadata=metadata)
        weight_map.update(dict.fromkeys(tensors, path.name))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if index.source.suffix == ".json":
        metadata = {"total_size": total, SCHEME_KEY: config.scheme}
        body = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (dst / index.source.name).write_text(json.dumps(body, indent=2) + "\n")
    return len(weights)


def _quantized_shard(path: Path, names: list[str], weights: set[str], config: QuantConfig) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in names:
            stored = f.get_tensor(name)
            if name in weights:
                q, scale = quantize_weight(stored, config.spec.storage)
                tensors[name], tensors[f"{name.removesuffix('.weight')}.{SCALE}"] = q, scale
            else:
                tensors[name] = stored.clone()  # own the bytes: the file's mapping closes with this block
    return tensors
