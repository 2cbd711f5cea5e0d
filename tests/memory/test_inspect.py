"""`reelserve inspect` on header-only fixtures with the real Wan2.2 shapes (no weight bytes on disk)."""

import json
from pathlib import Path

import pytest

from models.inspect import write_header_fixture
from serve.cli import main
from serve.loader.memory_model import GB, component_stats, model_stats


@pytest.fixture(scope="module")
def a14b(tmp_path_factory) -> Path:
    return write_header_fixture(tmp_path_factory.mktemp("hdr") / "a14b", "Wan2.2-T2V-A14B")


def test_a14b_expert_matches_the_published_count(a14b: Path) -> None:
    stats = model_stats(a14b)
    expert = stats.experts[0]
    # wan22-formats.md: a T2V-A14B expert has 14,288,491,584 parameters (exact, from the real index).
    assert expert.params == 14_288_491_584
    assert len(stats.experts) == 2 and len(expert.block_held["bf16"]) == 40
    # bf16 except the fp32 modules Wan keeps (norms, time embedder, scale_shift_table): just over 2 bytes/param.
    assert 28.5 * GB < expert.held["bf16"] < 28.8 * GB
    # fp8: about one byte per block-linear weight; the non-quantized rest stays bf16.
    assert 14.2 * GB < expert.held["fp8"] < 15.5 * GB and expert.held["fp8"] == expert.held["int8"]
    # UMT5-XXL encoder: 5.68 B parameters (wan22-formats.md 1.3).
    assert round(stats.text_encoder.params / 1e9, 2) == 5.68
    # Wan2.1 VAE: 508 MB of fp32 on disk.
    assert round(stats.vae.disk_bytes["F32"] / 1e6) in range(500, 515)


def test_ti2v_5b_transformer(tmp_path: Path) -> None:
    root = write_header_fixture(tmp_path / "5b", "Wan2.2-TI2V-5B")
    expert = component_stats(root / "transformer", "expert")
    assert expert.params == 4_999_787_712  # wan22-formats.md 1.2


def test_fixture_files_are_sparse(a14b: Path) -> None:
    """The fixture must not write 57 GB: the data area is a hole."""
    path = a14b / "transformer" / "diffusion_pytorch_model.safetensors"
    assert path.stat().st_size > 50 * GB
    assert path.stat().st_blocks * 512 < 10**8


def test_inspect_json_and_fits(a14b: Path, capsys) -> None:
    assert main(["inspect", str(a14b), "--json", "--vram", "80GB", "--ram", "256GB"]) == 0
    out = json.loads(capsys.readouterr().out)
    fits = {(p["mode"], p["weights_dtype"]) for p in out["plans"] if p["fits"]}
    assert ("resident", "bf16") in fits
    assert main(["inspect", str(a14b), "--json", "--vram", "24GiB", "--ram", "64GiB"]) == 0
    out = json.loads(capsys.readouterr().out)
    fits = {(p["mode"], p["weights_dtype"]) for p in out["plans"] if p["fits"]}
    assert ("resident", "bf16") not in fits and ("block-offload", "bf16") in fits
    assert out["tokens"] == 21 * 45 * 80  # 81 frames -> 21 latent frames, 720/16 x 1280/16


def test_bad_budget_names_the_flag(a14b: Path, capsys) -> None:
    assert main(["inspect", str(a14b), "--vram", "24XB"]) == 2
    assert "--vram '24XB'" in capsys.readouterr().err


def test_inspect_accounts_for_cfg_mode_and_chunks(a14b: Path, capsys) -> None:
    assert main(["inspect", str(a14b), "--json", "--cfg-mode", "sequential", "--block-chunks", "4"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(p["cfg_mode"], p["block_chunks"]) for p in out["plans"]} == {("sequential", 4)}
    assert list(out["activation_bytes"]) == ["sequential/4"]
    assert main(["inspect", str(a14b), "--json"]) == 0
    activations = json.loads(capsys.readouterr().out)["activation_bytes"]
    assert activations["batched/1"] > activations["batched/4"] > activations["sequential/1"]
    assert activations["sequential/1"] > activations["sequential/4"]
