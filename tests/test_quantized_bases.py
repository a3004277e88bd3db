"""Quantized bases: FP8 (dense, per expert, edge blocks, power-of-two and per-tensor scales), MXFP4 (gpt-oss)
and bitsandbytes 4-bit and 8-bit, merged keeping the format or dequantized, against peft's float64 merge of
the exactly decoded base, and against transformers' own dequantization of the same folders."""

from __future__ import annotations

import json

import pytest
import torch
from architectures import tiny_config
from helpers import (
    bf16_factors,
    build_adapter,
    build_model,
    expect_error,
    load_tensors,
    peft,
    run_cli,
    transformers,
    ulps,
)
from quantized import dense_exact, fp8_dense, mxfp4_dense, to_fp8, to_mxfp4

from lora_merge import merge, unmerge
from lora_merge.errors import QuantizationError

FP8_MAX, E2M1_MAX = 448.0, 6.0


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("quantized")


@pytest.fixture(scope="module")
def qwen3(root):
    """A bf16 Qwen3 whose linear layers 32×32 blocks tile (and one whose MLP they do not), with an adapter."""
    build_model("qwen3", root / "bf16", dtype=torch.bfloat16, hidden_size=64, intermediate_size=96, head_dim=16,
                tie_word_embeddings=False)
    build_model("qwen3", root / "bf16_80", dtype=torch.bfloat16, hidden_size=64, intermediate_size=80, head_dim=16,
                tie_word_embeddings=False)
    build_adapter(root / "bf16", root / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    build_adapter(root / "bf16_80", root / "adapter_80", r=4, lora_alpha=8, target_modules=["gate_proj", "o_proj"])
    return root


def oracle(quantized, adapter, tmp, auto="AutoModelForCausalLM") -> dict[str, torch.Tensor]:
    """peft's merge in float64 of the exactly decoded base, saved in the files' layout."""
    dense = dense_exact(quantized, tmp / "exact")
    model = getattr(transformers, auto).from_pretrained(dense, dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).merge_and_unload()
    merged.save_pretrained(tmp / "oracle")
    return load_tensors(tmp / "oracle")


def assert_fp8_nearest(out, base, expected, block, power_of_two=False):
    """Every FP8 tensor of OUT: unchanged blocks keep BASE's bytes; changed ones carry amax/448 (float32, or
    the power of two at least that) and hold the e4m3 value nearest to the exact merge at that scale."""
    requantized = 0
    for name, codes in out.items():
        if codes.dtype != torch.float8_e4m3fn:
            continue
        scales, want = out[name + "_scale_inv"].to(torch.float64), expected[name]
        grid = scales.reshape(-(-codes.shape[0] // block[0]), -1) if scales.numel() > 1 else scales.reshape(1, 1)
        bm, bn = block if scales.numel() > 1 else codes.shape
        got = fp8_dense(codes, out[name + "_scale_inv"], block)
        old = fp8_dense(base[name], base[name + "_scale_inv"], block)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                cut = (slice(i * bm, (i + 1) * bm), slice(j * bn, (j + 1) * bn))
                if torch.equal(want[cut], old[cut]):
                    assert torch.equal(codes[cut].view(torch.uint8), base[name][cut].view(torch.uint8)), name
                    continue
                requantized += 1
                amax = want[cut].abs().max()
                rule = 2.0 ** torch.ceil(torch.log2(amax / FP8_MAX)) if power_of_two else (amax / FP8_MAX).float().double()
                assert grid[i, j] == rule, (name, i, j)
                x = want[cut] / grid[i, j]
                step = torch.exp2(torch.floor(torch.log2(x.abs())).clamp(min=-6) - 3) * grid[i, j]
                assert ((got[cut] - want[cut]).abs() <= step / 2 * (1 + 1e-9)).all(), (name, i, j)
    return requantized


def test_fp8_keeps_its_format(qwen3, tmp_path):
    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8")
    result = merge(base, qwen3 / "adapter", tmp_path / "out", device="cpu")
    assert result.report.ok
    out, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert {n: (t.dtype, t.shape) for n, t in out.items()} == {n: (t.dtype, t.shape) for n, t in before.items()}
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    expected = oracle(base, qwen3 / "adapter", tmp_path)
    assert assert_fp8_nearest(out, before, expected, (32, 32)) > 0
    merged = {e.name for e in result.plan.entries if e.is_merge}
    for name, t in out.items():  # everything else is BASE's bytes, scales included
        if name.removesuffix("_scale_inv") not in merged:
            assert torch.equal(t.view(torch.uint8), before[name].view(torch.uint8)), name
    tensors = result.report.tensors
    assert all(tensors[n].check == "requantized" and tensors[n].correctly_rounded for n in merged)
    # transformers loads the output and dequantizes it to the same values
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True))
    w = loaded.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    exact = fp8_dense(out["model.layers.0.self_attn.q_proj.weight"], out["model.layers.0.self_attn.q_proj.weight_scale_inv"],
                      (32, 32))
    assert torch.equal(w, exact.float())


@pytest.mark.parametrize("kind", ["blocks", "ue8m0", "edges"])
def test_fp8_every_path_writes_the_same_bytes(qwen3, tmp_path, monkeypatch, kind):
    """The FP8 kernels in C, the same passes in numpy, and the torch codec (the GPU's path): one output."""
    import subprocess
    import sys

    from lora_merge import route

    if kind == "edges":
        base, adapter = to_fp8(qwen3 / "bf16_80", tmp_path / "fp8", own=True, shards=4), qwen3 / "adapter_80"
    else:
        base, adapter = to_fp8(qwen3 / "bf16", tmp_path / "fp8", ue8m0=kind == "ue8m0"), qwen3 / "adapter"
    code = "import sys; from lora_merge import merge; merge(sys.argv[1], sys.argv[2], sys.argv[3], device='cpu')"
    env = {k: v for k, v in __import__("os").environ.items() if k != "LORA_MERGE_PLAIN"}
    for name, extra in (("c", {}), ("numpy", {"LORA_MERGE_PLAIN": "1"})):
        r = subprocess.run([sys.executable, "-c", code, str(base), str(adapter), str(tmp_path / name)],
                           capture_output=True, text=True, env={**env, **extra})
        assert r.returncode == 0, r.stderr
    monkeypatch.setattr(route, "ROUTES", [r for r in route.ROUTES if r.name != "fp8"])
    assert merge(base, adapter, tmp_path / "torch", device="cpu").report.ok
    for f in (tmp_path / "c").glob("*.safetensors"):
        for other in ("numpy", "torch"):
            assert f.read_bytes() == (tmp_path / other / f.name).read_bytes(), (other, f.name)


def every_path(base, adapter, tmp_path, monkeypatch, fast: str):
    """The merge through the C kernels (its stats), the numpy passes and the torch codec: their files agree."""
    import os
    import subprocess
    import sys

    from lora_merge import route

    code = "import sys; from lora_merge import merge; merge(sys.argv[1], sys.argv[2], sys.argv[3], device='cpu')"
    env = {k: v for k, v in os.environ.items() if k != "LORA_MERGE_PLAIN"}
    r = subprocess.run([sys.executable, "-c", code, str(base), str(adapter), str(tmp_path / "numpy")],
                       capture_output=True, text=True, env={**env, "LORA_MERGE_PLAIN": "1"})
    assert r.returncode == 0, r.stderr
    result = merge(base, adapter, tmp_path / "c", device="cpu")
    assert result.report.ok
    monkeypatch.setattr(route, "ROUTES", [r for r in route.ROUTES if r.name != fast])
    assert merge(base, adapter, tmp_path / "torch", device="cpu").report.ok
    for f in (tmp_path / "c").glob("*.safetensors"):
        for other in ("numpy", "torch"):
            assert f.read_bytes() == (tmp_path / other / f.name).read_bytes(), (other, f.name)
    return result.stats


def test_fp8_with_an_adapter_of_bfloat16_values(qwen3, tmp_path, monkeypatch):
    """Factors of few bits (bfloat16 values, here of 3 bits) put elements exactly on midpoints of the e4m3 grid at
    power-of-two scales: decided from their exact value, the same by every path (the torch codec's float64 sums are
    exact for such factors)."""
    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8", ue8m0=True)
    adapter = bf16_factors(qwen3 / "adapter", tmp_path / "adapter", bits=3)
    stats = every_path(base, adapter, tmp_path, monkeypatch, "fp8")
    assert stats.exact > 0
    expected = oracle(base, adapter, tmp_path)
    assert assert_fp8_nearest(load_tensors(tmp_path / "c"), load_tensors(base), expected, (32, 32), True) > 0


def test_fp8_kept_says_what_bfloat16_would_keep(qwen3, tmp_path, monkeypatch):
    """Beside what the FP8 output keeps of the change, what --dtype bfloat16 would: the C and numpy passes and the
    torch check agree, and so does the figure computed here from peft's float64 merge."""
    import os
    import subprocess
    import sys

    from lora_merge import route

    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8")
    code = "import sys; from lora_merge import merge; merge(sys.argv[1], sys.argv[2], sys.argv[3], device='cpu')"
    env = {k: v for k, v in os.environ.items() if k != "LORA_MERGE_PLAIN"}
    for name, extra in (("c", {}), ("numpy", {"LORA_MERGE_PLAIN": "1"})):
        r = subprocess.run([sys.executable, "-c", code, str(base), str(qwen3 / "adapter"), str(tmp_path / name)],
                           capture_output=True, text=True, env={**env, **extra})
        assert r.returncode == 0, r.stderr
    monkeypatch.setattr(route, "ROUTES", [r for r in route.ROUTES if r.name != "fp8"])
    assert merge(base, qwen3 / "adapter", tmp_path / "torch", device="cpu").report.ok
    reports = {n: json.loads((tmp_path / n / "merge_report.json").read_text()) for n in ("c", "numpy", "torch")}
    expected, stored = oracle(base, qwen3 / "adapter", tmp_path), load_tensors(base)
    merged = [n for n, t in reports["c"]["tensors"].items() if t.get("delta_survival_bfloat16")]
    assert merged
    for name in merged:
        w = fp8_dense(stored[name], stored[name + "_scale_inv"], (32, 32))
        d, b = expected[name] - w, expected[name].float().to(torch.bfloat16).double() - w
        kept = float((b * d).sum() / (d * d).sum())
        for who, report in reports.items():
            got = report["tensors"][name]["delta_survival_bfloat16"]
            assert got["kept"] == pytest.approx(kept, rel=1e-3), (who, name)
    overall = reports["c"]["delta_survival"]["if_bfloat16"]
    assert overall["kept"] == pytest.approx(reports["torch"]["delta_survival"]["if_bfloat16"]["kept"], rel=1e-3)
    assert "written with --dtype bfloat16 it would keep" in reports["c"]["checks"]["delta"]["summary"]


def test_fp8_layer_saved_whole_by_the_adapter(qwen3, tmp_path):
    """modules_to_save on an FP8 layer: its new values, not BASE's, decide which blocks change."""
    build_adapter(qwen3 / "bf16", tmp_path / "adapter", r=4, target_modules=["q_proj"], modules_to_save=["o_proj"])
    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8")
    result = merge(base, tmp_path / "adapter", tmp_path / "out", device="cpu")
    assert result.report.ok
    out, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert assert_fp8_nearest(out, before, oracle(base, tmp_path / "adapter", tmp_path), (32, 32)) > 0
    name = "model.layers.0.self_attn.o_proj.weight"
    assert not torch.equal(out[name].view(torch.uint8), before[name].view(torch.uint8))


def test_fp8_dequantized_is_the_correctly_rounded_merge(qwen3, tmp_path):
    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8", shards=3)
    result = merge(base, qwen3 / "adapter", tmp_path / "out", device="cpu", dtype="float32")
    assert result.report.ok
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config
    out, expected = load_tensors(tmp_path / "out"), oracle(base, qwen3 / "adapter", tmp_path)
    assert set(out) == set(expected)
    for name, t in out.items():
        assert t.dtype == torch.float32 or name.endswith("norm.weight") or "embed" in name or "lm_head" in name, name
        assert ulps(t, expected[name], t.dtype).max() <= 0.5, name
    # transformers' own dequantization of BASE gives the untouched tensors
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=transformers.FineGrainedFP8Config(dequantize=True)).state_dict()
    merged = {e.name for e in result.plan.entries if e.is_merge}
    for name in out:
        if name not in merged and out[name].dtype == torch.float32:
            assert torch.equal(out[name], theirs[name]), name


def test_fp8_edge_blocks_and_power_of_two_scales(qwen3, tmp_path):
    """DeepSeek-V3's grid, rounded up where 32×32 blocks do not tile 80 rows, across shards; and ue8m0 scales."""
    ceil = to_fp8(qwen3 / "bf16_80", tmp_path / "ceil", own=True, shards=4)
    result = merge(ceil, qwen3 / "adapter_80", tmp_path / "out", device="cpu")
    assert result.report.ok
    assert load_tensors(ceil)["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)
    expected = oracle(ceil, qwen3 / "adapter_80", tmp_path / "o1")
    assert assert_fp8_nearest(load_tensors(tmp_path / "out"), load_tensors(ceil), expected, (32, 32)) > 0

    ue8m0 = to_fp8(qwen3 / "bf16", tmp_path / "ue8m0", ue8m0=True)
    assert load_tensors(ue8m0)["model.layers.0.self_attn.q_proj.weight_scale_inv"].dtype == torch.float8_e8m0fnu
    result = merge(ue8m0, qwen3 / "adapter", tmp_path / "out2", device="cpu")
    assert result.report.ok
    expected = oracle(ue8m0, qwen3 / "adapter", tmp_path / "o2")
    assert assert_fp8_nearest(load_tensors(tmp_path / "out2"), load_tensors(ue8m0), expected, (32, 32), True) > 0


def test_fp8_scale_per_tensor_in_small_blocks(qwen3, tmp_path):
    """One scale per tensor, merged in blocks of a few rows: a first pass finds the tensor's largest value."""
    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8", block=None)
    whole = merge(base, qwen3 / "adapter", tmp_path / "whole", device="cpu")
    rows = merge(base, qwen3 / "adapter", tmp_path / "rows", device="cpu", block_bytes=2048)
    assert whole.report.ok and rows.report.ok
    a, b = load_tensors(tmp_path / "whole"), load_tensors(tmp_path / "rows")
    assert all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
    expected = oracle(base, qwen3 / "adapter", tmp_path)
    assert assert_fp8_nearest(b, load_tensors(base), expected, None) > 0


def expert_adapter(base, folder):
    """A peft adapter on the attention's q_proj and on both expert parameters (target_parameters)."""
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"],
                             init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(folder)


def test_fp8_experts_stored_one_per_expert(tmp_path):
    """Qwen3-MoE FP8 releases: each expert's weights FP8 on disk, the adapter on the fused experts in memory."""
    torch.manual_seed(0)
    cfg = tiny_config("qwen3_moe")
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    base = to_fp8(tmp_path / "bf16", tmp_path / "fp8", block=(16, 16), own=True, shards=2)
    assert "model.layers.0.mlp.experts.1.down_proj.weight_scale_inv" in load_tensors(base)
    expert_adapter(tmp_path / "bf16", tmp_path / "adapter")
    result = merge(base, tmp_path / "adapter", tmp_path / "out", device="cpu")
    assert result.report.ok
    assert result.report.details["coverage"]["left_over"] == []
    expected = oracle(base, tmp_path / "adapter", tmp_path)
    out = load_tensors(tmp_path / "out")
    assert assert_fp8_nearest(out, load_tensors(base), expected, (16, 16)) > 0
    assert out["model.layers.1.mlp.experts.2.gate_proj.weight"].dtype == torch.float8_e4m3fn


def gpt_oss(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config("gpt_oss")
    cfg.hidden_size = 64
    transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    return to_mxfp4(tmp_path / "bf16", tmp_path / "mxfp4")


def test_mxfp4_experts_keep_their_format(tmp_path):
    base = gpt_oss(tmp_path)
    expert_adapter(tmp_path / "bf16", tmp_path / "adapter")
    result = merge(base, tmp_path / "adapter", tmp_path / "out", device="cpu")
    assert result.report.ok
    out, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert {n: (t.dtype, t.shape) for n, t in out.items()} == {n: (t.dtype, t.shape) for n, t in before.items()}
    expected = oracle(base, tmp_path / "adapter", tmp_path)
    groups = 0
    for name in [n[: -len("_blocks")] for n in out if n.endswith("_blocks")]:
        got, want = mxfp4_dense(out[name + "_blocks"], out[name + "_scales"]), expected[name]
        scale = torch.exp2(out[name + "_scales"].double() - 127).repeat_interleave(32, -1).transpose(1, 2)
        x = want / scale
        step = torch.exp2(torch.floor(torch.log2(x.abs())).clamp(min=0) - 1) * scale
        assert ((got - want).abs() <= step / 2 * (1 + 1e-9)).all(), name
        amax = want.transpose(1, 2).reshape(*out[name + "_scales"].shape, 32).abs().amax(-1)
        rule = torch.ceil(torch.log2(amax / E2M1_MAX)) + 127
        assert torch.equal(out[name + "_scales"].double(), rule), name
        groups += rule.numel()
    assert groups > 0
    # transformers loads the output and dequantizes it to the same values
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True))
    w = loaded.state_dict()["model.layers.1.mlp.experts.down_proj"]
    assert torch.equal(w, mxfp4_dense(out["model.layers.1.mlp.experts.down_proj_blocks"],
                                      out["model.layers.1.mlp.experts.down_proj_scales"]).float())

    result = merge(base, tmp_path / "adapter", tmp_path / "out16", device="cpu", dtype="bfloat16")
    assert result.report.ok
    dense = load_tensors(tmp_path / "out16")
    for name, want in expected.items():
        assert ulps(dense[name], want, torch.bfloat16).max() <= 0.5, name


def test_mxfp4_every_path_writes_the_same_bytes(tmp_path, monkeypatch):
    """The MXFP4 kernels in C, the same passes in numpy, and the torch codec (the GPU's path): one output."""
    import os
    import subprocess
    import sys

    from lora_merge import route

    base = gpt_oss(tmp_path)
    expert_adapter(tmp_path / "bf16", tmp_path / "adapter")
    code = "import sys; from lora_merge import merge; merge(sys.argv[1], sys.argv[2], sys.argv[3], device='cpu')"
    env = {k: v for k, v in os.environ.items() if k != "LORA_MERGE_PLAIN"}
    for name, extra in (("c", {}), ("numpy", {"LORA_MERGE_PLAIN": "1"})):
        r = subprocess.run([sys.executable, "-c", code, str(base), str(tmp_path / "adapter"), str(tmp_path / name)],
                           capture_output=True, text=True, env={**env, **extra})
        assert r.returncode == 0, r.stderr
    monkeypatch.setattr(route, "ROUTES", [r for r in route.ROUTES if r.name != "mxfp4"])
    assert merge(base, tmp_path / "adapter", tmp_path / "torch", device="cpu").report.ok
    for f in (tmp_path / "c").glob("*.safetensors"):
        for other in ("numpy", "torch"):
            assert f.read_bytes() == (tmp_path / other / f.name).read_bytes(), (other, f.name)


def test_mxfp4_with_an_adapter_of_bfloat16_values(tmp_path, monkeypatch):
    """As for FP8: factors of 3 bits, and alpha / r = 2, so that the torch codec's float64 sums are exact."""
    base = gpt_oss(tmp_path)
    expert_adapter(tmp_path / "bf16", tmp_path / "adapter32")
    adapter = bf16_factors(tmp_path / "adapter32", tmp_path / "adapter", bits=3, lora_alpha=6)
    assert every_path(base, adapter, tmp_path, monkeypatch, "mxfp4").exact > 0


def test_zero_delta_leaves_a_quantized_base_as_it_is(qwen3, tmp_path):
    fp8 = to_fp8(qwen3 / "bf16", tmp_path / "fp8")
    build_adapter(qwen3 / "bf16", tmp_path / "zero", r=4, target_modules=["q_proj", "down_proj"],
                  init_lora_weights=True, perturb=False)
    mxfp4 = gpt_oss(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    config = peft.LoraConfig(r=2, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "zero_experts")
    for base, adapter in ((fp8, tmp_path / "zero"), (mxfp4, tmp_path / "zero_experts")):
        out = tmp_path / f"out_{base.name}"
        result = merge(base, adapter, out, device="cpu")
        assert result.report.ok and result.plan.counts()["merged"] > 0
        ours, theirs = load_tensors(out), load_tensors(base)
        assert set(ours) == set(theirs)
        for name, t in ours.items():
            assert t.dtype == theirs[name].dtype and torch.equal(t.view(torch.uint8), theirs[name].view(torch.uint8)), name
        # safetensors' save_file groups tensors by dtype, putting scales apart from their codes: the files are BASE's
        # all the same, every byte where it was
        assert (out / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()
    order = list(safe_open_keys(fp8 / "model.safetensors"))
    codes = next(n for n in order if n.endswith("q_proj.weight"))
    assert order.index(codes + "_scale_inv") != order.index(codes) + 1  # the case this test is for


def safe_open_keys(path):
    """The tensor names of a safetensors file in the order their bytes lie in it."""
    import struct

    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda n: header[n]["data_offsets"][0])


@pytest.fixture(scope="module")
def bnb_bases(qwen3):
    pytest.importorskip("bitsandbytes")
    made = {}
    for name, qc in [
        ("bnb4", transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)),
        ("bnb4_fp4", transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
        ("bnb8", transformers.BitsAndBytesConfig(load_in_8bit=True)),
    ]:
        model = transformers.AutoModelForCausalLM.from_pretrained(qwen3 / "bf16", quantization_config=qc,
                                                                  dtype=torch.float32)
        model.save_pretrained(qwen3 / name)
        made[name] = qwen3 / name
    return made


def bnb_weights(folder) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every quantized linear layer of a saved checkpoint, from bitsandbytes' own loading: its dequantization
    (float32), and the exact values of its quantization state (float64)."""
    import bitsandbytes as bnb

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs, exact = {}, {}
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(module, bnb.nn.Linear4bit):
            state = w.quant_state
            theirs[name + ".weight"] = bnb.functional.dequantize_4bit(w.data, state)
            absmax = state.absmax
            if state.nested:
                absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            n = state.shape.numel()
            codes = torch.stack((w.data.reshape(-1) >> 4, w.data.reshape(-1) & 15), -1).reshape(-1)[:n].long()
            values = state.code.double()[codes] * absmax.double().repeat_interleave(state.blocksize)[:n]
            exact[name + ".weight"] = values.reshape(state.shape)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            theirs[name + ".weight"] = bnb.functional.int8_vectorwise_dequant(w.data, w.SCB)
            exact[name + ".weight"] = w.data.double() * w.SCB.double().unsqueeze(1) / 127
    return theirs, exact


@pytest.mark.parametrize("kind", ["bnb4", "bnb4_fp4", "bnb8"])
def test_bitsandbytes_is_merged_dequantized(kind, bnb_bases, qwen3, tmp_path):
    base = bnb_bases[kind]
    r = run_cli("merge", base, qwen3 / "adapter", tmp_path / "refused", "--device", "cpu")
    expect_error(r, "bitsandbytes", "--dtype")
    assert not (tmp_path / "refused").exists()

    result = merge(base, qwen3 / "adapter", tmp_path / "out", device="cpu", dtype="float32")
    assert result.report.ok
    assert any(("4-bit" if kind.startswith("bnb4") else "8-bit") + " quantization" in n for n in result.plan.notes)
    out = load_tensors(tmp_path / "out")
    theirs, exact = bnb_weights(base)
    assert theirs and set(theirs) <= set(out)
    assert not any(k.endswith(("absmax", "quant_map", "SCB", "weight_format")) or "quant_state" in k for k in out)
    merged = {e.name for e in result.plan.entries if e.is_merge}
    # bitsandbytes multiplies in float32 (8-bit: by 1/127 rounded); lora-merge rounds the exact product once
    tolerance = 0.5 if kind.startswith("bnb4") else 1.0
    for name, want in theirs.items():
        if name not in merged:
            assert ulps(out[name], want, torch.float32).max() <= tolerance, name
            assert ulps(out[name], exact[name], torch.float32).max() <= 0.5, name
    # merged tensors: peft's float64 merge on the exact values
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen3 / "bf16", dtype=torch.float64)
    model.load_state_dict(exact, strict=False)
    expected = peft.PeftModel.from_pretrained(model, qwen3 / "adapter", autocast_adapter_dtype=False).merge_and_unload()
    expected = expected.state_dict()
    for name in merged:
        assert ulps(out[name], expected[name], torch.float32).max() <= 0.5 + 1e-6, name


def test_the_16_bit_original_is_named(bnb_bases, qwen3, tmp_path):
    adapter = tmp_path / "adapter"
    build_adapter(qwen3 / "bf16", adapter, r=2, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "unsloth/Qwen3-8B-unsloth-bnb-4bit"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = merge(bnb_bases["bnb4"], adapter, tmp_path / "out", device="cpu", dtype="bfloat16")
    assert any("'unsloth/Qwen3-8B'" in n and "16-bit" in n for n in result.plan.notes), result.plan.notes


def with_config(folder, dst, **quantization_config):
    import shutil

    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("config,fragments", [
    ({"quant_method": "gptq", "bits": 4}, ["'gptq'", "unquantized model"]),
    ({"quant_method": "awq", "bits": 4}, ["'awq'", "unquantized model"]),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, ["'compressed-tensors' (pack-quantized)"]),
    ({"quant_method": "some-new-method"}, ["'some-new-method'"]),
    ({"quant_method": "fp8", "weight_block_size": [32, 32]}, ["no tensor is stored that way"]),
])
def test_other_quantization_is_refused_before_writing(config, fragments, qwen3, tmp_path):
    base = with_config(qwen3 / "bf16", tmp_path / "base", **config)
    r = run_cli("merge", base, qwen3 / "adapter", tmp_path / "out", "--device", "cpu")
    expect_error(r, *fragments)
    assert not (tmp_path / "out").exists()


def test_fp8_files_that_do_not_fit_are_refused(qwen3, tmp_path):
    from safetensors.torch import save_file

    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8")
    tensors = load_tensors(base)
    del tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    tensors["model.layers.1.self_attn.k_proj.weight_scale_inv"] = torch.ones(3, 3)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(QuantizationError) as e:
        merge(base, qwen3 / "adapter", tmp_path / "out", device="cpu")
    assert len(e.value.problems) == 2
    assert "q_proj.weight_scale_inv" in e.value.problems[0] + e.value.problems[1]


@pytest.mark.parametrize("fmt,value", [("fp8", float("nan")), ("fp8", float("inf")), ("ue8m0", None),
                                       ("mxfp4", None)])
def test_scales_that_are_not_numbers_are_refused_before_writing(qwen3, tmp_path, fmt, value):
    """A scale that is NaN or Inf (e8m0: the byte 255) on a weight the adapter changes: refused, naming it."""
    from safetensors.torch import load_file, save_file

    if fmt == "mxfp4":
        base, adapter = gpt_oss(tmp_path), tmp_path / "adapter"
        expert_adapter(tmp_path / "bf16", adapter)
        name = "model.layers.1.mlp.experts.down_proj_scales"
    else:
        base, adapter = to_fp8(qwen3 / "bf16", tmp_path / "fp8", ue8m0=fmt == "ue8m0"), qwen3 / "adapter"
        name = "model.layers.0.self_attn.q_proj.weight_scale_inv"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("mine")
    for file in base.glob("*.safetensors"):
        tensors = load_file(file)
        if name in tensors:
            broken = tensors[name].clone()
            if value is None:  # e8m0's NaN
                broken.view(torch.uint8).reshape(-1)[1] = 255
            else:
                broken.reshape(-1)[1] = value
            save_file(tensors | {name: broken}, file, metadata={"format": "pt"})
    r = run_cli("merge", base, adapter, tmp_path / "out", "--overwrite", "--device", "cpu")
    expect_error(r, "scales hold NaN or Inf in 1 tensor(s) the adapter changes", name, "download them again")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["kept.txt"]
    assert [p.name for p in tmp_path.iterdir() if "lora-merge" in p.name] == []


def test_a_quantized_merge_is_not_unmerged(qwen3, tmp_path):
    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8")
    merge(base, qwen3 / "adapter", tmp_path / "out", device="cpu")
    with pytest.raises(QuantizationError, match="MERGED is stored quantized") as e:
        unmerge(tmp_path / "out", qwen3 / "adapter", tmp_path / "back", device="cpu")
    assert "--dtype" in e.value.hint
    assert not (tmp_path / "back").exists()


def test_verify_reads_a_requantized_output_back(qwen3, tmp_path):
    base = to_fp8(qwen3 / "bf16", tmp_path / "fp8")
    merge(base, qwen3 / "adapter", tmp_path / "out", device="cpu")
    r = run_cli("verify", tmp_path / "out", "--base", base, "--adapter", qwen3 / "adapter", "--device", "cpu")
    assert r.exit_code == 0 and "written as FP8 e4m3" in r.output, r.output
    # one code moved by one step in a merged block: the check finds it
    from safetensors.torch import save_file

    tensors = load_tensors(tmp_path / "out")
    codes = tensors["model.layers.0.self_attn.q_proj.weight"].view(torch.uint8).clone()
    codes[3, 5] += 1
    tensors["model.layers.0.self_attn.q_proj.weight"] = codes.view(torch.float8_e4m3fn)
    save_file(tensors, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    r = run_cli("verify", tmp_path / "out", "--base", base, "--adapter", qwen3 / "adapter", "--device", "cpu")
    assert r.exit_code != 0 and "q_proj.weight: 1 element(s) outside the rounding bound" in r.output, r.output
