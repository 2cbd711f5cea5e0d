"""The four tiny layouts: files in the real repos' diffusers layout, deterministic, and loadable and
runnable by diffusers' own pipelines."""

import json
from pathlib import Path

import pytest
import torch

from models.tiny import LAYOUTS, write_tiny_checkpoint
from models.wan.spec import DEFAULTS_FILE
from serve import cli
from tests.models.wan.reference import guarded_prompt_clean, make_condition_image, to_pil

INDEX = "diffusion_pytorch_model.safetensors.index.json"

# layout -> (model_index _class_name, boundary_ratio, expand_timesteps, experts, transformer in/out, VAE z_dim)
EXPECTED = {
    "t2v-a14b": ("WanPipeline", 0.875, False, ("transformer", "transformer_2"), (16, 16), 16),
    "i2v-a14b": ("WanImageToVideoPipeline", 0.9, False, ("transformer", "transformer_2"), (36, 16), 16),
    "ti2v-5b": ("WanPipeline", None, True, ("transformer",), (48, 48), 48),
    "t2v-wan21": ("WanPipeline", None, False, ("transformer",), (16, 16), 16),
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    return {layout: write_tiny_checkpoint(root / layout, layout=layout) for layout in LAYOUTS}


def _pipe(cls_name: str, model_dir: Path):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_layouts_are_the_four_repos():
    assert LAYOUTS == ("t2v-a14b", "i2v-a14b", "ti2v-5b", "t2v-wan21") == tuple(EXPECTED)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_files_are_in_the_diffusers_layout(dirs, layout):
    root = dirs[layout]
    cls_name, boundary, expand, experts, (cin, cout), z_dim = EXPECTED[layout]
    index = _json(root / "model_index.json")
    assert index["_class_name"] == cls_name
    assert index["boundary_ratio"] == boundary and index["expand_timesteps"] is expand
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["transformer_2"] == (["diffusers", "WanTransformer3DModel"] if len(experts) == 2 else [None, None])
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    if cls_name == "WanImageToVideoPipeline":  # as Wan2.2 I2V-A14B: no CLIP image encoder
        assert index["image_encoder"] == [None, None] and index["image_processor"] == [None, None]
    else:
        assert "image_encoder" not in index
    for expert in experts:
        shard_index = _json(root / expert / INDEX)
        shards = set(shard_index["weight_map"].values())
        assert len(shards) >= 2 and all((root / expert / s).is_file() for s in shards)
        config = _json(root / expert / "config.json")
        assert (config["in_channels"], config["out_channels"]) == (cin, cout)
        assert config["image_dim"] is None and config["added_kv_proj_dim"] is None
    assert not (root / "transformer_2").exists() or len(experts) == 2
    assert _json(root / "vae" / "config.json")["z_dim"] == z_dim
    assert (root / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (root / "text_encoder" / "config.json").is_file() and (root / "tokenizer" / "tokenizer.json").is_file()
    sched = _json(root / "scheduler" / "scheduler_config.json")
    assert sched["use_flow_sigmas"] and sched["prediction_type"] == "flow_prediction"
    assert sched["flow_shift"] == (5.0 if layout == "ti2v-5b" else 3.0)


def test_ti2v_vae_is_the_wan22_one(dirs):
    vae = _json(dirs["ti2v-5b"] / "vae" / "config.json")
    assert vae["is_residual"] and vae["patch_size"] == 2
    assert (vae["in_channels"], vae["out_channels"]) == (12, 12)
    assert (vae["scale_factor_spatial"], vae["scale_factor_temporal"]) == (16, 4)
    assert vae["decoder_base_dim"] is not None and vae["decoder_base_dim"] != vae["base_dim"]
    mean, std = torch.tensor(vae["latents_mean"]), torch.tensor(vae["latents_std"])
    assert mean.shape == std.shape == (48,)
    assert (std > 0).all() and std.std() > 0.1 and mean.std() > 0.1 and not torch.allclose(std, torch.ones(48))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_defaults_are_tiny(dirs, layout):
    defaults = _json(dirs[layout] / DEFAULTS_FILE)
    assert (defaults["height"], defaults["width"], defaults["num_frames"], defaults["num_inference_steps"]) == (
        64,
        64,
        9,
        4,
    )
    if layout == "ti2v-5b":  # TI2V-5B's own guidance and fps; 64 is a multiple of 32 (16x VAE, 2x2 patch)
        assert (defaults["guidance_scale"], defaults["fps"]) == (5.0, 24)
    else:
        assert (defaults["guidance_scale"], defaults["guidance_scale_2"], defaults["fps"]) == (4.0, 3.0, 16)


@pytest.mark.parametrize("layout", ["i2v-a14b", "ti2v-5b"])
def test_same_seed_gives_byte_identical_files(tmp_path, dirs, layout):
    assert _files(write_tiny_checkpoint(tmp_path / layout, layout=layout)) == _files(dirs[layout])


def test_default_layouts_are_unchanged(tmp_path, dirs, tiny_model_dir):
    """layout=None keeps the two_experts switch: t2v-a14b (the session checkpoint) and t2v-wan21."""
    assert _files(dirs["t2v-a14b"]) == _files(tiny_model_dir)
    assert _files(write_tiny_checkpoint(tmp_path / "w21", two_experts=False)) == _files(dirs["t2v-wan21"])


def test_other_seed_gives_other_weights(tmp_path, dirs):
    other = write_tiny_checkpoint(tmp_path / "other", seed=1, layout="ti2v-5b")
    for part in ("vae/diffusion_pytorch_model.safetensors", "vae/config.json"):  # latents_mean/std are seeded too
        assert (other / part).read_bytes() != (dirs["ti2v-5b"] / part).read_bytes()


def test_unknown_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown layout 'i2v'.*ti2v-5b"):
        write_tiny_checkpoint(tmp_path / "x", layout="i2v")


def test_diffusers_runs_i2v_a14b(dirs):
    from diffusers import WanImageToVideoPipeline

    pipe = _pipe("WanImageToVideoPipeline", dirs["i2v-a14b"])
    assert isinstance(pipe, WanImageToVideoPipeline) and pipe.config.boundary_ratio == 0.9
    assert pipe.transformer_2 is not None and pipe.image_encoder is None and not pipe.config.expand_timesteps
    with guarded_prompt_clean():  # diffusers' I2V pipeline needs ftfy otherwise (see reference.py)
        out = pipe(
            image=to_pil(make_condition_image(64, 64)),
            prompt="a red square",
            height=64,
            width=64,
            num_frames=5,
            num_inference_steps=2,
            guidance_scale=4.0,
            guidance_scale_2=3.0,
            generator=torch.Generator("cpu").manual_seed(0),
            output_type="pt",
        )
    assert out.frames.shape == (1, 5, 3, 64, 64)


def test_diffusers_runs_ti2v_5b_text_and_image(dirs):
    text = _pipe("WanPipeline", dirs["ti2v-5b"])
    assert text.config.expand_timesteps and text.transformer_2 is None and text.config.boundary_ratio is None
    assert text.vae_scale_factor_spatial == 16 and text.vae_scale_factor_temporal == 4
    kwargs = dict(prompt="a red square", height=64, width=64, num_frames=5, num_inference_steps=2, output_type="pt")
    out = text(generator=torch.Generator("cpu").manual_seed(0), **kwargs)
    assert out.frames.shape == (1, 5, 3, 64, 64)
    image = _pipe("WanImageToVideoPipeline", dirs["ti2v-5b"])
    assert image.config.expand_timesteps and image.transformer_2 is None  # carried over from model_index.json
    with guarded_prompt_clean():
        out = image(
            image=to_pil(make_condition_image(64, 64)), generator=torch.Generator("cpu").manual_seed(0), **kwargs
        )
    assert out.frames.shape == (1, 5, 3, 64, 64)


def test_diffusers_runs_wan21(dirs):
    pipe = _pipe("WanPipeline", dirs["t2v-wan21"])
    assert pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    out = pipe(
        prompt="a red square",
        height=64,
        width=64,
        num_frames=5,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="pt",
    )
    assert out.frames.shape == (1, 5, 3, 64, 64)


def test_cli_layout_flag(tmp_path, dirs, capsys):
    assert cli.main(["tiny", str(tmp_path / "ti2v"), "--layout", "ti2v-5b"]) == 0
    assert _files(tmp_path / "ti2v") == _files(dirs["ti2v-5b"])
    assert cli.main(["tiny", str(tmp_path / "w21"), "--wan21"]) == 0  # the old flag, an alias
    assert _json(tmp_path / "w21" / "model_index.json") == _json(dirs["t2v-wan21"] / "model_index.json")
    assert cli.main(["tiny", str(tmp_path / "bad"), "--wan21", "--layout", "i2v-a14b"]) == 2
    assert "--wan21 means --layout t2v-wan21" in capsys.readouterr().err
    parser_choices = next(
        a.choices
        for a in cli._build_parser()._subparsers._group_actions[0].choices["tiny"]._actions
        if a.dest == "layout"
    )
    assert tuple(parser_choices) == LAYOUTS
