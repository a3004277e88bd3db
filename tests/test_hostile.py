"""What a hostile input or a new user's first try must not do: lose a good OUT, write through a planted link,
leave a killed run's files behind forever, hang on a pipe, show a traceback, or say something untrue."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (
    build_adapter,
    build_model,
    expect_error,
    paced_cli,
    peft,
    transformers,
)
from helpers import run_cli as run
from make_model import make
from safetensors.torch import load_file, save_file

from lora_merge import merge


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile") / "adapter"
    build_adapter(models["llama"], folder, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return folder


@pytest.fixture
def no_hang():
    """A test that would hang fails after 60 s instead."""
    def stop(signum, frame):
        raise TimeoutError("lora-merge hung")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def beside(out: Path) -> list[str]:
    """What lora-merge left next to OUT."""
    return sorted(p.name for p in out.parent.iterdir() if "lora-merge" in p.name)


# ----------------------------------------------------------------------- a failed --overwrite keeps OUT


def _nan_in_an_untouched_tensor(base: Path):
    tensors = load_file(base / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})


def _inf_in_a_merged_tensor(base: Path):
    tensors = load_file(base / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["parity check fails", "merged tensor not finite", "disk full writing the report",
                                 "a bug while writing the card"])
def test_a_failed_overwrite_keeps_the_old_out(models, adapter, tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    assert run(models["llama"], adapter, out, "-q").exit_code == 0
    before = snapshot(out)
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    if how == "parity check fails":
        _nan_in_an_untouched_tensor(base)
    elif how == "merged tensor not finite":
        _inf_in_a_merged_tensor(base)
    elif how == "disk full writing the report":
        from lora_merge import run as the_run

        real = the_run.write_new

        def full(path, data):
            if path.name == "merge_report.json":
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, data)

        monkeypatch.setattr(the_run, "write_new", full)
    else:
        from lora_merge import card

        monkeypatch.setattr(card, "render", lambda *a, **k: 1 / 0)

    if how == "a bug while writing the card":  # not a user error: raised as it is, OUT untouched all the same
        with pytest.raises(ZeroDivisionError):
            merge(str(base), str(adapter), out, device="cpu", overwrite=True)
    else:
        r = run(base, adapter, out, "--overwrite", "-q")
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        said = {"parity check fails": "the parity check failed (finite)",
                "merged tensor not finite": "the merge gives NaN or Inf in 1 tensor(s)",
                "disk full writing the report": "no room left on the disk while writing merge_report.json"}[how]
        assert said in r.output, r.output
    assert snapshot(out) == before  # weights, report and card: all as they were
    if how == "parity check fails":
        kept = tmp_path / "out.lora-merge-failed"
        assert f"OUT was not changed; the failed output is kept in {kept}" in r.output
        assert json.loads((kept / "merge_report.json").read_text())["status"] == "failed"
        assert beside(out) == ["out.lora-merge-failed"]
        # a second failure replaces that earlier failed output, and still leaves OUT alone
        assert run(base, adapter, out, "--overwrite", "-q").exit_code == 1
        assert beside(out) == ["out.lora-merge-failed"] and snapshot(out) == before
    else:
        assert beside(out) == []


def test_a_failed_merge_never_becomes_out(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    _nan_in_an_untouched_tensor(base)
    r = run(base, adapter, tmp_path / "out", "-q")
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert beside(tmp_path / "out") == ["out.lora-merge-failed"]
    assert (tmp_path / "out.lora-merge-failed" / "model.safetensors").is_file()


# --------------------------------------------------------------------------- links planted beside OUT


@pytest.mark.parametrize("kind", ["symbolic", "hard"])
def test_a_planted_lock_link_is_refused(models, adapter, tmp_path, kind):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    lock = tmp_path / ".out.lora-merge.lock"
    lock.symlink_to(victim) if kind == "symbolic" else os.link(victim, lock)
    r = run(models["llama"], adapter, tmp_path / "out")
    expect_error(r, str(lock), "a symbolic link" if kind == "symbolic" else "a hard link to another file",
                 "remove it" if kind == "hard" else "remove the link")
    assert victim.read_text() == "precious\n" and not (tmp_path / "out").exists()


def test_links_where_lora_merge_writes_are_never_followed(models, adapter, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    # the staging folder this very process would use
    (tmp_path / f".out.lora-merge-tmp-{os.getpid()}").symlink_to(victim, target_is_directory=True)
    assert run(models["llama"], adapter, tmp_path / "out", "-q").exit_code == 0
    # the --resume folder as a link, and a real one holding links named as the files lora-merge writes
    (tmp_path / ".out2.lora-merge-partial").symlink_to(victim, target_is_directory=True)
    assert run(models["llama"], adapter, tmp_path / "out2", "-q", "--resume").exit_code == 0
    partial = tmp_path / ".out3.lora-merge-partial"
    partial.mkdir()
    for name in ("merge_report.json", "README.md", "config.json", "model.safetensors", ".lora-merge-resume.json.tmp"):
        (partial / name).symlink_to(victim / "keep.txt")
    assert run(models["llama"], adapter, tmp_path / "out3", "-q", "--resume").exit_code == 0
    assert snapshot(victim) == {"keep.txt": b"precious"}
    for out in ("out", "out2", "out3"):
        assert json.loads((tmp_path / out / "merge_report.json").read_text())["status"] == "passed"
        assert not any(p.is_symlink() for p in (tmp_path / out).iterdir())


# ------------------------------------------------------------------------ what killed runs leave behind


SHAPE = dict(hidden=512, inter=1536, layers=6, heads=8, kv=4, head_dim=64, vocab=8000)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    make(SHAPE, root, rank=16, shards=2)
    return root


def test_a_killed_runs_temporary_output_is_cleared_by_the_next_run(medium, tmp_path):
    out = tmp_path / "out"
    proc = paced_cli(medium / "base", medium / "adapter", out, "--block-mb", "1", "--device", "cpu", "-q")
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".out.lora-merge-tmp-*/*.safetensors")):
        time.sleep(0.01)
    assert proc.poll() is None, "the merge ended before it could be killed"
    proc.kill()
    proc.wait(timeout=60)
    (stale,) = tmp_path.glob(".out.lora-merge-tmp-*")
    r = subprocess.run([sys.executable, "-m", "lora_merge", str(medium / "base"), str(medium / "adapter"), str(out),
                        "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"removed {stale.name}, the temporary output of a run (pid {proc.pid}) that did not finish" in r.stderr
    assert beside(out) == [] and (out / "merge_report.json").is_file()


def test_an_old_out_moved_aside_by_a_killed_commit_is_put_back(models, adapter, tmp_path, caplog):
    out = tmp_path / "out"
    assert run(models["llama"], adapter, out, "-q").exit_code == 0
    before = snapshot(out)
    out.rename(tmp_path / ".out.lora-merge-old-12345")  # killed between moving the old OUT and renaming the new
    r = run(models["llama"], adapter, out)
    expect_error(r, "already holds a finished merge", "--overwrite")
    assert "put back" in caplog.text and snapshot(out) == before and beside(out) == []


def test_resume_hints_say_what_to_do(models, adapter, tmp_path, caplog):
    out, partial = tmp_path / "out", tmp_path / ".out.lora-merge-partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    r = run(models["llama"], adapter, out, "-q")  # a plain run: the partial output is obsolete once OUT is complete
    assert r.exit_code == 0 and not partial.exists()
    assert "removed .out.lora-merge-partial, the partial output of an interrupted --resume run" in caplog.text
    partial.mkdir()
    r = run(models["llama"], adapter, out, "--resume")
    expect_error(r, "already exists", "pass --overwrite to replace it", f"or remove {partial}")
    assert "run the same command again" not in r.output


# ------------------------------------------------------------------ pipes, loops and odd files as input


def _pipe(path: Path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("where", ["base shard", "base index shard", "base config", "adapter weights",
                                   "adapter config"])
def test_a_named_pipe_is_refused_by_name(models, adapter, tmp_path, no_hang, where):
    base, adapt = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(models["llama_sharded" if where == "base index shard" else "llama"], base)
    shutil.copytree(adapter, adapt)
    path = {"base shard": base / "model.safetensors", "base config": base / "config.json",
            "base index shard": base / "model-00001-of-00007.safetensors",
            "adapter weights": adapt / "adapter_model.safetensors",
            "adapter config": adapt / "adapter_config.json"}[where]
    _pipe(path)
    r = run(base, adapt, tmp_path / "out")
    expect_error(r, str(path), "a named pipe, not a regular file")
    assert not (tmp_path / "out").exists() and beside(tmp_path / "out") == []


@pytest.mark.parametrize("where", ["shard", "config"])
def test_verify_refuses_a_named_pipe_in_out(models, adapter, tmp_path, no_hang, where):
    out = tmp_path / "out"
    assert run(models["llama"], adapter, out, "-q").exit_code == 0
    path = out / ("model.safetensors" if where == "shard" else "config.json")
    _pipe(path)
    r = run("verify", out, "--base", models["llama"], "--adapter", adapter)
    expect_error(r, str(path), "a named pipe, not a regular file")


def test_a_shard_that_is_a_link_loop(models, adapter, tmp_path, no_hang):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").symlink_to(base / "model.safetensors")
    expect_error(run(base, adapter, tmp_path / "out"), "model.safetensors", "a symbolic link that loops")
    out = tmp_path / "merged"
    assert run(models["llama"], adapter, out, "-q").exit_code == 0
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(out / "model.safetensors")
    expect_error(run("verify", out, "--base", models["llama"], "--adapter", adapter), "a symbolic link that loops")


def test_a_header_past_the_limit_says_what_the_limit_is(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    big = base / "model.safetensors"
    with open(big, "r+b") as f:  # a real file that large (sparse), whose header claims more than the limit
        f.write((101 * 2**20).to_bytes(8, "little"))
        f.truncate(200 * 2**20)
    expect_error(run(base, adapter, tmp_path / "out"), "its header is 105,906,176 bytes long",
                 "past lora-merge's limit of 104,857,600 bytes for a safetensors header")


# --------------------------------------------------------------------------- config values, checked


@pytest.fixture(scope="module")
def fp8_base(models, tmp_path_factory):
    from quantized import to_fp8

    return to_fp8(models["llama_bf16"], tmp_path_factory.mktemp("fp8") / "fp8", block=(16, 16))


@pytest.mark.parametrize("value", [[0, 128], "128", [128], [16, True], [16.0, 16]])
def test_fp8_block_sizes_are_checked_up_front(fp8_base, models, tmp_path, value):
    base = tmp_path / "fp8"
    shutil.copytree(fp8_base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = value
    (base / "config.json").write_text(json.dumps(config))
    build_adapter(models["llama_bf16"], tmp_path / "adapter", r=2, target_modules=["q_proj"])
    expect_error(run(base, tmp_path / "adapter", tmp_path / "out"),
                 f"quantization_config.weight_block_size must be null or a list of two positive integers, "
                 f"found {value!r}")


def test_a_quantization_config_that_is_not_an_object_is_named(fp8_base, models, tmp_path):
    base = tmp_path / "fp8"
    shutil.copytree(fp8_base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = "fp8"
    (base / "config.json").write_text(json.dumps(config))
    build_adapter(models["llama_bf16"], tmp_path / "adapter", r=2, target_modules=["q_proj"])
    expect_error(run(base, tmp_path / "adapter", tmp_path / "out"),
                 "BASE's config.json: quantization_config must be a JSON object, found 'fp8'")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """A tiny Qwen3-MoE and an all-linear adapter that reaches its experts through transformers' tables."""
    from architectures import tiny_config

    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe"))
    model.to(torch.bfloat16).save_pretrained(root / "base")
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
                        ).save_pretrained(root / "adapter")
    return root


@pytest.mark.parametrize("key, value, said", [
    ("model_type", ["qwen3_moe"], "model_type must be a string, found ['qwen3_moe']"),
    ("architectures", [5], "architectures must be a list of names, found [5]"),
    ("hidden_size", "abc", "(key 'hidden_size')"),
    ("num_experts", "four", "(key 'num_experts')"),
])
def test_configs_read_through_the_tables_fail_in_one_line(moe, tmp_path, key, value, said):
    base = tmp_path / "base"
    shutil.copytree(moe / "base", base)
    config = json.loads((base / "config.json").read_text())
    config[key] = value
    (base / "config.json").write_text(json.dumps(config))
    r = run(base, moe / "adapter", tmp_path / "out")
    expect_error(r, said)
    assert len([line for line in r.output.splitlines() if line.strip()]) <= 3, r.output


@pytest.mark.parametrize("size", ["1" + "0" * 400 + "GB", "0.1", "-5GB", "1e9"])
def test_an_absurd_shard_size_is_a_usage_error(models, adapter, tmp_path, size):
    r = run(models["llama"], adapter, tmp_path / "out", "--max-shard-size", size)
    assert r.exit_code == 2 and "Traceback" not in r.output and "--max-shard-size" in r.output, r.output


# ----------------------------------------------------------------------------- a new user's first tries


def test_an_adapter_for_another_model_says_what_does_not_fit_without_transformers(tmp_path, monkeypatch):
    """Trained on a deeper, wider model of the same family: the names and shapes are checked on BASE's own
    names, and nothing suggests installing transformers."""
    build_model("qwen3", tmp_path / "small")
    build_model("qwen3", tmp_path / "deep", num_hidden_layers=4, hidden_size=64, intermediate_size=128,
                layer_types=["full_attention"] * 4)
    build_adapter(tmp_path / "deep", tmp_path / "adapter", r=4, target_modules="all-linear")
    monkeypatch.setitem(sys.modules, "transformers", None)  # as after the plain install
    r = run(tmp_path / "small", tmp_path / "adapter", tmp_path / "out")
    expect_error(r, "the adapter does not fit BASE (28 problems: 14 targets BASE does not have, 14 that do not fit",
                 "model.layers.3.self_attn.q_proj.weight", "LoRA gives shape [64, 128] but the base tensor is [32, 64]")
    assert "transformers" not in r.output


def test_a_mistyped_path_says_both_what_is_here_and_what_the_hub_said(models, adapter, tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()
    shutil.copytree(adapter, tmp_path / "demo" / "adapter")
    monkeypatch.chdir(tmp_path)
    r = run(models["llama"], "demo/adaptr", "out")
    expect_error(r, "ADAPTER 'demo/adaptr': no such folder here, and as a Hub repo id:",
                 "did you mean demo/adapter?")


def test_a_weight_that_is_not_a_number(models, adapter, tmp_path):
    r = run(models["llama"], tmp_path / "out", "--adapter", f"{adapter}:abc")
    assert r.exit_code == 2 and "'abc' after the last ':' is the weight, and it must be a finite number" in r.output


def test_help_states_the_defaults_the_code_uses():
    from lora_merge.options import BLOCK_BYTES

    text = " ".join(run("merge", "--help").output.split())
    assert f"(default: {BLOCK_BYTES['cpu'] >> 20} on a CPU, {BLOCK_BYTES['cuda'] >> 20} on a GPU)" in text


def test_verbose_says_what_was_decided(models, adapter, tmp_path):
    r = subprocess.run([sys.executable, "-m", "lora_merge", str(models["llama"]), str(adapter), str(tmp_path / "out"),
                        "-v", "--dtype", "bfloat16", "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for said in ("computing on cpu, in blocks of", "plan: 4 tensors merged, 0 copied as bytes,",
                 "dtype: F32 tensors written as BF16", "tokenizer: from BASE", "config.json: dtype: 'float32' -> 'bfloat16'",
                 "adapter "):
        assert said in r.stderr, (said, r.stderr)
    quiet = subprocess.run([sys.executable, "-m", "lora_merge", str(models["llama"]), str(adapter),
                            str(tmp_path / "out2"), "-q"], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 0 and "computing on" not in quiet.stderr


def test_a_bare_command_shows_help_and_exits_2():
    r = run()
    assert r.exit_code == 2 and "Usage: " in r.output


def test_the_card_loads_a_tokenizer_only_when_out_has_one(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink()
    assert run(base, adapter, tmp_path / "out", "-q").exit_code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card and "AutoTokenizer" not in card
    assert run(models["llama"], adapter, tmp_path / "out2", "-q").exit_code == 0
    assert "AutoTokenizer.from_pretrained" in (tmp_path / "out2" / "README.md").read_text()


def test_verify_of_another_tools_merge_reads_as_a_pass(models, adapter, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "peft")
    for f in models["llama"].iterdir():  # the tokenizer and the rest, which save_pretrained does not write
        if not (tmp_path / "peft" / f.name).exists():
            shutil.copy(f, tmp_path / "peft" / f.name)
    r = run("verify", tmp_path / "peft", "--base", models["llama"], "--adapter", adapter)
    row = next(line for line in r.output.splitlines() if line.startswith("| merged |"))
    if r.exit_code == 0 and "not correctly rounded" in row:  # peft's float32 merge: a pass, and said to be one
        assert "| pass |" in row and "tensors pass: every element within the bound" in row, row
    else:
        assert r.exit_code == 0 and "correctly rounded, the nearest value of its dtype" in row, r.output


def test_a_full_disk_while_copying_the_other_files(models, adapter, tmp_path):
    import resource

    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    weights = (base / "model.safetensors").stat().st_size
    (base / "tokenizer.json").write_bytes(b"{}" + b" " * (4 * weights))  # the one file over the limit below

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * weights, 2 * weights))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "lora_merge", str(base), str(adapter), str(out), "-q"],
                       capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "\nerror: no room left on the disk while writing the files beside the weights" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not out.exists() and beside(out) == []
