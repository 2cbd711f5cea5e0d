"""The prompt-embedding cache: a hit is bit-identical to a fresh encode and runs no encoder pass;
the default negative prompt of a CFG batch is encoded once; the cache stays within its bytes,
evicting the least recently used prompt first; the server's `--prompt-cache-mb` reaches the worker.

Exact equality (torch.equal, no tolerance) holds because each prompt is encoded over its own
tokens, never padded to a batch-mate's length, so its embedding does not depend on the batch.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoTokenizer, UMT5EncoderModel

from serve.pipeline.prompt_cache import MIB, PromptEmbeddingCache, TextEncodeConfig
from serve.pipeline.text_encode import TextEncodeStage
from serve.worker.factory import RunnerConfig, load_model_runner

A, B, C = "a red square moving left", "a blue circle moving right", "a green square moving up"
NEGATIVE = ""  # what a request without a negative prompt carries


@pytest.fixture(scope="module")
def encoder_parts(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch.float32).eval()
    return tokenizer, encoder


class EncoderPasses:
    """Counts the text encoder's forward passes and the rows they encode (a forward hook on the real module)."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.passes, self.rows = 0, 0
        self.handle = encoder.register_forward_hook(self._count)

    def _count(self, module, args, output) -> None:
        self.passes += 1
        self.rows += args[0].shape[0]


@contextlib.contextmanager
def counting(encoder: torch.nn.Module):
    passes = EncoderPasses(encoder)
    try:
        yield passes
    finally:
        passes.handle.remove()


def test_a_hit_equals_a_fresh_encode_bit_for_bit(encoder_parts):
    tokenizer, encoder = encoder_parts
    cached = TextEncodeStage(tokenizer, encoder)
    fresh = TextEncodeStage(tokenizer, encoder, cache_bytes=0)
    cached([A, B, NEGATIVE, NEGATIVE])  # fills the cache
    batch = [B, C, A, NEGATIVE]  # three hits and a miss, in another order and company
    ours = cached(batch)
    assert torch.equal(ours, fresh(batch))
    for row, prompt in zip(ours, batch, strict=True):
        assert torch.equal(row, fresh([prompt])[0])  # the prompt alone
    assert len(fresh.cache) == 0 and cached.cache.hits == 3  # B, A and the negative prompt


def test_a_hit_runs_no_encoder_pass_and_enters_no_swap(encoder_parts):
    tokenizer, encoder = encoder_parts
    stage = TextEncodeStage(tokenizer, encoder)
    swaps = []

    @contextlib.contextmanager
    def encoding():  # stands where the residency manager moves the encoder onto the device
        swaps.append(1)
        yield

    with counting(encoder) as first:
        stage([A, B, NEGATIVE, NEGATIVE, NEGATIVE], encoding)
    assert first.rows == 3  # the negative prompt of three CFG requests is encoded once
    assert len(swaps) == 1
    with counting(encoder) as again:
        out = stage([B, NEGATIVE, A], encoding)
    assert again.passes == 0 and len(swaps) == 1
    assert out.shape == (3, 512, encoder.config.d_model)


def test_the_cache_stays_within_its_bytes_evicting_the_least_recently_used(encoder_parts):
    tokenizer, encoder = encoder_parts
    lengths = {len(tokenizer(p).input_ids) for p in (A, B, C)}
    assert len(lengths) == 1  # equal-sized entries make the budget exact
    entry = lengths.pop() * encoder.config.d_model * 4  # fp32 rows of the real tokens only
    stage = TextEncodeStage(tokenizer, encoder, cache_bytes=2 * entry)
    stage([A])
    stage([B])
    stage([A])  # A is now the most recently used
    stage([C])  # over budget: B goes
    assert stage.cache.bytes == 2 * entry and stage.cache.evictions == 1
    with counting(encoder) as passes:
        stage([A, C])
    assert passes.passes == 0
    with counting(encoder) as passes:
        stage([B])
    assert passes.rows == 1


def test_an_entry_larger_than_the_budget_is_not_kept():
    cache = PromptEmbeddingCache(max_bytes=100)
    cache.put("small", torch.zeros(20))  # 80 bytes
    cache.put("large", torch.zeros(26))  # 104 bytes: more than the whole budget
    assert "large" not in cache and "small" in cache and cache.bytes == 80
    cache.put("small", torch.zeros(5))  # replacing an entry counts only the new value
    assert cache.bytes == 20 and len(cache) == 1
    with pytest.raises(ValueError, match="max_bytes=-1"):
        PromptEmbeddingCache(-1)


def test_the_server_flag_sizes_the_worker_cache(tiny_model_dir):
    options = RunnerConfig(text=TextEncodeConfig(prompt_cache_mb=0.5))
    runner = load_model_runner(str(tiny_model_dir), "cpu", "float32", options)
    assert runner.text_encode.cache.max_bytes == MIB // 2
    assert load_model_runner(str(tiny_model_dir), "cpu", "float32").text_encode.cache.max_bytes == 64 * MIB
