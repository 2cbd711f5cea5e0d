"""load_component gives the same modules as diffusers' / transformers' from_pretrained."""

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from transformers import UMT5EncoderModel

from serve.loader import load_component

ORACLES = {
    "transformer": WanTransformer3DModel,
    "transformer_2": WanTransformer3DModel,
    "vae": AutoencoderKLWan,
    "text_encoder": UMT5EncoderModel,
}


@pytest.mark.parametrize("component", sorted(ORACLES))
def test_fp32_state_dict_equals_from_pretrained(tiny_model_dir, component):
    ours = load_component(tiny_model_dir / component)
    ref = ORACLES[component].from_pretrained(tiny_model_dir / component, torch_dtype=torch.float32)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert sorted(ours_sd) == sorted(ref_sd)
    for name, tensor in ref_sd.items():
        assert ours_sd[name].dtype == tensor.dtype, name
        assert torch.equal(ours_sd[name], tensor), name
    # Non-persistent buffers (Wan's rope tables) are not in state_dict; compare them too.
    ours_buffers = dict(ours.named_buffers())
    for name, buf in ref.named_buffers():
        assert torch.equal(ours_buffers[name], buf), name


@pytest.mark.parametrize("component", sorted(ORACLES))
def test_result_is_a_plain_inference_module(tiny_model_dir, component):
    module = load_component(tiny_model_dir / component)
    assert not module.training
    tensors = [*module.parameters(), *module.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)  # nothing left on meta
    assert not any(p.requires_grad for p in module.parameters())


def test_text_encoder_embeddings_stay_tied(tiny_model_dir):
    module = load_component(tiny_model_dir / "text_encoder")
    assert module.encoder.embed_tokens.weight is module.shared.weight


def _transformer_inputs(text_dim: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, 3, 8, 8, generator=gen),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 7, text_dim, generator=gen),
        return_dict=False,
    )


def _owned_copies(module: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter its own freshly allocated memory.

    from_pretrained (fp32 on CPU) keeps safetensors' mmap views, which sit at arbitrary 8-byte
    offsets of the file; CPU kernels pick vector paths by alignment, so the same weights give
    outputs differing in the last bits (measured max 4e-7). Our loader owns aligned copies.
    """
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None:
                sub._parameters[name] = torch.nn.Parameter(param.detach().clone(), requires_grad=False)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_forward_equals_from_pretrained(tiny_model_dir, dtype):
    ours = load_component(tiny_model_dir / "transformer", dtype=dtype)
    ref = WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer", torch_dtype=dtype).eval()
    ref = _owned_copies(ref)
    inputs = _transformer_inputs(ref.config.text_dim)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        assert torch.equal(ours(**inputs)[0], ref(**inputs)[0])


def test_text_encoder_forward_equals_from_pretrained(tiny_model_dir):
    ours = load_component(tiny_model_dir / "text_encoder")
    ref = UMT5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder", torch_dtype=torch.float32).eval()
    ref = _owned_copies(ref)
    ids = torch.tensor([[5, 9, 17, 1, 0]])
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


def test_bf16_keeps_declared_modules_in_fp32(tiny_model_dir):
    ours = load_component(tiny_model_dir / "transformer", dtype=torch.bfloat16)
    ref = WanTransformer3DModel.from_pretrained(tiny_model_dir / "transformer", torch_dtype=torch.bfloat16)
    ours_params = dict(ours.named_parameters())
    assert {n: p.dtype for n, p in ours_params.items()} == {n: p.dtype for n, p in ref.named_parameters()}
    keep = set(WanTransformer3DModel._keep_in_fp32_modules)
    for name, param in ours_params.items():
        expected = torch.float32 if keep.intersection(name.split(".")) else torch.bfloat16
        assert param.dtype == expected, name
    # Both kinds must occur, or the check above proves nothing about the rule.
    assert {p.dtype for p in ours_params.values()} == {torch.float32, torch.bfloat16}
    assert ours.rope.freqs_cos.dtype == ref.rope.freqs_cos.dtype


def test_text_encoder_keeps_wo_fp32_only_for_fp16(tiny_model_dir):
    """transformers applies UMT5's `_keep_in_fp32_modules = ["wo"]` for fp16 only (bf16 has the range)."""
    wo = "encoder.block.0.layer.1.DenseReluDense.wo.weight"
    for dtype, wo_dtype in ((torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)):
        ours = dict(load_component(tiny_model_dir / "text_encoder", dtype=dtype).named_parameters())
        ref = UMT5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder", torch_dtype=dtype)
        assert ours[wo].dtype == wo_dtype
        assert {n: p.dtype for n, p in ours.items()} == {n: p.dtype for n, p in ref.named_parameters()}
