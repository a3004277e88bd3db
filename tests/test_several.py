"""Several adapters summed in one pass, against peft loading them all and merging them."""

from __future__ import annotations

import json

import torch
from helpers import build_adapter, expect_error, load_tensors, run_cli

CLOSE = {"rtol": 2e-6, "atol": 1e-7}


def peft_merge_of(base, adapters: list[tuple[object, float]]) -> dict:
    """peft's merge_and_unload of every adapter, each one's scaling multiplied by its weight."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapters))]
    pm = peft.PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0])
    for name, (folder, _) in zip(names[1:], adapters[1:]):
        pm.load_adapter(folder, adapter_name=name)
    for module in pm.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            for name, (_, weight) in zip(names, adapters):
                if name in module.scaling:
                    module.scaling[name] *= weight
    merged = pm.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_two_adapters_with_weights_match_peft(models, tmp_path):
    base = models["llama_sharded"]
    build_adapter(base, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    build_adapter(base, tmp_path / "a2", seed=2, r=2, lora_alpha=4, use_rslora=True,
                  target_modules=["q_proj", "down_proj"])
    r = run_cli(base, tmp_path / "out", "--adapter", tmp_path / "a1", "--adapter", f"{tmp_path / 'a2'}:0.5")
    assert r.exit_code == 0, r.output
    assert "2 adapters onto 6 base tensors" in r.output
    got, want = load_tensors(tmp_path / "out"), peft_merge_of(base, [(tmp_path / "a1", 1.0), (tmp_path / "a2", 0.5)])
    base_tensors = load_tensors(base)
    changed = 0
    for name, t in got.items():
        torch.testing.assert_close(t, want[name], **CLOSE, msg=lambda m, name=name: f"{name}: {m}")
        changed += not torch.equal(t, base_tensors[name])
    assert changed == 6  # q_proj from both, v_proj from a1, down_proj from a2, in 2 layers
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["status"] == "passed"
    coverage = report["coverage"]["adapters"]
    assert [c["weight"] for c in coverage] == [1.0, 0.5]
    assert [c["merged"] for c in coverage] == [4, 4] and all(c["left_over"] == [] for c in coverage)
    assert [a["weight"] for a in report["provenance"]["adapters"]] == [1.0, 0.5]
    # verify takes the same adapters, and fails without the second
    r = run_cli("verify", tmp_path / "out", "--base", base, "--adapter", tmp_path / "a1",
                "--adapter", f"{tmp_path / 'a2'}:0.5")
    assert r.exit_code == 0, r.output
    expect_error(run_cli("verify", tmp_path / "out", "--base", base, "--adapter", tmp_path / "a1", "-q"),
                 "the parity check failed")


def test_an_adapter_that_does_not_fit_stops_the_merge(models, tmp_path):
    """An adapter for another model stops the merge before a byte is written, even beside one that fits."""
    base = models["llama"]
    build_adapter(base, tmp_path / "good", r=4, lora_alpha=8, target_modules=["q_proj"])
    build_adapter(models["gpt2"], tmp_path / "other", r=4, lora_alpha=8, target_modules=["c_attn"])
    r = run_cli(base, tmp_path / "out", "--adapter", tmp_path / "good", "--adapter", tmp_path / "other")
    expect_error(r, "the adapter does not fit BASE", "c_attn")
    assert not (tmp_path / "out").exists()


def test_what_cannot_be_summed_is_refused(models, tmp_path):
    base = models["llama"]
    build_adapter(base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    build_adapter(base, tmp_path / "plain", r=4, lora_alpha=8, target_modules=["q_proj"])
    build_adapter(base, tmp_path / "saved", r=4, lora_alpha=8, target_modules=["k_proj"], modules_to_save=["lm_head"])
    build_adapter(base, tmp_path / "saved2", seed=5, r=4, lora_alpha=8, target_modules=["v_proj"],
                  modules_to_save=["lm_head"])
    expect_error(run_cli(base, tmp_path / "out", "--adapter", tmp_path / "dora", "--adapter", tmp_path / "plain"),
                 "cannot be combined", "is DoRA")
    expect_error(run_cli(base, tmp_path / "out", "--adapter", tmp_path / "saved:0.5"),
                 "replaces the tensor")
    expect_error(run_cli(base, tmp_path / "out", "--adapter", tmp_path / "saved", "--adapter", tmp_path / "saved2"),
                 "lm_head.weight: replaced by one adapter and changed by another")
    # one adapter with a full tensor beside a plain one is fine
    r = run_cli(base, tmp_path / "out", "--adapter", tmp_path / "saved", "--adapter", tmp_path / "plain", "-q")
    assert r.exit_code == 0, r.output


def test_adapter_arguments(models, tmp_path):
    base = models["llama"]
    build_adapter(base, tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"])
    r = run_cli(base, tmp_path / "a", tmp_path / "out", "--adapter", tmp_path / "a")
    assert r.exit_code == 2 and "give BASE and OUT only" in r.output
    r = run_cli(base, tmp_path / "out", "--adapter", f"{tmp_path / 'a'}:nan")
    assert r.exit_code == 2 and "finite number" in r.output
    r = run_cli(base, tmp_path / "out")
    assert r.exit_code == 2 and "BASE ADAPTER OUT" in r.output
