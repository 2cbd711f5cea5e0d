"""Image-to-video end to end: the official `openai` client uploads a file to a live server that runs
the real worker and runner on a tiny I2V-A14B / TI2V-5B checkpoint.

Oracle: the same request run by `ModelRunner.generate` in this process, with the image as the API
fits it (`fit_image`). Lossless MP4s decode to the runner's uint8 frames bit for bit, so any
difference between the served video and the runner's is a bug in the HTTP / worker / image path.
"""

from __future__ import annotations

import dataclasses
import io
import time

import numpy as np
import openai
import pytest
from PIL import Image

from models.tiny import write_tiny_checkpoint
from serve.api.app import create_app
from serve.api.images import fit_image
from serve.config import ServerConfig
from serve.pipeline.mp4 import decode_mp4
from serve.worker.model_runner import ModelRunner
from tests.api.conftest import LiveServer
from tests.requests import make_params

TIMEOUT_S = 300


def gradient_png(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), np.full_like(x, 60)], -1)
    rgb[height // 4 : height // 2, width // 4 : width // 2] = (240, 30, 30)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def wait_for(client: openai.OpenAI, video_id: str):
    deadline = time.monotonic() + TIMEOUT_S
    while (video := client.videos.retrieve(video_id)).status not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job stuck in {video.status}"
        time.sleep(0.1)
    return video


@pytest.mark.parametrize(("layout", "size"), [("i2v-a14b", (48, 64)), ("ti2v-5b", (64, 64))])
def test_openai_client_upload_gives_the_runners_video_for_that_image(tmp_path, layout, size):
    width, height = size
    model_dir = write_tiny_checkpoint(tmp_path / layout, layout=layout)
    png = gradient_png(2 * width + 10, 2 * height)  # another aspect ratio: the server crops and resizes
    (tmp_path / "ref.png").write_bytes(png)
    with LiveServer(create_app(ServerConfig(model_dir=model_dir))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        with open(tmp_path / "ref.png", "rb") as image:
            job = client.videos.create(
                prompt="a red square moving left",
                size=f"{width}x{height}",
                input_reference=image,
                extra_body={"seed": 11, "num_frames": 5, "num_inference_steps": 3, "fps": 8, "lossless": True},
            )
        done = wait_for(client, job.id)
        assert done.status == "completed", done.error
        served, fps = decode_mp4(client.videos.download_content(job.id).read())

    fitted, adjustment = fit_image(Image.open(io.BytesIO(png)).convert("RGB"), height, width)
    assert adjustment is not None  # it really was cropped and resized
    params = dataclasses.replace(
        make_params(height=height, width=width, num_frames=5, num_inference_steps=3, fps=8, seed=11),
        prompt="a red square moving left",
        negative_prompt="",
        guidance_scale=ModelRunner.from_checkpoint(model_dir).spec.defaults["guidance_scale"],
        guidance_scale_2=ModelRunner.from_checkpoint(model_dir).spec.defaults["guidance_scale_2"],
        lossless=True,
        image=fitted,
    )
    expected = ModelRunner.from_checkpoint(model_dir).generate(params).frames
    assert served.shape == (5, height, width, 3) and fps == 8
    np.testing.assert_array_equal(served, expected)
