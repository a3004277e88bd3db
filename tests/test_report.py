"""The parity report: a clean merge passes, every way of corrupting OUT is caught and named."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from helpers import build_adapter, peft
from safetensors.torch import load_file, save_file

from lora_merge import merge
from lora_merge.cli import cli

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def verify(out, base, adapter, *extra):
    return run("verify", out, "--base", base, "--adapter", adapter, *extra)


@pytest.fixture(scope="module")
def merged(models, tmp_path_factory):
    """A bf16 sharded base, an all-linear adapter, and lora-merge's output (read-only)."""
    root = tmp_path_factory.mktemp("report")
    base = models["llama_bf16"]
    build_adapter(base, root / "adapter", r=4, lora_alpha=8, target_modules=ALL_LINEAR)
    merge(str(base), str(root / "adapter"), root / "out", device="cpu")
    return base, root / "adapter", root / "out"


@pytest.fixture
def out_copy(merged, tmp_path):
    base, adapter, out = merged
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    return base, adapter, copy


def shard_of(folder, name):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return folder / json.loads(index.read_text())["weight_map"][name]
    return folder / "model.safetensors"


def rewrite(folder, name, change):
    """Rewrite the shard holding ``name`` with ``change(tensors)`` applied; keep the index true."""
    path = shard_of(folder, name)
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in tensors or v != path.name}
        data["weight_map"].update({k: path.name for k in tensors})
        index.write_text(json.dumps(data))


def test_clean_merge_report(merged):
    base, adapter, out = merged
    report = json.loads((out / "merge_report.json").read_text())
    assert report["status"] == "passed"
    assert all(c["ok"] and c["failures"] == [] for c in report["checks"].values())
    assert report["structure"]["out"] == report["structure"]["base"]
    assert report["structure"]["expected_differences"] == []
    cov = report["coverage"]
    assert cov["adapter_modules"] == 2 * len(ALL_LINEAR) and cov["merged"] == 2 * len(ALL_LINEAR)
    assert cov["left_over"] == [] and cov["adapter_tensors"] == 4 * len(ALL_LINEAR)
    tensors = report["tensors"]
    merged_names = {n for n, t in tensors.items() if t["check"] == "merged"}
    assert len(merged_names) == 2 * len(ALL_LINEAR)
    for name, t in tensors.items():
        assert t["ok"]
        if t["check"] == "merged":
            assert t["max_error_ulp"] <= 0.5 + 1e-6 and t["correctly_rounded"]
    # the recorded hashes are those of the weights files in OUT, every one of them
    files = report["files"]
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert sorted(files["weights"]) == shards
    for shard in shards:
        assert files["weights"][shard]["sha256"] == hashlib.sha256((out / shard).read_bytes()).hexdigest()
    assert files["config_changes"] == {}
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        assert files["copied"][f]["sha256"] == hashlib.sha256((out / f).read_bytes()).hexdigest()
    prov = report["provenance"]
    assert (
        prov["adapter"]["files"]["adapter_model.safetensors"]
        == hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    )
    assert prov["base"]["path"] == str(base) and prov["device"] == "cpu"
    memory = prov["memory"]
    assert memory["peak_bytes"] >= memory["baseline_bytes"] > 0
    assert memory["added_bytes"] == memory["peak_bytes"] - memory["baseline_bytes"] and memory["gpu_peak_bytes"] is None
    assert prov["merge_seconds"] >= 0 and prov["lora_merge_version"]


def test_verify_passes_and_writes_json(merged, tmp_path):
    base, adapter, out = merged
    r = verify(out, base, adapter, "--report", tmp_path / "r.json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "parity report: PASSED" in r.output and "| Check | Result | Details |" in r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "passed"
    assert report["tensors"].keys() == json.loads((out / "merge_report.json").read_text())["tensors"].keys()


@pytest.mark.parametrize("case", ["another adapter", "another scale", "another base", "the base itself"])
def test_a_mismatch_says_what_the_stored_tensors_hold_instead(merged, tmp_path, case):
    """verify against the wrong adapter, scale or base (or against BASE itself): one line that says what OUT holds
    instead and what to check, with figures a person reads (no ten-digit ulp counts, no million percent)."""
    import re

    base, adapter, out = merged
    other = tmp_path / "other"
    if case == "another adapter":
        build_adapter(base, other, seed=7, r=4, lora_alpha=8, target_modules=ALL_LINEAR)
        said, todo = "their change is not this adapter's", "check that --adapter is the adapter that was merged"
    elif case == "another scale":
        shutil.copytree(adapter, other)
        config = json.loads((adapter / "adapter_config.json").read_text())
        (other / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": 16}))
        said, todo = "they carry 0.5 times this adapter's change: it was merged with another scale", "lora_alpha"
    elif case == "another base":
        shutil.copytree(base, other)
        for shard in other.glob("*.safetensors"):
            torch.manual_seed(3)
            tensors = {k: (v.float() + torch.randn_like(v.float()) * 0.02).to(v.dtype)
                       for k, v in load_file(shard).items()}
            save_file(tensors, shard, metadata={"format": "pt"})
        base, said, todo = other, "but on other weights: it was merged into another base", "check that --base"
    else:
        out, said, todo = base, "they hold BASE's values: the adapter was not merged into them", "merge again"
    r = verify(out, base, other if case in ("another adapter", "another scale") else adapter, "--device", "cpu")
    assert r.exit_code == 1
    row = next(line for line in r.output.splitlines() if line.startswith("| merged |"))
    assert said in row and "%" not in row, row
    error = [line for line in r.output.splitlines() if line.startswith(("error:", "hint:"))]
    assert said in error[0] and todo in error[1], error
    assert not re.search(r"\d{7}|\d{1,3}(,\d{3}){3}", row + "".join(error)), row  # no number of ten digits or more
    delta = next(line for line in r.output.splitlines() if line.startswith("| delta |"))
    assert "survived" not in delta and "-0.0%" not in delta, delta


def _exact_value(base, adapter, name):
    """W + s·B·A in float64, straight from the files, for one Linear weight (independent of lora_merge)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load_file(adapter / "adapter_model.safetensors")
    module = name.removesuffix(".weight")
    a = factors[f"base_model.model.{module}.lora_A.weight"].double()
    b = factors[f"base_model.model.{module}.lora_B.weight"].double()
    scale = config["lora_alpha"] / config["r"]
    w = load_file(shard_of(base, name))[name].double()
    return w + scale * (b @ a), scale * (b.abs() @ a.abs()), scale * (b @ a), config["r"]


def _ulp_bf16(x: float) -> float:
    return 2.0 ** (max(math.frexp(abs(x))[1] - 1, -126) - 7) if x else 2.0**-133


def _bf16_step(x: torch.Tensor, up: bool) -> torch.Tensor:
    """The next bfloat16 value above (or below) the non-zero ``x``."""
    bits = x.view(torch.int16).clone()
    bits += 1 if (float(x) > 0) == up else -1  # sign and magnitude: magnitude grows by one step
    return bits.view(torch.bfloat16)


def test_one_element_one_ulp_beyond_the_bound(out_copy):
    base, adapter, out = out_copy
    name = "model.layers.1.self_attn.v_proj.weight"
    value, products, delta, r = _exact_value(base, adapter, name)
    i, j = 3, 5
    v, d = float(value[i, j]), float(delta[i, j])
    # the documented bound: ½ ulp(v) + ½ ulp(Δ) + (r + 2)·2⁻²⁴·|s|·(|B|·|A|) (+ float64 slack)
    bound = 0.5 * _ulp_bf16(v) + 0.5 * _ulp_bf16(d) + (r + 2) * 2.0**-24 * float(products[i, j])

    def corrupt(tensors):
        t = tensors[name]
        up = float(t[i, j]) >= v  # move away from the exact value
        x = t[i, j].clone()
        while abs(float(_bf16_step(x, up)) - v) <= bound:
            x = _bf16_step(x, up)
        t[i, j] = _bf16_step(x, up)  # the first bf16 value outside the bound: one ulp beyond it
        assert abs(float(t[i, j]) - v) > bound

    rewrite(out, name, corrupt)
    r = verify(out, base, adapter)
    assert r.exit_code == 1
    assert f"merged: {name}: 1 element(s) outside the rounding bound, first at [{i}, {j}]" in r.output
    assert "error: the parity check failed (merged)" in r.output
    assert name in r.output.splitlines()[-2]
    row = next(line for line in r.output.splitlines() if line.startswith("| merged |"))
    assert "| FAIL |" in row and "within" not in row and "checked, 1 outside the rounding bound" in row, row
    assert "they carry this adapter's change, rounded less exactly than the exact merge rounded once" in row, row


def test_an_untouched_tensor_altered(out_copy):
    base, adapter, out = out_copy
    name = "model.layers.0.input_layernorm.weight"

    def corrupt(tensors):
        t = tensors[name]
        t.view(torch.int16)[0] ^= 1  # one bit

    rewrite(out, name, corrupt)
    r = verify(out, base, adapter)
    assert r.exit_code == 1
    assert f"untouched: {name}: bytes differ from BASE" in r.output


def test_nan_anywhere_is_caught(out_copy):
    base, adapter, out = out_copy
    name = "model.layers.0.self_attn.q_proj.weight"
    rewrite(out, name, lambda t: t[name].__setitem__((0, 0), float("nan")))
    r = verify(out, base, adapter)
    assert r.exit_code == 1
    assert f"finite: {name}: holds NaN or Inf" in r.output
    assert f"merged: {name}: 1 element(s) outside the rounding bound" in r.output


def test_a_tensor_missing(out_copy):
    base, adapter, out = out_copy
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite(out, name, lambda t: t.pop(name))
    r = verify(out, base, adapter)
    assert r.exit_code == 1
    assert f"structure: {name}: missing from OUT" in r.output


def test_a_dtype_changed(out_copy):
    base, adapter, out = out_copy
    name = "model.layers.0.mlp.down_proj.weight"
    rewrite(out, name, lambda t: t.__setitem__(name, t[name].to(torch.float16)))
    r = verify(out, base, adapter)
    assert r.exit_code == 1
    assert f"structure: {name}: dtype F16, expected BF16" in r.output


def test_a_tokenizer_file_missing(out_copy):
    base, adapter, out = out_copy
    (out / "tokenizer.json").unlink()
    r = verify(out, base, adapter)
    assert r.exit_code == 1
    assert "files: tokenizer.json: missing from OUT (BASE has it)" in r.output


def test_an_unexpected_config_change(out_copy):
    base, adapter, out = out_copy
    config = json.loads((out / "config.json").read_text())
    config["rms_norm_eps"] = 0.1
    (out / "config.json").write_text(json.dumps(config))
    r = verify(out, base, adapter)
    assert r.exit_code == 1
    assert "files: config.json: rms_norm_eps is 0.1, expected 1e-06" in r.output


def test_a_silently_retied_lm_head(models, tmp_path):
    base = models["qwen3_tied"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj", "embed_tokens"])
    out = tmp_path / "out"
    merge(str(base), str(tmp_path / "adapter"), out, device="cpu")
    report = json.loads((out / "merge_report.json").read_text())
    assert {
        "tensor": "lm_head.weight",
        "what": "not stored in BASE",
        "cause": "untied from model.embed_tokens.weight",
    } in report["structure"]["expected_differences"]
    assert report["files"]["config_changes"]["tie_word_embeddings"]["cause"] == "expected"
    # re-tie it the way a careless save would: drop the separate head, set the flag back
    rewrite(out, "lm_head.weight", lambda t: t.pop("lm_head.weight"))
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    r = verify(out, base, tmp_path / "adapter")
    assert r.exit_code == 1
    assert "structure: lm_head.weight: missing from OUT" in r.output
    assert "files: config.json: tie_word_embeddings is True, expected False" in r.output


def test_merge_that_goes_wrong_is_kept_beside_out_marked_failed(models, tmp_path, monkeypatch):
    """A merge bug (here: every delta added twice) is caught by the report, which reads OUT back."""
    from test_writer import twice

    from lora_merge import kernels

    base = models["llama"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj"])
    monkeypatch.setattr(kernels, "merge32", twice(kernels.merge32, wide=True))
    out = tmp_path / "out"
    r = run(base, tmp_path / "adapter", out)
    assert r.exit_code == 1
    assert "parity report: FAILED" in r.output
    assert "error: the parity check failed (merged): model.layers.0.self_attn.q_proj.weight" in r.output
    kept = tmp_path / "out.lora-merge-failed"
    assert f"OUT was not changed; the failed output is kept in {kept}" in r.output and not out.exists()
    report = json.loads((kept / "merge_report.json").read_text())
    assert report["status"] == "failed"
    assert not report["tensors"]["model.layers.1.self_attn.q_proj.weight"]["ok"]


PEFT_CASES = {
    "plain_fp32": ("llama_sharded", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "plain_bf16": ("llama_bf16", dict(r=4, lora_alpha=8, target_modules=ALL_LINEAR)),
    "dora": ("llama", dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"])),
    "gpt2_conv1d": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
    "embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "lora_bias": ("qwen2", dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "k_proj"])),
    "modules_to_save": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"])),
}


@pytest.mark.parametrize("case", sorted(PEFT_CASES))
def test_verify_peft_merge_and_unload_output(case, models, tmp_path):
    """peft's own merge, saved with a different shard layout, passes verify (tensors match by name)."""
    import transformers

    base_name, kwargs = PEFT_CASES[case]
    base = models[base_name]
    build_adapter(base, tmp_path / "adapter", **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    merged_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").merge_and_unload()
    out = tmp_path / "peft-out"
    merged_model.save_pretrained(out, max_shard_size="50KB")
    # users save the tokenizer beside the model themselves; peft writes weights and config only
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
        shutil.copy(base / f, out / f)
    ours = sorted(p.name for p in base.glob("*.safetensors"))
    theirs = sorted(p.name for p in out.glob("*.safetensors"))
    r = verify(out, base, tmp_path / "adapter", "--report", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["status"] == "passed"
    if base_name != "gpt2":
        assert ours != theirs  # a different shard layout


def test_latency_three_way(merged):
    base, adapter, out = merged
    r = verify(out, base, adapter, "--latency", "--new-tokens", 3, "--runs", 2, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "| Condition | Mean latency (s) | Std dev (s) | Runs |" in r.output
    r = verify(out, base, adapter, "--latency", "--new-tokens", 3, "--runs", 2, "--json")
    assert r.exit_code == 0, r.output
    lat = json.loads(r.output)["latency"]
    auto = "cuda" if torch.cuda.is_available() else "cpu"  # --device left at auto
    assert lat["new_tokens"] == 3 and lat["device"].split(":")[0] == auto and lat["dtype"] == "bfloat16"
    assert set(lat["conditions"]) == {"base", "unmerged", "merged"}
    for c in lat["conditions"].values():
        assert c["runs"] == 2 and len(c["times_s"]) == 2 and c["mean_s"] > 0 and c["std_s"] >= 0
    weights = {k: c["weights_read_per_token_bytes"] for k, c in lat["conditions"].items()}
    assert weights["merged"] == weights["base"] < weights["unmerged"]
    assert set(lat["ratios"]) == {"merged/base", "unmerged/base"}
    assert isinstance(lat["merged_tokens_equal_unmerged"], bool)


@pytest.mark.parametrize("absent, said", [(["peft"], "peft is not installed"),
                                          (["transformers", "peft"], "transformers and peft are not installed")])
def test_latency_without_the_extra(absent, said, merged, monkeypatch):
    import sys

    base, adapter, out = merged
    for name in absent:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    r = verify(out, base, adapter, "--latency")
    assert r.exit_code == 1
    assert f"error: --latency needs transformers and peft ({said})" in r.output
    assert "hint: pip install 'lora-merge[latency]'" in r.output


def test_verify_errors_are_one_line(merged, tmp_path):
    base, adapter, out = merged
    r = verify(tmp_path / "nowhere", base, adapter)
    assert r.exit_code == 1
    assert r.output.startswith(f"error: OUT '{tmp_path / 'nowhere'}' does not exist")
    (tmp_path / "empty").mkdir()
    r = verify(tmp_path / "empty", base, adapter)
    assert r.exit_code == 1 and "error: OUT" in r.output and "has no safetensors weights" in r.output
    r = run("verify", out, "--base", base)
    assert r.exit_code == 2 and "Missing option '--adapter'" in r.output
    r = verify(out, base, adapter, "-q")
    assert r.exit_code == 0 and r.output == ""
