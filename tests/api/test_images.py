"""`input_reference` (image-to-video input): decoding, bounds and fitting, then both routes live.

The live servers run the fake runner, which ignores the image; what these tests check is what
reaches the engine (`GenerationParams.image`) and what the client is told. The tiny checkpoint is
text-to-video, so the image-taking server serves it with a spec whose `image_input` is "optional".
"""

from __future__ import annotations

import base64
import dataclasses
import io
import struct
import time
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from models.wan.spec import read_spec
from serve.api.app import create_app
from serve.api.body_limit import MAX_BODY_BYTES
from serve.api.images import ImageInputError, decode_image, fit_image, image_body_bytes, reference_bytes
from serve.config import Limits, ServerConfig
from serve.engine.client import EngineClient
from serve.engine.request import ConditionImage
from tests.api.conftest import LiveServer
from tests.engine.fake_runner import FACTORY

LIMITS = Limits(max_image_bytes=200_000, max_image_pixels=256 * 256)
SMALL = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 2}
FORM = {key: str(value) for key, value in SMALL.items()}


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose header says width x height RGB: a decompression bomb's shape."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def refusal(data: bytes, limits: Limits = LIMITS) -> str:
    with pytest.raises(ImageInputError) as caught:
        decode_image(data, limits)
    return str(caught.value)


# -- fitting -------------------------------------------------------------------------------------


def test_an_image_of_the_request_size_keeps_its_exact_pixels():
    img = noise(48, 32)
    fitted, adjustment = fit_image(decode_image(encode(img), LIMITS), height=32, width=48)
    assert adjustment is None
    assert (fitted.width, fitted.height) == (48, 32) and fitted.rgb == img.tobytes()


def test_another_aspect_ratio_is_centre_cropped_then_resized_with_lanczos():
    img = noise(200, 100)
    fitted, adjustment = fit_image(img, height=32, width=48)
    assert adjustment == "input_reference=200x100->48x32 (center-cropped to 150x100, resized)"
    expected = img.crop((25, 0, 175, 100)).resize((48, 32), Image.Resampling.LANCZOS)
    assert (fitted.width, fitted.height) == (48, 32) and fitted.rgb == expected.tobytes()


def test_a_crop_to_the_exact_size_is_not_resampled():
    img = noise(90, 30)
    fitted, adjustment = fit_image(img, height=30, width=30)
    assert adjustment == "input_reference=90x30->30x30 (center-cropped to 30x30)"
    assert fitted.rgb == img.crop((30, 0, 60, 30)).tobytes()


def test_same_aspect_ratio_is_only_resized():
    img = noise(128, 96)
    fitted, adjustment = fit_image(img, height=48, width=64)
    assert adjustment == "input_reference=128x96->64x48 (resized)"
    assert fitted.rgb == img.resize((64, 48), Image.Resampling.LANCZOS).tobytes()


def test_exif_orientation_is_applied_before_fitting():
    img = noise(4, 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    for fmt in ("PNG", "WEBP"):
        upright = decode_image(encode(img, fmt, exif=exif, lossless=True), LIMITS)
        assert upright.size == (2, 4)
        assert upright.tobytes() == img.transpose(Image.Transpose.ROTATE_270).tobytes()


def test_alpha_palette_and_16_bit_images_become_8_bit_rgb():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert decode_image(encode(rgba), LIMITS).getpixel((0, 0)) == (10, 20, 30)
    assert decode_image(encode(rgba.convert("P")), LIMITS).mode == "RGB"
    deep = Image.fromarray(np.full((4, 4), 0x1234, dtype=np.uint16))  # Pillow alone would clip to 255
    assert decode_image(encode(deep), LIMITS).getpixel((0, 0)) == (0x12, 0x12, 0x12)


def test_jpeg_and_webp_are_accepted():
    for fmt in ("JPEG", "WEBP"):
        assert decode_image(encode(noise(16, 16), fmt), LIMITS).size == (16, 16)


def test_json_base64_bare_or_data_url_but_never_a_url():
    data = encode(noise(8, 8))
    assert reference_bytes(b64(data), LIMITS) == data
    assert reference_bytes("data:image/png;base64," + b64(data), LIMITS) == data
    for url in ("https://example.com/cat.png", "http://169.254.169.254/latest", "file:///etc/passwd"):
        with pytest.raises(ImageInputError, match="URL fetching is not supported"):
            reference_bytes(url, LIMITS)
    with pytest.raises(ImageInputError, match="not valid base64"):
        reference_bytes("not base64!", LIMITS)
    with pytest.raises(ImageInputError, match="base64 data URL"):
        reference_bytes("data:image/png,rawbytes", LIMITS)
    with pytest.raises(ImageInputError, match="at most 200000 bytes"):  # refused before decoding
        reference_bytes("A" * 300_000, LIMITS)


# -- refusals ------------------------------------------------------------------------------------


def test_bad_images_are_refused_with_the_reason():
    png = encode(noise(64, 64))
    assert refusal(b"") == "input_reference is empty"
    assert refusal(png[: len(png) // 2]) == "input_reference: the image is truncated or corrupt"
    assert refusal(png[:20]) == "input_reference: the image is truncated or corrupt"
    assert refusal(encode(noise(8, 8), "GIF")) == "input_reference must be a PNG, JPEG or WebP image"
    assert refusal(b"just some text\n") == "input_reference must be a PNG, JPEG or WebP image"
    assert refusal(encode(noise(8, 8), "BMP")) == "input_reference must be a PNG, JPEG or WebP image"


def test_pixel_bounds_are_checked_from_the_header_before_decoding():
    # Past Pillow's own bomb bound (Image.open raises): still our 422 message, never a 500.
    assert "at most 65536 pixels (server limit max_image_pixels)" in refusal(png_claiming(100_000, 100_000))
    # Under Pillow's bound but over ours: refused from the header; these bytes could not even decode.
    assert refusal(png_claiming(5000, 4000)) == (
        "input_reference is 5000x4000 = 20000000 pixels; it must have at most 65536 pixels "
        "(server limit max_image_pixels)"
    )
    compressible = encode(Image.new("RGB", (257, 256)))  # a real image, 1 KB, over by one column
    assert len(compressible) < 2000 and "257x256 = 65792 pixels" in refusal(compressible)


def test_byte_bound_is_checked_before_decoding():
    big = encode(noise(256, 256))  # ~197 KB of noise
    assert refusal(big, Limits(max_image_bytes=100_000)) == (
        f"input_reference is {len(big)} bytes; it must be at most 100000 bytes (server limit max_image_bytes)"
    )


# -- live ----------------------------------------------------------------------------------------


def image_server(model_dir, image_input: str, **config) -> LiveServer:
    cfg = ServerConfig(model_dir=model_dir, limits=LIMITS, **config)
    spec = dataclasses.replace(read_spec(model_dir), image_input=image_input)
    return LiveServer(create_app(cfg, EngineClient(cfg, runner_factory=FACTORY), spec=spec))


@pytest.fixture(scope="module")
def i2v_server(tiny_model_dir) -> Iterator[LiveServer]:
    with image_server(tiny_model_dir, "optional") as server:
        yield server


@pytest.fixture
def submitted(i2v_server, monkeypatch) -> list:
    """The GenerationParams each request hands the engine (both routes go through add_request)."""
    seen = []
    core = i2v_server.engine.core
    add_request = core.add_request
    monkeypatch.setattr(core, "add_request", lambda params, **kw: seen.append(params) or add_request(params, **kw))
    return seen


def until_submitted(submitted: list, count: int) -> None:
    """Jobs reach the engine through the job runner's next claim (a tick later); wait for them."""
    deadline = time.monotonic() + 120  # a guard against a hang only
    while len(submitted) < count:
        assert time.monotonic() < deadline, f"{len(submitted)} of {count} jobs reached the engine"
        time.sleep(0.05)


def test_generate_takes_base64_json_and_the_fitted_image_reaches_the_engine(i2v_server, submitted):
    img = noise(100, 50)
    with i2v_server.client() as http:
        response = http.post("/generate", json={"prompt": "a cat", **SMALL, "input_reference": b64(encode(img))})
    assert response.status_code == 200, response.text
    assert response.headers["x-reelserve-adjusted"] == (
        "input_reference=100x50->32x32 (center-cropped to 50x50, resized)"
    )
    expected, _ = fit_image(img, 32, 32)
    assert submitted[-1].image == expected and (submitted[-1].height, submitted[-1].width) == (32, 32)


def test_the_image_is_fitted_to_the_rounded_size(i2v_server, submitted):
    img = noise(40, 40)  # 40x40 rounds down to 32x32 (the tiny model's multiple is 16)
    body = {"prompt": "a cat", **SMALL, "height": 40, "width": 40}
    with i2v_server.client() as http:
        response = http.post("/generate", json={**body, "input_reference": "data:image/png;base64," + b64(encode(img))})
    assert response.status_code == 200, response.text
    assert response.headers["x-reelserve-adjusted"] == (
        "height=40->32; width=40->32; input_reference=40x40->32x32 (resized)"
    )
    assert submitted[-1].image == ConditionImage(32, 32, img.resize((32, 32), Image.Resampling.LANCZOS).tobytes())


def test_generate_takes_a_multipart_upload_and_keeps_exact_pixels(i2v_server, submitted):
    img = noise(32, 32)
    files = {"input_reference": ("ref.webp", encode(img, "WEBP", lossless=True), "image/webp")}
    with i2v_server.client() as http:
        response = http.post("/generate", data={"prompt": "a cat", **FORM}, files=files)
    assert response.status_code == 200, response.text
    assert "x-reelserve-adjusted" not in response.headers
    assert submitted[-1].image.rgb == img.tobytes()
    with i2v_server.client() as http:  # a text part may carry it as base64, too
        response = http.post("/generate", data={"prompt": "a cat", **FORM, "input_reference": b64(encode(img))})
    assert response.status_code == 200, response.text
    assert submitted[-1].image.rgb == img.tobytes()


def test_openai_client_uploads_an_image_and_no_job_view_holds_it(i2v_server, submitted):
    client = openai.OpenAI(base_url=f"{i2v_server.url}/v1", api_key="unused", max_retries=0)
    img = noise(64, 48)
    job = client.videos.create(
        prompt="a cat",
        size="32x32",
        input_reference=("ref.png", encode(img), "image/png"),
        extra_body={"num_frames": 5, "num_inference_steps": 2},
    )
    assert job.adjustments == ["input_reference=64x48->32x32 (center-cropped to 48x48, resized)"]
    until_submitted(submitted, 1)  # the job runner hands stored jobs to the engine
    assert submitted[-1].image == fit_image(img, 32, 32)[0]
    with i2v_server.client() as http:
        views = [http.get(f"/v1/videos/{job.id}").text, http.get("/v1/videos").text]
    assert all("rgb" not in view and "image" not in view for view in views)
    # The record does not keep it (it is an artifact of its own until the job ends).
    assert i2v_server.app.state.jobs.get(job.id).params.image is None


def test_videos_json_takes_base64_and_openais_image_url_object(i2v_server, submitted):
    data_url = "data:image/png;base64," + b64(encode(noise(32, 32)))
    with i2v_server.client() as http:
        for reference in (data_url.split(",", 1)[1], {"image_url": data_url}):
            response = http.post("/v1/videos", json={"prompt": "a cat", **SMALL, "input_reference": reference})
            assert response.status_code == 200, response.text
            assert response.json()["adjustments"] is None
        unsupported = http.post("/v1/videos", json={"prompt": "a cat", "input_reference": {"file_id": "file-1"}})
    until_submitted(submitted, 2)
    assert len(submitted) == 2 and all(p.image.rgb == submitted[0].image.rgb for p in submitted)
    assert unsupported.status_code == 422
    assert unsupported.json()["error"]["param"].startswith("input_reference")


def test_openai_client_sends_the_image_url_object_as_a_form_part(i2v_server, submitted):
    """OpenAI's object form through the client: its `input_reference` argument takes files only in
    this SDK, so the object goes in `extra_body`, which the client flattens into an
    `input_reference[image_url]` form part (serve/api/form_fields.py); it reaches the engine as
    the JSON object does."""
    img = noise(32, 32)
    client = openai.OpenAI(base_url=f"{i2v_server.url}/v1", api_key="unused", max_retries=0)
    reference = {"image_url": "data:image/png;base64," + b64(encode(img))}
    with pytest.warns(DeprecationWarning):  # the SDK marks the Videos API deprecated (Sora's shutdown)
        client.videos.create(prompt="a cat", size="32x32", extra_body={**SMALL, "input_reference": reference})
    until_submitted(submitted, 1)
    assert submitted[-1].image.rgb == img.tobytes()


BAD = [
    ("truncated", encode(noise(64, 64))[:300], "truncated or corrupt"),
    ("bomb", png_claiming(100_000, 100_000), "server limit max_image_pixels"),
    ("pixels", encode(Image.new("RGB", (300, 300))), "300x300 = 90000 pixels"),
    ("gif", encode(noise(8, 8), "GIF"), "must be a PNG, JPEG or WebP image"),
    ("text", b"hello, I am a text file\n", "must be a PNG, JPEG or WebP image"),
    ("empty", b"", "input_reference is empty"),
    ("bytes", encode(noise(300, 300)), "at most 200000 bytes (server limit max_image_bytes)"),
]


@pytest.mark.parametrize(("case", "data", "words"), BAD, ids=[case for case, _, _ in BAD])
def test_bad_images_are_422_naming_input_reference_on_both_routes_and_the_server_keeps_serving(
    i2v_server, case, data, words
):
    with i2v_server.client() as http:
        answers = [
            http.post("/generate", json={"prompt": "a cat", **SMALL, "input_reference": b64(data)}),
            http.post("/generate", data={"prompt": "a cat", **FORM}, files={"input_reference": ("x", data)}),
            http.post("/v1/videos", json={"prompt": "a cat", **SMALL, "input_reference": b64(data)}),
            http.post("/v1/videos", data={"prompt": "a cat", **FORM}, files={"input_reference": ("x", data)}),
        ]
        after = http.post("/generate", json={"prompt": "a cat", **SMALL, "input_reference": b64(encode(noise(8, 8)))})
    for response in answers:
        assert response.status_code == 422, response.text
        field, message = field_error(response)
        assert field == "input_reference" and words in message, message
    assert after.status_code == 200


def field_error(response) -> tuple[str, str]:
    """(field, message) of a 422 naming one field, in either API's shape (serve/api/errors.py)."""
    body = response.json()
    if "error" in body:  # /v1/*: OpenAI's error object
        return body["error"]["param"], body["error"]["message"]
    (error,) = body["detail"]
    return ".".join(str(part) for part in error["loc"][1:]), error["msg"]


def test_a_url_is_refused_not_fetched(i2v_server):
    with i2v_server.client() as http:
        for route in ("/generate", "/v1/videos"):
            body = {"prompt": "a cat", **SMALL, "input_reference": "http://127.0.0.1:1/secret.png"}
            response = http.post(route, json=body)
            assert response.status_code == 422
            field, message = field_error(response)
            assert field == "input_reference" and "URL fetching is not supported" in message


def test_only_the_image_routes_take_bodies_over_1_mib_and_only_up_to_the_configured_bound(i2v_server):
    bound = image_body_bytes(LIMITS, MAX_BODY_BYTES)
    assert bound == 266_668 + 256 + MAX_BODY_BYTES  # base64 of 200000 bytes, data-URL prefix, 1 MiB
    padding = "A" * (MAX_BODY_BYTES + 1000)
    with i2v_server.client() as http:
        over_a_mib = http.post("/generate", json={"prompt": "a cat", "negative_prompt": padding})
        elsewhere = http.post("/v1/videos/x/remix", json={"prompt": padding})
        past_bound = http.post("/generate", json={"prompt": "a cat", "input_reference": "A" * bound})
        streamed = http.post("/v1/videos", content=iter([b"x" * (bound // 2)] * 3))
        health = http.get("/health")
    assert over_a_mib.status_code == 422  # read and parsed: the prompt limit refuses it, not the body limit
    assert elsewhere.status_code == 413 and past_bound.status_code == 413 and streamed.status_code == 413
    assert f"over {bound} bytes" in past_bound.json()["detail"]
    assert health.status_code == 200


def test_a_model_that_requires_an_image_refuses_a_request_without_one(i2v_server, monkeypatch):
    state = i2v_server.app.state
    monkeypatch.setattr(state, "spec", dataclasses.replace(state.spec, image_input="required"))
    with i2v_server.client() as http:
        for route in ("/generate", "/v1/videos"):
            response = http.post(route, json={"prompt": "a cat", **SMALL})
            assert response.status_code == 422
            field, message = field_error(response)
            assert field == "input_reference" and "input_reference is required" in message
        ok = http.post("/generate", json={"prompt": "a cat", **SMALL, "input_reference": b64(encode(noise(8, 8)))})
    assert ok.status_code == 200


def test_a_text_to_video_model_refuses_an_image_and_keeps_the_1_mib_limit(tiny_model_dir):
    image = encode(noise(8, 8))
    with image_server(tiny_model_dir, "none") as server, server.client() as http:
        answers = [
            http.post("/generate", json={"prompt": "a cat", **SMALL, "input_reference": b64(image)}),
            http.post("/v1/videos", data={"prompt": "a cat", **FORM}, files={"input_reference": ("x.png", image)}),
        ]
        too_big = http.post("/generate", json={"prompt": "a cat", "input_reference": "A" * MAX_BODY_BYTES})
        after = http.post("/generate", json={"prompt": "a cat", **SMALL})
    for response in answers:
        assert response.status_code == 422, response.text
        field, message = field_error(response)
        assert field == "input_reference"
        assert message.endswith("input_reference is not accepted: this model (text-to-video) takes no image")
    assert too_big.status_code == 413 and after.status_code == 200


def test_openapi_documents_both_bodies(i2v_server):
    schema = httpx.get(f"{i2v_server.url}/openapi.json").json()
    components = schema["components"]["schemas"]
    assert {"GenerateRequest", "VideoCreateRequest", "ImageReference"} <= components.keys()
    assert "input_reference" in components["GenerateRequest"]["properties"]
    for path in ("/generate", "/v1/videos"):
        content = schema["paths"][path]["post"]["requestBody"]["content"]
        form = components[content["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]]
        assert form["properties"]["input_reference"]["format"] == "binary"
