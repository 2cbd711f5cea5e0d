"""Encoding only up to the longest prompt gives diffusers' 512-position embeddings.

Tolerance 1e-5: padded positions are masked out of UMT5's attention (additive mask of the dtype's
minimum, so exp() gives exactly 0), so the real tokens see the same inputs; only the length of
reductions changes. Past each prompt's length both are exactly zero.
"""

import torch
from diffusers import WanPipeline

from serve.pipeline.text_encode import TextEncodeStage

PROMPTS = ["a red square moving left over the sea at night", "", "a cat"]


def test_embeddings_match_diffusers_full_length_encoding(tiny_model_dir):
    pipe = WanPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    stage = TextEncodeStage(pipe.tokenizer, pipe.text_encoder)
    ours = stage(PROMPTS)
    reference = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=512, device=torch.device("cpu"))
    assert ours.shape == reference.shape == (3, 512, pipe.text_encoder.config.d_model)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    lengths = pipe.tokenizer(PROMPTS, padding="longest", return_tensors="pt").attention_mask.sum(1)
    for row, length in zip(ours, lengths, strict=True):
        assert row[length:].abs().max() == 0 and row[:length].abs().max() > 0
