"""Placing adapters named for the model in memory: when the files suffice, when the model class is needed,
and refusals that never drop part of a delta."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from architectures import tiny_config
from helpers import expect_error, load_tensors, peft, run_cli, transformers, ulps
from safetensors.torch import save_file

from lora_merge import merge, unmerge, verify
from lora_merge.errors import LayoutError, PlanError


def build(model_type: str, folder, **overrides):
    config = tiny_config(model_type)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    return folder


def adapter(base, folder, **lora):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora)).save_pretrained(folder)
    return folder


def peft_merge(base, adapter_dir, out):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, adapter_dir, autocast_adapter_dtype=False).merge_and_unload()
    merged.save_pretrained(out)
    return load_tensors(out)


def assert_correctly_rounded(out, reference):
    ours = load_tensors(out)
    assert set(ours) == set(reference)
    for name, got in ours.items():
        assert ulps(got, reference[name], got.dtype).max() <= 0.5, name


@pytest.fixture(scope="module")
def square_gpt_oss(tmp_path_factory):
    """gpt-oss with intermediate = hidden, as in the published model: down_proj's (E, I, H) experts are square,
    so only the model class (GptOssExperts.is_transposed) says which way round peft's delta goes."""
    root = tmp_path_factory.mktemp("gpt_oss")
    base = build("gpt_oss", root / "base", intermediate_size=32)
    return base, adapter(base, root / "adapter", r=3, lora_alpha=5, target_modules=[],
                         target_parameters=["down_proj", "gate_up_proj"])


def test_square_experts_need_the_model_class(square_gpt_oss, tmp_path):
    base, adapter_dir = square_gpt_oss
    result = merge(str(base), str(adapter_dir), tmp_path / "out", device="cpu")
    assert result.plan.adapter.layout and "gpt_oss" in result.plan.adapter.layout
    assert result.report.ok and result.stats.merged == 4
    assert_correctly_rounded(tmp_path / "out", peft_merge(base, adapter_dir, tmp_path / "peft"))


def test_without_transformers_the_extra_is_named(square_gpt_oss, tmp_path, no_transformers):
    base, adapter_dir = square_gpt_oss
    with pytest.raises(LayoutError) as caught:
        merge(str(base), str(adapter_dir), tmp_path / "out", device="cpu")
    assert "lora-merge[transformers]" in caught.value.hint
    r = run_cli(base, adapter_dir, tmp_path / "out2")
    expect_error(r, "transformers is not installed", "lora-merge[transformers]")
    assert "down_proj" in r.output  # which targets the files could not place
    assert not (tmp_path / "out2").exists()


def per_expert_adapter(base, folder, r=2, alpha=6):
    """A peft adapter in the older naming, one module per expert, as transformers 4 built Qwen3-MoE."""
    from safetensors import safe_open

    shapes = {}
    for f in base.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            shapes.update({k: h.get_slice(k).get_shape() for k in h.keys()})
    torch.manual_seed(3)
    tensors = {}
    for name, (out, inn) in ((k, v) for k, v in shapes.items() if ".experts." in k):
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, inn) * 0.2
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, r) * 0.2
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["gate_proj", "up_proj", "down_proj"]}))
    return tensors, alpha / r


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return build("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe") / "base")


def test_older_per_expert_naming_still_merges(qwen3_moe, tmp_path, monkeypatch):
    tensors, scale = per_expert_adapter(qwen3_moe, tmp_path / "adapter")
    monkeypatch.setitem(sys.modules, "transformers", None)  # matched by name: transformers is never asked
    result = merge(str(qwen3_moe), str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert result.report.ok and not result.plan.adapter.mapped
    assert result.stats.merged == len(tensors) // 2
    ours, before = load_tensors(tmp_path / "out"), load_tensors(qwen3_moe)
    for key, a in tensors.items():
        if ".lora_A." in key:
            name = key.removeprefix("base_model.model.").replace(".lora_A", "")
            b = tensors[key.replace("lora_A", "lora_B")]
            exact = before[name].double() + scale * (b.double() @ a.double())
            assert ulps(ours[name], exact, torch.bfloat16).max() <= 0.5, name


def test_a_missing_expert_is_refused_not_dropped(qwen3_moe, tmp_path):
    """One expert's up_proj gone from the files: part of the fused delta would land nowhere."""
    import shutil

    from safetensors.torch import load_file

    base = tmp_path / "base"
    shutil.copytree(qwen3_moe, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    gone = "model.layers.0.mlp.experts.3.up_proj.weight"
    shard = base / index["weight_map"].pop(gone)
    kept = {k: v for k, v in load_file(shard).items() if k != gone}
    save_file(kept, shard, metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    adapter_dir = adapter(qwen3_moe, tmp_path / "adapter", r=2, lora_alpha=4, target_modules="all-linear")
    with pytest.raises(PlanError) as caught:
        merge(str(base), str(adapter_dir), tmp_path / "out", device="cpu")
    assert "model.layers.0.mlp.experts.gate_up_proj" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_verify_and_unmerge_follow_the_same_layout(qwen3_moe, tmp_path):
    adapter_dir = adapter(qwen3_moe, tmp_path / "adapter", r=2, lora_alpha=4, target_modules="all-linear")
    result = merge(str(qwen3_moe), str(adapter_dir), tmp_path / "out", device="cpu")
    assert result.report.details["coverage"]["through_mapping"] > 0
    report = verify(tmp_path / "out", str(qwen3_moe), str(adapter_dir), device="cpu")
    assert report.ok
    assert report.details["coverage"]["through_mapping"] == result.report.details["coverage"]["through_mapping"]
    back = unmerge(str(tmp_path / "out"), str(adapter_dir), tmp_path / "back", original=str(qwen3_moe), device="cpu")
    trip = back.report.details["round_trip"]["totals"]
    assert back.report.ok and trip["worst_ulp"] <= 1.0 and trip["untouched"]["identical"] == trip["untouched"]["tensors"]


def test_the_report_says_where_targets_were_placed(qwen3_moe, tmp_path):
    adapter_dir = adapter(qwen3_moe, tmp_path / "adapter", r=2, lora_alpha=4, target_modules="all-linear")
    r = run_cli(qwen3_moe, adapter_dir, tmp_path / "out", "--device", "cpu")
    assert r.exit_code == 0, r.output
    coverage = json.loads((tmp_path / "out" / "merge_report.json").read_text())["coverage"]
    layers, experts = 2, 4
    # per layer: q, k, v, o and the router by name; the fused gate_up_proj and down_proj through the tables,
    # onto one gate, one up and one down tensor per expert
    assert coverage["direct"] == 5 * layers and coverage["through_mapping"] == 2 * layers
    assert coverage["targets"] == (5 + 3 * experts) * layers and coverage["left_over"] == []
    assert "placed through transformers" in r.output and "'qwen3_moe'" in r.output
