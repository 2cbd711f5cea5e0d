"""The per-request applier on a plain Linear: each row gets exactly its own LoRA set."""

from __future__ import annotations

import torch

from serve.lora.runtime import _DeviceLayer, apply_loras
from serve.lora.weights import LoraLayer


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(6, 5)

    def forward(self, x):
        return self.proj(x)


def lora(seed: int, alpha: float) -> tuple[dict, LoraLayer]:
    g = torch.Generator().manual_seed(seed)
    layer = LoraLayer("proj", down=torch.randn(2, 6, generator=g), up=torch.randn(5, 2, generator=g), alpha=alpha)
    layer.diff_b = torch.randn(5, generator=g)
    return {"proj": _DeviceLayer.of(layer, torch.zeros(1))}, layer


def expected(net, x, layer, scale):
    return net.proj(x) + scale * (x @ (layer.scaling * layer.up @ layer.down).T + layer.diff_b)


def test_rows_get_their_own_lora_and_hooks_go_away():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(3, 4, 6)
    (a, layer_a), (b, layer_b) = lora(1, alpha=4.0), lora(2, alpha=2.0)
    with torch.no_grad(), apply_loras(net, [[(a, 0.5)], [], [(a, 0.5), (b, 2.0)]]):
        out = net(x)
    with torch.no_grad():
        torch.testing.assert_close(out[0], expected(net, x[0], layer_a, 0.5))
        torch.testing.assert_close(out[1], net(x[1]))  # a row without LoRA is the base layer
        both = expected(net, x[2], layer_a, 0.5) + expected(net, x[2], layer_b, 2.0) - net.proj(x[2])
        torch.testing.assert_close(out[2], both)
        assert not net.proj._forward_hooks  # removed after the block
        torch.testing.assert_close(net(x), net.proj(x))


def test_one_set_for_all_rows_takes_the_unindexed_path():
    torch.manual_seed(0)
    net, x = Net(), torch.randn(2, 3, 6)
    a, layer_a = lora(1, alpha=2.0)
    with torch.no_grad(), apply_loras(net, [[(a, 1.0)], [(a, 1.0)]]):
        out = net(x)
    with torch.no_grad():
        torch.testing.assert_close(out, expected(net, x, layer_a, 1.0))
