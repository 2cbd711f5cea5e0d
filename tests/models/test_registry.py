"""The registry: a checkpoint's model_index.json and configs -> family, variant and spec."""

import json

import pytest

from models.registry import UnsupportedModelError, resolve
from models.tiny import LAYOUTS, write_tiny_checkpoint

EXPECTED = {
    # layout: (variant, experts, image input, latent channels, spatial multiple, boundary)
    "t2v-a14b": ("t2v", 2, "none", 16, 16, 0.875),
    "t2v-wan21": ("t2v", 1, "none", 16, 16, None),
    "i2v-a14b": ("i2v", 2, "required", 16, 16, 0.9),
    "ti2v-5b": ("ti2v", 1, "optional", 48, 32, None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {layout: write_tiny_checkpoint(root / layout, layout=layout) for layout in LAYOUTS}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_resolves_to_its_variant(checkpoints, layout):
    entry = resolve(checkpoints[layout])
    variant, experts, image_input, channels, multiple, boundary = EXPECTED[layout]
    assert (entry.family, entry.variant) == ("wan", variant)
    spec = entry.spec
    assert (len(spec.expert_names), spec.image_input, spec.latent_channels) == (experts, image_input, channels)
    assert (spec.spatial_multiple, spec.boundary_ratio) == (multiple, boundary)
    assert spec.expand_timesteps == (variant == "ti2v")


def test_ti2v_tokens_and_latents_follow_the_16x_vae():
    """TI2V-5B at its default 704x1280, 121 frames: 31 latent frames of 44x80, 27,280 tokens
    (the Wan2.1 formula, 8x VAE, would say 4x as many)."""
    from models.wan.spec import WanSpec

    spec = WanSpec("x", ("transformer",), None, 4, 16, (1, 2, 2), 48, {}, "optional", "ti2v", True)
    assert spec.latent_shape(704, 1280, 121) == (1, 48, 31, 44, 80)
    assert spec.tokens(704, 1280, 121) == 31 * 22 * 40
    values = {"height": 720, "width": 1280, "num_frames": 120}
    assert spec.round_size(values) == ["height=720->704", "num_frames=120->117"]


def _edit_index(checkpoint, **changes):
    path = checkpoint / "model_index.json"
    index = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(index))


def test_an_unknown_pipeline_class_is_named_with_what_is_supported(checkpoints, tmp_path):
    import shutil

    copy = shutil.copytree(checkpoints["t2v-a14b"], tmp_path / "vace")
    _edit_index(copy, _class_name="WanVACEPipeline")
    with pytest.raises(UnsupportedModelError, match=r"pipeline class 'WanVACEPipeline' is not supported.*WanPipeline"):
        resolve(copy)


def test_a_wan21_i2v_checkpoint_with_an_image_encoder_is_refused(checkpoints, tmp_path):
    import shutil

    copy = shutil.copytree(checkpoints["i2v-a14b"], tmp_path / "wan21-i2v")
    config_path = copy / "transformer" / "config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"image_dim": 1280}))
    with pytest.raises(UnsupportedModelError, match="CLIP image encoder, image_dim 1280"):
        resolve(copy)
