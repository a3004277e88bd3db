"""The command line: results, and one clear line for every user error, leaving nothing behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import build_adapter, expect_error, load_tensors
from helpers import run_cli as run


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "adapter"
    build_adapter(models["llama_sharded"], folder, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return folder


def leftovers(parent):
    return [p.name for p in parent.iterdir() if "lora-merge-" in p.name]


def test_merge_default_command(models, adapter, tmp_path):
    out = tmp_path / "out"
    r = run(models["llama_sharded"], adapter, out)
    assert r.exit_code == 0, r.output
    assert "merged 4 tensors" in r.output
    base = models["llama_sharded"]
    for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "model.safetensors.index.json"]:
        assert (out / name).is_file(), name
    for name in ["generation_config.json", "tokenizer.json", "chat_template.jinja"]:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert not list(out.glob("adapter_*"))
    assert leftovers(tmp_path) == []


def test_merge_subcommand_json_and_dtype(models, adapter, tmp_path):
    out = tmp_path / "out"
    r = run("merge", models["llama_sharded"], adapter, out, "--dtype", "bfloat16", "--json", "-q")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["merged"] == 4 and summary["converted"] > 0 and summary["copied"] == 0
    assert all(t.dtype == torch.bfloat16 for t in load_tensors(out).values())
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_dry_run_writes_nothing(models, adapter, tmp_path):
    out = tmp_path / "out"
    r = run(models["llama_sharded"], adapter, out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "  4 targets: lora(r=4, s=2)\n  (-v lists every target)" in r.output and "q_proj.weight" not in r.output
    assert "estimated peak memory" in r.output
    assert not out.exists() and leftovers(tmp_path) == []
    r = run(models["llama_sharded"], adapter, out, "--dry-run", "-v")  # every target, a line each
    assert "model.layers.0.self_attn.q_proj.weight  [F32 [32, 32]]  lora(r=4, s=2)" in r.output, r.output
    r = run(models["llama_sharded"], adapter, out, "--dry-run", "--json")
    plan = json.loads(r.output)
    assert plan["counts"]["merged"] == 4 and len(plan["targets"]) == 4


def test_version_and_help():
    assert run("--version").output.startswith("lora-merge, version")
    r = run("-h")
    assert r.exit_code == 0 and "lora-merge BASE ADAPTER OUT" in r.output
    assert "--dtype" in run("merge", "--help").output
    for command in ("merge", "unmerge"):  # --device says what it does there, and only that
        assert "latency" not in run(command, "--help").output
    assert "on --device" in run("verify", "--help").output


def test_a_finished_merge_run_again_says_it_is_finished(models, adapter, tmp_path):
    """The same --resume command once more, after it completed: OUT is finished and checked, not in the way."""
    out = tmp_path / "out"
    assert run(models["llama_sharded"], adapter, out, "--resume", "-q").exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run(models["llama_sharded"], adapter, out, "--resume")
    expect_error(r, "already holds a finished merge, checked", f"lora-merge verify {out}", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(tmp_path) == []


def test_missing_base(adapter, tmp_path):
    expect_error(run(tmp_path / "nope", adapter, tmp_path / "out"), "BASE", "does not exist")
    assert not (tmp_path / "out").exists()


def test_base_without_safetensors(adapter, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(b"x")
    expect_error(run(base, adapter, tmp_path / "out"), "no safetensors weights", "hint:", "save_pretrained")


def test_adapter_without_config(models, tmp_path):
    (tmp_path / "adapter").mkdir()
    expect_error(run(models["llama"], tmp_path / "adapter", tmp_path / "out"), "adapter_config.json")


def test_adapter_config_not_json(models, adapter, tmp_path):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    (bad / "adapter_config.json").write_text("{not json")
    expect_error(run(models["llama"], bad, tmp_path / "out"), "not valid JSON")


@pytest.mark.parametrize("field,value,message", [
    ("peft_type", "VBLORA", "does not merge yet"),
    ("peft_type", "IA3", "not a tensor IA3 stores"),
    ("use_qalora", True, "QALoRA"),
    ("alora_invocation_tokens", [1, 2], "aLoRA"),
    ("init_lora_weights", "pissa", "changed the base weights"),
    ("init_lora_weights", "olora", "changed the base weights"),
])
def test_unmergeable_adapters_refused(models, adapter, tmp_path, field, value, message):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config[field] = value
    (bad / "adapter_config.json").write_text(json.dumps(config))
    expect_error(run(models["llama_sharded"], bad, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_adapter_for_another_model_lists_every_offender(models, tmp_path):
    build_adapter(models["gpt2"], tmp_path / "adapter", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
    r = run(models["llama"], tmp_path / "adapter", tmp_path / "out")
    expect_error(r, "2 problems", "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_shape_mismatch_names_shapes(models, tmp_path):
    from helpers import build_model

    build_model("llama", tmp_path / "wide", hidden_size=48, intermediate_size=64)
    build_adapter(tmp_path / "wide", tmp_path / "adapter", r=4, target_modules=["q_proj"])
    r = run(models["llama"], tmp_path / "adapter", tmp_path / "out")
    expect_error(r, "model.layers.0.self_attn.q_proj.weight", "[32, 48]", "[32, 32]", "2 problems")


def test_rank_disagreeing_with_config(models, adapter, tmp_path):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    expect_error(run(models["llama_sharded"], bad, tmp_path / "out"), "rank 4", "r=8")


def test_out_exists_needs_overwrite(models, adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(run(models["llama_sharded"], adapter, out), "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    r = run(models["llama_sharded"], adapter, out, "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert leftovers(tmp_path) == []


def test_empty_out_is_fine(models, adapter, tmp_path):
    (tmp_path / "out").mkdir()
    assert run(models["llama_sharded"], adapter, tmp_path / "out", "-q").exit_code == 0


def test_out_inside_inputs_refused(models, adapter, tmp_path):
    expect_error(run(models["llama_sharded"], adapter, models["llama_sharded"] / "merged"), "is BASE or inside it")
    expect_error(run(models["llama_sharded"], adapter, adapter), "is ADAPTER or inside it")
    assert not (models["llama_sharded"] / "merged").exists()


def test_overwrite_never_removes_inputs(models, adapter, tmp_path):
    expect_error(run(models["llama_sharded"], adapter, adapter.parent, "--overwrite"), "contains ADAPTER")
    assert (adapter / "adapter_config.json").exists()


def test_failure_midway_leaves_nothing(models, adapter, tmp_path):
    """A damaged adapter tensor: refused before anything is written, nothing left behind."""
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    from safetensors.torch import load_file, save_file

    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in tensors if "layers.1" in k and "lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, bad / "adapter_model.safetensors")
    expect_error(run(models["llama_sharded"], bad, tmp_path / "out"), "NaN or Inf")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_no_cuda_device(models, adapter, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    expect_error(run(models["llama_sharded"], adapter, tmp_path / "out", "--device", "cuda"), "CUDA is not available")
    expect_error(run(models["llama_sharded"], adapter, tmp_path / "out", "--device", "tpu"), "not one of")


def test_debug_variable_shows_traceback(models, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_MERGE_DEBUG", "1")
    r = run(tmp_path / "nope", tmp_path / "nope2", tmp_path / "out")
    assert r.exit_code != 0 and r.exception is not None


def test_adapter_bin_is_read_as_plain_tensors(models, adapter, tmp_path):
    from safetensors.torch import load_file

    binary = tmp_path / "adapter_bin"
    binary.mkdir()
    shutil.copy(adapter / "adapter_config.json", binary)
    torch.save(load_file(adapter / "adapter_model.safetensors"), binary / "adapter_model.bin")
    assert run(models["llama_sharded"], adapter, tmp_path / "a", "-q").exit_code == 0
    assert run(models["llama_sharded"], binary, tmp_path / "b", "-q").exit_code == 0
    for f in (tmp_path / "a").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_needing_code_is_refused(models, adapter, tmp_path, capfd):
    bad = tmp_path / "adapter_bin"
    bad.mkdir()
    shutil.copy(adapter / "adapter_config.json", bad)
    torch.save({"x": Payload()}, bad / "adapter_model.bin")
    r = run(models["llama_sharded"], bad, tmp_path / "out")
    expect_error(r, "refused", "never runs code from a pickle")
    assert "this must never run" not in r.output + capfd.readouterr().out
    assert not (tmp_path / "out").exists()


def test_adapter_given_as_its_tensor_file(models, adapter, tmp_path):
    r = run(models["llama_sharded"], adapter / "adapter_model.safetensors", tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output
    same = run(models["llama_sharded"], adapter, tmp_path / "same", "-q")
    assert same.exit_code == 0 and load_tensors(tmp_path / "out").keys() == load_tensors(tmp_path / "same").keys()
    for name, t in load_tensors(tmp_path / "same").items():
        assert torch.equal(t, load_tensors(tmp_path / "out")[name]), name
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    (renamed / "adapter_model.safetensors").rename(renamed / "weights.safetensors")
    expect_error(run(models["llama"], renamed / "weights.safetensors", tmp_path / "o2"),
                 "adapter_model.safetensors beside adapter_config.json")


def test_swapped_inputs_are_named(models, adapter, tmp_path):
    r = run(adapter, models["llama_sharded"], tmp_path / "out")
    expect_error(r, f"BASE {str(adapter)!r} is a LoRA adapter (it holds adapter_config.json), not a model",
                 "the order is BASE ADAPTER OUT")
    r = run(adapter, adapter, tmp_path / "out")
    expect_error(r, "and as ADAPTER is a LoRA adapter")
    assert "has no tensor" not in r.output
    r = run(models["llama_sharded"], models["llama"], tmp_path / "out")
    expect_error(r, f"ADAPTER {str(models['llama'])!r} is a model", "the order is BASE ADAPTER OUT")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_model_that_ships_its_adapter_is_still_a_model(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama_sharded"], base)
    shutil.copy(adapter / "adapter_config.json", base / "adapter_config.json")
    r = run(base, adapter, tmp_path / "out", "-q")
    assert r.exit_code == 0, r.output


def test_a_closed_stdout_is_not_a_failed_merge(models, adapter, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "lora_merge", str(models["llama_sharded"]), str(adapter), str(out),
                          "--dtype", "float16"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # as `| head` does once it has its lines
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err, err
    assert json.loads((out / "merge_report.json").read_text())["status"] == "passed"


@pytest.mark.parametrize("typo, meant", [("verfiy", "verify"), ("unmrege", "unmerge"), ("psuh", "push")])
def test_a_misspelt_command_is_named(typo, meant, tmp_path):
    r = run(typo, tmp_path / "merged", "--base", "org/base")
    assert r.exit_code == 2 and f"did you mean '{meant}'?" in r.output, r.output
    assert "--verbose" not in r.output


def test_the_progress_bar_counts_as_the_summary_does():
    from tqdm import tqdm

    from lora_merge.memory import megabytes
    from lora_merge.progress import UNITS, byte_bar

    meter = tqdm.format_meter(1_192_100_000, 2_000_000_000, 1.0, **UNITS)
    assert "1.19GB" in meter and megabytes(1_192_100_000) == "1,192.1 MB"
    quiet = byte_bar(10, enabled=False)
    quiet.update(5)  # a real bar, that shows nothing
    assert quiet.disable
    quiet.close()


@pytest.mark.parametrize("key, value, said", [
    ("rank_pattern", {"q_proj": 0}, "rank_pattern['q_proj'] must be a positive integer, found 0"),
    ("alpha_pattern", {"q_proj": float("nan")}, "alpha_pattern['q_proj'] must be a positive finite number, found nan"),
    ("r", 4.5, "r must be a positive integer, found 4.5"),
    ("lora_alpha", "8", "lora_alpha must be a positive finite number, found '8'"),
    ("lora_alpha", float("inf"), "lora_alpha must be a positive finite number, found inf"),
    ("rank_pattern", [4], "rank_pattern must be a JSON object, found [4]"),
    ("use_rslora", "yes", "use_rslora must be true or false, found 'yes'"),
])
def test_config_numbers_are_checked_up_front(models, adapter, tmp_path, key, value, said):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config[key] = value
    (bad / "adapter_config.json").write_text(json.dumps(config))
    expect_error(run(models["llama_sharded"], bad, tmp_path / "out"), said)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_integer_factors_are_refused(models, adapter, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    first = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[first] = (tensors[first] * 100).to(torch.int32)
    save_file(tensors, bad / "adapter_model.safetensors")
    expect_error(run(models["llama_sharded"], bad, tmp_path / "out"),
                 "adapter tensors must be floating point; 1 are not", f"{first} (I32)")
    assert not (tmp_path / "out").exists()


def test_max_shard_size_cuts_out_into_shards(models, adapter, tmp_path):
    from helpers import transformers

    base = models["llama_sharded"]
    same = tmp_path / "same"
    assert run(base, adapter, same, "-q").exit_code == 0
    total = sum(p.stat().st_size for p in same.glob("*.safetensors"))
    out = tmp_path / "out"
    r = run(base, adapter, out, "--max-shard-size", f"{total // 5}B", "--json")
    assert r.exit_code == 0, r.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) >= 5 and files == sorted(set(index["weight_map"].values()))
    assert all(f.startswith("model-") and f.endswith(f"-of-{len(files):05d}.safetensors") for f in files)
    ours, mirrored = load_tensors(out), load_tensors(same)
    assert ours.keys() == mirrored.keys() and all(torch.equal(ours[n], mirrored[n]) for n in ours)
    assert json.loads((out / "merge_report.json").read_text())["status"] == "passed"
    assert run("verify", out, "--base", base, "--adapter", adapter, "-q").exit_code == 0
    transformers.AutoModelForCausalLM.from_pretrained(out)  # transformers reads the new index
    # one file when it all fits, without an index
    r = run(base, adapter, tmp_path / "one", "--max-shard-size", "1GB", "-q")
    assert r.exit_code == 0 and sorted(p.name for p in (tmp_path / "one").glob("*.safetensors*")) == ["model.safetensors"]
    r = run(base, adapter, tmp_path / "bad", "--max-shard-size", "lots")
    assert r.exit_code == 2 and "'lots' is not a size" in r.output and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("1.5MB", 1_500_000), ("2GiB", 2 * 2**30),
                                        ("1M", 2**20), ("3k", 3 * 2**10), ("100B", 100), ("100", None), ("1e9", None)])
def test_a_shard_size_has_a_unit(text, size):
    """One rule: every size has a unit (a letter alone is a power of 1024, as for split and du); a bare number is
    refused rather than read as bytes (100 bytes a file) or as anything else."""
    from lora_merge.options import parse_size

    if size is not None:
        assert parse_size(text) == size
    else:
        with pytest.raises(ValueError, match="has no unit" if text == "100" else "is not a size"):
            parse_size(text)


def test_resume_follows_the_shard_layout(models, adapter):
    from lora_merge import prepare
    from lora_merge.resume import fingerprint

    mirrored = prepare(models["llama_sharded"], adapter, device="cpu")
    cut = prepare(models["llama_sharded"], adapter, device="cpu", max_shard_bytes=20_000)
    again = prepare(models["llama_sharded"], adapter, device="cpu", max_shard_bytes=20_000)
    assert [s.name for s in cut.shards] != [s.name for s in mirrored.shards]
    assert fingerprint(cut) == fingerprint(again) != fingerprint(mirrored)  # a partial output of another layout is not kept


@pytest.mark.parametrize("trained_on, warned", [("Qwen3ForCausalLM", True), ("LlamaForCausalLM", False)])
def test_an_adapter_of_another_architecture_is_named(models, adapter, tmp_path, trained_on, warned):
    """Same shapes, another model class (peft's auto_mapping): the merge goes on, and says so."""
    from lora_merge import prepare

    shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["auto_mapping"] = {"base_model_class": trained_on, "parent_library": "transformers"}
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    notes = prepare(models["llama_sharded"], tmp_path / "adapter").notes
    said = [n for n in notes if "auto_mapping" in n]
    assert said == ([f"the adapter was trained on a {trained_on} (auto_mapping.base_model_class) but BASE is a "
                     "LlamaForCausalLM: check that it is the model the adapter was made for"] if warned else [])


@pytest.mark.parametrize("short, name", [("bf16", "bfloat16"), ("fp16", "float16"), ("FP32", "float32")])
def test_dtype_takes_the_short_names_people_type(models, adapter, tmp_path, short, name):
    r = run(models["llama_sharded"], adapter, tmp_path / "out", "--dtype", short, "-q")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == name
    from lora_merge.options import MergeOptions

    assert MergeOptions(dtype=short).dtype == name
    r = run(models["llama_sharded"], adapter, tmp_path / "bad", "--dtype", "int8")
    assert r.exit_code == 2 and "'int8' is not one of float32, float16, bfloat16 (or bf16, fp16" in r.output


def test_a_result_prints_as_the_summary(models, adapter, tmp_path):
    """print(merge(...)) reads as the command line's summary, not as a dict."""
    from lora_merge import merge

    result = merge(models["llama_sharded"], adapter, tmp_path / "out", device="cpu")
    text = str(result).splitlines()
    assert text[0] == f"merged 4 tensors, copied {result.summary()['copied']}, converted 0 -> {tmp_path / 'out'}"
    assert text[3] == f"  parity: passed (report: {tmp_path / 'out' / 'merge_report.json'})"
