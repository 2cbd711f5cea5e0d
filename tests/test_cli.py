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
