"""Every parameter and persistent buffer is assigned exactly once; tied weights count once."""

import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import serve.loader.load as loader
from serve.loader import CheckpointIndex, load_component


@pytest.fixture
def assignments(monkeypatch) -> Counter:
    """Count `assign` calls per slot (its tuple of names) during a load."""
    counts: Counter = Counter()
    real = loader.assign

    def counting(module, slot, tensor):
        counts[slot.names] += 1
        real(module, slot, tensor)

    monkeypatch.setattr(loader, "assign", counting)
    return counts


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_each_slot_assigned_exactly_once(tiny_model_dir, assignments, component):
    module = load_component(tiny_model_dir / component)
    assert set(assignments.values()) == {1}
    assigned = {name for names in assignments for name in names}
    assert assigned == set(module.state_dict())  # every param and persistent buffer, nothing else
    index = CheckpointIndex.from_dir(tiny_model_dir / component)
    assert len(assignments) == len(index.tensors)  # one read per stored tensor


def _text_encoder_with(tiny_model_dir: Path, tmp_path: Path, edit) -> Path:
    folder = Path(shutil.copytree(tiny_model_dir / "text_encoder", tmp_path / "text_encoder"))
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_tied_embedding_saved_under_both_names_fills_once(tiny_model_dir, tmp_path, assignments):
    """transformers 5.23 writes only `shared.weight`; older files may carry both names."""
    stored = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    assert "encoder.embed_tokens.weight" not in stored and "shared.weight" in stored
    folder = _text_encoder_with(
        tiny_model_dir, tmp_path, lambda t: t.update({"encoder.embed_tokens.weight": t["shared.weight"].clone()})
    )
    module = load_component(folder)
    assert assignments[("shared.weight", "encoder.embed_tokens.weight")] == 1
    assert module.encoder.embed_tokens.weight is module.shared.weight
    assert torch.equal(module.shared.weight, stored["shared.weight"])


def test_tied_embedding_saved_under_the_other_name(tiny_model_dir, tmp_path):
    stored = load_file(tiny_model_dir / "text_encoder" / "model.safetensors")
    folder = _text_encoder_with(
        tiny_model_dir, tmp_path, lambda t: t.update({"encoder.embed_tokens.weight": t.pop("shared.weight")})
    )
    module = load_component(folder)
    assert module.encoder.embed_tokens.weight is module.shared.weight
    assert torch.equal(module.shared.weight, stored["shared.weight"])
