"""Deterministic tiny checkpoints in the exact diffusers layouts of the Wan2.2 / Wan2.1 repos.

Four layouts (`LAYOUTS`), each what the real repo's pipeline `save_pretrained` writes, only small:

- "t2v-a14b"  Wan2.2 T2V-A14B: `WanPipeline`, boundary_ratio 0.875, experts `transformer` (high
  noise) and `transformer_2` (low noise), 16 latent channels in and out, Wan2.1 VAE (z 16, 8x).
- "i2v-a14b"  Wan2.2 I2V-A14B: `WanImageToVideoPipeline`, boundary_ratio 0.9, two experts with
  36 input channels (16 noise + 4 first-frame mask + 16 image latents) and 16 out, no CLIP image
  encoder (image_encoder / image_processor null in model_index.json), Wan2.1 VAE.
- "ti2v-5b"   Wan2.2 TI2V-5B: `WanPipeline` with expand_timesteps=True and no boundary, one
  transformer with 48 channels in and out, the Wan2.2 VAE (z 48, residual, 2x2 pixel patchify,
  16x spatial, 4x temporal; fixed non-trivial latents_mean/std) and flow shift 5.
- "t2v-wan21" Wan2.1 T2V: `WanPipeline`, one transformer, no boundary, Wan2.1 VAE.

Files: `model_index.json`, `transformer/` (and `transformer_2/`), always several shards plus
`diffusion_pytorch_model.safetensors.index.json`, `vae/`, `text_encoder/`, `tokenizer/`
(a Unigram `tokenizer.json` built with the `tokenizers` library), `scheduler/` (UniPC with flow
sigmas, as the real repos ship) and `reelserve_defaults.json` (small default sizes). No hub
access: every weight is drawn here from a seeded generator, so the same seed gives byte-identical
files.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from models.wan.spec import DEFAULTS_FILE

BOUNDARY_RATIO = 0.875  # Wan2.2 T2V-A14B
I2V_BOUNDARY_RATIO = 0.9  # Wan2.2 I2V-A14B
FLOW_SHIFT = 3.0  # the A14B and Wan2.1 diffusers repos' scheduler
TI2V_FLOW_SHIFT = 5.0  # the TI2V-5B diffusers repo's scheduler (conversion script)

LAYOUTS = ("t2v-a14b", "i2v-a14b", "ti2v-5b", "t2v-wan21")


@dataclass(frozen=True)
class TinySize:
    """Shape of one checkpoint variant. `shard_bytes` is chosen so transformers always shard."""

    num_layers: int
    num_heads: int
    head_dim: int
    ffn_dim: int
    text_dim: int
    text_layers: int
    vae_base_dim: int
    shard_bytes: int


SIZES: dict[str, TinySize] = {
    # Fast enough for every test: a 2-step 64x64x9 generation takes well under a second.
    "tiny": TinySize(2, 2, 12, 32, 32, 2, 8, shard_bytes=20_000),
    # For benchmarks and the loader memory test: about 150 MB of fp32 per expert.
    "bench": TinySize(4, 12, 64, 3072, 64, 2, 16, shard_bytes=32 * 2**20),
}

# Defaults a tiny checkpoint carries in place of the A14B ones (1280x720, 81 frames, 40 steps),
# which would be pointlessly slow on a CPU for a model with random weights.
TINY_DEFAULTS = {
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "num_inference_steps": 4,
    "guidance_scale": 4.0,
    "guidance_scale_2": 3.0,
    "fps": 16,
}

# TI2V-5B's own defaults are 1280x704, 121 frames, 50 steps, guidance 5.0, 24 fps. Height and width
# must be multiples of 32 there (16x VAE times the 2x2 patch).
TI2V_TINY_DEFAULTS = {
    "height": 64,
    "width": 64,
    "num_frames": 9,
    "num_inference_steps": 4,
    "guidance_scale": 5.0,
    "guidance_scale_2": 5.0,  # unused (one transformer); equal to guidance_scale so nothing reads differently
    "fps": 24,
}


@dataclass(frozen=True)
class Layout:
    """What distinguishes one Wan repo layout from another."""

    pipeline: str  # the diffusers pipeline class whose save_config writes model_index.json
    num_experts: int
    in_channels: int
    out_channels: int
    boundary_ratio: float | None
    expand_timesteps: bool
    wan22_vae: bool  # Wan2.2 VAE (z 48, 16x) instead of the Wan2.1 one (z 16, 8x)
    flow_shift: float
    defaults: dict


_A14B_EXPERTS = dict(
    num_experts=2, expand_timesteps=False, wan22_vae=False, flow_shift=FLOW_SHIFT, defaults=TINY_DEFAULTS
)
LAYOUT_SPECS: dict[str, Layout] = {
    "t2v-a14b": Layout("WanPipeline", in_channels=16, out_channels=16, boundary_ratio=BOUNDARY_RATIO, **_A14B_EXPERTS),
    # 36 = 16 noise + 4 first-frame mask (the 4 pixel frames of latent frame 0) + 16 image latents
    "i2v-a14b": Layout(
        "WanImageToVideoPipeline", in_channels=36, out_channels=16, boundary_ratio=I2V_BOUNDARY_RATIO, **_A14B_EXPERTS
    ),
    "ti2v-5b": Layout(
        "WanPipeline",
        num_experts=1,
        in_channels=48,
        out_channels=48,
        boundary_ratio=None,
        expand_timesteps=True,
        wan22_vae=True,
        flow_shift=TI2V_FLOW_SHIFT,
        defaults=TI2V_TINY_DEFAULTS,
    ),
    "t2v-wan21": Layout(
        "WanPipeline",
        num_experts=1,
        in_channels=16,
        out_channels=16,
        boundary_ratio=None,
        expand_timesteps=False,
        wan22_vae=False,
        flow_shift=FLOW_SHIFT,
        defaults=TINY_DEFAULTS,
    ),
}


VOCAB_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "and",
    "in",
    "on",
    "with",
    "red",
    "green",
    "blue",
    "yellow",
    "white",
    "black",
    "purple",
    "orange",
    "cat",
    "dog",
    "bird",
    "car",
    "square",
    "disc",
    "circle",
    "moving",
    "left",
    "right",
    "up",
    "down",
    "slowly",
    "fast",
    "over",
    "under",
    "city",
    "forest",
    "sea",
    "sky",
    "night",
    "day",
)


def tokenizer_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary: specials, lowercase words, and single characters as fallback."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = VOCAB_WORDS
    pieces = [("\u2581" + w, -2.0 - i * 0.01) for i, w in enumerate(words)]
    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces += [("\u2581", -3.0)] + [(c, -5.0 - i * 0.01) for i, c in enumerate(chars)]
    return specials + pieces


def build_tokenizer():
    """A real fast tokenizer (Unigram + Metaspace, as T5's) wrapped as transformers' T5TokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram(tokenizer_vocab(), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)


def transformer_config(size: TinySize, in_channels: int = 16, out_channels: int = 16) -> dict:
    return wan_transformer_config(
        size.num_heads, size.head_dim, size.ffn_dim, size.num_layers, size.text_dim, in_channels, out_channels
    )


def wan_transformer_config(
    num_heads: int,
    head_dim: int,
    ffn_dim: int,
    num_layers: int,
    text_dim: int,
    in_channels: int = 16,
    out_channels: int = 16,
) -> dict:
    """`WanTransformer3DModel` arguments of a small model with the real one's structure (patch
    1x2x2, RMS qk-norm across heads, cross-attention norm, no image embedding). Channels: 16/16
    for T2V, 36/16 for I2V-A14B, 48/48 for TI2V-5B."""
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=text_dim,
        freq_dim=256,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )


def umt5_config(vocab_size: int, d_model: int, num_layers: int):
    """A small `UMT5Config` (8-wide heads, gated GELU, no dropout, T5's special ids)."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=num_layers,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def flow_unipc_scheduler(flow_shift: float = FLOW_SHIFT):
    """UniPC on shifted flow sigmas: the scheduler the Wan2.2 repos ship."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=flow_shift
    )


def _seeded(seed: int, build):
    """Build a module with its random init drawn from `seed` (CPU init is deterministic)."""
    torch.manual_seed(seed)
    return build().eval()


def _perturb_zero_init(module: torch.nn.Module, seed: int) -> None:
    """diffusers zero-inits nothing in Wan, but some norms start at exactly 1/0; nudge every
    parameter so the oracle compares real arithmetic, not identities."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def wan22_vae_config(size: TinySize, seed: int) -> dict:
    """`AutoencoderKLWan` arguments of a small Wan2.2 VAE (the TI2V-5B one), with the real config's
    keys: z_dim 48, residual blocks, 2x2 pixel patchify (so 12 channels in and out), 16x spatial and
    4x temporal compression, a decoder wider than the encoder (real: 160 / 256), and 48 fixed
    latents_mean / latents_std values far enough from 0 / 1 that de-normalisation is exercised."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(48, generator=gen) * 0.5
    std = 0.5 + torch.rand(48, generator=gen)
    return dict(
        base_dim=size.vae_base_dim,
        decoder_base_dim=size.vae_base_dim * 3 // 2,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[round(float(v), 4) for v in mean],
        latents_std=[round(float(v), 4) for v in std],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_temporal=4,
        scale_factor_spatial=16,
    )


def build_components(size: TinySize, seed: int, two_experts: bool, layout: Layout | None = None):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    if layout is None:
        layout = LAYOUT_SPECS["t2v-a14b" if two_experts else "t2v-wan21"]
    tokenizer = build_tokenizer()
    text_config = umt5_config(len(tokenizer_vocab()), size.text_dim, size.text_layers)
    text_encoder = _seeded(seed, lambda: UMT5EncoderModel(text_config))
    if layout.wan22_vae:
        vae_config = wan22_vae_config(size, seed + 4)
    else:
        vae_config = dict(
            base_dim=size.vae_base_dim,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    vae = _seeded(seed + 1, lambda: AutoencoderKLWan(**vae_config))
    tcfg = transformer_config(size, layout.in_channels, layout.out_channels)
    experts = {"transformer": _seeded(seed + 2, lambda: WanTransformer3DModel(**tcfg))}
    if layout.num_experts == 2:
        experts["transformer_2"] = _seeded(seed + 3, lambda: WanTransformer3DModel(**tcfg))
    for offset, module in enumerate(experts.values()):
        _perturb_zero_init(module, seed + 10 + offset)
    return tokenizer, text_encoder, vae, experts, flow_unipc_scheduler(layout.flow_shift)


def write_tiny_checkpoint(
    out_dir: str | Path, size: str = "tiny", seed: int = 0, two_experts: bool = True, layout: str | None = None
) -> Path:
    """Write a checkpoint to `out_dir` and return it.

    `layout` is one of `LAYOUTS`; when None, `two_experts` picks it ("t2v-a14b", or "t2v-wan21" for
    False), so older callers keep their byte-identical output. A given `layout` overrides `two_experts`.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    if layout is None:
        layout = "t2v-a14b" if two_experts else "t2v-wan21"
    if layout not in LAYOUT_SPECS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    spec = SIZES[size]
    lay = LAYOUT_SPECS[layout]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder, vae, experts, scheduler = build_components(spec, seed, lay.num_experts == 2, lay)

    save_wan_checkpoint(
        out,
        tokenizer,
        text_encoder,
        vae,
        scheduler,
        experts,
        shard_size=spec.shard_bytes,
        boundary_ratio=lay.boundary_ratio,
        defaults=lay.defaults,
        pipeline=lay.pipeline,
        expand_timesteps=lay.expand_timesteps,
    )
    return out


def save_wan_checkpoint(
    out: Path,
    tokenizer,
    text_encoder,
    vae,
    scheduler,
    experts: dict,
    shard_size: int | str,
    boundary_ratio: float | None,
    defaults: dict,
    pipeline: str = "WanPipeline",
    expand_timesteps: bool = False,
) -> None:
    """Write the components in the layout `<pipeline>.save_pretrained` produces (experts sharded
    at `shard_size`, so the index path is always exercised), plus `reelserve_defaults.json`.
    `pipeline` is "WanPipeline" or "WanImageToVideoPipeline" (the latter without a CLIP image
    encoder, as Wan2.2 I2V-A14B: image_encoder and image_processor are null in model_index.json)."""
    import diffusers

    if pipeline not in ("WanPipeline", "WanImageToVideoPipeline"):
        raise ValueError(f"unknown pipeline class {pipeline!r}")
    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(out / "tokenizer")
    vae.save_pretrained(out / "vae", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    for name, module in experts.items():
        module.save_pretrained(out / name, safe_serialization=True, max_shard_size=shard_size)
    pipe = getattr(diffusers, pipeline)(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=experts["transformer"],
        transformer_2=experts.get("transformer_2"),
        boundary_ratio=boundary_ratio,
        expand_timesteps=expand_timesteps,
    )
    pipe.save_config(out)  # model_index.json, exactly as save_pretrained writes it
    (out / DEFAULTS_FILE).write_text(json.dumps(defaults, indent=2, sort_keys=True) + "\n")


@contextmanager
def checkpoint_or_tiny(model_dir: str | Path | None, size: str = "bench") -> Iterator[Path]:
    """`model_dir` if given, else a tiny checkpoint of `size` built in a temporary directory that
    is removed afterwards (what every bench script does when run without --model)."""
    if model_dir is not None:
        yield Path(model_dir)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield write_tiny_checkpoint(Path(tmp) / size, size=size)
