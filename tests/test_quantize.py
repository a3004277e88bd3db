"""--quantize fp8: a bf16 base and an adapter straight to an FP8 checkpoint (e4m3, a float32 scale per 128×128
block), each element the nearest e4m3 value of the exact merge at its block's scale, against peft's float64 merge;
the output loaded by transformers' FineGrainedFP8 and checked again by verify."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    build_adapter,
    build_model,
    expect_error,
    load_tensors,
    peft,
    run_cli,
    transformers,
    ulps,
)
from quantized import fp8_dense, to_fp8

from lora_merge import merge, verify

FP8_MAX = 448.0


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Attention 128 × 128 (FP8), an MLP of 192 (sides not multiples of 128: kept in bf16)."""
    root = tmp_path_factory.mktemp("quantize")
    build_model("qwen3", root / "bf16", dtype=torch.bfloat16, hidden_size=128, intermediate_size=192, head_dim=64,
                num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    build_adapter(root / "bf16", root / "adapter", r=4, lora_alpha=8,
                  target_modules=["q_proj", "v_proj", "down_proj"])
    return root


def exact(base, adapter) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_quantize_fp8_rounds_the_exact_merge_once(qwen3, tmp_path):
    base, adapter = qwen3 / "bf16", qwen3 / "adapter"
    result = merge(base, adapter, tmp_path / "out", device="cpu", quantize="fp8")
    assert result.report.ok
    out, before, want = load_tensors(tmp_path / "out"), load_tensors(base), exact(base, adapter)
    fp8 = sorted(n for n, t in out.items() if t.dtype == torch.float8_e4m3fn)
    assert fp8 and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for n in fp8)
    for name in fp8:  # targeted (q, v) and not (k, o): each element once rounded from the exact value
        codes, scales = out[name], out[name[: -len("weight")] + "weight_scale_inv"]
        assert scales.dtype == torch.float32 and scales.shape == (1, 1)
        value = want[name]
        rule = (value.abs().max() / FP8_MAX).float()  # one block: its largest |value| / 448, in float32
        assert scales.reshape(()) == rule, name
        x = value / rule.double()
        step = torch.exp2(torch.floor(torch.log2(x.abs())).clamp(min=-6) - 3) * rule.double()
        got = fp8_dense(codes, scales, (128, 128))
        assert ((got - value).abs() <= step / 2 * (1 + 1e-9)).all(), name
    for name, t in out.items():  # the rest: BASE's dtype, BASE's bytes or the merge rounded once to bf16
        if t.dtype == torch.float8_e4m3fn or name.endswith("_scale_inv"):
            continue
        assert t.dtype == before[name].dtype, name
        if "down_proj" in name:
            assert ulps(t, want[name], torch.bfloat16).max() <= 0.5, name
        else:
            assert torch.equal(t, before[name]), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128] and qc["activation_scheme"] == "dynamic"
    assert {"lm_head", "model.embed_tokens", "model.layers.0.mlp.down_proj"} <= set(qc["modules_to_not_convert"])
    data = result.report.details["delta_survival"]
    assert 0 < data["kept"] <= 1.5 and data["tensors"] == 6
    # transformers loads it and dequantizes it to the same values
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(loaded.state_dict()[name],
                       fp8_dense(out[name], out[name[: -len("weight")] + "weight_scale_inv"], (128, 128)).float())
    assert verify(tmp_path / "out", base, adapter, device="cpu").ok
    # verify fails an element moved one code
    codes = out[fp8[0]].view(torch.uint8).clone()
    codes[0, 0] ^= 1
    from safetensors.torch import save_file

    out[fp8[0]] = codes.view(torch.float8_e4m3fn)
    save_file(out, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    assert not verify(tmp_path / "out", base, adapter, device="cpu").ok


def test_quantize_is_for_a_float_base_and_alone(qwen3, tmp_path):
    r = run_cli("merge", qwen3 / "bf16", qwen3 / "adapter", tmp_path / "out", "--quantize", "fp8", "--dtype", "float32")
    assert r.exit_code == 2 and "--quantize and --dtype" in r.output, r.output
    fp8_base = to_fp8(qwen3 / "bf16", tmp_path / "fp8", (128, 128), which=lambda n: n.endswith("q_proj.weight"))
    r = run_cli("merge", fp8_base, qwen3 / "adapter", tmp_path / "out", "--quantize", "fp8", "--device", "cpu")
    expect_error(r, "--quantize fp8 writes a float BASE quantized")
    assert not (tmp_path / "out").exists()


def test_quantize_fp8_of_experts_stored_one_per_expert(tmp_path):
    from architectures import tiny_config

    config = tiny_config("qwen3_moe")
    for key, value in dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, head_dim=64,
                           num_attention_heads=2, num_key_value_heads=2).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    result = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", device="cpu", quantize="fp8")
    assert result.report.ok and result.report.tensors["model.layers.0.mlp.experts.1.up_proj.weight"].correctly_rounded
    out = load_tensors(tmp_path / "out")
    assert out["model.layers.0.mlp.experts.1.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16  # the router stays
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate" in qc["modules_to_not_convert"]
    assert verify(tmp_path / "out", tmp_path / "base", tmp_path / "adapter", device="cpu").ok
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    assert torch.isfinite(loaded(torch.tensor([[1, 5, 9]])).logits).all()
