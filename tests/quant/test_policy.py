"""`--quant` parsing, the batch-key string, and which layers a policy quantizes."""

import pytest
from torch import nn

from models.tiny import SIZES, transformer_config
from serve.loader.build import build_empty
from serve.quant import DEFAULT_SKIP, QuantConfig, QuantPolicy
from serve.quant.swap import eligible_linears


def test_parse_per_expert_and_aliases():
    policy = QuantPolicy.parse("high=w8a8-int8,low=bf16")
    assert policy.for_expert("transformer") == QuantConfig("w8a8-int8")
    assert policy.for_expert("transformer_2") is None  # bf16 means "not quantized, at --dtype"
    both = QuantPolicy.parse("fp8-wo")
    assert both.for_expert("transformer") == both.for_expert("transformer_2") == QuantConfig("fp8-wo")
    assert QuantPolicy.parse("transformer_2=int8-wo").for_expert("transformer") is None


def test_key_is_stable_hashable_and_distinguishes_policies():
    a = QuantPolicy.parse("high=w8a8-int8,low=none")
    assert a.key() == QuantPolicy.parse("low=fp32, high=w8a8-int8").key()
    assert a.key().startswith("transformer=w8a8-int8[skip=")
    keys = {QuantPolicy.parse(t).key() for t in ("none", "w8a8-int8", "high=w8a8-int8", "low=w8a8-int8", "fp8-wo")}
    assert len(keys) == 5
    assert QuantPolicy.parse("none").key() == "none"
    assert a.key() != QuantPolicy.parse("high=w8a8-int8", skip=("ffn",)).key()  # the skip list is part of it
    assert hash(a) == hash(QuantPolicy.parse("high=w8a8-int8"))


@pytest.mark.parametrize(
    ("text", "experts", "message"),
    [
        ("int4", ("transformer",), "unknown quantization scheme 'int4'; choose one of int8-wo"),
        ("low=w8a8-int8", ("transformer",), "unknown expert 'low'"),
        ("mid=fp8-wo", ("transformer", "transformer_2"), "unknown expert 'mid'"),
    ],
)
def test_bad_policies_name_the_problem(text, experts, message):
    with pytest.raises(ValueError, match=message):
        QuantPolicy.parse(text, experts)


def test_bad_skip_regex_is_refused():
    with pytest.raises(ValueError, match="not a valid regex"):
        QuantConfig("int8-wo", skip=("blocks.(",))


def test_fused_lora_on_a_quantized_expert_is_refused():
    class Fused:
        path, expert = "lightning.safetensors", 0

    class Options:
        fused = (Fused(),)

    QuantPolicy.parse("low=w8a8-int8").check_no_fused_lora(("transformer", "transformer_2"), Options())
    with pytest.raises(ValueError, match="must be fused into the float weights before quantizing"):
        QuantPolicy.parse("high=w8a8-int8").check_no_fused_lora(("transformer", "transformer_2"), Options())


def _wan_class():
    from serve.loader.build import ALLOWED

    return ALLOWED["WanTransformer3DModel"], {
        "_class_name": "WanTransformer3DModel",
        **transformer_config(SIZES["tiny"]),
    }


def test_default_skip_keeps_embedders_and_output_projection():
    model = build_empty(*_wan_class())
    keep = frozenset(model._keep_in_fp32_modules)
    names = eligible_linears(model, QuantConfig("w8a8-int8"), keep)
    all_linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert names == [n for n in all_linears if n.startswith("blocks.")]  # every block linear, nothing else
    assert len(names) == 2 * 10  # per block: attn1 q,k,v,out + attn2 q,k,v,out + ffn up, down
    assert DEFAULT_SKIP and "proj_out" not in names and not any("condition_embedder" in n for n in names)
    no_ffn = eligible_linears(model, QuantConfig("w8a8-int8", DEFAULT_SKIP + (r"\.ffn\.",)), keep)
    assert len(no_ffn) == 2 * 8
    # a module the class keeps in fp32 is never quantized, whatever the skip list says
    assert not any("time_embedder" in n for n in eligible_linears(model, QuantConfig("int8-wo", ()), keep))
