"""Fixtures for the quantization tests."""

from pathlib import Path

import pytest
import torch

from models.tiny import TinySize, transformer_config

# Hidden 256 (2 heads x 128), ffn 1024: big enough that per-channel scales and biases are the
# small overhead they are on a real model (on the 24-wide tiny one they are 25% of a weight).
MID = TinySize(num_layers=2, num_heads=2, head_dim=128, ffn_dim=1024, text_dim=64, text_layers=2, vae_base_dim=8,
               shard_bytes=2 * 2**20)  # fmt: skip


@pytest.fixture(scope="session")
def mid_transformer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sharded `transformer/` component of MID size (random weights, seed 0). Treat as read-only."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**transformer_config(MID)).eval()
    out = tmp_path_factory.mktemp("mid") / "transformer"
    model.save_pretrained(out, safe_serialization=True, max_shard_size=MID.shard_bytes)
    return out
