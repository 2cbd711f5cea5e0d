"""The image-to-video demo model (models/demo/i2v_train.py, models/demo/i2v_checkpoint): how its
experts start from the T2V demo, its conditioning encode, the training script in smoke mode, the
committed checkpoint in reelserve and in diffusers' WanImageToVideoPipeline, and its behaviour:
the image fixes colour, shape and start position, the prompt ("moving left") the direction.
The behaviour thresholds can fail: the same harness scores a barely trained model low."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from safetensors.torch import load_file

from models.demo import i2v_train, quality
from models.demo.data import DIRECTIONS, Combo, balanced_combos, render_clip
from serve.worker.model_runner import ModelRunner
from tests.models.wan.reference import ATOL, i2v_a14b_frames
from tests.requests import make_params

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"
I2V_MODEL = DEMO / "i2v_checkpoint"
T2V_MODEL = DEMO / "checkpoint"
# For each direction the 7 images share the prompt and the seed: only the image tells their colours apart.
BALANCED = balanced_combos()


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> tuple[Path, Path]:
    """The training script in smoke mode (every stage, a few steps), run twice from scratch."""
    tmp = tmp_path_factory.mktemp("demo_i2v_smoke")
    return tuple(i2v_train.run(i2v_train.SMOKE, tmp / n, tmp / f"{n}.work") for n in ("a", "b"))


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.from_checkpoint(I2V_MODEL)


@pytest.fixture(scope="module")
def balanced_cases() -> list[quality.I2VCase]:
    return quality.i2v_cases(BALANCED, seeds=[0])


# ---------------------------------------------------------------- how training starts and what it sees


def test_widened_expert_is_the_t2v_expert_whatever_the_condition():
    """Every T2V weight copied, the 20 new input channels zero: training starts from the T2V model."""
    t2v = i2v_train.load_t2v_expert(T2V_MODEL, "transformer_2")
    i2v = i2v_train.widen_from_t2v(t2v)
    assert i2v.config.in_channels == 36 and i2v.config.out_channels == 16
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 16, 5, 8, 8, generator=gen), torch.randn(1, 20, 5, 8, 8, generator=gen)
    text, t = torch.randn(1, 512, 32, generator=gen), torch.tensor([500.0])
    with torch.no_grad():
        ours = i2v(hidden_states=torch.cat([x, cond], 1), timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        theirs = t2v(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_compact_text_attention_is_the_512_position_prompt():
    """Training attends to 4 prompt positions, the last standing for all the padding (CompactText):
    the same outputs as the full zero-padded 512 positions sampling uses."""
    from models.demo.train import encode_prompts

    model = i2v_train.widen_from_t2v(i2v_train.load_t2v_expert(T2V_MODEL, "transformer_2"))
    tokenizer, encoder = i2v_train.load_text(T2V_MODEL)
    text = encode_prompts(tokenizer, encoder, ["moving left", "", "moving up"])
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 36, 5, 8, 8, generator=gen), torch.tensor([990.0, 500.0, 20.0])
    compact = i2v_train.CompactText(i2v_train.COMPACT_LENGTH)
    with torch.no_grad():
        full = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
        compact.install(model)
        ours = model(hidden_states=x, timestep=t, encoder_hidden_states=compact.cut(text), return_dict=False)[0]
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=0)  # outputs up to ~7
    with pytest.raises(ValueError, match="longer"):
        compact.cut(encode_prompts(tokenizer, encoder, ["a red square moving left"]))


def test_captions_name_only_the_direction_in_the_demo_vocabulary():
    from models.demo.train import vocabulary

    for direction in DIRECTIONS:
        assert all(word in vocabulary() for word in i2v_train.direction_prompt(direction).split())


def test_shape_detector_reads_rendered_clips_and_centroid_is_the_object():
    gen = torch.Generator().manual_seed(5)
    for combo in BALANCED:
        frames = quality.clip_to_frames(render_clip(combo, gen)[0])
        assert quality.detect_shape(frames) == combo.shape, combo
    frame = np.full((64, 64, 3), 10, np.uint8)
    frame[10:20, 30:40] = (255, 0, 0)
    assert quality.object_centroid(frame) == (34.5, 14.5)


# ---------------------------------------------------------------- training script


def test_training_smoke_runs_end_to_end_and_reruns_identically(smoke_runs):
    """Every stage for a few steps, twice from scratch: bit-identical weights. (The latents stage
    also checks its batched condition encode against `encode_condition`, the inference path.)"""
    first, second = smoke_runs
    files = sorted(p.relative_to(first) for p in first.rglob("*.safetensors"))
    assert len(files) >= 8  # text encoder, VAE, two sharded experts
    for rel in files:
        a, b = load_file(first / rel), load_file(second / rel)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), rel
    for name in i2v_train.COPIED:  # the T2V demo's files, unchanged
        for path in (T2V_MODEL / name).iterdir():
            assert (first / name / path.name).read_bytes() == path.read_bytes(), path


def test_harness_scores_a_barely_trained_i2v_model_low(smoke_runs, balanced_cases):
    """The control that makes the thresholds below meaningful: the smoke checkpoint is the T2V
    demo plus a few steps (its image channels still ~0), so it cannot see the image: colour at
    about chance (1/7) and the object almost never where the image has it."""
    control = quality.runner_generate_i2v(ModelRunner.from_checkpoint(smoke_runs[0]))
    score = quality.evaluate_i2v(control, balanced_cases)
    print(quality.format_i2v_scores({"barely trained": score}))
    assert score.colour_accuracy <= 0.35
    assert score.start_accuracy <= 0.25


# ---------------------------------------------------------------- the committed checkpoint


def test_checkpoint_is_small_and_in_the_i2v_a14b_layout():
    total = sum(p.stat().st_size for p in I2V_MODEL.rglob("*") if p.is_file())
    assert total < 15 * 10**6
    index = (I2V_MODEL / "model_index.json").read_text()
    assert '"_class_name": "WanImageToVideoPipeline"' in index
    for name in i2v_train.EXPERTS:
        assert (I2V_MODEL / name / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_checkpoint_matches_diffusers_image_to_video_pipeline(runner):
    """reelserve and WanImageToVideoPipeline on the committed checkpoint (fp32), CFG on, both experts."""
    pipe = WanImageToVideoPipeline.from_pretrained(I2V_MODEL, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.boundary_ratio == 0.875 and pipe.transformer.config.in_channels == 36
    case = quality.i2v_case(Combo("green", "disc", "right"), seed=3)
    p = make_params(
        prompt=case.prompt, negative_prompt="", height=64, width=64, num_frames=17, image=case.image, seed=3
    )
    assert (runner.decode_float(p) - i2v_a14b_frames(pipe, p)).abs().max() <= ATOL


def test_checkpoint_follows_the_image_and_the_prompt(runner, balanced_cases):
    """Defaults (20 UniPC steps, CFG 4.0/3.0), one seed, 28 images. The committed model scores
    colour 26/28 (a green and a cyan object drift to another colour in later frames), direction
    28/28, median start error 0.5 px, and 6 or 7 distinct colours per direction; the smoke model
    above scores 4/28 colour and a median start error of 27 px."""
    frames = {}

    def generate(prompt, image, seed):
        frames[prompt, image] = out = quality.runner_generate_i2v(runner)(prompt, image, seed)
        return out

    score = quality.evaluate_i2v(generate, balanced_cases)
    table = quality.format_i2v_scores({"balanced": score})
    print(table)
    assert score.colour_accuracy >= 0.8, table
    assert score.direction_accuracy >= 0.85, table
    assert score.median_start_error <= 3.0, table
    # The same prompt and seed with the 7 images of one direction: the colours follow the images.
    for direction in DIRECTIONS:
        colours = {
            quality.detect_colour(frames[c.prompt, c.image]) for c in balanced_cases if c.combo.direction == direction
        }
        assert len(colours) >= 6, (direction, colours)


# ---------------------------------------------------------------- the official client against a live server

# Frame 0 of the served (playable H.264 yuv420p) video against the uploaded image: mean absolute
# error over all pixels and channels, 8-bit units. Measured on the committed checkpoint over the 28
# BALANCED images with seed 0 and the defaults (ModelRunner frames through the same MP4 encode):
# - against the uploaded image: 6.2-22.0 (median 14.9). The demo VAE alone, encoding and decoding
#   the image, is already 6.2-22.4 off (median 14.8): it loses the dark background's shade. So this
#   bound is the VAE's floor plus a margin and says little by itself (the smoke model: 18.7-36.3).
# - against that VAE round trip of the image (what a perfect transformer would give through this
#   VAE): 1.4-6.1 (median 2.4), of which the codec is 1.2-2.1. The same frames against another
#   case's round trip: 13.9-28.0; the barely trained smoke model against its own: 15.2-28.3.
# The object's start is read as the harness reads it (START_TOLERANCE, 4 px; measured 0.1-1.6 px).
FIRST_FRAME_VS_IMAGE_MAE = 25.0
FIRST_FRAME_VS_ROUND_TRIP_MAE = 8.0
# One image per direction, four colours, both shapes (a subset of the measured 28, not picked by score).
SERVED = [BALANCED[0], BALANCED[9], BALANCED[18], BALANCED[27]]


def vae_round_trip(image) -> np.ndarray:
    """The image through the checkpoint's VAE as a 1-frame video: encode (posterior mode), decode."""
    from models.wan.vae import image_tensor

    vae = i2v_train.load_vae(I2V_MODEL)
    with torch.no_grad():
        pixels = vae.decode(vae.encode(image_tensor(image).unsqueeze(2)).latent_dist.mode()).sample
    return quality.clip_to_frames(pixels[0].clamp(-1, 1))[0]


def served_video(server_url: str, path: Path, prompt: str, seed: int) -> np.ndarray:
    """The official `openai` client: upload the file, poll until done, download, decode (uint8 frames)."""
    import time

    import openai

    from serve.pipeline.mp4 import decode_mp4

    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    with open(path, "rb") as image:
        job = client.videos.create(prompt=prompt, size="64x64", input_reference=image, extra_body={"seed": seed})
    deadline = time.monotonic() + 120
    while (video := client.videos.retrieve(job.id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job stuck in {video.status}"
        time.sleep(0.1)
    assert video.status == "completed", video.error
    return decode_mp4(client.videos.download_content(job.id).read())[0]


def test_openai_client_upload_gives_a_video_that_starts_from_the_image(tmp_path):
    """Issue 12's check: `videos.create(input_reference=open(png, "rb"))` against a live server on
    the I2V demo returns a video whose first frame is the uploaded image within the tolerances
    above, whose object starts where the image has it, in the image's colour, and moves the way
    the prompt says."""
    from PIL import Image

    from serve.api.app import create_app
    from serve.config import ServerConfig
    from tests.api.conftest import LiveServer

    cases = quality.i2v_cases(SERVED, seeds=[0])
    with LiveServer(create_app(ServerConfig(model_dir=I2V_MODEL))) as server:
        for case in cases:
            uploaded = np.frombuffer(case.image.rgb, np.uint8).reshape(case.image.height, case.image.width, 3)
            Image.fromarray(uploaded).save(path := tmp_path / "first_frame.png")
            video = served_video(server.url, path, case.prompt, case.seed)
            first = video[0].astype(np.float32)
            vs_image = float(np.abs(first - uploaded).mean())
            vs_round_trip = float(np.abs(first - vae_round_trip(case.image)).mean())
            start = quality.object_centroid(video[0])
            assert video.shape == (17, 64, 64, 3), case.combo
            assert vs_image <= FIRST_FRAME_VS_IMAGE_MAE, (case.combo, vs_image)
            assert vs_round_trip <= FIRST_FRAME_VS_ROUND_TRIP_MAE, (case.combo, vs_round_trip)
            assert start is not None and math.dist(start, case.start) <= quality.START_TOLERANCE, (case.combo, start)
            assert quality.detect_colour(video) == case.combo.colour, case.combo
            assert quality.detect_direction(video) == case.combo.direction, case.combo
