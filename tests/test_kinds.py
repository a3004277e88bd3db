"""peft's adapter kinds beyond LoRA (AdaLoRA, LoHa, LoKr, IA3) against peft's own merge_and_unload in float64, rounded
once; the kinds with no weight to merge, and those not merged yet, refused by name."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from helpers import bf16_factors, expect_error, load_tensors, run_cli
from test_peft_oracle import round_bf16_reference

from lora_merge import merge, unmerge, verify

LINEAR = ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]

KINDS = {
    "adalora": lambda: peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=LINEAR,
                                          init_lora_weights=False),
    "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=LINEAR, init_weights=False),
    "loha_patterns": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=LINEAR, init_weights=False,
                                             rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3}),
    "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=LINEAR, init_weights=False),
    "lokr_low_rank": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=LINEAR, init_weights=False,
                                             decompose_both=True, decompose_factor=4),
    "ia3": lambda: peft.IA3Config(target_modules=LINEAR, feedforward_modules=["down_proj"], init_ia3_weights=False),
}


def build_kind(base, folder, config, seed: int = 3):
    """A real peft adapter of any kind on the model in ``base``, its weights away from identity."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():  # AdaLoRA's E starts at zero and IA3's l at one: move every trainable value
        for name, p in pm.named_parameters():
            if p.requires_grad and ("lora_E" in name or "ia3_l" in name):
                p.add_(torch.randn_like(p) * 0.3)
    pm.save_pretrained(folder)


def reference(base, adapter) -> dict[str, torch.Tensor]:
    """peft's merge in float64 (the adapter kept in float64 too)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    pm = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False)
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def ulps_unit(mag: torch.Tensor) -> torch.Tensor:
    """float32's ulp at each |x|."""
    return torch.pow(2.0, torch.floor(torch.log2(mag.double().clamp(min=torch.finfo(torch.float32).tiny))) - 23)


def rounded_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype != torch.bfloat16:
        return x.to(dtype)  # float64 -> float32 rounds once
    zero = x == 0
    return torch.where(zero, x.to(dtype), round_bf16_reference(torch.where(zero, 1.0, x)))


def assert_merged_as_peft(base, adapter, out, expect_changed: int):
    ours, ref, before = load_tensors(out), reference(base, adapter), load_tensors(base)
    assert set(ours) == set(before)
    changed = 0
    for name, got in ours.items():
        assert got.dtype == before[name].dtype, name
        want = rounded_once(ref[name], got.dtype)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        changed += not torch.equal(got, before[name])
    assert changed == expect_changed


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("base_name", ["llama", "llama_bf16"])
def test_kind_matches_peft(kind, base_name, models, tmp_path):
    base = models[base_name]
    build_kind(base, tmp_path / "adapter", KINDS[kind]())
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu", block_bytes=2048)
    assert result.stats.merged == 2 * len(LINEAR)
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * len(LINEAR))
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["checks"]["merged"]["ok"] and "correctly rounded" in report["checks"]["merged"]["summary"]
    assert report["coverage"]["kind"].lower() == kind.split("_")[0] and not report["coverage"]["left_over"]


def test_ia3_scales_the_bias(models, tmp_path):
    """Outside feedforward_modules peft scales the layer's bias with l too (qwen2's attention has biases)."""
    base = models["qwen2"]
    build_kind(base, tmp_path / "adapter", peft.IA3Config(target_modules=["q_proj", "k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"], init_ia3_weights=False))
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    ours, before = load_tensors(tmp_path / "out"), load_tensors(base)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.bias"], before["model.layers.0.self_attn.q_proj.bias"])
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * 5)


def test_tied_qwen3(models, tmp_path):
    base = models["qwen3_tied"]
    build_kind(base, tmp_path / "adapter", peft.LoKrConfig(r=2, alpha=4, target_modules=["q_proj", "up_proj"],
                                                           init_weights=False))
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert_merged_as_peft(base, tmp_path / "adapter", tmp_path / "out", 2 * 2)


@pytest.mark.parametrize("kind", ["loha", "lokr_low_rank", "adalora"])
def test_ties_decided_exactly(kind, models, tmp_path):
    """Factors of 3 significant bits and a power-of-two scale: many merged values land exactly on a bfloat16
    midpoint, where the float64 value alone cannot tell (its bound holds the midpoint): each is the exact
    value's rounding, ties to even (peft's float64 merge is exact here, and rounded once by integer arithmetic)."""
    base = models["llama_bf16"]
    config = KINDS[kind]()
    build_kind(base, tmp_path / "made", config)
    alpha = {"adalora": None, "loha": 4, "lokr_low_rank": 2}[kind]
    adapter = bf16_factors(tmp_path / "made", tmp_path / "adapter", bits=3)
    if alpha is not None:
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"alpha": alpha}))
    result = merge(str(base), str(adapter), tmp_path / "out", device="cpu")
    assert_merged_as_peft(base, adapter, tmp_path / "out", 2 * len(LINEAR))
    if kind != "adalora":  # alpha / r a power of two: exact ties, decided outside float64
        assert result.stats.exact > 0


def test_verify_and_unmerge_an_additive_kind(models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["loha"]())
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert verify(tmp_path / "out", str(base), str(tmp_path / "adapter")).ok
    result = unmerge(str(tmp_path / "out"), str(tmp_path / "adapter"), tmp_path / "back", original=str(base))
    assert result.report.ok
    back, before, merged = load_tensors(tmp_path / "back"), load_tensors(base), load_tensors(tmp_path / "out")
    # one rounding each way: within an ulp of the larger of |W| and |W + ΔW|, as for LoRA
    for name in before:
        unit = ulps_unit(torch.maximum(before[name].abs(), merged[name].abs()))
        assert float(((back[name].double() - before[name].double()).abs() / unit).max()) <= 1, name


def test_ia3_not_weighted(models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["ia3"]())
    r = run_cli(str(base), "--adapter", f"{tmp_path / 'adapter'}:0.5", str(tmp_path / "out"))
    expect_error(r, "ia3", "not combined")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("peft_type, words", [
    ("PROMPT_TUNING", ["PROMPT_TUNING", "no weight to merge"]),
    ("PREFIX_TUNING", ["PREFIX_TUNING", "no weight to merge"]),
    ("XLORA", ["XLORA", "per token"]),
    ("LILY", ["LILY", "peft does not define a merge"]),
    ("SHADOW", ["SHADOW", "peft does not define a merge"]),
    ("VERA", ["VERA", "does not merge yet", "LOHA"]),
    ("OFT", ["OFT", "does not merge yet"]),
])
def test_kinds_refused_by_name(peft_type, words, models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["loha"]())
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(cfg | {"peft_type": peft_type}))
    r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"))
    expect_error(r, *words)
    assert not (tmp_path / "out").exists()


def test_dry_run_names_the_kind(models, tmp_path):
    base = models["llama"]
    build_kind(base, tmp_path / "adapter", KINDS["lokr"]())
    r = run_cli(str(base), str(tmp_path / "adapter"), str(tmp_path / "out"), "--dry-run")
    assert r.exit_code == 0, r.output
    assert "lokr(ff, s=2)" in r.output
