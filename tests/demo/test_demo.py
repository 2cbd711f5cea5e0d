"""The demo model: its data, its tokenizer, the quality harness (which must be able to fail), the
training script in smoke mode, and the committed checkpoint in reelserve and in diffusers."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from safetensors.torch import load_file

from models.demo import data, quality, train
from models.demo.data import Combo
from serve.worker.model_runner import ModelRunner
from tests.pipeline.test_oracle import ATOL, params, reference_frames

DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "demo" / "checkpoint"
# Every colour x direction once, the shape alternating: balanced, so a model that always draws one
# colour or one direction scores exactly 1/7 and 1/4.
BALANCED_COMBOS = data.balanced_combos()


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The training script in smoke mode, run twice from scratch."""
    tmp = tmp_path_factory.mktemp("demo_smoke")
    return tuple(train.run(train.SMOKE, tmp / name, tmp / f"{name}.work") for name in ("a", "b"))


@pytest.fixture(scope="module")
def demo_pipe() -> WanPipeline:
    pipe = WanPipeline.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------- data and detector


def test_clips_are_deterministic_and_in_range():
    combo = Combo("red", "disc", "up")
    a, mask_a = data.render_clip(combo, torch.Generator().manual_seed(3))
    b, _ = data.render_clip(combo, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape == (3, data.NUM_FRAMES, data.HEIGHT, data.WIDTH)
    assert a.min() >= -1 and a.max() <= 1

    gen = torch.Generator().manual_seed(0)
    for combo in data.all_combos():  # the object is wholly inside the frame in every frame
        mask = data.render_clip(combo, gen)[1]
        edges = torch.cat([mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]], dim=1)
        assert edges.max() == 0, combo


def test_held_out_combinations_are_not_trained_but_their_parts_are():
    trained = {(c.colour, c.shape, c.direction) for c in data.train_combos()}
    assert trained.isdisjoint(data.HELD_OUT)
    for colour, shape, direction in data.HELD_OUT:
        assert any(c[0] == colour for c in trained)
        assert any(c[1] == shape for c in trained)
        assert any(c[2] == direction for c in trained)


def test_detector_reads_every_rendered_clip_right():
    gen = torch.Generator().manual_seed(11)
    for combo in data.all_combos():
        for _ in range(2):
            frames = quality.clip_to_frames(data.render_clip(combo, gen)[0])
            assert quality.detect_colour(frames) == combo.colour, combo
            assert quality.detect_direction(frames) == combo.direction, combo


def test_detector_says_none_without_an_object_or_motion():
    dark = np.full((17, 64, 64, 3), 10, np.uint8)
    assert quality.detect_colour(dark) is None
    assert quality.detect_direction(dark) is None
    still = dark.copy()
    still[:, 20:30, 20:30] = (255, 0, 0)
    assert quality.detect_colour(still) == "red"
    assert quality.detect_direction(still) is None


def test_harness_scores_an_untrained_demo_model_near_chance(smoke_runs):
    """The demo architecture after a few smoke steps (weights still essentially random), with its
    real defaults: colour chance is 1/7 (14%), direction 1/4, far below the trained thresholds."""
    runner = ModelRunner.from_checkpoint(smoke_runs[0])
    score = quality.evaluate(quality.runner_generate(runner), BALANCED_COMBOS, seeds=[0])
    print(quality.format_scores({"untrained": score}))
    assert score.videos == 28
    assert score.colour_accuracy <= 0.35
    assert score.direction_accuracy <= 0.4


# ---------------------------------------------------------------- tokenizer and training script


def test_word_level_tokenizer():
    tok = train.build_tokenizer()
    ids = tok("A Red square moving LEFT").input_ids
    vocab = train.vocabulary()
    assert [vocab[i] for i in ids] == ["a", "red", "square", "moving", "left", "</s>"]
    assert tok("a purple square").input_ids[1] == vocab.index("<unk>")


def test_training_smoke_runs_end_to_end_and_reruns_identically(smoke_runs):
    """Every stage for a few steps; the output is a servable checkpoint, and a second run from
    scratch writes bit-identical weights (fixed seeds, fixed step counts, fixed thread count)."""
    first, second = smoke_runs
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert len(files) >= 8  # text encoder, VAE, two sharded experts
    for rel in files:
        a, b = load_file(first / rel), load_file(second / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    runner = ModelRunner.from_checkpoint(first)
    frames = quality.runner_generate(runner, num_inference_steps=2)("a red disc moving up", 0)
    assert frames.shape == (17, 64, 64, 3)


# ---------------------------------------------------------------- the committed checkpoint


def test_checkpoint_is_small_and_in_the_wan22_layout(demo_pipe):
    total = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert total < 15 * 10**6
    for name in ("transformer", "transformer_2"):
        assert (DEMO_MODEL / name / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert demo_pipe.config.boundary_ratio == train.BOUNDARY_RATIO
    assert demo_pipe.vae.config.dim_mult == [1, 2, 4, 4] and demo_pipe.vae.config.z_dim == 16
    assert demo_pipe.vae.config.temperal_downsample == [False, True, True]  # 8x spatial, 4x temporal


def test_checkpoint_matches_diffusers_wan_pipeline(demo_pipe):
    """reelserve and WanPipeline on the committed checkpoint, both experts used, CFG on."""
    runner = ModelRunner.from_checkpoint(DEMO_MODEL)
    p = params(prompt="a green disc moving right", negative_prompt="", height=64, width=64, num_frames=17)
    ours = runner.decode_float(p)
    theirs = reference_frames(demo_pipe, p)
    assert (ours - theirs).abs().max() <= ATOL


def test_checkpoint_follows_prompts():
    """The issue's thresholds (colour >= 80%, direction >= 90%) with the model's default sampler,
    steps and guidance, over every trained combination with one seed (`bench/demo_quality.py`
    runs two seeds and the held-out combinations)."""
    runner = ModelRunner.from_checkpoint(DEMO_MODEL)
    score = quality.evaluate(quality.runner_generate(runner), data.train_combos(), seeds=[0])
    assert score.videos == 52
    assert score.colour_accuracy >= 0.8, quality.format_scores({"suite": score})
    assert score.direction_accuracy >= 0.9, quality.format_scores({"suite": score})
