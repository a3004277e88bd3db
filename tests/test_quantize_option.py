"""--quantize fp8: a bf16 base and an adapter straight to an FP8 checkpoint (e4m3, a float32 scale per 128×128
block), each element the nearest e4m3 value of the exact merge at its block's scale, against peft's float64 merge;
the output loaded by transformers' FineGrainedFP8 and checked again by verify."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

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
from lora_merge.quantize import NAMED_AS_STORED

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


def exact(base, adapter, auto_class: str = "AutoModelForCausalLM") -> dict[str, torch.Tensor]:
    model = getattr(transformers, auto_class).from_pretrained(base, dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def scale_of(name: str) -> str:
    return name + "_scale_inv"


def assert_rounded_once(codes, scales, value, name):
    """Each 128×128 block's scale its largest exact |value| / 448 in float32, each element within half an e4m3 step
    of its exact value; a stacked (experts, out, in) parameter expert by expert."""
    if codes.dim() == 3:
        for e in range(codes.shape[0]):
            assert_rounded_once(codes[e], scales[e], value[e], f"{name}[{e}]")
        return
    assert scales.dtype == torch.float32 and scales.shape == (-(-codes.shape[0] // 128), -(-codes.shape[1] // 128))
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = value[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            rule = (block.abs().max() / FP8_MAX).float()
            assert scales[i, j] == (rule if rule > 0 else 1.0), (name, i, j)
    got = fp8_dense(codes, scales, (128, 128))
    spread = scales.double().repeat_interleave(128, 0).repeat_interleave(128, 1)[: codes.shape[0], : codes.shape[1]]
    step = torch.exp2(torch.floor(torch.log2((value / spread).abs())).clamp(min=-6) - 3) * spread
    assert ((got - value).abs() <= step / 2 * (1 + 1e-9)).all(), name


def loaded_as_fp8(folder, monkeypatch, auto_class: str = "AutoModelForCausalLM"):
    """OUT loaded by transformers' FineGrainedFP8 as on a GPU (FP8Linear and FP8Experts holding the codes and
    scales; no CUDA is needed to load, only to run): its parameters, and the keys it missed or did not expect."""
    from transformers.quantizers.quantizer_finegrained_fp8 import (
        FineGrainedFP8HfQuantizer,
    )

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    model, info = getattr(transformers, auto_class).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_quantize_fp8_rounds_the_exact_merge_once(qwen3, tmp_path, monkeypatch):
    base, adapter = qwen3 / "bf16", qwen3 / "adapter"
    result = merge(base, adapter, tmp_path / "out", device="cpu", quantize="fp8")
    assert result.report.ok
    out, before, want = load_tensors(tmp_path / "out"), load_tensors(base), exact(base, adapter)
    fp8 = sorted(n for n, t in out.items() if t.dtype == torch.float8_e4m3fn)
    assert fp8 and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")) for n in fp8)
    for name in fp8:  # targeted (q, v) and not (k, o): each element once rounded from the exact value
        assert out[scale_of(name)].shape == (1, 1)
        assert_rounded_once(out[name], out[scale_of(name)], want[name], name)
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
                       fp8_dense(out[name], out[scale_of(name)], (128, 128)).float())
    on_gpu = loaded_as_fp8(tmp_path / "out", monkeypatch)  # and as on a GPU: the codes and scales themselves
    assert all(torch.equal(on_gpu[n].view(torch.uint8), out[n].view(torch.uint8)) for n in fp8)
    assert verify(tmp_path / "out", base, adapter, device="cpu").ok
    r = run_cli("unmerge", tmp_path / "out", adapter, tmp_path / "back")  # rounded to FP8: no way back
    expect_error(r, "MERGED is stored quantized", "without --quantize", "keep BASE")
    assert not (tmp_path / "back").exists()
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


def tiny_base(model_type: str, folder, vision: dict | None = None, **sizes):
    """A tiny bf16 model of ``model_type`` with the given sizes (of its text and vision parts), saved by
    transformers."""
    from architectures import auto_class, tiny_config

    if model_type not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} does not know {model_type}")
    config = tiny_config(model_type)
    for part, values in ((getattr(config, "text_config", None) or config, sizes),
                         (getattr(config, "vision_config", None), vision or {})):
        for key, value in values.items():
            if hasattr(part, key):
                setattr(part, key, value)
    torch.manual_seed(0)
    getattr(transformers, auto_class(model_type)).from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def tiny_adapter(base, folder, experts: list[str], auto_class: str = "AutoModelForCausalLM", modules="all-linear"):
    """A peft adapter on ``modules`` (every linear layer), and on the stacked expert parameters ``experts``."""
    model = getattr(transformers, auto_class).from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=modules, target_parameters=experts or None,
                           init_lora_weights=False)
    peft.get_peft_model(model, lora).save_pretrained(folder)
    return folder


MOE = dict(hidden_size=128, head_dim=64, num_attention_heads=2, num_key_value_heads=2)


def test_quantize_fp8_of_experts_stored_one_per_expert(tmp_path, monkeypatch):
    """qwen3_moe: one matrix per expert in the files, stacked by transformers into FP8Experts with their scales."""
    base = tiny_base("qwen3_moe", tmp_path / "base", moe_intermediate_size=128, intermediate_size=256, **MOE)
    adapter = tiny_adapter(base, tmp_path / "adapter", [])
    result = merge(base, adapter, tmp_path / "out", device="cpu", quantize="fp8")
    assert result.report.ok and result.report.tensors["model.layers.0.mlp.experts.1.up_proj.weight"].correctly_rounded
    out = load_tensors(tmp_path / "out")
    assert out["model.layers.0.mlp.experts.1.up_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16  # the router stays
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.gate" in qc["modules_to_not_convert"]
    assert not any("experts" in m for m in qc["modules_to_not_convert"])
    assert verify(tmp_path / "out", base, adapter, device="cpu").ok
    want, on_gpu = exact(base, adapter), loaded_as_fp8(tmp_path / "out", monkeypatch)
    for param in ("gate_up_proj", "down_proj"):  # what FP8Experts holds: the exact merge, rounded once
        name = f"model.layers.1.mlp.experts.{param}"
        assert on_gpu[name].dtype == torch.float8_e4m3fn
        assert_rounded_once(on_gpu[name], on_gpu[scale_of(name)], want[name], name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    assert torch.isfinite(loaded(torch.tensor([[1, 5, 9]])).logits).all()


def test_quantize_fp8_of_experts_stacked_in_the_files(tmp_path, monkeypatch):
    """granitemoe_swa stores experts.gate_up_proj (E, 2I, H) as transformers holds it: codes and scales stacked."""
    base = tiny_base("granitemoe_swa", tmp_path / "base", intermediate_size=128, **MOE)
    adapter = tiny_adapter(base, tmp_path / "adapter", ["experts.gate_up_proj", "experts.down_proj"])
    result = merge(base, adapter, tmp_path / "out", device="cpu", quantize="fp8")
    name = "model.layers.0.block_sparse_moe.experts.gate_up_proj"
    assert result.report.ok and result.report.tensors[name].correctly_rounded
    out, want = load_tensors(tmp_path / "out"), exact(base, adapter)
    assert out[name].dtype == torch.float8_e4m3fn and out[scale_of(name)].shape == (4, 2, 1)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert not any("experts" in m for m in qc["modules_to_not_convert"])
    on_gpu = loaded_as_fp8(tmp_path / "out", monkeypatch)
    for param in ("gate_up_proj", "down_proj"):
        name = f"model.layers.1.block_sparse_moe.experts.{param}"
        assert torch.equal(on_gpu[name].view(torch.uint8), out[name].view(torch.uint8))
        assert_rounded_once(on_gpu[name], on_gpu[scale_of(name)], want[name], name)
    assert verify(tmp_path / "out", base, adapter, device="cpu").ok


KEPT_EXPERTS = {  # experts FP8Experts cannot take from what OUT would store: left in bf16, their modules named
    "granitemoe": (dict(intermediate_size=128, **MOE), "block_sparse_moe.experts",
                   "block_sparse_moe.input_linear.weight", "renaming leaves its scale"),  # the scale would not be renamed along
    "qwen3_moe": (dict(moe_intermediate_size=192, intermediate_size=256, **MOE), "mlp.experts",
                  "mlp.experts.0.gate_proj.weight", "whole 128×128 blocks"),  # 192 rows: blocks cut where gate meets up
    "gpt_oss": (dict(intermediate_size=128, **MOE), "mlp.experts", "mlp.experts.gate_up_proj", "bias (FP8Experts holds none)"),
    # (E, H, 2I) = (E, 256, 256): whole blocks either way round, so only the module class tells
    "llama4_text": (dict(MOE, hidden_size=256, intermediate_size=128, intermediate_size_mlp=256),
                    "feed_forward.experts", "feed_forward.experts.gate_up_proj", "a forward of its own"),
}


@pytest.mark.parametrize("model_type", sorted(KEPT_EXPERTS))
def test_quantize_fp8_keeps_experts_fp8experts_cannot_take(model_type, tmp_path, monkeypatch):
    sizes, module, stored, why = KEPT_EXPERTS[model_type]
    base = tiny_base(model_type, tmp_path / "base", **sizes)
    adapter = tiny_adapter(base, tmp_path / "adapter", [])
    result = merge(base, adapter, tmp_path / "out", device="cpu", quantize="fp8")
    assert result.report.ok
    assert any("experts module" in n and "left in BASE's dtype" in n for n in result.plan.notes), result.plan.notes
    assert any(why in n for n in result.plan.notes), result.plan.notes
    out = load_tensors(tmp_path / "out")
    assert out[f"model.layers.0.{stored}"].dtype == torch.bfloat16
    assert any(t.dtype == torch.float8_e4m3fn for t in out.values())  # attention is FP8
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert f"model.layers.0.{module}" in qc["modules_to_not_convert"]
    on_gpu = loaded_as_fp8(tmp_path / "out", monkeypatch)  # every tensor found where transformers looks for it
    assert on_gpu[f"model.layers.0.{module}.down_proj"].dtype == torch.bfloat16
    assert verify(tmp_path / "out", base, adapter, device="cpu").ok


def test_quantize_fp8_of_a_dense_base_needs_no_transformers(qwen3, tmp_path, no_transformers):
    result = merge(qwen3 / "bf16", qwen3 / "adapter", tmp_path / "out", device="cpu", quantize="fp8")
    assert result.report.ok and sys.modules["transformers"] is None  # never imported


@pytest.mark.parametrize("model_type", NAMED_AS_STORED)
def test_quantize_fp8_of_a_plain_dense_type_chooses_as_transformers_would(model_type, tmp_path):
    """For these model types --quantize fp8 chooses by name, without importing transformers: the same weights, and
    the same modules_to_not_convert, as transformers' own model class gives."""
    from lora_merge.placement import Placement
    from lora_merge.quantize import Quantization, choose
    from lora_merge.sources import Source, load_base

    folder = tiny_base(model_type, tmp_path / "base", **MOE, intermediate_size=256)
    base = load_base(Source(str(folder), folder))
    assert choose("fp8", base, lambda: pytest.fail("no model class needed")) == Quantization("fp8")
    by_class = choose("fp8", replace(base, config=base.config | {"model_type": "not listed"}), Placement(base).layout)
    assert not by_class.notes and by_class.chosen  # transformers' own answer, with Linear weights to choose
    assert by_class.chosen == {n for n, i in base.tensors.items() if Quantization("fp8").takes(n, i)}
    assert by_class.config(base.tensors) == Quantization("fp8").config(base.tensors)


def test_quantize_fp8_of_experts_without_transformers_names_the_extra(tmp_path, no_transformers):
    base = tmp_path / "base"
    base.mkdir()
    tensors = {"model.layers.0.mlp.experts.0.up_proj.weight": torch.ones(128, 128, dtype=torch.bfloat16)}
    from safetensors.torch import save_file

    save_file(tensors, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.model.layers.0.mlp.experts.0.up_proj.lora_A.weight": torch.ones(2, 128),
               "base_model.model.model.layers.0.mlp.experts.0.up_proj.lora_B.weight": torch.ones(128, 2)},
              adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["up_proj"]}))
    r = run_cli("merge", base, adapter, tmp_path / "out", "--quantize", "fp8", "--device", "cpu")
    expect_error(r, "--quantize fp8: BASE stores experts, and which of them transformers can load as FP8")
    assert "transformers is not installed" in r.output and "lora-merge[transformers]" in r.output
    assert not (tmp_path / "out").exists()


LOADED_AS_STORED = {  # what transformers makes of the files, followed tensor by tensor; an MLP of 192 stays bf16
    "qwen2_5_vl": ("model.language_model.layers.0.self_attn.q_proj.weight", 192),  # prefixes renamed on loading
    "gemma3": ("model.language_model.layers.0.self_attn.q_proj.weight", 192),  # the vision head's
    # MultiheadAttention out_proj is a Linear subclass transformers does not make FP8: stays bf16
    "hrm_text": ("model.L_module.layers.0.self_attn.q_proj.weight", 256),  # q, k, v (and gate, up) cut from one
    # stored w_qkv (gate_up_proj) on loading, and their scales with them
}


@pytest.mark.parametrize("model_type", sorted(LOADED_AS_STORED))
def test_quantize_fp8_loads_where_transformers_looks(model_type, tmp_path, monkeypatch):
    from architectures import auto_class

    kind, (fp8_name, mlp_size) = auto_class(model_type), LOADED_AS_STORED[model_type]
    base = tiny_base(model_type, tmp_path / "base", vision=dict(hidden_size=128, intermediate_size=256, embed_dim=128,
                     out_hidden_size=128, num_heads=2, num_attention_heads=2), **MOE, intermediate_size=mlp_size)
    adapter = tiny_adapter(base, tmp_path / "adapter", [], kind, modules=["q_proj"])
    result = merge(base, adapter, tmp_path / "out", device="cpu", quantize="fp8")
    assert result.report.ok
    want, on_gpu = exact(base, adapter, kind), loaded_as_fp8(tmp_path / "out", monkeypatch, kind)
    fp8 = [n for n, t in on_gpu.items() if t.dtype == torch.float8_e4m3fn]
    assert fp8_name in fp8
    for name in fp8:  # each FP8 parameter as transformers holds it: the exact merge, rounded once
        assert_rounded_once(on_gpu[name], on_gpu[scale_of(name)], want[name], name)
    mlp = fp8_name.replace("self_attn.q_proj", "mlp.down_proj")
    assert (on_gpu[mlp].dtype == torch.bfloat16) == (mlp_size % 128 != 0)
    if mlp_size % 128:  # named as the model in memory has it, and as the files do
        kept = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
        assert mlp[: -len(".weight")] in kept["modules_to_not_convert"]
    if model_type == "gemma3":
        assert on_gpu["model.vision_tower.head.attention.out_proj.weight"].dtype == torch.bfloat16


def test_quantize_fp8_with_nothing_to_quantize_says_so(tmp_path):
    base = tiny_base("llama", tmp_path / "base")  # every side 32 or 64: no whole 128×128 block
    adapter = tiny_adapter(base, tmp_path / "adapter", [])
    r = run_cli("merge", base, adapter, tmp_path / "out", "--quantize", "fp8", "--device", "cpu")
    expect_error(r, "--quantize fp8: none of BASE's weights can be stored that way")
    assert not (tmp_path / "out").exists()


def test_quantize_fp8_refuses_a_cut_weight_transformers_could_not_load(tmp_path):
    """hrm_text stores gate and up as one gate_up_proj that transformers cuts on loading; of 192 rows each they are
    not whole blocks, and an FP8 checkpoint keeping it in bf16 does not load in transformers."""
    base = tiny_base("hrm_text", tmp_path / "base", **MOE, intermediate_size=192)
    adapter = tiny_adapter(base, tmp_path / "adapter", [], modules=["q_proj"])
    r = run_cli("merge", base, adapter, tmp_path / "out", "--quantize", "fp8", "--device", "cpu")
    expect_error(r, "transformers cannot load an FP8 checkpoint that keeps such a weight")
    assert "mlp.gate_up_proj.weight" in r.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_fp8_every_path_writes_the_same_bytes(tmp_path, monkeypatch, dtype):
    """The FP8 kernels in C reading a float BASE, the same passes in numpy, and the torch codec (the GPU's path): one
    output, targeted and untouched matrices, several blocks each, an all-zero block among them."""
    from safetensors.torch import save_file

    from lora_merge import route

    base = tmp_path / "base"
    build_model("qwen3", base, dtype=dtype, hidden_size=256, intermediate_size=384, head_dim=64,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    tensors = load_tensors(base)
    tensors["model.layers.0.self_attn.k_proj.weight"][:128, 128:] = 0  # a block that is zero, untouched
    tensors["model.layers.0.self_attn.q_proj.weight"][128:256, :128] = 0  # and one the adapter changes
    # a block whose scale is 2^-10 (its largest |value| 448 · 2^-10) and whose other values are ties between two
    # codes at that scale (±1.0625 · 2^k): more open elements than the kernel lists in one go
    o_proj = tensors["model.layers.0.self_attn.o_proj.weight"]
    ties = torch.randint(-3, 5, (128, 128), generator=torch.Generator().manual_seed(0))
    o_proj[:128, :128] = (torch.where(o_proj[:128, :128] < 0, -1.0625, 1.0625) * torch.exp2(ties - 10.0)).to(dtype)
    o_proj[0, 0] = 448 * 2.0**-10
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = tmp_path / "adapter"
    build_adapter(base, adapter, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    from lora_merge import kernels

    result = merge(base, adapter, tmp_path / "c", device="cpu", quantize="fp8")
    assert result.report.ok
    fp8 = [e for e in result.plan.entries if e.dtype == "F8_E4M3"]
    assert fp8 and all(route.Fp8Route.takes(e, "cpu") for e in fp8)  # targeted or not, all through the FP8 kernels
    report = json.loads((tmp_path / "c" / "merge_report.json").read_text())
    assert report["tensors"]["model.layers.0.self_attn.q_proj.weight"]["correctly_rounded"]
    with monkeypatch.context() as m:  # the numpy passes, as LORA_MERGE_PLAIN=1 picks them
        m.setattr(kernels, "FP8", kernels.plain.FP8)
        assert merge(base, adapter, tmp_path / "numpy", device="cpu", quantize="fp8").report.ok
    with monkeypatch.context() as m:
        m.setattr(route, "ROUTES", [r for r in route.ROUTES if r.name != "fp8"])
        assert merge(base, adapter, tmp_path / "torch", device="cpu", quantize="fp8").report.ok
    for f in (tmp_path / "c").glob("*.safetensors"):
        for other in ("numpy", "torch"):
            assert f.read_bytes() == (tmp_path / other / f.name).read_bytes(), (other, f.name)
    out, want = load_tensors(tmp_path / "c"), exact(base, adapter)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert out[scale_of(name)][0, 1] == 1.0  # the zero block: scale 1, as transformers' quantizer
    assert out[scale_of("model.layers.0.self_attn.o_proj.weight")][0, 0] == 2.0**-10
    for name in ("model.layers.0.self_attn.q_proj.weight", name, "model.layers.0.self_attn.o_proj.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        assert_rounded_once(out[name], out[scale_of(name)], want[name], name)
    assert verify(tmp_path / "c", base, adapter, device="cpu").ok
