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

import torch

from .adapter import FileTensor
from .dtypes import FLOAT_DTYPES
from .errors import UnsupportedAdapterError
from .exact import Factors, expected_rows, ulp
from .mathops import round_to
from .plan import Plan
from .report import Check, Report, compare_copy
from .safetensors_file import TensorInfo
from .sources import BaseModel

BLOCK_ELEMENTS = 1 << 18


def refuse_irreversible(adapter) -> None:
    """DoRA and whole-tensor (or row) replacements cannot be taken back out from the adapter alone."""
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


def _merges_to(v: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Where merging the delta ``d`` into ``v`` gives exactly the merged bits ``m``."""
    return _bits(round_to(v.to(torch.float64) + d, m.dtype)) == _bits(m)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def round_trip(plan: Plan, out_model: BaseModel, device, original: BaseModel | None) -> tuple[Check, dict]:
    """Per changed tensor: elements certainly recovered, and (with the original) bit-identical ones and the worst ulp."""
    tensors: dict[str, dict] = {}
    totals = {"elements": 0, "certain": 0}
    if original is not None:
        totals |= {"identical": 0, "worst_ulp": 0.0}
    failures: list[str] = []
    untouched = {"tensors": 0, "identical": 0}
    for entry in plan.entries:
        if not entry.is_merge:
            if original is not None and entry.name in original.tensors:
                untouched["tensors"] += 1
                untouched["identical"] += _same_bytes(out_model.tensors[entry.name], original.tensors[entry.name])
            continue
        if entry.dtype not in FLOAT_DTYPES:
            continue
        got: TensorInfo = out_model.tensors[entry.name]
        merged = FileTensor(entry.base)
        orig = FileTensor(original.tensors[entry.name]) if original is not None and entry.name in original.tensors else None
        if orig is not None and (orig.shape != entry.shape or orig.dtype != entry.dtype):
            failures.append(f"{entry.name}: the original is {orig.dtype} {list(orig.shape)}, OUT {entry.dtype} "
                            f"{list(entry.shape)}")
            orig = None
        rows = entry.shape[0] if entry.shape else 1
        step = max(1, BLOCK_ELEMENTS // max(1, math.prod(entry.shape[1:])))
        f = Factors(device)  # one tensor's factors at a time: memory stays flat
        stat = {"elements": 0, "certain": 0}
        if orig is not None:
            stat |= {"identical": 0, "worst_ulp": 0.0}
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            m = merged.rows(start, stop).to(device)
            d = m.to(torch.float64) - expected_rows(entry, f, start, stop).value  # the adapter's delta, back
            u = FileTensor(got).rows(start, stop).to(device)
            up = torch.nextafter(u, torch.full_like(u, math.inf))
            down = torch.nextafter(u, torch.full_like(u, -math.inf))
            certain = _merges_to(u, d, m) & ~_merges_to(up, d, m) & ~_merges_to(down, d, m)
            stat["elements"] += u.numel()
            stat["certain"] += int(certain.sum())
            if orig is not None:
                w = orig.rows(start, stop).to(device)
                stat["identical"] += int((_bits(u) == _bits(w)).sum())
                w64 = w.to(torch.float64)
                unit = ulp(torch.maximum(w64.abs(), m.to(torch.float64).abs()), entry.dtype)
                err = ((u.to(torch.float64) - w64).abs() / unit).nan_to_num(nan=0.0)
                if err.numel():
                    stat["worst_ulp"] = max(stat["worst_ulp"], float(err.max()))
        tensors[entry.name] = stat
        for k in totals:
            totals[k] = max(totals[k], stat[k]) if k == "worst_ulp" else totals[k] + stat[k]
        if orig is not None and stat["worst_ulp"] > 1.0:
            failures.append(f"{entry.name}: {stat['worst_ulp']:.2f} ulp from the original (more than 1)")
    n = totals["elements"] or 1
    summary = f"{totals['certain']:,} of {totals['elements']:,} changed elements certainly the original " \
              f"({100 * totals['certain'] / n:.2f}%)"
    if original is not None:
        summary += (f"; against the original: {totals['identical']:,} bit-identical "
                    f"({100 * totals['identical'] / n:.2f}%), worst {totals['worst_ulp']:.2f} ulp")
        summary += f"; {untouched['identical']} of {untouched['tensors']} untouched tensors byte-identical"
        totals["untouched"] = untouched
    else:
        summary += "; pass --base ORIGINAL to count bit-identical elements"
    return Check("round trip", not failures, summary, failures), {"totals": totals, "tensors": tensors}


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    fd = os.open(a.path, os.O_RDONLY)
    try:
        return compare_copy(fd, a, b)["ok"]
    finally:
        os.close(fd)


def add_round_trip(report: Report, folder, plan: Plan, device, original: BaseModel | None) -> Report:
    """The unmerge's report: the parity checks of OUT against MERGED minus the adapter, and the round trip."""
    from .report import load_out

    check, data = round_trip(plan, load_out(folder), device, original)
    report.checks.append(check)
    report.details["round_trip"] = data
    return report
