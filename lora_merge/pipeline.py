"""The merge as a library call: resolve, plan, stream, finish. The CLI is a thin layer over ``merge``."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DeviceError
from .formats.peft import load_peft_adapter
from .output import StagedOutput, check_output
from .plan import Plan, make_plan
from .sources import TOKENIZER_FILES, extra_files, load_base, resolve_source
from .writer import DEFAULT_BLOCK_BYTES, WriteStats, write_shards

log = logging.getLogger("lora_merge")

# Resident memory of the process before any tensor: the interpreter with torch imported (measured, CPU).
BASELINE_RSS = 230 * 1024 * 1024


@dataclass
class MergeResult:
    plan: Plan
    out: Path | None
    device: str
    seconds: float = 0.0
    stats: WriteStats | None = None
    files_copied: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        counts = self.plan.counts()
        total = self.plan.total_bytes
        result = {
            "out": str(self.out) if self.out else None,
            "device": self.device,
            "tensors": counts["tensors"],
            "merged": counts["merged"],
            "copied": counts["copied"],
            "converted": counts["converted"],
            "adapter_tensors": counts["adapter_tensors"],
            "bytes": total,
            "config_changes": self.plan.config_changes,
            "notes": self.plan.notes,
        }
        if self.stats is not None:
            result["seconds"] = round(self.seconds, 3)
            result["throughput_mb_s"] = round(total / 1e6 / self.seconds, 1) if self.seconds > 0 else None
            result["files"] = self.stats.files + self.files_copied
        return result


def resolve_device(spec: str):
    """The torch device that computes; 'auto' is CUDA when present, else the CPU."""
    import torch

    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available here", "use --device cpu (or auto)")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present",
                "pick an index below that",
            )
        return dev
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("--device mps: Apple's Metal backend is not available here", "use --device cpu")
        # Metal has no float64, and the merge's exact rounding needs it: the arithmetic stays on the CPU.
        log.warning("MPS has no float64; computing on the CPU to keep the rounding exact")
        return torch.device("cpu")
    raise DeviceError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")


def estimate_peak_bytes(plan: Plan, block_bytes: int) -> int:
    """Rough peak resident memory: baseline + the largest float64 block with its temporaries + adapter factors."""
    largest_block = 0
    factors = 0
    for e in plan.entries:
        if e.is_copy:
            continue
        row = math.prod(e.shape[1:])
        rows = min(e.shape[0] if e.shape else 1, max(1, block_bytes // (8 * row)))
        largest_block = max(largest_block, rows * row * 8)
        if e.ops is not None:
            factors = max(factors, sum(8 * math.prod(t.shape) for t in _factor_tensors(e.ops)))
    # block in float64, the rounding's float32/float64 temporaries, the raw read and the output bytes
    return BASELINE_RSS + 3 * largest_block + factors


def _factor_tensors(ops):
    for d in ops.deltas:
        yield from (d.a, d.b) if hasattr(d, "a") else (d.t,)


def describe_plan(plan: Plan, block_bytes: int = DEFAULT_BLOCK_BYTES) -> dict:
    """The plan as data: what --dry-run prints."""
    return {
        "base": str(plan.base.path),
        "adapter": str(plan.adapter.path),
        "counts": plan.counts(),
        "bytes": plan.total_bytes,
        "estimated_peak_bytes": estimate_peak_bytes(plan, block_bytes),
        "shards": [s.name for s in plan.shards],
        "targets": [
            {"tensor": e.name, "shard": s.name, "operation": e.note, "shape": list(e.shape), "dtype": e.dtype}
            for s in plan.shards for e in s.entries if e.is_merge or not e.is_copy
        ],
        "config_changes": plan.config_changes,
        "notes": plan.notes,
    }


def prepare(base: str, adapter: str, dtype: str | None = None) -> Plan:
    """Resolve both inputs and plan the merge from headers; raises before anything is written."""
    base_model = load_base(resolve_source(base, "BASE"))
    adapter_src = resolve_source(adapter, "ADAPTER")
    return make_plan(base_model, load_peft_adapter(adapter_src.path), dtype=dtype)


def _tokenizer_folder(plan: Plan, tokenizer_from: str | None) -> Path:
    adapter_has = any((plan.adapter.path / f).is_file() for f in TOKENIZER_FILES)
    if tokenizer_from == "adapter":
        return plan.adapter.path
    if tokenizer_from is None and adapter_has and any("resized" in n for n in plan.notes):
        # new rows in the embeddings mean new tokens: the base's tokenizer does not know them
        log.info("the vocabulary was resized: taking the tokenizer from the adapter")
        return plan.adapter.path
    return plan.base.path


def finish_files(plan: Plan, folder: Path, tokenizer_from: str | None = None) -> list[str]:
    """config.json (as planned), then the base's other non-weight files and the tokenizer."""
    written = []
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    written.append("config.json")
    tok_folder = _tokenizer_folder(plan, tokenizer_from)
    for path in extra_files(plan.base.path):
        if path.name == "config.json" or (tok_folder != plan.base.path and path.name in TOKENIZER_FILES):
            continue
        shutil.copy2(path, folder / path.name)
        written.append(path.name)
    if tok_folder != plan.base.path:
        for name in TOKENIZER_FILES:
            if (tok_folder / name).is_file():
                shutil.copy2(tok_folder / name, folder / name)
                written.append(name)
    return written


def merge(
    base: str,
    adapter: str,
    out: str | Path,
    *,
    dtype: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    tokenizer_from: str | None = None,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress_factory=None,
) -> MergeResult:
    """Merge ADAPTER into BASE and write the result to OUT. Nothing exists at OUT unless it succeeds."""
    plan = prepare(base, adapter, dtype)
    out_path = check_output(Path(out), overwrite, {"BASE": plan.base.path, "ADAPTER": plan.adapter.path})
    dev = resolve_device(device)
    started = time.perf_counter()
    with StagedOutput(out_path) as staged:
        bar = progress_factory(plan.total_bytes) if progress_factory else None
        try:
            stats = write_shards(plan, staged.tmp, dev, block_bytes, bar)
        finally:
            if bar is not None:
                bar.close()
        copied = finish_files(plan, staged.tmp, tokenizer_from)
        staged.commit()
    return MergeResult(plan, out_path, str(dev), time.perf_counter() - started, stats, copied)
