"""Unmerge: subtract the adapter and measure how much of the base comes back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build_adapter, expect_error, load_tensors, run_cli

MANTISSA = {torch.float32: 23, torch.bfloat16: 7}


@pytest.mark.parametrize("base_name,dtype", [("llama_sharded", torch.float32), ("llama_bf16", torch.bfloat16)])
def test_merge_then_unmerge(models, tmp_path, base_name, dtype):
    base = models[base_name]
    build_adapter(base, tmp_path / "adapter", r=8, lora_alpha=16, target_modules="all-linear")
    assert run_cli(base, tmp_path / "adapter", tmp_path / "merged", "-q").exit_code == 0
    r = run_cli("unmerge", tmp_path / "merged", tmp_path / "adapter", tmp_path / "back", "--base", base, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["status"] == "passed"
    assert report["checks"]["delta"]["summary"].startswith("OUT keeps 100.0% of the change of taking the adapter out")
    trip = report["round_trip"]
    ours, original, merged = load_tensors(tmp_path / "back"), load_tensors(base), load_tensors(tmp_path / "merged")
    assert set(ours) == set(original)
    # the report's counts are the ones a direct comparison gives
    identical = elements = 0
    for name, stat in trip["tensors"].items():
        same = ours[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32) == \
            original[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32)
        assert stat["identical"] == int(same.sum()) and stat["elements"] == same.numel()
        assert stat["certain"] <= stat["identical"]  # "certainly the original" is never wrong
        identical, elements = identical + stat["identical"], elements + stat["elements"]
        # the error in ulp of the larger of |original| and |merged|: one rounding each way, so at most 1
        mag = torch.maximum(original[name].double().abs(), merged[name].double().abs())
        unit = torch.pow(2.0, torch.floor(torch.log2(mag.clamp(min=torch.finfo(dtype).tiny))) - MANTISSA[dtype])
        error = ((ours[name].double() - original[name].double()).abs() / unit).max().item()
        assert error <= 1.0 and stat["worst_ulp"] == pytest.approx(error, abs=1e-9)
    assert trip["totals"]["identical"] == identical and trip["totals"]["elements"] == elements
    assert 0 < identical < elements  # some rounding could not be undone, and the report says so
    assert trip["totals"]["untouched"]["identical"] == trip["totals"]["untouched"]["tensors"]
    for name in set(original) - set(trip["tensors"]):
        assert torch.equal(ours[name], original[name]), name


def test_unmerge_speaks_of_merged(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = models["llama"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    assert run_cli(base, tmp_path / "adapter", tmp_path / "merged", "-q").exit_code == 0
    r = run_cli("unmerge", tmp_path / "merged", tmp_path / "adapter", "back")
    assert r.exit_code == 0, r.output
    assert f"-> {(Path.cwd() / 'back').resolve()}" in r.output  # absolute, as merge prints it
    assert "W − s·B·A" in r.output and "byte-identical to MERGED" in r.output and "as MERGED" in r.output
    assert "W + s·B·A" not in r.output and "BASE" not in r.output.split("| Check |")[1]


def test_unmerge_without_the_base_counts_what_is_certain(models, tmp_path):
    base = models["llama"]
    build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    assert run_cli(base, tmp_path / "adapter", tmp_path / "merged", "-q").exit_code == 0
    r = run_cli("unmerge", tmp_path / "merged", tmp_path / "adapter", tmp_path / "back")
    assert r.exit_code == 0, r.output
    assert "certainly the original" in r.output and "pass --base ORIGINAL" in r.output
    report = json.loads((tmp_path / "back" / "merge_report.json").read_text())
    assert report["round_trip"]["totals"]["certain"] > 0
    assert not (tmp_path / "back" / "README.md").exists()  # no model card for a merge that is not one


def test_unmerge_refuses_what_cannot_be_undone(models, tmp_path):
    base = models["llama"]
    build_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    build_adapter(base, tmp_path / "saved", r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    for name, why in (("dora", "is DoRA"), ("saved", "replaces 1 tensor(s) outright")):
        assert run_cli(base, tmp_path / name, tmp_path / f"merged-{name}", "-q").exit_code == 0
        expect_error(run_cli("unmerge", tmp_path / f"merged-{name}", tmp_path / name, tmp_path / "back"), why)
        assert not (tmp_path / "back").exists()
