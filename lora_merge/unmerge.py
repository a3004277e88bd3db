"""Unmerge: subtract an adapter's delta from a merged model and write the base back.

The same engine as the merge, with the adapter's weight -1: ``W = W' - s·B·A`` in float64, rounded
once. Rounding on the way in cannot always be undone on the way out, so the result is measured:

- against the original base, when it is given: per tensor, how many elements came back
  bit-identical and the worst error in units in the last place (ulp);
- always: how many elements are *certainly* the original: the only value of the dtype that
  merges to the merged model's bits (then the original must have been it).

The ulp is taken at the larger of |original| and |merged|: the merged model kept only that
precision, so nothing finer can be recovered from it. Each element is rounded once on the way in and
once on the way out, which bounds the error by one such ulp.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from . import kernels
from .adapter import FileTensor
from .buffers import HostBuffers
from .check.readback import READ_BYTES, compare_copy
from .check.report import Report
from .check.verdict import Check
from .dtypes import FLOAT_DTYPES
from .errors import UnsupportedAdapterError
from .numbers.floats.check import FloatCheck
from .numbers.floats.merge import FloatMerge
from .numbers.floats.spec import OPEN_SHARE
from .numbers.floats.spec import takes as float_takes
from .paths import open_read
from .plan import Plan
from .reader import stored_rows
from .safetensors_file import TensorInfo
from .sources import BaseModel

BLOCK_ELEMENTS = 1 << 18


def refuse_irreversible(adapter) -> None:
    """DoRA, whole-tensor (or row) replacements and the kinds that transform W (but IA3, divided back out where
    no factor is zero) cannot be taken back out from the adapter alone (or not exactly yet)."""
    transformed = sorted(op.module for op in adapter.targets.values()
                         if op.multiply is not None and op.multiply.name != "ia3")
    if transformed:
        kind = next(op.multiply.name for op in adapter.targets.values() if op.module == transformed[0])
        raise UnsupportedAdapterError(
            f"ADAPTER is {adapter.kind} ({len(transformed)} modules, e.g. {transformed[0]}): the merge transformed W "
            f"({kind}), and inverting that transform is not done yet",
            "keep the base model; unmerge takes back the kinds that add to W (LoRA, AdaLoRA, LoHa, LoKr, VeRA, "
            "MiSS, FourierFT) and IA3")
    zero = sorted(op.name for op in adapter.targets.values()
                  if op.multiply is not None and bool((op.multiply.l.load() == 0).any()))
    if zero:
        raise UnsupportedAdapterError(
            f"ADAPTER is IA3 with a factor of zero in {len(zero)} tensor(s), e.g. {zero[0]}: the merge zeroed those "
            "rows or columns, and nothing in the merged model tells what they were", "keep the base model")
    dora = sorted(op.module for op in adapter.targets.values() if op.dora_magnitude is not None)
    if dora:
        raise UnsupportedAdapterError(
            f"ADAPTER is DoRA ({len(dora)} modules, e.g. {dora[0]}): the merge rescaled each row by m/‖W + ΔW‖, "
            "and undoing that needs the original W's norms, which the adapter does not hold",
            "keep the base model; it cannot be recovered from the merged model and a DoRA adapter",
        )
    replaced = sorted(op.name for op in adapter.targets.values() if op.replace is not None or op.row_indices is not None)
    if replaced:
        raise UnsupportedAdapterError(
            f"ADAPTER replaces {len(replaced)} tensor(s) outright (modules_to_save, saved embeddings or trainable "
            f"tokens, e.g. {replaced[0]}): the values they replaced are not in the adapter",
            "keep the base model; those tensors cannot be recovered from the merged model",
        )


@dataclass
class Recovered:
    """How much of one tensor (or of all) came back: ``certain`` elements the only value that merges to MERGED's,
    and against the original (when given) the ``identical`` ones and the worst error in ulp."""

    elements: int = 0
    certain: int = 0
    identical: int | None = None
    worst_ulp: float | None = None

    def add(self, other: Recovered) -> None:
        self.elements += other.elements
        self.certain += other.certain
        if other.identical is not None:
            self.identical = (self.identical or 0) + other.identical
            self.worst_ulp = max(self.worst_ulp or 0.0, other.worst_ulp)

    def to_json(self) -> dict:
        found = {"elements": self.elements, "certain": self.certain}
        if self.identical is not None:
            found |= {"identical": self.identical, "worst_ulp": self.worst_ulp}
        return found


class _DenseTrip:
    """One tensor's round trip on the CPU (``kernels.trip``): u, MERGED's M and the original read a block of rows
    at a time; the elements the kernels cannot judge are decided exactly, as the merge decides (``FloatMerge``)."""

    def __init__(self, entry, got: TensorInfo, orig: TensorInfo | None):
        forward = replace(entry.ops, deltas=[replace(d, scale=-d.scale) for d in entry.ops.deltas])
        self.entry, self.got, self.orig = entry, got, orig
        self.merge = FloatMerge(replace(entry, ops=forward))  # u + the adapter's delta, as the merge made M
        check = FloatCheck(entry)  # the judgement's error bound is the check's: it compares as the check does
        self.bound = (check.c_terms, check.slack, check.c)
        self.kind = kernels.KINDS[entry.dtype]

    def run(self) -> Recovered:
        e, merge, buffers = self.entry, self.merge, HostBuffers()
        rows = 1 if merge.vector else e.shape[0]
        step = max(1, BLOCK_ELEMENTS // merge.width)
        found = Recovered(identical=0 if self.orig else None, worst_ulp=0.0 if self.orig else None)
        stats = np.zeros(3)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            n = (stop - start) * merge.width
            m = stored_rows(e.base, start, stop, buffers, "merged")
            u = stored_rows(self.got, start, stop, buffers, "u")
            w = stored_rows(self.orig, start, stop, buffers, "orig") if self.orig else np.empty(0, np.uint8)
            ct, slack, c = self.bound
            args = (self.kind, u, m, w, merge.f.left[start:stop], merge.f.right, merge.f.rank, ct, slack,
                    stop - start, merge.width, c)
            for passes in (kernels, kernels.plain):  # the plain passes list every open element, however many
                idx = buffers("open", (n // OPEN_SHARE + 1 if passes is kernels else n,), np.int64)
                block_stats = np.zeros(3)
                count = passes.trip(*args, idx, block_stats)
                if count <= len(idx):
                    break
            stats[:2] += block_stats[:2]
            stats[2] = max(stats[2], block_stats[2])
            if count:
                stats[0] += self._decided(idx[:count], start, u, m, buffers)
            found.elements += n
        found.certain = int(stats[0])
        if self.orig:
            found.identical, found.worst_ulp = int(stats[1]), float(stats[2])
        return found

    def _decided(self, flat: np.ndarray, t0: int, u: np.ndarray, m: np.ndarray, buffers: HostBuffers) -> int:
        """How many of the open elements are certainly the original: u, and its two neighbours, merged exactly."""
        top = 0x80000000 if u.dtype == np.float32 else 0x8000
        bits = u.view(np.uint32 if u.dtype == np.float32 else np.uint16)
        merged = buffers("remerged", u.shape, u.dtype)
        at = bits[flat].copy()
        verdicts = []
        for x in (at, kernels.plain.next_up(at, top), kernels.plain.next_down(at, top)):
            bits[flat] = x
            self.merge._decide(flat, t0, u, merged)
            verdicts.append(merged.view(bits.dtype)[flat] == m.view(bits.dtype)[flat])
        bits[flat] = at
        return int(np.count_nonzero(verdicts[0] & ~verdicts[1] & ~verdicts[2]))


def _recovered(entry, got: TensorInfo, orig: TensorInfo | None, device) -> Recovered:
    """One tensor's round trip: on the CPU in numpy for the tensors the merge computes so, where u, M and the
    original share a dtype; else in torch."""
    same = got.dtype == entry.dtype == entry.base.dtype and (orig is None or orig.dtype == entry.dtype)
    if device.type == "cpu" and same and float_takes(entry, "cpu"):
        return _DenseTrip(entry, got, orig).run()
    return _torch_trip(entry, got, orig, device)


def _torch_trip(entry, got: TensorInfo, orig: TensorInfo | None, device) -> Recovered:
    """The round trip in torch (on ``device``), for what the numpy one does not take (experts, mixed dtypes)."""
    import torch

    from .check.elements import Factors, expected_rows, ulp
    from .kindmath import factors_along
    from .mathops import round_to

    dev = device.torch

    def bits(t):
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    scaling = entry.ops.multiply if entry.ops is not None else None
    if not getattr(scaling, "inverse", False):
        scaling = None  # else IA3 divided back out: a value merges by v ⊙ l, d holding l along its axis
    cache: dict = {}  # IA3's l, loaded once for the tensor

    def merges_to(v, d, m):
        if scaling is not None:  # v ⊙ l is exact in float64
            return bits(round_to(v.to(torch.float64) * d, m.dtype)) == bits(m)
        return bits(round_to(v.to(torch.float64) + d, m.dtype)) == bits(m)

    merged, out = FileTensor(entry.base), FileTensor(got)
    original = FileTensor(orig) if orig is not None else None
    rows = entry.shape[0] if entry.shape else 1
    step = max(1, BLOCK_ELEMENTS // max(1, math.prod(entry.shape[1:])))
    f = Factors(dev)  # one tensor's factors at a time: memory stays flat
    found = Recovered(identical=0 if orig else None, worst_ulp=0.0 if orig else None)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        m = merged.rows(start, stop).to(dev)
        if scaling is not None:  # the factors l, along their axis
            d = factors_along(scaling, m.dim(), start, stop, dev, cache)
        else:
            d = m.to(torch.float64) - expected_rows(entry, f, start, stop).value  # the adapter's delta, back
        u = out.rows(start, stop).to(dev)
        up = torch.nextafter(u, torch.full_like(u, math.inf))
        down = torch.nextafter(u, torch.full_like(u, -math.inf))
        certain = merges_to(u, d, m) & ~merges_to(up, d, m) & ~merges_to(down, d, m) & u.isfinite() & m.isfinite()
        found.elements += u.numel()
        found.certain += int(certain.sum())
        if original is not None:
            w = original.rows(start, stop).to(dev)
            found.identical += int((bits(u) == bits(w)).sum())
            w64 = w.to(torch.float64)
            unit = ulp(torch.maximum(w64.abs(), m.to(torch.float64).abs()), entry.dtype)
            err = ((u.to(torch.float64) - w64).abs() / unit).nan_to_num(nan=0.0)
            if err.numel():
                found.worst_ulp = max(found.worst_ulp, float(err.max()))
    return found


def round_trip(plan: Plan, out_model: BaseModel, device, original: BaseModel | None) -> tuple[Check, dict]:
    """Per changed tensor: elements certainly recovered, and (with the original) bit-identical ones and the worst
    ulp; the tensors side by side on two threads (the kernels release the GIL)."""
    failures: list[str] = []
    untouched = {"tensors": 0, "identical": 0}
    jobs = {}
    for entry in plan.entries:
        if not entry.is_merge:
            if original is not None and entry.name in original.tensors:
                untouched["tensors"] += 1
                untouched["identical"] += _same_bytes(out_model.tensors[entry.name], original.tensors[entry.name])
            continue
        if entry.dtype not in FLOAT_DTYPES:
            continue
        got: TensorInfo = out_model.tensors[entry.name]
        orig = original.tensors.get(entry.name) if original is not None else None
        if orig is not None and (tuple(orig.shape) != tuple(entry.shape) or orig.dtype != entry.dtype):
            failures.append(f"{entry.name}: the original is {orig.dtype} {list(orig.shape)}, OUT {entry.dtype} "
                            f"{list(entry.shape)}")
            orig = None
        jobs[entry.name] = (entry, got, orig)

    with ThreadPoolExecutor(2) as pool:  # each tensor's factors are read when its turn comes: memory stays flat
        found = {name: pool.submit(_recovered, *job, device) for name, job in jobs.items()}
        tensors = {name: f.result() for name, f in found.items()}
    totals = Recovered(identical=0 if original is not None else None, worst_ulp=0.0 if original is not None else None)
    for name, stat in tensors.items():
        totals.add(stat)
        if stat.worst_ulp is not None and stat.worst_ulp > 1.0:
            failures.append(f"{name}: {stat.worst_ulp:.2f} ulp from the original (more than 1)")
    n = totals.elements or 1
    summary = f"{totals.certain:,} of {totals.elements:,} changed elements certainly the original " \
              f"({100 * totals.certain / n:.2f}%)"
    data = {"totals": totals.to_json(), "tensors": {name: stat.to_json() for name, stat in tensors.items()}}
    if original is not None:
        summary += (f"; against the original: {totals.identical:,} bit-identical "
                    f"({100 * totals.identical / n:.2f}%), worst {totals.worst_ulp:.2f} ulp")
        summary += f"; {untouched['identical']} of {untouched['tensors']} untouched tensors byte-identical"
        data["totals"]["untouched"] = untouched
    else:
        summary += "; pass --base ORIGINAL to count bit-identical elements"
    return Check("round trip", not failures, summary, failures), data


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    fd, src = open_read(a.path), open_read(b.path)
    try:
        return compare_copy(fd, a.start, src, b.start, a.nbytes, a.dtype, np.empty(2 * READ_BYTES, np.uint8)
                            ).differs_at is None
    finally:
        os.close(fd)
        os.close(src)


def add_round_trip(report: Report, folder, plan: Plan, device, original: BaseModel | None) -> Report:
    """The unmerge's report: the parity checks of OUT against MERGED minus the adapter, and the round trip."""
    from .check.report import load_out

    check, data = round_trip(plan, load_out(folder), device, original)
    report.checks.append(check)
    report.details["round_trip"] = data
    return report
