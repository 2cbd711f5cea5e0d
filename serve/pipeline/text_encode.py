"""Stage: prompts -> UMT5 embeddings, padded with zeros past each prompt's true length (as Wan expects)."""

from __future__ import annotations

import torch

# Wan was trained with 512 text tokens; diffusers' WanPipeline.__call__ uses the same default.
MAX_SEQUENCE_LENGTH = 512


def clean_prompt(text: str) -> str:
    """The same cleaning diffusers applies (ftfy when installed, HTML unescape, whitespace)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


class TextEncodeStage:
    def __init__(self, tokenizer, text_encoder: torch.nn.Module, max_length: int = MAX_SEQUENCE_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(len(prompts), max_length, text_dim) embeddings on the text encoder's device.

        The encoder runs only over the longest prompt's tokens, not all 512: padded positions are
        masked out of its attention, so the real tokens' outputs do not depend on them, and the
        result is zero past each prompt's length anyway. diffusers encodes all 512 positions; for
        a typical 20-token prompt that is 25x the work for the same embeddings (the oracle test
        compares the final frames).
        """
        tokens = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="longest",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        # Zero the positions past each prompt's length: the transformer's cross-attention has no
        # mask, so the padding must carry no signal (this is what the reference pipeline does).
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.pad(hidden, (0, 0, 0, self.max_length - hidden.shape[1]))
