"""--jobs N: tensors merged and checked N at once, the same bytes whatever N (and whatever order the lanes finish
in), every guarantee kept: each block checked, each range read back, nothing left on a failure."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from helpers import build_adapter, build_model, run_cli
from quantized import to_fp8
from test_quantized_bases import expert_adapter, gpt_oss

from lora_merge import merge, unmerge, verify
from lora_merge.route import working_set

JOBS = (1, 2, 3, 8)


def hashes(folder: Path) -> dict[str, str]:
    """Every weights file and the index, by name: their sha256."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name.endswith((".safetensors", ".index.json"))}


def same_for_every_n(base, adapter, tmp_path: Path, **settings) -> dict[int, object]:
    tmp_path.mkdir(exist_ok=True)
    results = {n: merge(base, adapter, tmp_path / f"jobs{n}", device="cpu", jobs=n, **settings) for n in JOBS}
    assert all(r.report.ok for r in results.values())
    first = hashes(tmp_path / "jobs1")
    assert first and all(hashes(tmp_path / f"jobs{n}") == first for n in JOBS), "the bytes depend on --jobs"
    stats = [(r.stats.merged, r.stats.copied, r.stats.decided, r.stats.exact) for r in results.values()]
    assert len(set(stats)) == 1, stats
    return results


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    build_model("llama", root / "base", sharded=True, dtype=torch.bfloat16)
    build_adapter(root / "base", root / "adapter", r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"])
    build_adapter(root / "base", root / "dora", r=4, use_dora=True, target_modules=["q_proj", "down_proj"])
    return root


def test_float_merges_are_the_same_bytes_for_every_n(dense, tmp_path):
    results = same_for_every_n(dense / "base", dense / "adapter", tmp_path)
    assert len(list((tmp_path / "jobs1").glob("*.safetensors"))) >= 3  # several shards, several tensors each
    assert results[8].report.details["provenance"]["options"]["jobs"] == 8


def test_torch_merges_and_a_dtype_change_are_the_same_bytes_for_every_n(dense, tmp_path):
    same_for_every_n(dense / "base", dense / "dora", tmp_path, dtype="float32")


def test_kept_fp8_is_the_same_bytes_for_every_n(dense, tmp_path):
    fp8 = to_fp8(dense / "base", tmp_path / "fp8", block=(16, 16), shards=3)
    same_for_every_n(fp8, dense / "adapter", tmp_path / "kept")


def test_quantize_fp8_is_the_same_bytes_for_every_n(tmp_path):
    base = tmp_path / "base"  # Linear weights in whole 128×128 blocks
    build_model("qwen3", base, dtype=torch.bfloat16, sharded=True, hidden_size=256, intermediate_size=384,
                head_dim=64, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj", "down_proj"])
    same_for_every_n(base, tmp_path / "adapter", tmp_path / "quantize", quantize="fp8")


def test_kept_mxfp4_experts_are_the_same_bytes_for_every_n(tmp_path):
    base = gpt_oss(tmp_path)
    expert_adapter(tmp_path / "bf16", tmp_path / "adapter")
    same_for_every_n(base, tmp_path / "adapter", tmp_path)


def test_unmerge_and_verify_for_every_n(dense, tmp_path):
    merged = tmp_path / "merged"
    merge(dense / "base", dense / "adapter", merged, device="cpu")
    back = {n: unmerge(merged, dense / "adapter", tmp_path / f"back{n}", device="cpu", jobs=n) for n in JOBS}
    assert all(r.report.ok for r in back.values())
    assert all(hashes(tmp_path / f"back{n}") == hashes(tmp_path / "back1") for n in JOBS)
    reports = [verify(merged, dense / "base", dense / "adapter", device="cpu", jobs=n) for n in JOBS]
    assert all(r.ok for r in reports)
    digests = [{name: w["sha256"] for name, w in r.details["files"]["weights"].items()} for r in reports]
    assert len(digests[0]) >= 3 and all(d == digests[0] for d in digests)  # each file's sha256, whatever N


def test_resume_keeps_the_shards_that_several_jobs_finished(dense, tmp_path, monkeypatch):
    """Shards written side by side (two at once here): the journal records each as it is complete, and a resumed
    run keeps them, giving the bytes a run in one go gives."""
    from lora_merge import writer

    real, failed = writer._Writing.shard, []

    def third_fails_once(self, shard):
        if shard.name.endswith("00003-of-00003.safetensors") and not failed:
            failed.append(shard.name)
            raise OSError(5, "Input/output error")
        return real(self, shard)

    monkeypatch.setattr(writer._Writing, "shard", third_fails_once)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="Input/output error"):
        merge(dense / "base", dense / "adapter", out, device="cpu", jobs=2, resume=True)
    result = merge(dense / "base", dense / "adapter", out, device="cpu", jobs=2, resume=True)
    assert result.report.ok and 1 <= result.stats.reused <= 2  # those complete before the failure stopped the rest
    merge(dense / "base", dense / "adapter", tmp_path / "fresh", device="cpu", jobs=1)
    assert hashes(out) == hashes(tmp_path / "fresh")


def test_a_failing_lane_stops_the_run_and_leaves_nothing(dense, tmp_path, monkeypatch):
    """A tensor that fails in one lane while others are busy: the error is raised once, OUT is not made, and
    nothing is left beside it."""
    from lora_merge.numbers.floats import merge as floats

    real = floats.FloatMerge.rows
    calls = []

    def failing(self, start, stop, *args):
        calls.append(self.entry.name)
        if self.entry.name.endswith("layers.1.mlp.down_proj.weight"):
            raise OSError(28, "No space left on device")
        return real(self, start, stop, *args)

    monkeypatch.setattr(floats.FloatMerge, "rows", failing)
    out = tmp_path / "out"
    r = run_cli(str(dense / "base"), str(dense / "adapter"), str(out), "--device", "cpu", "--jobs", "3")
    assert r.exit_code == 1 and "No space left" in r.output and "Traceback" not in r.output
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []
    assert len(calls) > 1


def test_the_working_set_grows_linearly_with_n(dense):
    from lora_merge import prepare
    from lora_merge.devices import resolve

    plan = prepare(dense / "base", dense / "adapter")
    one, _ = working_set(plan, resolve("cpu"), None, 1)
    two, _ = working_set(plan, resolve("cpu"), None, 2)
    eight, _ = working_set(plan, resolve("cpu"), None, 8)
    assert one < two < eight and eight - one == 7 * (two - one)


def test_the_dry_run_says_what_n_jobs_hold(dense):
    r = run_cli(str(dense / "base"), str(dense / "adapter"), "unused-out", "--dry-run", "--jobs", "4")
    assert r.exit_code == 0 and "with --jobs 4" in r.output


def test_jobs_must_be_positive():
    r = run_cli("base", "adapter", "out", "--jobs", "0")
    assert r.exit_code == 2 and "--jobs" in r.output
    with pytest.raises(ValueError, match="jobs must be a positive number"):
        merge("base", "adapter", "out", jobs=0)


def test_auto_on_a_gpu_keeps_the_cpu_engine_for_what_it_has_kernels_for(dense):
    """--device auto with CUDA: the tensors the CPU engine has kernels for stay on the CPU, the rest go to the GPU;
    --device cuda sends everything there. (Decided from the plan alone: no GPU is needed to check the decision.)"""
    from lora_merge import prepare
    from lora_merge.devices import CPU, Device
    from lora_merge.route import routes

    auto, cuda = Device("cuda", 0, auto=True), Device("cuda", 0)
    float_plan = prepare(dense / "base", dense / "adapter")
    dora_plan = prepare(dense / "base", dense / "dora")
    chosen = {r.entry.name: (r.name, r.device) for r in routes(float_plan, auto)}
    merged = [n for n, e in ((e.name, e) for e in float_plan.entries) if e.is_merge]
    assert merged and all(chosen[n] == ("float", CPU) for n in merged)
    dora = {r.name: r.device for r in routes(dora_plan, auto) if r.entry.ops is not None}
    assert dora == {"torch": auto}  # DoRA has no CPU kernels: the GPU
    assert {(r.name, r.device) for r in routes(float_plan, cuda) if r.entry.is_merge} == {("torch", cuda)}
    one, _ = working_set(float_plan, auto, None)
    assert one == working_set(float_plan, CPU, None)[0]  # the CPU engine's blocks, its memory
