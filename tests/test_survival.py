"""How much of the adapter's change the stored model carries: the report's figures against an independent computation
from the files, the change rounded away named, and --min-delta-kept as a gate."""

import json

import peft
import pytest
import torch
import transformers
from helpers import build_adapter, load_tensors, run_cli
from safetensors.torch import load_file, save_file

from lora_merge import ParityError, merge, verify


def exact_merge(base, adapter) -> dict[str, torch.Tensor]:
    """peft's merge in float64: W + s·B·A for every targeted weight."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    merged = peft.PeftModel.from_pretrained(model, adapter, autocast_adapter_dtype=False).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def survival(out, base, exact, name) -> dict:
    o, w, v = out[name].double(), base[name].double(), exact[name]
    realized, delta = o - w, v - w
    return {"kept": float((realized * delta).sum() / (delta * delta).sum()),
            "relative_error": float((realized - delta).norm() / delta.norm()),
            "changed_elements": int((o != w).sum())}


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("survival") / "adapter"
    build_adapter(models["llama_bf16"], folder, r=4, lora_alpha=8, target_modules="all-linear")
    return folder


def test_the_share_kept_is_what_the_files_hold(models, adapter, tmp_path):
    base = models["llama_bf16"]
    result = merge(base, adapter, tmp_path / "out", device="cpu")
    out, before, exact = load_tensors(tmp_path / "out"), load_tensors(base), exact_merge(base, adapter)
    merged = [e.name for e in result.plan.entries if e.is_merge]
    assert merged
    cross = energy = 0.0
    for name in merged:
        want = survival(out, before, exact, name)
        got = result.report.to_json()["tensors"][name]["delta_survival"]
        assert got["kept"] == pytest.approx(want["kept"], rel=1e-5, abs=1e-6), name
        assert got["relative_error"] == pytest.approx(want["relative_error"], rel=1e-5, abs=1e-6), name
        assert got["changed_elements"] == want["changed_elements"], name
        delta = exact[name] - before[name].double()
        cross += float(((out[name].double() - before[name].double()) * delta).sum())
        energy += float((delta * delta).sum())
    total = result.report.details["delta_survival"]
    assert total["kept"] == pytest.approx(cross / energy, rel=1e-5)
    assert total["tensors"] == len(merged) and total["unchanged"] == []
    check = result.report.check("delta")
    assert check.ok and f"OUT keeps {cross / energy:.1%} of the adapter's change (by energy" in check.summary
    assert result.summary()["delta_survival"] == total
    # verify reads the same figures back from the files
    again = verify(tmp_path / "out", base, adapter, device="cpu")
    assert again.details["delta_survival"]["kept"] == pytest.approx(total["kept"], rel=1e-9)


def faint(adapter, folder, module: str, factor: float):
    """A copy of ``adapter`` whose ``module``'s B is multiplied by ``factor``."""
    folder.mkdir()
    tensors = load_file(adapter / "adapter_model.safetensors")
    hits = [k for k in tensors if module in k and "lora_B" in k]
    assert hits
    for k in hits:
        tensors[k] = tensors[k] * factor
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    return folder


def test_a_change_rounded_away_is_named_and_fails_with_min_delta_kept(models, adapter, tmp_path):
    base = models["llama_bf16"]
    weak = faint(adapter, tmp_path / "weak", "layers.0.self_attn.q_proj", 1e-9)
    result = merge(base, weak, tmp_path / "out", device="cpu")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(load_tensors(tmp_path / "out")[name], load_tensors(base)[name])  # bf16 rounded it away
    data, check = result.report.details["delta_survival"], result.report.check("delta")
    assert data["unchanged"] == [name]
    assert check.ok and any(name in w for w in check.warnings) and name in result.report.table()
    assert "1 tensor the adapter changes stored unchanged" in check.summary

    r = run_cli("merge", base, weak, tmp_path / "gated", "--device", "cpu", "--min-delta-kept", "0.5")
    assert r.exit_code == 1, r.output
    assert "none of the adapter's change was stored" in r.output and name in r.output
    assert not (tmp_path / "gated").exists() and (tmp_path / "gated.lora-merge-failed").is_dir()
    report = json.loads((tmp_path / "gated.lora-merge-failed" / "merge_report.json").read_text())
    assert report["status"] == "failed" and not report["checks"]["delta"]["ok"]
    # --json prints the summary, failed or not, naming where the output is
    r = run_cli("merge", base, weak, tmp_path / "gated", "--device", "cpu", "--min-delta-kept", "0.5", "--json")
    assert r.exit_code == 1
    summary = json.loads(r.stdout)
    kept = tmp_path / "gated.lora-merge-failed"
    assert summary["parity"] == "failed" and summary["out"] == str(kept)
    assert summary["report"] == str(kept / "merge_report.json") and summary["merged"] >= 1
    # the same gate in verify, on the output that passed without it
    assert not verify(tmp_path / "out", base, weak, device="cpu", min_delta_kept=0.5).ok


def test_min_delta_kept_passes_a_sound_merge_and_fails_a_zero_adapter(models, adapter, tmp_path):
    base = models["llama_bf16"]
    assert merge(base, adapter, tmp_path / "out", device="cpu", min_delta_kept=0.9).report.ok
    zero = faint(adapter, tmp_path / "zero", "lora_B", 0.0)
    with pytest.raises(ParityError) as e:
        merge(base, zero, tmp_path / "zero-out", device="cpu", min_delta_kept=0.1)
    assert "the adapter's change is zero everywhere" in " ".join(e.value.report.check("delta").failures)
    # without the gate, a zero adapter is a zero change, reported as such
    report = merge(base, zero, tmp_path / "zero-plain", device="cpu").report
    assert report.ok and "zero everywhere" in report.check("delta").summary


@pytest.mark.parametrize("value", ["1.5", "-0.1", "half"])
def test_min_delta_kept_is_a_share(models, adapter, tmp_path, value):
    r = run_cli("merge", models["llama_bf16"], adapter, tmp_path / "out", "--min-delta-kept", value)
    assert r.exit_code == 2 and "--min-delta-kept" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="min_delta_kept"):
        merge(models["llama_bf16"], adapter, tmp_path / "out", device="cpu", min_delta_kept=1.5)


def test_the_figures_are_in_the_json_summary(models, adapter, tmp_path):
    r = run_cli("merge", models["llama_bf16"], adapter, tmp_path / "out", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output[r.output.index("{"):])
    assert 0.9 < summary["delta_survival"]["kept"] < 1.1 and summary["delta_survival"]["min_delta_kept"] is None
