"""CFG-parallel with per-request LoRAs on a batch that mixes LoRA sets, in one process.

A CFG 2 group runs half of a forward's rows on each half of the group (`CfgSplit`); the LoRA
hooks inside the forward see only those rows, so their row groups must be built for that slice.
The engine never batches different LoRA sets (they are part of the batch key), but the runner
takes one set per row and must stay right for any batch. Here each rank's split is played in this
process (its all-gather left out): each rank's half equals the same rows of the whole forward.

Tolerance: a half runs 2 rows instead of 4, so BLAS may block the matmuls differently (~1e-6).
"""

import torch

from serve.lora.options import LoraOptions
from serve.lora.runtime import apply_loras
from serve.worker.group import CfgSplit
from serve.worker.model_runner import ModelRunner
from tests.lora.test_lora_vs_diffusers import make_lora_files


class _LocalSplit(CfgSplit):
    """Rank `index` of a CFG 2 split, without a process group: the forward returns its rows only."""

    def __init__(self, index: int) -> None:
        self.group, self.degree, self.index, self.split = None, 2, index, False

    def after(self, module, args, kwargs, output):
        return output


def test_each_cfg_half_applies_its_own_rows_loras(tiny_model_dir, tmp_path):
    runner = ModelRunner.from_checkpoint(tiny_model_dir, lora=LoraOptions(lora_dirs=(tmp_path,)))
    make_lora_files(runner, tmp_path, "original")  # read on first use
    denoise = runner.denoise
    model = denoise.experts[0]
    gen = torch.Generator().manual_seed(0)
    c = model.config
    # 2 requests, CFG on: rows [cond_A, cond_B, uncond_A, uncond_B]; A has a LoRA, B none.
    hidden = torch.randn(4, c.in_channels, 3, 4, 4, generator=gen)
    t = torch.full((4,), 900.0)
    embeds = torch.randn(4, 8, c.text_dim, generator=gen)
    loras = [(("distill", 0.5),), ()]

    def forward(rows: int) -> torch.Tensor:
        with torch.inference_mode(), apply_loras(model, denoise._row_loras(0, loras, rows)):
            return model(hidden_states=hidden, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]

    whole = forward(4)
    for index in range(2):
        split = _LocalSplit(index)
        handles = [
            model.register_forward_pre_hook(split.before, with_kwargs=True),
            model.register_forward_hook(split.after, with_kwargs=True),
        ]
        denoise.local_rows = split.local_rows
        try:
            half = forward(4)
        finally:
            denoise.local_rows = None
            for handle in handles:
                handle.remove()
        torch.testing.assert_close(half, whole[2 * index : 2 * index + 2], atol=1e-5, rtol=0)
    # The LoRA did change request A's rows: a row left without it would show.
    with torch.inference_mode():
        base = model(hidden_states=hidden, timestep=t, encoder_hidden_states=embeds, return_dict=False)[0]
    assert (whole[[0, 2]] - base[[0, 2]]).abs().max() > 1e-3
    torch.testing.assert_close(whole[[1, 3]], base[[1, 3]], atol=1e-5, rtol=0)
