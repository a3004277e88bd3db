"""The writer checks what it makes as it makes it, and reads back what it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import build_adapter, run_cli

from lora_merge import kernels, merge, shardfile
from lora_merge.errors import ParityError

TARGETS = ["q_proj", "v_proj", "down_proj"]


def twice(merge, wide=False):
    """A merge kernel that adds each low-rank delta twice (its left factors doubled)."""
    at = 2 if wide else 3  # merge32(w, in_kind, L, ...), merge16(kind, w, in_kind, L, ...)

    def wrong(*args):
        args = list(args)
        args[at] = np.ascontiguousarray(2 * np.asarray(args[at]))
        return merge(*args)

    return wrong


@pytest.fixture
def adapter(models, tmp_path):
    build_adapter(models["llama_bf16"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=TARGETS)
    return tmp_path / "adapter"


def test_a_wrong_merge_is_caught_as_it_is_made(models, adapter, tmp_path, monkeypatch):
    """The merge arithmetic adds the delta twice: the check, with its own code, fails those tensors."""
    monkeypatch.setattr(kernels, "merge16", twice(kernels.merge16))
    with pytest.raises(ParityError) as caught:
        merge(str(models["llama_bf16"]), str(adapter), tmp_path / "out", device="cpu", block_bytes=4096)
    assert not (tmp_path / "out").exists()  # a failed output is never OUT: it is kept beside it, named so
    report = json.loads((tmp_path / "out.lora-merge-failed" / "merge_report.json").read_text())
    assert report["status"] == "failed" and not report["checks"]["merged"]["ok"]
    failed = {n for n, t in report["tensors"].items() if not t["ok"]}
    assert failed == {n for n in report["tensors"] if n.rsplit(".", 2)[-2] in TARGETS} == set(caught.value.report.failed_tensors)


def test_a_file_that_does_not_hold_the_checked_bytes_fails(models, adapter, tmp_path, monkeypatch):
    """One byte changes between the check and the disk: reading the block back shows it."""
    write_at = shardfile.write_at
    done = []

    def flip_once(fd, data, offset):
        view = memoryview(data).cast("B")
        if not done and len(view) > 1000:  # a merged block, not the header
            done.append(True)
            changed = bytearray(view)
            changed[500] ^= 0x40
            return write_at(fd, changed, offset)
        return write_at(fd, data, offset)

    monkeypatch.setattr(shardfile, "write_at", flip_once)
    with pytest.raises(ParityError):
        merge(str(models["llama_bf16"]), str(adapter), tmp_path / "out", device="cpu")
    report = json.loads((tmp_path / "out.lora-merge-failed" / "merge_report.json").read_text())
    failures = report["checks"]["merged"]["failures"]
    assert len(failures) == 1 and "does not hold the bytes that were checked, first at byte 500" in failures[0]


def test_torch_threads_are_given_back(models, adapter, tmp_path):
    before = torch.get_num_threads()
    merge(str(models["llama_bf16"]), str(adapter), tmp_path / "out", device="cpu")
    assert torch.get_num_threads() == before


def test_memory_is_stated_before_and_measured_after(models, adapter, tmp_path):
    base = models["llama_bf16"]
    r = run_cli(base, adapter, tmp_path / "out", "--dry-run", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    memory = json.loads(r.output)["memory"]
    assert memory["baseline_bytes"] > 0 and memory["estimated_added_bytes"] > 0
    assert memory["estimated_peak_bytes"] == memory["baseline_bytes"] + memory["estimated_added_bytes"]
    assert memory["estimated_gpu_bytes"] is None
    r = run_cli(base, adapter, tmp_path / "out", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "above the" in r.output and "the process held before the merge" in r.output
    measured = json.loads((tmp_path / "out" / "merge_report.json").read_text())["provenance"]["memory"]
    assert measured["peak_bytes"] >= measured["baseline_bytes"] > 0


def test_every_written_shard_is_hashed_as_written(models, tmp_path):
    import hashlib

    base = models["llama_sharded"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=TARGETS)
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cpu", block_bytes=4096)
    weights = json.loads((tmp_path / "out" / "merge_report.json").read_text())["files"]["weights"]
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert sorted(weights) == shards and len(shards) > 1
    for name in shards:
        assert weights[name]["sha256"] == hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest()
