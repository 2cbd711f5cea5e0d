"""Train the demo model on CPU: a Wan2.2 T2V-A14B-shaped checkpoint that really follows prompts.

    python -m models.demo.train --out models/demo/checkpoint    # the committed model (~75 min on 2 cores)
    python -m models.demo.train --out /tmp/demo --smoke         # a few steps of every stage

Stages, each writing into `--work` (default `build/demo-train/`) so a long run can be resumed
stage by stage (`--stages`):

1. `vae`: an `AutoencoderKLWan` (8x spatial, 4x temporal, z_dim 16) trained as a deterministic
   autoencoder on 9-frame clips with the object's pixels weighted `1 + object_weight`: a plain
   MSE is dominated by the dark background and greys the object's colour out.
2. `latents`: encodes a fixed set of 17-frame training clips and measures per-channel latent mean
   and std, which go into the VAE config (`latents_mean`/`latents_std`) exactly as Wan's do.
3. `decoder`: the decoder alone trained further with the encoder frozen (the latents stay valid);
   prints how well colour and direction survive a round trip through the VAE.
4. `base`: one `WanTransformer3DModel` trained with the flow-matching objective over all noise
   levels (captions dropped to the empty prompt `prompt_dropout` of the time, for CFG).
5. `experts`: the base copied into the high-noise expert (`transformer`, sigma >= boundary) and the
   low-noise expert (`transformer_2`, sigma < boundary), each fine-tuned on its own range only.
6. `export`: everything saved in fp16 in the diffusers layout (sharded experts with their index,
   `model_index.json`, UniPC scheduler, word-level tokenizer, frozen random UMT5 encoder).

Determinism: every random draw comes from a seeded generator, step counts are fixed (never a time
budget), and torch runs with a fixed thread count; a rerun on the same machine gives bit-identical
weights (tested in smoke mode; a full-length rerun of the `decoder` stage, 600 steps, gave
bit-identical weights too).
The stages share nothing but their files, so running them one by one gives the same checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from models.demo.data import HEIGHT, NUM_FRAMES, WIDTH, all_combos, render_clip, sample_batch, train_combos
from models.tiny import (
    BOUNDARY_RATIO,  # the A14B T2V split: t >= 875 goes to the high-noise expert
    FLOW_SHIFT,  # the scheduler's shift: training draws sigmas where sampling spends its steps
    flow_unipc_scheduler,
    save_wan_checkpoint,
    umt5_config,
    wan_transformer_config,
)
from serve.pipeline.text_encode import MAX_SEQUENCE_LENGTH  # what WanPipeline pads prompts to
from serve.sampling.presets import shift_sigma

THREADS = 2

# What the demo checkpoint serves by default (reelserve_defaults.json).
DEMO_DEFAULTS = {
    "height": HEIGHT,
    "width": WIDTH,
    "num_frames": NUM_FRAMES,
    "num_inference_steps": 20,
    "guidance_scale": 4.0,
    "guidance_scale_2": 3.0,
    "fps": 8,
}


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    # VAE
    vae_steps: int = 2000
    vae_batch: int = 4
    vae_frames: int = 9  # 1 + 2*4: the first causal chunk and a steady-state chunk
    vae_lr: float = 1e-3
    object_weight: float = 20.0
    decoder_steps: int = 600  # decoder-only fine-tune after the latents are fixed
    decoder_lr: float = 3e-4
    # latents
    clips_per_combo: int = 32
    encode_batch: int = 8
    # transformer
    base_steps: int = 3000
    expert_steps: int = 1000
    tf_batch: int = 32
    tf_lr: float = 1e-3
    expert_lr: float = 3e-4
    prompt_dropout: float = 0.1
    # model shapes
    vae_base_dim: int = 16
    tf_heads: int = 4
    tf_head_dim: int = 32
    tf_ffn: int = 512
    tf_layers: int = 4
    text_dim: int = 32
    text_layers: int = 2
    log_every: int = 100
    roundtrip_clips_per_combo: int = 1  # VAE round-trip report (information only)


SMOKE = TrainConfig(
    vae_steps=2,
    vae_batch=2,
    vae_frames=5,
    decoder_steps=2,
    clips_per_combo=1,
    base_steps=3,
    expert_steps=2,
    tf_batch=4,
    log_every=1,
    roundtrip_clips_per_combo=0,
)

STAGES = ("vae", "latents", "decoder", "base", "experts", "export")


# ---------------------------------------------------------------- tokenizer and text encoder


def vocabulary() -> list[str]:
    """Every word of every caption, after the three specials T5 places first."""
    words: list[str] = ["a", "moving"]
    for combo in all_combos():
        for word in (combo.colour, combo.shape, combo.direction):
            if word not in words:
                words.append(word)
    return ["<pad>", "</s>", "<unk>", *words]


def build_tokenizer():
    """A word-level fast tokenizer: lowercase, split on whitespace and punctuation, `</s>` appended
    (as T5 does), unknown words become `<unk>`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def build_text_encoder(cfg: TrainConfig):
    """A tiny UMT5 encoder with seeded random weights, frozen; rounded to fp16 at once so the
    embeddings used in training are exactly those the exported fp16 checkpoint produces."""
    from transformers import UMT5EncoderModel

    config = umt5_config(len(vocabulary()), cfg.text_dim, cfg.text_layers)
    torch.manual_seed(cfg.seed + 1)
    encoder = UMT5EncoderModel(config).eval().requires_grad_(False)
    _round_to_fp16(encoder)
    return encoder


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """Prompt embeddings exactly as `WanPipeline._get_t5_prompt_embeds` makes them: each prompt's
    hidden states cut to its own length, then zero-padded to 512 positions."""
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = text_encoder(inputs.input_ids, inputs.attention_mask).last_hidden_state.float()
    out = torch.zeros(len(prompts), MAX_SEQUENCE_LENGTH, hidden.shape[-1])
    for i, length in enumerate(inputs.attention_mask.sum(dim=1).tolist()):
        out[i, :length] = hidden[i, :length]
    return out


# ---------------------------------------------------------------- models


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(cfg.seed + 2)
    return AutoencoderKLWan(
        base_dim=cfg.vae_base_dim,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def build_transformer(cfg: TrainConfig):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(cfg.seed + 3)
    return WanTransformer3DModel(
        **wan_transformer_config(cfg.tf_heads, cfg.tf_head_dim, cfg.tf_ffn, cfg.tf_layers, cfg.text_dim)
    )


def _round_to_fp16(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def _cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_loop(
    name: str,
    params: list[torch.nn.Parameter],
    steps: int,
    lr: float,
    loss_fn: Callable[[int], torch.Tensor],
    log_every: int,
) -> list[float]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, steps, lr, warmup=min(100, max(1, steps // 10)))
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            recent = losses[-log_every:]
            print(
                f"[{name}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.5f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    return losses


# ---------------------------------------------------------------- stages


def object_weighted_mse(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: float) -> torch.Tensor:
    """MSE with the object's pixels weighted `1 + weight`: (B, 3, T, H, W) and mask (B, T, H, W)."""
    w = (1.0 + weight * mask).unsqueeze(1)
    return ((recon - target) ** 2 * w).sum() / (w.sum() * recon.shape[1])


def train_vae(cfg: TrainConfig, work: Path) -> None:
    vae = build_vae(cfg).train()
    gen = torch.Generator().manual_seed(cfg.seed + 10)
    combos = all_combos()  # the VAE sees every combination: holding out is about the prompt

    def loss_fn(step: int) -> torch.Tensor:
        pixels, masks, _ = sample_batch(combos, cfg.vae_batch, gen, cfg.vae_frames)
        recon = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
        return object_weighted_mse(recon, pixels, masks, cfg.object_weight)

    _train_loop("vae", list(vae.parameters()), cfg.vae_steps, cfg.vae_lr, loss_fn, cfg.log_every)
    _round_to_fp16(vae)
    vae.eval().save_pretrained(work / "vae", safe_serialization=True)


def finetune_decoder(cfg: TrainConfig, work: Path) -> None:
    """More training for the decoder alone, the encoder frozen: the latents the transformer learns
    from stay exactly valid, and the cheaper step (no encoder backward) buys sharper objects."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(work / "vae")
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    vae.train()
    gen = torch.Generator().manual_seed(cfg.seed + 15)
    combos = all_combos()

    def loss_fn(step: int) -> torch.Tensor:
        pixels, masks, _ = sample_batch(combos, cfg.vae_batch, gen, cfg.vae_frames)
        with torch.no_grad():
            z = vae.encode(pixels).latent_dist.mode()
        return object_weighted_mse(vae.decode(z).sample, pixels, masks, cfg.object_weight)

    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    _train_loop("decoder", params, cfg.decoder_steps, cfg.decoder_lr, loss_fn, cfg.log_every)
    _round_to_fp16(vae)
    vae.eval()
    report_vae_roundtrip(vae, cfg, "decoder")
    vae.save_pretrained(work / "vae_decoder", safe_serialization=True)


def encode_latents(cfg: TrainConfig, work: Path) -> None:
    """Latents of `clips_per_combo` clips of every trained combination, and their channel stats."""
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    vae = AutoencoderKLWan.from_pretrained(work / "vae").eval()
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    trained = train_combos()
    combos = [c for c in trained for _ in range(cfg.clips_per_combo)]
    latents, labels = [], []
    with torch.no_grad():
        for start in range(0, len(combos), cfg.encode_batch):
            chunk = combos[start : start + cfg.encode_batch]
            pixels = torch.stack([render_clip(c, gen)[0] for c in chunk])
            latents.append(vae.encode(pixels).latent_dist.mode())
            labels += [trained.index(c) for c in chunk]
    z = torch.cat(latents)
    report_vae_roundtrip(vae, cfg, "latents")
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    save_file(
        {"latents": z.contiguous(), "labels": torch.tensor(labels), "mean": mean, "std": std},
        str(work / "latents.safetensors"),
    )
    print(f"[latents] {tuple(z.shape)} mean {mean.abs().mean():.3f} std {std.mean():.3f}", flush=True)


def report_vae_roundtrip(vae, cfg: TrainConfig, stage: str) -> None:
    """How much of the task survives the VAE alone: the harness's colour and direction detectors
    on encode-decode round trips of 17-frame clips of every combination, and the object's PSNR."""
    from models.demo.quality import Score, clip_to_frames

    if cfg.roundtrip_clips_per_combo == 0:
        return
    gen = torch.Generator().manual_seed(cfg.seed + 21)
    score, object_psnr = Score(), []
    with torch.no_grad():
        for combo in all_combos() * cfg.roundtrip_clips_per_combo:
            pixels, mask = render_clip(combo, gen)
            recon = vae.decode(vae.encode(pixels[None]).latent_dist.mode()).sample[0].clamp(-1, 1)
            score.add(combo, clip_to_frames(recon), 0.0)
            mse = ((recon - pixels) / 2).pow(2)[:, mask > 0.5].mean()
            object_psnr.append(float(-10 * torch.log10(mse)))
    print(
        f"[{stage}] VAE round trip over {score.videos} clips: colour {score.colour_accuracy:.0%}, "
        f"direction {score.direction_accuracy:.0%}, object PSNR {sum(object_psnr) / len(object_psnr):.1f} dB",
        flush=True,
    )


def _load_latents(work: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(work / "latents.safetensors"))


def _caption_embeddings(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every trained caption (in `train_combos()` order) and of the empty prompt."""
    tokenizer, encoder = build_tokenizer(), build_text_encoder(cfg)
    captions = [c.caption for c in train_combos()]
    return encode_prompts(tokenizer, encoder, captions), encode_prompts(tokenizer, encoder, [""])[0]


def _unshift(sigma: float, shift: float = FLOW_SHIFT) -> float:
    """The inverse of `shift_sigma`: which uniform draw lands on `sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def flow_matching_loss(
    model,
    x0: torch.Tensor,
    text: torch.Tensor,
    gen: torch.Generator,
    sigma_range: tuple[float, float],
) -> torch.Tensor:
    """Rectified-flow loss as Wan is trained: x_t = (1 - s) x0 + s noise, target noise - x0,
    timestep 1000 s, with s drawn from the shifted distribution restricted to `sigma_range`."""
    lo, hi = _unshift(sigma_range[0]), _unshift(sigma_range[1])
    u = lo + (hi - lo) * torch.rand(x0.shape[0], generator=gen)
    sigma = shift_sigma(u, FLOW_SHIFT).view(-1, 1, 1, 1, 1)  # where the sampler spends its steps
    noise = torch.randn(x0.shape, generator=gen)
    x_t = (1 - sigma) * x0 + sigma * noise
    pred = model(hidden_states=x_t, timestep=sigma.flatten() * 1000, encoder_hidden_states=text, return_dict=False)[0]
    return F.mse_loss(pred, noise - x0)


def _transformer_batches(
    cfg: TrainConfig, work: Path, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (normalised latents, prompt embeddings) batches; captions dropped to the empty
    prompt with probability `prompt_dropout`, which is what CFG's unconditional branch sees."""
    data = _load_latents(work)
    x0_all = (data["latents"] - data["mean"].view(1, -1, 1, 1, 1)) / data["std"].view(1, -1, 1, 1, 1)
    labels = data["labels"]
    captions, empty = _caption_embeddings(cfg)
    while True:
        idx = torch.randint(x0_all.shape[0], (cfg.tf_batch,), generator=gen)
        text = captions[labels[idx]].clone()
        dropped = torch.rand(cfg.tf_batch, generator=gen) < cfg.prompt_dropout
        text[dropped] = empty
        yield x0_all[idx], text


def train_transformer(
    cfg: TrainConfig,
    work: Path,
    model,
    steps: int,
    lr: float,
    sigma_range: tuple[float, float],
    seed_offset: int,
    name: str,
) -> None:
    gen = torch.Generator().manual_seed(cfg.seed + seed_offset)
    batches = _transformer_batches(cfg, work, gen)
    model.train()

    def loss_fn(step: int) -> torch.Tensor:
        x0, text = next(batches)
        return flow_matching_loss(model, x0, text, gen, sigma_range)

    _train_loop(name, list(model.parameters()), steps, lr, loss_fn, cfg.log_every)
    model.eval()


def train_base(cfg: TrainConfig, work: Path) -> None:
    model = build_transformer(cfg)
    train_transformer(cfg, work, model, cfg.base_steps, cfg.tf_lr, (0.0, 1.0), 30, "base")
    model.save_pretrained(work / "base", safe_serialization=True)


def train_experts(cfg: TrainConfig, work: Path) -> None:
    from diffusers import WanTransformer3DModel

    ranges = {"transformer": (BOUNDARY_RATIO, 1.0), "transformer_2": (0.0, BOUNDARY_RATIO)}
    for offset, (name, sigma_range) in enumerate(ranges.items()):
        model = WanTransformer3DModel.from_pretrained(work / "base")
        train_transformer(cfg, work, model, cfg.expert_steps, cfg.expert_lr, sigma_range, 40 + offset, name)
        _round_to_fp16(model)
        model.save_pretrained(work / name, safe_serialization=True)


def _trained(model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """A freshly built model with the weights a stage saved in `directory`, so the exported config
    is the builder's own (no `_name_or_path` pointing into the work directory)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(directory / "diffusion_pytorch_model.safetensors")))
    return model.eval()


def _check_replaceable(out: Path) -> None:
    """Export replaces `out` wholesale: only ever an empty directory or an earlier export."""
    if out.exists() and any(out.iterdir()) and not (out / "training_config.json").is_file():
        raise SystemExit(
            f"{out}: exists and is not a checkpoint this script wrote (no training_config.json); "
            "choose another --out or remove it yourself"
        )


def export(cfg: TrainConfig, work: Path, out: Path) -> None:
    """Write the checkpoint in fp16, in the layout `WanPipeline.save_pretrained` produces."""
    _check_replaceable(out)
    data = _load_latents(work)
    vae = _trained(build_vae(cfg), work / "vae_decoder")
    vae.register_to_config(latents_mean=data["mean"].tolist(), latents_std=data["std"].tolist())
    experts = {name: _trained(build_transformer(cfg), work / name).half() for name in ("transformer", "transformer_2")}
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_wan_checkpoint(
        out,
        build_tokenizer(),
        build_text_encoder(cfg).half(),
        vae.half(),
        flow_unipc_scheduler(),
        experts,
        shard_size="1MB",  # small shards: the demo exercises the sharded index path like a real checkpoint
        boundary_ratio=BOUNDARY_RATIO,
        defaults=DEMO_DEFAULTS,
    )
    (out / "training_config.json").write_text(json.dumps(asdict(cfg), indent=2, sort_keys=True) + "\n")


def run(cfg: TrainConfig, out: Path, work: Path, stages: tuple[str, ...] = STAGES) -> Path:
    """Run `stages` in order; torch's global RNG and thread count are restored afterwards."""
    if "export" in stages:
        _check_replaceable(out)  # before an hour of training, not after
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with torch.random.fork_rng():
            _run_stages(cfg, out, work, stages)
    finally:
        torch.set_num_threads(threads)
    return out


def _run_stages(cfg: TrainConfig, out: Path, work: Path, stages: tuple[str, ...]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    steps = {
        "vae": lambda: train_vae(cfg, work),
        "latents": lambda: encode_latents(cfg, work),
        "decoder": lambda: finetune_decoder(cfg, work),
        "base": lambda: train_base(cfg, work),
        "experts": lambda: train_experts(cfg, work),
        "export": lambda: export(cfg, work, out),
    }
    run_timed(steps, stages)


def parse_stages(parser: argparse.ArgumentParser, text: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """`--stages a,b` as a tuple; an unknown stage is the parser's error, naming the known ones."""
    stages = tuple(s for s in text.split(",") if s)
    unknown = [s for s in stages if s not in known]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {','.join(known)}")
    return stages


def run_timed(steps: dict, stages: tuple[str, ...]) -> None:
    """Run `steps[stage]` for each of `stages` in order, printing how long each took."""
    for stage in stages:
        started = time.perf_counter()
        steps[stage]()
        print(f"[{stage}] done in {time.perf_counter() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument(
        "--work", type=Path, default=Path("build/demo-train"), help="intermediate files (default: build/demo-train)"
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps of every stage, to check it runs")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    args = parser.parse_args(argv)
    stages = parse_stages(parser, args.stages, STAGES)
    cfg = SMOKE if args.smoke else TrainConfig()
    run(cfg, args.out, args.work, stages)


if __name__ == "__main__":
    main()
