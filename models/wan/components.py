"""A Wan checkpoint's modules, streamed from disk by the loader: tokenizer, UMT5, VAE, experts."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from models.wan.spec import WanSpec
from serve.loader.residency import ResidencyConfig, ResidencyManager
from serve.quant.schemes import QuantPolicy


@dataclass
class WanComponents:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    experts: list[torch.nn.Module]  # [transformer] or [transformer, transformer_2]
    scheduler_config: dict


def load_components(
    spec: WanSpec,
    device: torch.device,
    dtype: torch.dtype,
    quant: QuantPolicy | None = None,
    residency: ResidencyConfig | None = None,
) -> WanComponents:
    from transformers import AutoTokenizer

    from serve.loader import load_component

    opened = check_components(spec)  # each component's config against its headers, once for all
    root = spec.model_dir
    # Offloaded components load on the host: the residency manager moves what the device may hold.
    host = torch.device("cpu")
    expert_device = device if residency is None or residency.mode == "resident" else host
    text_device = device if residency is None or residency.text_encoder == "device" else host
    return WanComponents(
        tokenizer=AutoTokenizer.from_pretrained(root / "tokenizer"),
        text_encoder=load_component(root / "text_encoder", text_device, dtype, opened=opened["text_encoder"]),
        # The VAE stays fp32: diffusers' Wan docs recommend it, bf16 decode visibly degrades frames.
        vae=load_component(root / "vae", device, torch.float32, opened=opened["vae"]),
        # Quantization is per expert (`--quant high=w8a8-int8,low=none`): each expert is quantized
        # while it streams in, so its float weights never sit on the device.
        experts=[
            load_component(
                root / name, expert_device, dtype, quant.for_expert(name) if quant else None, opened=opened[name]
            )
            for name in spec.expert_names
        ],
        scheduler_config=json.loads((root / "scheduler" / "scheduler_config.json").read_text()),
    )


def check_components(spec: WanSpec) -> dict:
    """Every component's config.json against its headers before any module is built: a bad
    transformer_2 config is refused in a second, not after the text encoder and VAE have loaded.
    Returns what the loader needs of each (`load_component(..., opened=)`), so none is checked twice."""
    from serve.loader.config_check import open_components

    names = ("text_encoder", "vae", *spec.expert_names)
    return dict(zip(names, open_components([spec.model_dir / name for name in names]), strict=True))


def install_residency(
    config: ResidencyConfig, spec: WanSpec, components: WanComponents, device: torch.device
) -> ResidencyManager:
    """A manager holding the experts, text encoder and VAE per `config`."""
    manager = ResidencyManager(config, device)
    manager.add_fixed("vae", components.vae)
    manager.add_text_encoder(components.text_encoder)
    for name, module in zip(spec.expert_names, components.experts, strict=True):
        manager.add_expert(name, module, spec.model_dir / name)
    return manager
