"""LoRA files come only from the configured directories: no `..`, no symlink out, no other path."""

from __future__ import annotations

import pytest

from serve.lora.paths import LoraPathError, named_lora_files, resolve_lora_path


@pytest.fixture
def dirs(tmp_path):
    inside, outside = tmp_path / "loras", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    (inside / "style.safetensors").write_bytes(b"x")
    (outside / "secret.safetensors").write_bytes(b"x")
    return inside, outside


def test_relative_and_absolute_paths_inside_resolve(dirs):
    inside, _ = dirs
    assert resolve_lora_path("style.safetensors", [inside]) == (inside / "style.safetensors").resolve()
    assert resolve_lora_path(inside / "style.safetensors", [inside]) == (inside / "style.safetensors").resolve()


@pytest.mark.parametrize("path", ["../elsewhere/secret.safetensors", "ABS"])
def test_paths_outside_are_refused(dirs, path):
    inside, outside = dirs
    path = outside / "secret.safetensors" if path == "ABS" else path
    with pytest.raises(LoraPathError, match="outside the LoRA directories.*--lora-dir"):
        resolve_lora_path(path, [inside])


def test_a_symlink_out_of_the_directory_is_refused(dirs):
    inside, outside = dirs
    (inside / "link.safetensors").symlink_to(outside / "secret.safetensors")
    with pytest.raises(LoraPathError, match="outside the LoRA directories"):
        resolve_lora_path("link.safetensors", [inside])


def test_no_directory_configured_and_missing_files_are_clear(dirs):
    inside, _ = dirs
    with pytest.raises(LoraPathError, match="no LoRA directory is configured; add one with --lora-dir"):
        resolve_lora_path("style.safetensors", [])
    with pytest.raises(LoraPathError, match="nope.safetensors not found"):
        resolve_lora_path("nope.safetensors", [inside])
    (inside / "weights.pt").write_bytes(b"x")
    with pytest.raises(LoraPathError, match="not a .safetensors file"):
        resolve_lora_path("weights.pt", [inside])


def test_named_loras_by_layout(dirs):
    inside, _ = dirs
    folder = inside / "lightning"
    folder.mkdir()
    (folder / "high_noise_model.safetensors").write_bytes(b"x")
    (folder / "low_noise_model.safetensors").write_bytes(b"x")
    assert named_lora_files("lightning", [inside], 2) == {
        0: (folder / "high_noise_model.safetensors").resolve(),
        1: (folder / "low_noise_model.safetensors").resolve(),
    }
    # A single file goes to the first (high-noise) transformer only, as diffusers does by default.
    assert named_lora_files("style", [inside], 2) == {0: (inside / "style.safetensors").resolve()}
    with pytest.raises(LoraPathError, match="leaves the LoRA directory"):
        named_lora_files("../elsewhere", [inside], 2)
    with pytest.raises(LoraPathError, match="low-noise file but the model has one transformer"):
        named_lora_files("lightning", [inside], 1)
