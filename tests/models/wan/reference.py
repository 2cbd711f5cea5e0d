"""diffusers' own pipelines as the oracle for reelserve's image-to-video and TI2V-5B paths.

Every helper returns float frames in [0, 1] of shape (F, H, W, 3): `output_type="pt"` gives
`frames` (B, F, 3, H, W) (`VaeImageProcessor.denormalize`: `(x * 0.5 + 0.5).clamp(0, 1)`,
image_processor.py:235), and we take `.frames[0].permute(0, 2, 3, 1)`. All runs are fp32 on CPU
with `generator=torch.Generator("cpu").manual_seed(seed)`; the generator is drawn from once, for the
initial latents (`randn_tensor` of shape (1, z_dim, (F - 1) // 4 + 1, H / s, W / s)). The image
latents use the VAE posterior's mode (`sample_mode="argmax"`), so they draw nothing.

Line numbers are of the installed diffusers 0.42.1 (`.venv/lib/python3.11/site-packages/diffusers`).

I2V-A14B (`i2v_a14b_frames`): `WanImageToVideoPipeline.__call__` (pipelines/wan/pipeline_wan_i2v.py:512)
on the "i2v-a14b" tiny checkpoint, `config.expand_timesteps` False, boundary_ratio 0.9.
- No image encoder: `transformer.config.image_dim` is None, so `encode_image` is skipped (:698) and
  `encoder_hidden_states_image` is None.
- `prepare_latents` (:396), non-expand branch: `video_condition = cat([image, zeros(F - 1 frames)],
  dim=2)` (:432), the whole F-frame video is VAE-encoded (:458), normalised
  `(z - latents_mean) * (1 / latents_std)` (:462); the mask (:471-484) is 1 on pixel frame 0
  (repeated 4x, so latent frame 0 is all ones) and 0 elsewhere, reshaped to 4 channels;
  condition = cat([mask (4), image latents (16)]) = 20 channels.
- Loop: expert switch `t >= boundary_ratio * 1000` -> `transformer` with `guidance_scale`, else
  `transformer_2` with `guidance_scale_2` (:754-761); input `cat([latents, condition], dim=1)`
  (36 channels) with one scalar timestep per sample (:772-773); cond and uncond are two separate
  forwards, `uncond + g * (cond - uncond)` (:776-795); UniPC step on the 16 noise channels (:798).
- Decode: `latents / (1 / std) + mean` then `vae.decode` (:822-834).

TI2V-5B text-to-video (`ti2v_text_frames`): `WanPipeline.__call__` (pipelines/wan/pipeline_wan.py:384)
on the "ti2v-5b" tiny checkpoint, `config.expand_timesteps` True (from model_index.json), no
boundary, transformer_2 None.
- `mask = ones(latents.shape)` (:575), so the expand_timesteps branch (:607-611) gives a per-token
  timestep of shape (B, F_lat * H_lat/2 * W_lat/2) that is `t` for every token (same value as the
  scalar path, but a 2-D timestep through the transformer's condition embedder); input is the
  latents alone (:606). Decode as above (:662-674), with the Wan2.2 VAE (z 48, 16x, patchify 2).

TI2V-5B image-to-video (`ti2v_image_frames`): diffusers runs TI2V-5B I2V through
`WanImageToVideoPipeline` (its only expand_timesteps image path): `WanImageToVideoPipeline.
from_pretrained(ti2v_dir)` reads `expand_timesteps: true` and `boundary_ratio: null` from the
checkpoint's model_index.json (the constructor takes both, :177-178, so no extra kwargs are needed;
`ti2v_image_pipeline` asserts they arrived). image_encoder / image_processor are absent from that
model_index.json and load as None (optional components).
- `prepare_latents`, expand branch: only the image itself is encoded, as a 1-frame video (:428-429,
  :458), normalised as above (:462) -> condition (1, 48, 1, H_lat, W_lat); `first_frame_mask` is
  (1, 1, F_lat, H_lat, W_lat), 0 on latent frame 0 and 1 elsewhere (:464-469).
- Loop (:763-770): input `(1 - mask) * condition + mask * latents` (latent frame 0 replaced by the
  image latents every step), per-token timestep `(mask[0][0][:, ::2, ::2] * t).flatten()`, i.e. 0
  on frame 0's tokens and `t` elsewhere; UniPC steps all of `latents` (frame 0 included, whose
  result is discarded); after the loop frame 0 is replaced by the image latents again (:819-820).

What diffusers does to the image (both image paths): `video_processor.preprocess(image, height,
width)` (:713) is `VaeImageProcessor.preprocess` (image_processor.py:608): PIL branch (:685):
`get_default_height_width` rounds (height, width) down to multiples of the VAE scale factor (:603,
a no-op for legal sizes), `image.resize((width, height), resample=LANCZOS)` (:497; PIL returns a
plain copy when the size is unchanged, PIL/Image.py:2409, so for a ConditionImage already at the
request size this step is exact), `np.array(img).astype(float32) / 255` (:167), to (1, 3, H, W),
then `2 * x - 1` (:220, :732). The image therefore enters the VAE as `rgb_uint8 / 255 * 2 - 1` in
fp32, exactly.

Quirk: `pipeline_wan_i2v.basic_clean` calls `ftfy.fix_text` unconditionally (:96-97) while only
importing ftfy when installed, so without ftfy every `WanImageToVideoPipeline` call raises
NameError; `pipeline_wan.basic_clean` guards it (:79-80). ftfy is not a dependency here, so the
image helpers swap in WanPipeline's guarded `basic_clean` for the duration of the call (identical
cleaning; ftfy would not change these ASCII prompts anyway).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import PIL.Image
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.pipelines.wan import pipeline_wan, pipeline_wan_i2v

from serve.engine.request import ConditionImage, GenerationParams

# The T2V oracle's tolerance (tests/pipeline/test_oracle.py explains it): 1/20 of one 8-bit level.
ATOL = 2e-5


def make_condition_image(
    width: int,
    height: int,
    square_rgb: tuple[int, int, int] = (230, 30, 40),
    square_at: tuple[float, float] = (0.2, 0.25),
    square_size: float = 0.4,
) -> ConditionImage:
    """A deterministic test image: a coloured square (top-left corner at `square_at`, as fractions
    of width and height; side `square_size` of the shorter side) on a gradient background (red
    rising to the right, green rising downwards, blue constant)."""
    x = np.arange(width, dtype=np.float64)[None, :].repeat(height, 0)
    y = np.arange(height, dtype=np.float64)[:, None].repeat(width, 1)
    rgb = np.stack([x * 255 / max(1, width - 1), y * 255 / max(1, height - 1), np.full_like(x, 96.0)], axis=-1)
    side = max(1, round(square_size * min(width, height)))
    x0, y0 = round(square_at[0] * width), round(square_at[1] * height)
    rgb[y0 : y0 + side, x0 : x0 + side] = square_rgb
    return ConditionImage(width=width, height=height, rgb=np.rint(rgb).astype(np.uint8).tobytes())


def to_pil(image: ConditionImage) -> PIL.Image.Image:
    """The request's 8-bit RGB bytes (row-major, height x width x 3) as a PIL image for diffusers."""
    return PIL.Image.frombytes("RGB", (image.width, image.height), image.rgb)


@contextmanager
def guarded_prompt_clean():
    """See the module docstring: WanImageToVideoPipeline needs ftfy unless we swap this in."""
    with mock.patch.object(pipeline_wan_i2v, "basic_clean", pipeline_wan.basic_clean):
        yield


def _load(cls, model_dir: str | Path):
    pipe = cls.from_pretrained(model_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def i2v_a14b_pipeline(model_dir: str | Path) -> WanImageToVideoPipeline:
    """`WanImageToVideoPipeline` on an "i2v-a14b" checkpoint (two experts, no image encoder)."""
    pipe = _load(WanImageToVideoPipeline, model_dir)
    assert pipe.transformer_2 is not None and pipe.config.boundary_ratio is not None
    assert not pipe.config.expand_timesteps and pipe.image_encoder is None
    assert pipe.transformer.config.image_dim is None
    return pipe


def ti2v_text_pipeline(model_dir: str | Path) -> WanPipeline:
    """`WanPipeline` on a "ti2v-5b" checkpoint (expand_timesteps, one transformer)."""
    pipe = _load(WanPipeline, model_dir)
    assert pipe.config.expand_timesteps and pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    return pipe


def ti2v_image_pipeline(model_dir: str | Path) -> WanImageToVideoPipeline:
    """`WanImageToVideoPipeline` on a "ti2v-5b" checkpoint: the expand_timesteps image branch."""
    pipe = _load(WanImageToVideoPipeline, model_dir)
    assert pipe.config.expand_timesteps and pipe.transformer_2 is None and pipe.config.boundary_ratio is None
    assert pipe.image_encoder is None and pipe.transformer.config.image_dim is None
    return pipe


def _check_request(pipe, p: GenerationParams, with_image: bool) -> None:
    """Refuse requests diffusers would silently change (rounded sizes, resized image) or that this
    oracle does not model (other samplers, presets, LoRAs)."""
    assert p.sampler == "unipc" and p.preset is None and not p.loras, "the oracle runs the checkpoint's UniPC only"
    multiple = pipe.vae_scale_factor_spatial * pipe.transformer.config.patch_size[1]
    assert p.height % multiple == 0 and p.width % multiple == 0, f"{p.height}x{p.width}: not multiples of {multiple}"
    assert (p.num_frames - 1) % pipe.vae_scale_factor_temporal == 0, f"num_frames {p.num_frames} is not 4k+1"
    if with_image:
        assert p.image is not None, "an image-to-video request needs params.image"
        assert (p.image.width, p.image.height) == (p.width, p.height), "the image must already be at the request size"
    else:
        assert p.image is None, "WanPipeline ignores images; use ti2v_image_frames"


def _call(pipe, p: GenerationParams, **image) -> torch.Tensor:
    out = pipe(
        prompt=p.prompt,
        negative_prompt=p.negative_prompt,
        height=p.height,
        width=p.width,
        num_frames=p.num_frames,
        num_inference_steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        # diffusers raises on guidance_scale_2 without a boundary (one transformer)
        guidance_scale_2=p.guidance_scale_2 if pipe.config.boundary_ratio is not None else None,
        generator=torch.Generator("cpu").manual_seed(p.seed),
        output_type="pt",
        **image,
    )
    return out.frames[0].permute(0, 2, 3, 1)  # (F, 3, H, W) -> (F, H, W, 3)


def i2v_a14b_frames(pipe: WanImageToVideoPipeline, p: GenerationParams) -> torch.Tensor:
    """Wan2.2 I2V-A14B: `pipe` from `i2v_a14b_pipeline`, `p.image` the first frame."""
    assert not pipe.config.expand_timesteps and pipe.transformer_2 is not None
    _check_request(pipe, p, with_image=True)
    with guarded_prompt_clean():
        return _call(pipe, p, image=to_pil(p.image))


def ti2v_text_frames(pipe: WanPipeline, p: GenerationParams) -> torch.Tensor:
    """Wan2.2 TI2V-5B text-to-video: `pipe` from `ti2v_text_pipeline`, `p.image` None."""
    assert isinstance(pipe, WanPipeline) and pipe.config.expand_timesteps
    _check_request(pipe, p, with_image=False)
    return _call(pipe, p)


def ti2v_image_frames(pipe: WanImageToVideoPipeline, p: GenerationParams) -> torch.Tensor:
    """Wan2.2 TI2V-5B image-to-video: `pipe` from `ti2v_image_pipeline`, `p.image` the first frame."""
    assert isinstance(pipe, WanImageToVideoPipeline) and pipe.config.expand_timesteps
    _check_request(pipe, p, with_image=True)
    with guarded_prompt_clean():
        return _call(pipe, p, image=to_pil(p.image))


@contextmanager
def record_transformer_calls(pipe):
    """Record (expert name, timestep tensor, input channels) for every transformer forward."""
    calls: list[tuple[str, torch.Tensor, int]] = []
    handles = []
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is None:
            continue

        def hook(_module, _args, kwargs, name=name):
            calls.append((name, kwargs["timestep"].detach().clone(), kwargs["hidden_states"].shape[1]))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()
