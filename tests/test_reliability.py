"""Bad inputs, full disks, concurrent runs and interruptions: one clear line, nothing lost, nothing left."""

from __future__ import annotations

import fcntl
import json
import math
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from helpers import build_adapter, expect_error, paced_cli
from helpers import run_cli as run
from make_model import make
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def adapter(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("rel") / "adapter"
    build_adapter(models["llama"], folder, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    return folder


def nothing_left(parent: Path, out: Path):
    assert not out.exists()
    assert [p.name for p in parent.iterdir() if "lora-merge" in p.name] == []


# ------------------------------------------------------------------------------------ damaged files


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _retyped(h):
    name = next(k for k in h if k != "__metadata__")
    h[name]["dtype"] = "F12"


def _overlapping(h):
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    first, second = h[names[0]], h[names[1]]
    size = second["data_offsets"][1] - second["data_offsets"][0]
    start = first["data_offsets"][0]
    second["data_offsets"] = [start, start + size]


def _out_of_range(h):
    name = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
    b, e = h[name]["data_offsets"]
    h[name]["data_offsets"] = [b + 4096, e + 4096]


def _malformed(h):
    name = next(k for k in h if k != "__metadata__")
    h[name]["shape"] = "many"


def _edit(fn):
    def damage(path: Path):
        header, data = split(path)
        fn(header)
        join(path, header, data)
    return damage


def _set_length(n):
    def damage(path: Path):
        raw = path.read_bytes()
        path.write_bytes(struct.pack("<Q", n) + raw[8:])
    return damage


def _truncate(path: Path):
    raw = path.read_bytes()
    path.write_bytes(raw[:-100])


def _not_json(path: Path):
    raw = bytearray(path.read_bytes())
    raw[8:40] = b"\xff" * 32
    path.write_bytes(bytes(raw))


def _longer_than_file(path: Path):
    _set_length(path.stat().st_size)(path)


DAMAGE = {
    "truncated data": (_truncate, "truncated"),
    "header length past the file": (_longer_than_file, "larger than the file"),
    "absurd header size": (_set_length(2**62), "past lora-merge's limit of 104,857,600 bytes for a safetensors header"),
    "header not JSON": (_not_json, "not valid JSON"),
    "overlapping offsets": (_edit(_overlapping), "overlap"),
    "out-of-range offsets": (_edit(_out_of_range), "past the data region"),
    "unknown dtype": (_edit(_retyped), "unknown dtype 'F12'"),
    "malformed entry": (_edit(_malformed), "malformed header entry"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_base_safetensors(models, adapter, tmp_path, case):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    damage, message = DAMAGE[case]
    damage(base / "model.safetensors")
    out = tmp_path / "out"
    expect_error(run(base, adapter, out), "model.safetensors", message)
    nothing_left(tmp_path, out)


@pytest.mark.parametrize("case", ["truncated data", "header not JSON", "unknown dtype"])
def test_damaged_adapter_safetensors(models, adapter, tmp_path, case):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    damage, message = DAMAGE[case]
    damage(bad / "adapter_model.safetensors")
    out = tmp_path / "out"
    expect_error(run(models["llama"], bad, out), "adapter_model.safetensors", message)
    nothing_left(tmp_path, out)


# --------------------------------------------------------------------------------- malicious indexes


def _index(base: Path) -> dict:
    return json.loads((base / "model.safetensors.index.json").read_text())


def _write_index(base: Path, index: dict) -> None:
    (base / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_pointing_outside_the_folder(models, adapter, tmp_path, target):
    base = tmp_path / "models" / "base"
    shutil.copytree(models["llama_sharded"], base)
    index = _index(base)
    index["weight_map"][next(iter(index["weight_map"]))] = target
    _write_index(base, index)
    out = tmp_path / "out"
    expect_error(run(base, adapter, out), "outside the model folder")
    nothing_left(tmp_path, out)


def test_shard_that_is_a_link_outside(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama_sharded"], base)
    shard = sorted(base.glob("model-*.safetensors"))[0]
    elsewhere = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, elsewhere)
    shard.symlink_to(elsewhere)
    out = tmp_path / "out"
    expect_error(run(base, adapter, out), "points outside the model folder")
    assert not out.exists()


def test_tensor_listed_twice_in_the_index(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama_sharded"], base)
    index = _index(base)
    name, shard = next(iter(index["weight_map"].items()))
    other = next(s for s in index["weight_map"].values() if s != shard)
    text = json.dumps(index)
    text = text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{other}", ', 1)
    (base / "model.safetensors.index.json").write_text(text)
    out = tmp_path / "out"
    expect_error(run(base, adapter, out), "listed twice", name)
    nothing_left(tmp_path, out)


def test_listed_shard_missing(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama_sharded"], base)
    gone = sorted(base.glob("model-*.safetensors"))[-1]
    gone.unlink()
    out = tmp_path / "out"
    expect_error(run(base, adapter, out), "missing", gone.name)
    nothing_left(tmp_path, out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_shard(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    (base / "model.safetensors").chmod(0)
    expect_error(run(base, adapter, tmp_path / "out"), "cannot read")


def test_dangling_shard_link(models, adapter, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models["llama"], base)
    (base / "model.safetensors").unlink()
    (base / "model.safetensors").symlink_to(base / "gone.safetensors")
    expect_error(run(base, adapter, tmp_path / "out"), "cannot read (No such file", "download the model again")


# --------------------------------------------------------------------------------------- NaN and Inf


def test_nan_in_the_adapter_is_refused_and_can_be_allowed(models, adapter, tmp_path):
    bad = tmp_path / "adapter"
    shutil.copytree(adapter, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    names = sorted(k for k in tensors if "lora_A" in k)[:2]
    for name in names:
        tensors[name][0, 1] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    out = tmp_path / "out"
    expect_error(run(models["llama"], bad, out), "the adapter holds NaN or Inf in 2 tensor(s)", *names,
                 "--allow-nonfinite")
    nothing_left(tmp_path, out)

    r = run(models["llama"], bad, out, "--allow-nonfinite", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads((out / "merge_report.json").read_text())
    assert report["status"] == "passed"
    assert report["checks"]["finite"]["ok"] and "allowed by --allow-nonfinite" in report["checks"]["finite"]["summary"]
    assert report["provenance"]["options"]["allow_nonfinite"] is True
    assert any("NaN or Inf" in n for n in report["notes"])
    merged = load_file(out / "model.safetensors")
    assert torch.isnan(merged["model.layers.0.self_attn.q_proj.weight"]).any()
    # verify says the same only when told NaN is expected
    r = run("verify", out, "--base", models["llama"], "--adapter", bad)
    assert r.exit_code == 1 and "error: the parity check failed (finite)" in r.output, r.output
    assert run("verify", out, "--base", models["llama"], "--adapter", bad, "--allow-nonfinite").exit_code == 0


def test_overflow_in_the_merged_result(models, adapter, tmp_path):
    big = tmp_path / "adapter"
    shutil.copytree(adapter, big)
    config = json.loads((big / "adapter_config.json").read_text())
    config["lora_alpha"] = 1e9 * config["r"]  # s = 1e9: every merged weight far past float16's 65504
    (big / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    r = run(models["llama"], big, out, "--dtype", "float16")
    expect_error(r, "the merge gives NaN or Inf in 4 tensor(s)", "q_proj", "down_proj", "--dtype float32")
    nothing_left(tmp_path, out)
    r = run(models["llama"], big, out, "--dtype", "float16", "--allow-nonfinite")
    assert r.exit_code == 0, r.output
    assert torch.isinf(load_file(out / "model.safetensors")["model.layers.1.mlp.down_proj.weight"]).any()


# ------------------------------------------------------------------------------------ disk and locks


def test_full_disk_midway(models, adapter, tmp_path):
    """A file size limit stands in for a full disk: the write fails after the first bytes."""
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, 16 * 1024))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the failing write returns EFBIG instead of killing

    r = subprocess.run([sys.executable, "-m", "lora_merge", str(models["llama"]), str(adapter), str(out), "-q"],
                       capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith("error: no room left on the disk while writing model.safetensors"), r.stderr
    assert "hint: free some disk space" in r.stderr and "Traceback" not in r.stderr
    nothing_left(tmp_path, out)


def test_not_enough_free_disk_is_refused_before_starting(models, adapter, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("lora_merge.output.shutil.disk_usage", lambda _: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    size = sum(p.stat().st_size for p in models["llama"].glob("*.safetensors"))
    r = run(models["llama"], adapter, out)
    expect_error(r, "not enough free disk for OUT", "0.0 MB are free", "choose an OUT on a disk with room")
    needed = float(r.output.split("the merge writes ")[1].split(" MB")[0])
    assert size / 1e6 <= needed < size / 1e6 + 2
    nothing_left(tmp_path, out)


def test_a_second_run_on_the_same_out_is_refused(models, adapter, tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / ".out.lora-merge.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        expect_error(run(models["llama"], adapter, out), "another lora-merge run (pid 4242) is writing OUT")
        assert not out.exists()
    finally:
        os.close(fd)
    # a lock file left by a run that died holds no lock: the next run goes ahead and removes it
    assert run(models["llama"], adapter, out, "-q").exit_code == 0
    assert not lock.exists()


# ----------------------------------------------------------------------------------------- --resume


SHAPE = dict(hidden=256, inter=768, layers=4, heads=4, kv=2, head_dim=64, vocab=4000)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A --resume run stopped by SIGINT after its first shard was finished, and a plain merge to compare."""
    root = tmp_path_factory.mktemp("resume")
    make(SHAPE, root, rank=8, shards=3)
    out = root / "out"
    proc = paced_cli(root / "base", root / "adapter", out, "--resume", "--block-mb", "1", "--device", "cpu")
    journal = root / ".out.lora-merge-partial" / ".lora-merge-resume.json"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        try:
            if json.loads(journal.read_text())["shards"]:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.005)
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    reference = root / "reference"
    assert run(root / "base", root / "adapter", reference, "-q").exit_code == 0
    return root, proc.returncode, err, reference


def _resume(root: Path, partial: Path, *extra) -> tuple[dict, Path]:
    """Run --resume from a copy of the partial folder in a fresh place; returns the summary and OUT."""
    work = root / f"try{len(list(root.glob('try*')))}"
    work.mkdir()
    shutil.copytree(partial, work / ".out.lora-merge-partial")
    r = run(root / "base", root / "adapter", work / "out", "--resume", "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.output), work / "out"


def test_interrupted_resume_run_keeps_finished_shards(interrupted):
    root, code, err, _ = interrupted
    assert code == 130 and err.startswith("error: interrupted; the finished shards are kept in"), err
    assert "--resume" in err and "Traceback" not in err
    assert not (root / "out").exists()
    journal = json.loads((root / ".out.lora-merge-partial" / ".lora-merge-resume.json").read_text())
    assert len(journal["shards"]) >= 1


def test_resume_continues_and_gives_the_same_bytes(interrupted):
    root, _, _, reference = interrupted
    summary, out = _resume(root, root / ".out.lora-merge-partial")
    assert summary["shards_reused"] >= 1 and summary["parity"] == "passed"
    for f in reference.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert not (out / ".lora-merge-resume.json").exists()
    assert not (out.parent / ".out.lora-merge-partial").exists()
    report = json.loads((out / "merge_report.json").read_text())
    assert report["provenance"]["shards_reused"]


def test_a_slow_flush_leaves_no_journal_in_the_finished_out(interrupted, monkeypatch):
    """The flush thread records a finished shard in the journal after it is on disk; however late that comes, the
    journal is gone from OUT, and nothing is written into the staged folder once it has become OUT."""
    from lora_merge import output

    flush = output._flush_file

    def slow(path, then=None):
        time.sleep(0.3)  # the disk is slow: the main thread reaches the end of the merge first
        flush(path, then)

    monkeypatch.setattr(output, "_flush_file", slow)
    root, _, _, reference = interrupted
    summary, out = _resume(root, root / ".out.lora-merge-partial")
    assert summary["parity"] == "passed"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert not (out.parent / ".out.lora-merge-partial").exists()


def test_resume_rewrites_a_finished_shard_that_changed(interrupted, tmp_path):
    root, _, _, reference = interrupted
    partial = tmp_path / "partial"
    shutil.copytree(root / ".out.lora-merge-partial", partial)
    journal = json.loads((partial / ".lora-merge-resume.json").read_text())
    for name in journal["shards"]:
        raw = bytearray((partial / name).read_bytes())
        raw[-1] ^= 1
        (partial / name).write_bytes(bytes(raw))
    summary, out = _resume(root, partial)
    assert summary["shards_reused"] == 0
    for f in reference.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_resume_with_another_plan_starts_over(interrupted):
    root, _, _, _ = interrupted
    summary, out = _resume(root, root / ".out.lora-merge-partial", "--dtype", "float16")
    assert summary["shards_reused"] == 0 and summary["parity"] == "passed"
    assert math.isclose(sum(p.stat().st_size for p in out.glob("*.safetensors")),
                        sum(p.stat().st_size for p in (root / "reference").glob("*.safetensors")), rel_tol=0.01)
