"""What the config.json of each allowed class (`serve.loader.build.ALLOWED`) says about the weights,
in terms the headers can confirm: how many repeated blocks there are, and the shapes of a few
tensors whose dimensions come straight from config fields.

These are the fields an operator edits or mixes up between downloads, so each check names the
field; `serve.loader.config_check` runs them before building anything and then compares every
other tensor generically. Pure arithmetic on the config dict: nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serve.loader.errors import CheckpointError

# Wan's rope tables are real buffers of rope_max_seq_len rows built in __init__ (the only config
# size no header shows). The Wan repos use 1024; this is 16x that, and the tables stay ~30 MB.
MAX_ROPE_LEN = 16384


@dataclass(frozen=True)
class Dim:
    """One expected dimension and the config fields that set it ("ffn_dim is 13824"); None when the
    class fixes it (a kernel size)."""

    size: int
    field: str | None = None


@dataclass(frozen=True)
class KeyTensor:
    names: tuple[str, ...]
    """The tensor under its possible names; the first one the headers hold is checked."""
    dims: tuple[Dim, ...]
    wanted_by: str | None = None
    """For an optional part the config switches on ("image_dim is 1280"): the headers must hold it."""


@dataclass(frozen=True)
class BlockCount:
    """The config implies `expected` distinct indices N among tensors named `prefix`N."""

    prefix: str
    expected: int
    field: str


@dataclass(frozen=True)
class Rules:
    counts: list[BlockCount]
    tensors: list[KeyTensor]


class Fields:
    """A config's fields, each validated as it is read; a field the file omits comes from
    `defaults()` (the library's), called only then: save_pretrained writes every field, so an
    absurd config is refused before the model library is even imported."""

    def __init__(self, config: dict, path: Path, defaults: Callable[[], dict]) -> None:
        self.config, self.path, self._defaults = config, path, defaults
        self._resolved: dict | None = None

    def get(self, name: str) -> object:
        if name in self.config:
            return self.config[name]
        if self._resolved is None:
            self._resolved = self._defaults()
        return self._resolved.get(name)

    def _bad(self, name: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: {name} is {self.get(name)!r}, but it must be {what}; "
            "restore config.json from the same download as the weights"
        )

    def count(self, name: str, minimum: int = 0) -> int:
        value = self.get(name)
        # bool is an int to Python, but `true` is not a layer count.
        if type(value) is not int or value < minimum:
            raise self._bad(name, f"a whole number >= {minimum}")
        return value

    def dim(self, name: str, limit: int | None = None) -> int:
        value = self.count(name, minimum=1)
        if limit is not None and value > limit:
            raise self._bad(name, f"at most {limit:,}")
        return value

    def optional_dim(self, name: str) -> int | None:
        return None if self.get(name) is None else self.dim(name)

    def dims(self, name: str, length: int | None = None) -> tuple[int, ...]:
        value = self.get(name)
        ok = isinstance(value, list | tuple) and len(value) > 0 and (length is None or len(value) == length)
        if not ok or any(type(v) is not int or v < 1 for v in value):
            size = f"{length} " if length else "a non-empty list of "
            raise self._bad(name, f"{size}whole numbers >= 1")
        return tuple(value)


def transformer_rules(f: Fields) -> Rules:
    """`WanTransformer3DModel` (diffusers): 40 blocks of dim 5120 for A14B, 30 of 3072 for TI2V-5B."""
    heads, head_dim = f.dim("num_attention_heads"), f.dim("attention_head_dim")
    in_ch, text_dim, freq_dim, ffn = f.dim("in_channels"), f.dim("text_dim"), f.dim("freq_dim"), f.dim("ffn_dim")
    out_ch = f.optional_dim("out_channels") or in_ch  # the class's own fallback
    patch = f.dims("patch_size", length=3)
    f.dim("rope_max_seq_len", limit=MAX_ROPE_LEN)
    image_dim, added_kv = f.optional_dim("image_dim"), f.optional_dim("added_kv_proj_dim")
    inner = Dim(heads * head_dim, f"num_attention_heads x attention_head_dim is {heads} x {head_dim}")
    embedder = "condition_embedder"
    tensors = [
        KeyTensor(
            ("patch_embedding.weight",),
            (inner, Dim(in_ch, f"in_channels is {in_ch}"), *(Dim(p, f"patch_size is {list(patch)}") for p in patch)),
        ),
        KeyTensor(("proj_out.weight",), (Dim(out_ch * math.prod(patch), f"out_channels is {out_ch}"), inner)),
        KeyTensor((f"{embedder}.text_embedder.linear_1.weight",), (inner, Dim(text_dim, f"text_dim is {text_dim}"))),
        KeyTensor((f"{embedder}.time_embedder.linear_1.weight",), (inner, Dim(freq_dim, f"freq_dim is {freq_dim}"))),
        KeyTensor(("blocks.0.attn1.to_q.weight",), (inner, inner)),
        KeyTensor(("blocks.0.ffn.net.0.proj.weight",), (Dim(ffn, f"ffn_dim is {ffn}"), inner)),
    ]
    if image_dim is not None:  # Wan2.1 I2V's CLIP image projection; no Wan2.2 model has one
        img = Dim(image_dim, f"image_dim is {image_dim}")
        name = f"{embedder}.image_embedder.ff.net.0.proj.weight"
        tensors.append(KeyTensor((name,), (img, img), wanted_by=img.field))
    if added_kv is not None:
        added = Dim(added_kv, f"added_kv_proj_dim is {added_kv}")
        tensors.append(KeyTensor(("blocks.0.attn2.add_k_proj.weight",), (inner, added), wanted_by=added.field))
    layers = f.count("num_layers")
    counts = [BlockCount("blocks.", layers, f"num_layers is {layers}")]
    return Rules(counts, tensors)


def vae_rules(f: Fields) -> Rules:
    """`AutoencoderKLWan` (diffusers): the Wan2.1 VAE (z 16) and the Wan2.2 one (z 48, residual)."""
    base, z, in_ch, out_ch = f.dim("base_dim"), f.dim("z_dim"), f.dim("in_channels"), f.dim("out_channels")
    mult, res = f.dims("dim_mult"), f.count("num_res_blocks")
    dec = f.optional_dim("decoder_base_dim")
    dec_field = f"decoder_base_dim is {dec}" if dec else f"base_dim (decoder_base_dim is unset) is {base}"
    dec = dec or base  # the class's own fallback
    zd, z2 = Dim(z, f"z_dim is {z}"), Dim(2 * z, f"z_dim is {z} (the encoder outputs 2 x z_dim)")
    enc_in, enc_out = Dim(base, f"base_dim is {base}"), Dim(base * mult[-1], f"base_dim is {base}, dim_mult {mult}")
    dec_in, dec_out = (
        Dim(dec * mult[-1], f"{dec_field}, dim_mult {mult}"),
        Dim(dec * mult[0], f"{dec_field}, dim_mult {mult}"),
    )
    k3, k1 = (Dim(3),) * 3, (Dim(1),) * 3
    tensors = [
        KeyTensor(("encoder.conv_in.weight",), (enc_in, Dim(in_ch, f"in_channels is {in_ch}"), *k3)),
        KeyTensor(("encoder.conv_out.weight",), (z2, enc_out, *k3)),
        KeyTensor(("quant_conv.weight",), (z2, z2, *k1)),
        KeyTensor(("post_quant_conv.weight",), (zd, zd, *k1)),
        KeyTensor(("decoder.conv_in.weight",), (dec_in, zd, *k3)),
        KeyTensor(("decoder.conv_out.weight",), (Dim(out_ch, f"out_channels is {out_ch}"), dec_out, *k3)),
    ]
    resnets = f"num_res_blocks is {res} ({res + 1} resnets per decoder stage)"
    counts = [
        BlockCount("decoder.up_blocks.", len(mult), f"dim_mult is {list(mult)} ({len(mult)} decoder stages)"),
        BlockCount("decoder.up_blocks.0.resnets.", res + 1, resnets),
    ]
    return Rules(counts, tensors)


def umt5_rules(f: Fields) -> Rules:
    """`UMT5EncoderModel` (transformers): UMT5-XXL in the Wan repos, 24 blocks of d_model 4096."""
    vocab, d_model, d_kv, heads = f.dim("vocab_size"), f.dim("d_model"), f.dim("d_kv"), f.dim("num_heads")
    d_ff, buckets = f.dim("d_ff"), f.dim("relative_attention_num_buckets")
    model, layer = Dim(d_model, f"d_model is {d_model}"), "encoder.block.0.layer"
    attention = Dim(heads * d_kv, f"num_heads x d_kv is {heads} x {d_kv}")
    tensors = [
        KeyTensor(("shared.weight", "encoder.embed_tokens.weight"), (Dim(vocab, f"vocab_size is {vocab}"), model)),
        KeyTensor((f"{layer}.0.SelfAttention.q.weight",), (attention, model)),
        KeyTensor(
            (f"{layer}.1.DenseReluDense.wi_0.weight", f"{layer}.1.DenseReluDense.wi.weight"),
            (Dim(d_ff, f"d_ff is {d_ff}"), model),
        ),
        KeyTensor(
            (f"{layer}.0.SelfAttention.relative_attention_bias.weight",),
            (Dim(buckets, f"relative_attention_num_buckets is {buckets}"), Dim(heads, f"num_heads is {heads}")),
        ),
    ]
    layers = f.count("num_layers")
    counts = [BlockCount("encoder.block.", layers, f"num_layers is {layers}")]
    return Rules(counts, tensors)


RULES: dict[str, Callable[[Fields], Rules]] = {
    "WanTransformer3DModel": transformer_rules,
    "AutoencoderKLWan": vae_rules,
    "UMT5EncoderModel": umt5_rules,
}
