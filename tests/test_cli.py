"""The command line: clear one-line errors, and `generate` honouring the model flags."""

import numpy as np
import pytest

from serve.cli import main
from serve.pipeline.mp4 import decode_mp4


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--model", "/nonexistent"], "--model: model directory /nonexistent does not exist"),
        (["serve", "--model", "{tiny}", "--max-num-frames", "10"], "--max-num-frames: max_num_frames=10 is not of"),
        (["generate", "--model", "{tiny}", "--prompt", "x", "--quant", "int9"], "int9"),
        (
            ["generate", "--model", "{tiny}", "--prompt", "x", "--quant", "w8a8-int8", "--weights-dtype", "fp8"],
            "give --quant or --weights-dtype, not both",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(tiny_model_dir, capsys, argv, message):
    argv = [a.replace("{tiny}", str(tiny_model_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_generate_with_block_offload_writes_the_same_video_as_resident(tiny_model_dir, tmp_path):
    common = ["generate", "--model", str(tiny_model_dir), "--prompt", "a red square", "--seed", "5", "--lossless"]
    assert main([*common, "-o", str(tmp_path / "a.mp4")]) == 0
    assert (
        main(
            [
                *common,
                "-o",
                str(tmp_path / "b.mp4"),
                "--memory-mode",
                "block-offload",
                "--prefetch-blocks",
                "0",
                "--text-encoder-device",
                "swap",
            ]
        )
        == 0
    )
    a, fps = decode_mp4((tmp_path / "a.mp4").read_bytes())
    b, _ = decode_mp4((tmp_path / "b.mp4").read_bytes())
    assert a.shape == (9, 64, 64, 3) and fps == 16
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    from models.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("cli-i2v") / "i2v", layout="i2v-a14b")


def test_generate_with_an_image_runs_image_to_video_on_the_fitted_image(i2v_dir, tmp_path, capsys):
    import dataclasses

    from PIL import Image

    from serve.api.images import fit_image
    from serve.worker.model_runner import ModelRunner
    from tests.requests import make_params

    rgb = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ref.png")
    argv = ["generate", "--model", str(i2v_dir), "--prompt", "a red square", "--seed", "5", "--lossless"]
    size = ["--height", "64", "--width", "48", "--num-frames", "5", "--steps", "2"]
    assert main([*argv, *size, "--image", str(tmp_path / "ref.png"), "-o", str(tmp_path / "out.mp4")]) == 0
    assert "input_reference=100x80->48x64" in capsys.readouterr().err  # the CLI says what it fitted
    image, _ = fit_image(Image.open(tmp_path / "ref.png"), 64, 48)
    runner = ModelRunner.from_checkpoint(i2v_dir)
    defaults = runner.spec.defaults
    params = make_params(
        prompt="a red square",
        negative_prompt="",
        height=64,
        width=48,
        num_frames=5,
        num_inference_steps=2,
        guidance_scale=defaults["guidance_scale"],
        guidance_scale_2=defaults["guidance_scale_2"],
        seed=5,
        lossless=True,
    )
    expected = runner.generate(dataclasses.replace(params, image=image)).frames
    np.testing.assert_array_equal(decode_mp4((tmp_path / "out.mp4").read_bytes())[0], expected)


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("i2v", [], "is an image-to-video model; pass --image FILE"),
        ("i2v", ["--image", "{tmp}/missing.png"], "--image {tmp}/missing.png: "),
        ("i2v", ["--image", "{tmp}/notes.txt"], "must be a PNG, JPEG or WebP image"),
        ("t2v", ["--image", "{tmp}/notes.txt"], "is a text-to-video model and takes no --image"),
    ],
)
def test_image_problems_are_one_line_errors(i2v_dir, tiny_model_dir, tmp_path, capsys, model, extra, message):
    (tmp_path / "notes.txt").write_text("not an image")
    model_dir = i2v_dir if model == "i2v" else tiny_model_dir
    argv = ["generate", "--model", str(model_dir), "--prompt", "x", "-o", str(tmp_path / "o.mp4")]
    assert main(argv + [a.replace("{tmp}", str(tmp_path)) for a in extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message.replace("{tmp}", str(tmp_path)) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.mp4").exists()
