"""Train the image-to-video companion of the demo model on CPU: a Wan2.2 I2V-A14B-shaped checkpoint
(`WanImageToVideoPipeline` layout) where the image fixes the object and the prompt its motion.

    python -m models.demo.i2v_train --out models/demo/i2v_checkpoint   # the committed model
    python -m models.demo.i2v_train --out /tmp/demo-i2v --smoke         # a few steps of every stage

It starts from the text-to-video demo (`--source`, default `models/demo/checkpoint`) and trains
only the two experts: the VAE, the text encoder and the tokenizer are the T2V demo's, loaded with
`from_pretrained` and exported byte for byte. Captions name only the direction ("moving left"):
the conditioning image is the only place colour, shape, size and start position can come from.

Stages, each writing into `--work` (default `build/demo-i2v-train/`), so a run can be resumed
stage by stage (`--stages`):

1. `latents`: `clips_per_combo` 17-frame clips of every trained combination (data.py), each
   VAE-encoded (posterior mode, normalised with the VAE's latents_mean/std: the target), and its
   conditioning video [first frame as 8-bit RGB, 16 zero frames] encoded as
   `models.wan.vae.encode_condition` does at inference (batched; checked against it).
2. `base`: one I2V transformer, initialised from the T2V demo's low-noise expert (every weight
   copied; the patch embedding grows from 16 to 36 input channels, the 20 new ones zero, so
   training starts from exactly what that expert computes), fine-tuned over all noise levels with train.py's
   `flow_matching_loss` (same sigma shift, 10% empty prompts), the input being
   cat([noisy latents, first-frame mask, condition latents]). One model over all levels, as
   train.py's base: reading the image pays off most at high noise, and a low-noise expert trained
   only on its own range barely learns it (measured: its frame-0 error was the same with the
   image zeroed), so the skill is learned once and both experts inherit it.
3. `experts`: the base copied into the high-noise expert (`transformer`, sigma >= boundary) and
   the low-noise one (`transformer_2`), each fine-tuned on its own sigma range only.
4. `export`: fp16, the `WanImageToVideoPipeline.save_pretrained` layout (no image encoder, as
   Wan2.2 I2V-A14B), boundary_ratio 0.875 (the T2V demo's split, which both experts inherit; the
   real I2V-A14B uses 0.9).

Determinism as in train.py: seeded generators, fixed step counts, a fixed torch thread count
(`THREADS`); a rerun gives bit-identical weights (tested in smoke mode).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.demo.data import DIRECTIONS, NUM_FRAMES, render_clip, train_combos
from models.demo.train import (
    DEMO_DEFAULTS,
    _check_replaceable,
    _round_to_fp16,
    _train_loop,
    encode_prompts,
    flow_matching_loss,
    parse_stages,
    run_timed,
)
from models.tiny import BOUNDARY_RATIO, flow_unipc_scheduler, save_wan_checkpoint, wan_transformer_config
from models.wan.i2v import first_frame_mask
from models.wan.vae import encode_condition, image_tensor, latent_stats
from serve.engine.request import ConditionImage
from serve.pipeline.text_encode import MAX_SEQUENCE_LENGTH

SOURCE = Path(__file__).resolve().parent / "checkpoint"  # the T2V demo
# One torch thread, not train.py's two: on a 2-core machine shared with other work, two threads
# spin at every parallel region's barrier (measured: a batch-16 step took 17 s with 2 threads and
# 1.35 s with 1 while another process held a core; on an idle machine 2 threads are ~2x faster).
THREADS = 1
EXPERTS = ("transformer", "transformer_2")  # high noise (sigma >= boundary), low noise
# The base starts from the T2V demo's low-noise expert, the one that denoises most of the
# trajectory (sigma < 0.875 is ~70% of the shifted training draws and of the 20 sampling steps).
BASE_FROM = "transformer_2"
COPIED = ("vae", "text_encoder", "tokenizer")  # the T2V demo's files, exported unchanged
IN_CHANNELS = 36  # 16 noise + 4 first-frame mask + 16 condition latents
# Prompt positions training attends to (`CompactText`): "moving left" is 3 tokens with `</s>`,
# plus the one position that stands for all of the padding.
COMPACT_LENGTH = 4
DIRECTION_NAMES = list(DIRECTIONS)


def direction_prompt(direction: str) -> str:
    """The only caption the I2V demo is trained on: every word is in the T2V demo's vocabulary."""
    return f"moving {direction}"


@dataclass(frozen=True)
class I2VConfig:
    seed: int = 0
    # data
    clips_per_combo: int = 12
    max_clips: int = 0  # 0: all; smoke mode encodes only a few
    encode_batch: int = 8
    # transformer
    base_steps: int = 3500
    base_batch: int = 16
    base_lr: float = 1e-3  # train.py's tf_lr: the 20 new input channels start from zero
    # The high-noise expert decides the colour of every frame (its first prediction already does;
    # later steps keep it), and the colour of the later frames is the slowest thing to learn: with
    # 2000 steps, 24 of the 28 balanced test images kept their colour to the last frame (green and
    # cyan objects drifted to red, white, yellow; the harness: 86.5% of trained combinations), with
    # 5000 steps 26. 5000 steps took 33 min here on a contended thread (~16 min uncontended).
    high_steps: int = 5000
    low_steps: int = 800
    expert_batch: int = 16
    expert_lr: float = 5e-4
    prompt_dropout: float = 0.1
    boundary_ratio: float = BOUNDARY_RATIO
    log_every: int = 50


SMOKE = I2VConfig(
    clips_per_combo=1,
    max_clips=2,
    encode_batch=2,
    base_steps=3,
    base_batch=4,
    high_steps=2,
    low_steps=2,
    expert_batch=4,
    log_every=1,
)

STAGES = ("latents", "base", "experts", "export")


# ---------------------------------------------------------------- the T2V demo's components


def load_vae(source: Path):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(source / "vae", torch_dtype=torch.float32).eval()


def load_text(source: Path):
    """The T2V demo's tokenizer and frozen text encoder (fp16 weights, exact in fp32)."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(source / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(source / "text_encoder", dtype=torch.float32)
    return tokenizer, encoder.eval().requires_grad_(False)


def i2v_transformer_config(t2v_config) -> dict:
    """The T2V expert's architecture with 36 input channels (asserted to be the demo's builder's)."""
    keys = ("num_attention_heads", "attention_head_dim", "ffn_dim", "num_layers", "text_dim")
    shape = [t2v_config[k] for k in keys]
    config = wan_transformer_config(*shape)
    mismatched = {k: (v, t2v_config[k]) for k, v in config.items() if t2v_config[k] != v and k != "patch_size"}
    if mismatched or list(t2v_config["patch_size"]) != list(config["patch_size"]):
        raise ValueError(f"the source expert is not the demo architecture: {mismatched}")
    return wan_transformer_config(*shape, in_channels=IN_CHANNELS, out_channels=16)


def widen_from_t2v(t2v) -> torch.nn.Module:
    """An I2V expert that computes exactly what `t2v` does, whatever the 20 extra channels hold:
    every weight copied, the patch embedding's columns for the mask and condition channels zero."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**i2v_transformer_config(t2v.config))
    state = {k: v.float() for k, v in t2v.state_dict().items()}
    weight = state["patch_embedding.weight"]  # (dim, 16, 1, 2, 2)
    wide = weight.new_zeros(weight.shape[0], IN_CHANNELS, *weight.shape[2:])
    wide[:, : weight.shape[1]] = weight
    state["patch_embedding.weight"] = wide
    model.load_state_dict(state)  # strict: every weight of the T2V expert, nothing else
    return model.eval()


def load_t2v_expert(source: Path, name: str):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(source / name, torch_dtype=torch.float32)


# ---------------------------------------------------------------- conditioning


def condition_image(pixels: torch.Tensor) -> ConditionImage:
    """A clip's first frame as a request carries it: 8-bit RGB at the clip's size."""
    from models.demo.quality import clip_to_frames

    first = clip_to_frames(pixels[:, :1])[0]
    return ConditionImage(width=first.shape[1], height=first.shape[0], rgb=first.tobytes())


@torch.inference_mode()
def encode_conditions(vae, images: list[ConditionImage], num_frames: int) -> torch.Tensor:
    """`encode_condition` for a batch: [image, zero frames] through the VAE, posterior mode,
    (z - mean) / std. Same operations; batching changes only float rounding (checked in `encode`)."""
    pixels = torch.cat([image_tensor(im) for im in images]).unsqueeze(2)
    pad = pixels.new_zeros(pixels.shape[0], 3, num_frames - 1, *pixels.shape[-2:])
    latents = vae.encode(torch.cat([pixels, pad], dim=2)).latent_dist.mode()
    mean, std = latent_stats(vae, torch.device("cpu"))
    return (latents - mean) * (1.0 / std)


def encode_latents(cfg: I2VConfig, source: Path, work: Path) -> None:
    """Targets and conditions of `clips_per_combo` clips of every trained combination."""
    from safetensors.torch import save_file

    vae = load_vae(source)
    mean, std = latent_stats(vae, torch.device("cpu"))
    gen = torch.Generator().manual_seed(cfg.seed + 50)
    combos = [c for c in train_combos() for _ in range(cfg.clips_per_combo)]
    if cfg.max_clips:
        combos = combos[:: max(1, len(combos) // cfg.max_clips)][: cfg.max_clips]
    targets, conditions, labels = [], [], []
    started = time.perf_counter()
    for start in range(0, len(combos), cfg.encode_batch):
        chunk = combos[start : start + cfg.encode_batch]
        pixels = torch.stack([render_clip(c, gen)[0] for c in chunk])
        images = [condition_image(p) for p in pixels]
        with torch.inference_mode():
            targets.append((vae.encode(pixels).latent_dist.mode() - mean) / std)
        conditions.append(encode_conditions(vae, images, NUM_FRAMES))
        if start == 0:  # the batched encode is the inference path's, up to float rounding
            single = encode_condition(vae, images[0], NUM_FRAMES, torch.device("cpu"))
            err = float((single - conditions[0][:1]).abs().max())
            if err > 1e-4:
                raise AssertionError(f"batched condition encode differs from encode_condition by {err}")
        labels += [DIRECTION_NAMES.index(c.direction) for c in chunk]
        if (start // cfg.encode_batch + 1) % 10 == 0:
            print(f"[latents] {start + len(chunk)}/{len(combos)} clips ({time.perf_counter() - started:.0f} s)")
    x0, cond = torch.cat(targets), torch.cat(conditions)
    save_file(
        {"latents": x0.contiguous(), "condition": cond.contiguous(), "direction": torch.tensor(labels)},
        str(work / "i2v_latents.safetensors"),
    )
    print(f"[latents] {tuple(x0.shape)} targets and conditions; target std {x0.std():.3f}", flush=True)


# ---------------------------------------------------------------- training


class CompactText:
    """Cross-attention over a prompt cut to `length` positions (its real tokens, then padding),
    computing exactly what the 512-position prompt gives.

    `encode_prompts` zero-pads every prompt to 512 positions, as WanPipeline does, and the model
    attends to all of them. Every padding position holds the same zero vector, so all have the same
    key and value, and a softmax over M identical keys equals one such key with its logit raised by
    log M. So the last kept position (always padding) stands for all `512 - length + 1` padding
    positions through an additive attention bias. Same function, same gradients (up to float
    rounding; tested): the 512-long cross-attention was more than half of a training step.
    """

    def __init__(self, length: int):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        class Processor(WanAttnProcessor):
            """diffusers' own processor, given the bias as its (otherwise unused) attention mask."""

            bias: torch.Tensor

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
                return super().__call__(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)

        self.length = length
        self.processor = Processor()
        self.processor.bias = torch.zeros(1, 1, 1, length)
        self.processor.bias[..., -1] = math.log(MAX_SEQUENCE_LENGTH - length + 1)

    def cut(self, embeddings: torch.Tensor) -> torch.Tensor:
        if (embeddings[:, self.length - 1 :] != 0).any():
            raise ValueError(f"a prompt is longer than {self.length - 1} tokens")
        return embeddings[:, : self.length]

    def install(self, transformer: torch.nn.Module) -> None:
        for block in transformer.blocks:
            block.attn2.set_processor(self.processor)

    @staticmethod
    def uninstall(transformer: torch.nn.Module) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        for block in transformer.blocks:
            block.attn2.set_processor(WanAttnProcessor())


class Conditioned(torch.nn.Module):
    """What `flow_matching_loss` calls as its model: an I2V transformer whose 16 noisy input
    channels are followed by this step's 20 condition channels (first-frame mask, image latents),
    exactly `torch.cat([latents, condition], dim=1)` as the sampling loop builds them."""

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer
        self.condition: torch.Tensor | None = None

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
        return self.transformer(
            hidden_states=torch.cat([hidden_states, self.condition], dim=1),
            timestep=timestep,
            encoder_hidden_states=encoder_hidden_states,
            return_dict=False,
        )


def _load_latents(work: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(work / "i2v_latents.safetensors"))


def _batches(
    cfg: I2VConfig, source: Path, work: Path, batch: int, compact: CompactText, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless (target latents, condition channels, prompt embeddings) batches, as train.py's
    `_transformer_batches`: captions (here "moving {direction}") dropped to the empty prompt with
    probability `prompt_dropout`, the unconditional branch of CFG (which still sees the image).
    Prompt embeddings are cut by `compact` (see `CompactText`)."""
    data = _load_latents(work)
    x0_all, cond_all, labels = data["latents"], data["condition"], data["direction"]
    mask = first_frame_mask(x0_all[:1], 4)  # (1, 4, F', h, w): the VAE packs 4 frames per latent frame
    tokenizer, encoder = load_text(source)
    captions = compact.cut(encode_prompts(tokenizer, encoder, [direction_prompt(d) for d in DIRECTION_NAMES]))
    empty = compact.cut(encode_prompts(tokenizer, encoder, [""]))[0]
    while True:
        idx = torch.randint(x0_all.shape[0], (batch,), generator=gen)
        text = captions[labels[idx]].clone()
        dropped = torch.rand(batch, generator=gen) < cfg.prompt_dropout
        text[dropped] = empty
        condition = torch.cat([mask.expand(batch, -1, -1, -1, -1), cond_all[idx]], dim=1)
        yield x0_all[idx], condition, text


def train_i2v(
    cfg: I2VConfig,
    source: Path,
    work: Path,
    transformer: torch.nn.Module,
    steps: int,
    batch: int,
    lr: float,
    sigma_range: tuple[float, float],
    seed_offset: int,
    name: str,
) -> None:
    """train.py's `train_transformer` with the condition channels: the same loss, optimiser,
    schedule and clipping (`flow_matching_loss`, `_train_loop`); cross-attention over the
    compacted prompts (`CompactText`, the same function)."""
    gen = torch.Generator().manual_seed(cfg.seed + seed_offset)
    compact = CompactText(COMPACT_LENGTH)
    batches = _batches(cfg, source, work, batch, compact, gen)
    compact.install(transformer)
    model = Conditioned(transformer).train()

    def loss_fn(step: int) -> torch.Tensor:
        x0, model.condition, text = next(batches)
        return flow_matching_loss(model, x0, text, gen, sigma_range)

    try:
        _train_loop(name, list(model.parameters()), steps, lr, loss_fn, cfg.log_every)
    finally:
        CompactText.uninstall(transformer)
    model.eval()


def _save(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def _load(directory: Path, config) -> torch.nn.Module:
    """A freshly built I2V expert with saved weights (its config the builder's own)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    model = WanTransformer3DModel(**i2v_transformer_config(config))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()


def train_base(cfg: I2VConfig, source: Path, work: Path) -> None:
    model = widen_from_t2v(load_t2v_expert(source, BASE_FROM))
    train_i2v(cfg, source, work, model, cfg.base_steps, cfg.base_batch, cfg.base_lr, (0.0, 1.0), 60, "base")
    _save(model, work / "base")


def train_experts(cfg: I2VConfig, source: Path, work: Path) -> None:
    t2v_config = load_t2v_expert(source, BASE_FROM).config
    ranges = {
        "transformer": ((cfg.boundary_ratio, 1.0), cfg.high_steps),
        "transformer_2": ((0.0, cfg.boundary_ratio), cfg.low_steps),
    }
    for offset, (name, (sigma_range, steps)) in enumerate(ranges.items()):
        model = _load(work / "base", t2v_config)
        train_i2v(cfg, source, work, model, steps, cfg.expert_batch, cfg.expert_lr, sigma_range, 70 + offset, name)
        _round_to_fp16(model)
        _save(model, work / name)


def export(cfg: I2VConfig, source: Path, work: Path, out: Path) -> None:
    """fp16 in the layout `WanImageToVideoPipeline.save_pretrained` writes; the VAE, text encoder
    and tokenizer directories are then the source's own files, copied unchanged."""
    _check_replaceable(out)
    t2v_config = load_t2v_expert(source, BASE_FROM).config
    experts = {name: _load(work / name, t2v_config).half() for name in EXPERTS}
    tokenizer, encoder = load_text(source)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_wan_checkpoint(
        out,
        tokenizer,
        encoder.half(),
        load_vae(source).half(),
        flow_unipc_scheduler(),
        experts,
        shard_size="1MB",  # as the T2V demo: the sharded index path, like a real checkpoint
        boundary_ratio=cfg.boundary_ratio,
        defaults=DEMO_DEFAULTS,
        pipeline="WanImageToVideoPipeline",
    )
    for name in COPIED:
        shutil.rmtree(out / name)
        shutil.copytree(source / name, out / name)
    config = asdict(cfg) | {
        "source": "models/demo/checkpoint (the T2V demo)",
        "caption": direction_prompt("{direction}"),
    }
    (out / "training_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------- driver


def run(cfg: I2VConfig, out: Path, work: Path, stages: tuple[str, ...] = STAGES, source: Path = SOURCE) -> Path:
    """Run `stages` in order; torch's global RNG and thread count are restored afterwards."""
    if "export" in stages:
        _check_replaceable(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.random.fork_rng():
            _run_stages(cfg, source, out, work, stages)
    finally:
        torch.set_num_threads(threads)
    return out


def _run_stages(cfg: I2VConfig, source: Path, out: Path, work: Path, stages: tuple[str, ...]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    steps = {
        "latents": lambda: encode_latents(cfg, source, work),
        "base": lambda: train_base(cfg, source, work),
        "experts": lambda: train_experts(cfg, source, work),
        "export": lambda: export(cfg, source, work, out),
    }
    run_timed(steps, stages)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.demo.i2v_train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("build/demo-i2v-train"),
        help="intermediate files (default: build/demo-i2v-train)",
    )
    parser.add_argument("--source", type=Path, default=SOURCE, help="the T2V demo checkpoint to start from")
    parser.add_argument("--smoke", action="store_true", help="a few steps of every stage, to check it runs")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args = parser.parse_args(argv)
    stages = parse_stages(parser, args.stages, STAGES)
    cfg = SMOKE if args.smoke else I2VConfig()
    run(cfg, args.out, args.work, stages, args.source)


if __name__ == "__main__":
    main()
