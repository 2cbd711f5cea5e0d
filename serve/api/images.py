"""`input_reference`: the conditioning image of image-to-video requests, from upload to `ConditionImage`.

The bytes arrive as a multipart file part or as base64 (a bare string or a `data:` URL) in JSON;
URLs are refused, never fetched (an SSRF surface). Each bound is checked before the work it guards:
the byte size before decoding base64 or the image, the pixel count (read from the header) before
any pixel is decoded. Only PNG, JPEG and WebP are opened at all. Every refusal is a 422 naming
`input_reference` and the limit, in the shape FastAPI gives schema errors.

The image is then fitted to the request's (height, width) as diffusers' Wan pipelines expect of
their `image` argument: orientation from EXIF applied and converted to RGB (`load_image`), then
made exactly height x width (`VaeImageProcessor.preprocess` resizes with Lanczos). We centre-crop
to the target aspect ratio first so the picture is not stretched, and report the change.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import threading

import numpy as np
from fastapi.exceptions import RequestValidationError
from PIL import Image, ImageOps

from serve.config import Limits
from serve.engine.request import ConditionImage

FIELD = "input_reference"
FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow's names; nothing else is even parsed
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG; WebP is RIFF....WEBP
DATA_URL_PREFIX_CHARS = 256  # room for "data:image/webp;base64," and any media-type parameters
# Decoding a 16.7 MP image takes ~50 MB of RGB plus intermediates; the threadpool runs up to 40
# requests at once, so bound how many decode together rather than how many arrive.
_DECODE_SLOTS = threading.BoundedSemaphore(4)


def base64_chars(n_bytes: int) -> int:
    """Length of the base64 text of `n_bytes` bytes (4 characters per 3 bytes, padded)."""
    return -(-n_bytes // 3) * 4


def image_body_bytes(limits: Limits, base_bytes: int) -> int:
    """The request-body bound of routes that carry an image: the largest image as base64 in JSON
    (4/3 of its bytes, plus a data-URL prefix), plus `base_bytes` for every other field and for
    JSON/multipart framing. A multipart upload of the raw file is smaller still."""
    return base64_chars(limits.max_image_bytes) + DATA_URL_PREFIX_CHARS + base_bytes


class ImageInputError(ValueError):
    """A refused `input_reference`; `error()` renders it as a 422."""

    def __init__(self, message: str, kind: str = "value_error", limit: int | None = None) -> None:
        super().__init__(message)
        self.kind, self.limit = kind, limit

    def error(self, field: str = FIELD) -> RequestValidationError:
        detail = {"type": self.kind, "loc": ("body", field), "msg": str(self), "input": None}
        if self.limit is not None:
            detail["ctx"] = {"limit": self.limit}
        return RequestValidationError([detail])


def _too_many_bytes(size: str, limits: Limits) -> ImageInputError:
    msg = f"{FIELD} is {size} bytes; it must be at most {limits.max_image_bytes} bytes (server limit max_image_bytes)"
    return ImageInputError(msg, "too_long", limits.max_image_bytes)


def reference_bytes(value: str, limits: Limits) -> bytes:
    """The image bytes of a JSON `input_reference`: base64, bare or as a `data:...;base64,` URL."""
    if _URL.match(value):
        raise ImageInputError(
            f"{FIELD} is a URL; URL fetching is not supported: send the image itself "
            "(a multipart file, or base64 / a data:image/...;base64, URL in JSON)"
        )
    data = value
    if value[:5].lower() == "data:":
        match = _DATA_URL.match(value[: DATA_URL_PREFIX_CHARS + 1])
        if match is None or "base64" not in (p.strip().lower() for p in match[2].split(";")):
            raise ImageInputError(f"{FIELD} must be a base64 data URL, e.g. data:image/png;base64,...")
        data = value[match.end() :]
    if len(data) > base64_chars(limits.max_image_bytes):  # refuse before decoding anything
        raise _too_many_bytes(f"about {len(data) * 3 // 4}", limits)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(
            f"{FIELD} is not valid base64; send the image file's bytes base64-encoded "
            "(or as a data:image/png;base64,... URL), or upload it as a multipart file"
        ) from None
    return raw


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Decode a PNG, JPEG or WebP file into an RGB image, upright per its EXIF orientation."""
    if not data:
        raise ImageInputError(f"{FIELD} is empty")
    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(str(len(data)), limits)
    with _DECODE_SLOTS:
        try:
            # `formats`: Pillow tries only these decoders. open() reads the header, not the pixels.
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError:  # over twice Pillow's own bound, raised in open()
            raise _too_many_pixels("larger than any image this server opens", limits) from None
        except Exception:
            if data.startswith(_SIGNATURES) or data[8:12] == b"WEBP":
                raise _corrupt() from None
            raise ImageInputError(f"{FIELD} must be a PNG, JPEG or WebP image") from None
        if img.format not in FORMATS:  # `formats` guarantees this; kept as the stated invariant
            raise ImageInputError(f"{FIELD} must be a PNG, JPEG or WebP image, not {img.format}")
        width, height = img.size
        if width * height > limits.max_image_pixels:
            raise _too_many_pixels(f"{width}x{height} = {width * height} pixels", limits)
        try:
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
        except Exception:
            raise _corrupt() from None


def _corrupt() -> ImageInputError:
    return ImageInputError(f"{FIELD}: the image is truncated or corrupt")


def _too_many_pixels(what: str, limits: Limits) -> ImageInputError:
    msg = f"{FIELD} is {what}; it must have at most {limits.max_image_pixels} pixels (server limit max_image_pixels)"
    return ImageInputError(msg, "too_long", limits.max_image_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """`convert("RGB")` as diffusers' `load_image` does (alpha dropped, palettes and CMYK mapped),
    except for 16-bit grayscale PNGs, which Pillow would clip at 255: those keep their top 8 bits."""
    if img.mode.startswith("I"):
        values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        img = Image.fromarray(values.astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # what Pillow warns it should be before dropping the alpha
    return img if img.mode == "RGB" else img.convert("RGB")


def fit_image(img: Image.Image, height: int, width: int) -> tuple[ConditionImage, str | None]:
    """The image at exactly (height, width): centre-cropped to that aspect ratio, then resized with
    Lanczos. Untouched pixels when it already has that size. Also returns what changed, if anything,
    for `X-Reelserve-Adjusted`."""
    img = to_rgb(img)
    src_w, src_h = img.size
    box_w, box_h = src_w, src_h
    if src_w * height > src_h * width:  # wider than the target: trim left and right
        box_w = max(1, round(src_h * width / height))
    elif src_w * height < src_h * width:  # taller: trim top and bottom
        box_h = max(1, round(src_w * height / width))
    steps = []
    if (box_w, box_h) != (src_w, src_h):
        left, top = (src_w - box_w) // 2, (src_h - box_h) // 2
        img = img.crop((left, top, left + box_w, top + box_h))
        steps.append(f"center-cropped to {box_w}x{box_h}")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
        steps.append("resized")
    image = ConditionImage(width=width, height=height, rgb=img.tobytes())
    if not steps:
        return image, None
    return image, f"{FIELD}={src_w}x{src_h}->{width}x{height} ({', '.join(steps)})"


def condition_image(data: bytes, height: int, width: int, limits: Limits) -> tuple[ConditionImage, str | None]:
    """Decode, bound and fit an uploaded image; raises `ImageInputError` for anything refused."""
    return fit_image(decode_image(data, limits), height, width)
