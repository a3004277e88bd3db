"""The parity report: read a merged folder back and check it against BASE and ADAPTER.

Nothing here trusts the merge. Every tensor is read back from OUT and matched by name, whatever the
shard layout. Untouched tensors must hash like the base's. Each merged element must lie within a
rounding bound of the exact value W + s·B·A, which is computed here from the adapter's factors in
float64 and never rounded. The bound allows one rounding of the sum and one of the delta, plus
float32 arithmetic error. A correct merge passes it, peft's float32 merge_and_unload included;
any element moved one unit in the last place beyond it fails.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .adapter import FileTensor, LowRank, TargetOps
from .dtypes import DTYPES, FLOAT_DTYPES, torch_dtype
from .mathops import all_finite, flat_nonzero, low_halves
from .plan import Entry, Plan
from .safetensors_file import TensorInfo, file_sha256, pread_exact
from .sources import TOKENIZER_FILES, BaseModel, Source, extra_files, load_base
from .writer import rows_per_block

REPORT_NAME = "merge_report.json"
OWN_FILES = (REPORT_NAME, "README.md")  # written by lora-merge itself, not copies of BASE files
IGNORED_CONFIG_KEYS = ("transformers_version", "_name_or_path")  # rewritten by any save_pretrained
HASH = "sha256"
ADAPTER_CONFIG_KEYS = (
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "use_dora",
    "target_modules",
    "modules_to_save",
    "base_model_name_or_path",
    "fan_in_fan_out",
    "enable_lora",  # loralib
    "fine_tune_type",  # mlx-lm
    "lora_parameters",
    "num_layers",
    "prefixes",  # kohya
)
CHUNK_BYTES = 4 * 1024 * 1024
BLOCK_BYTES = 2 * 1024 * 1024  # float64 bytes per row block in the element check
COMPUTE_UNIT = 2.0**-24  # float32 unit roundoff: the bound admits a merge computed in float32
MAX_LISTED = 20  # failures listed per check on the terminal (the JSON has them all)


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"ok": self.ok, "summary": self.summary, "failures": self.failures}


@dataclass
class Report:
    out: str  # OUT as shown to the user
    checks: list[Check]
    details: dict
    folder: Path | None = None  # the folder that was read
    plan: Plan | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed_tensors(self) -> list[str]:
        return sorted(n for n, t in self.details["tensors"].items() if not t["ok"])

    def to_json(self) -> dict:
        return {
            "status": "passed" if self.ok else "failed",
            "out": self.out,
            "checks": {c.name: c.to_json() for c in self.checks},
            **self.details,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def table(self) -> str:
        lines = [
            f"parity report: {'PASSED' if self.ok else 'FAILED'} ({self.out})",
            "| Check | Result | Details |",
            "|---|---|---|",
        ]
        lines += [f"| {c.name} | {'pass' if c.ok else 'FAIL'} | {c.summary} |" for c in self.checks]
        groups: dict[tuple[str, str], list[str]] = {}
        for d in self.details["structure"]["expected_differences"]:
            groups.setdefault((d["what"], d["cause"]), []).append(d["tensor"])
        for (what, cause), names in groups.items():
            who = names[0] if len(names) == 1 else f"{len(names)} tensors"
            lines.append(f"  expected: {who}: {what} ({cause})")
        for c in self.checks:
            for f in c.failures[:MAX_LISTED]:
                lines.append(f"  {c.name}: {f}")
            if len(c.failures) > MAX_LISTED:
                lines.append(f"  {c.name}: … and {len(c.failures) - MAX_LISTED} more (see the JSON report)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry


def verify_output(
    out: Path,
    plan: Plan,
    device,
    *,
    out_model: BaseModel | None = None,
    shown_as: str | None = None,
    provenance: dict | None = None,
    progress=None,
    allow_nonfinite: bool = False,
) -> Report:
    """Check the merged folder ``out`` against the plan of BASE + ADAPTER; a failed check does not raise."""
    started = time.perf_counter()
    out_model = out_model or load_out(out)
    tensors: dict[str, dict] = {}
    structure, structure_data = _check_structure(plan, out_model)
    coverage, coverage_data = _check_coverage(plan)
    untouched, merged, finite = _check_tensors(plan, out_model, device, tensors, progress, allow_nonfinite)
    files, files_data = _check_files(plan, out)
    checks = [structure, coverage, untouched, merged, finite, files]
    prov = {
        "lora_merge_version": __version__,
        "base": _source_json(plan.base.source),
        **_adapters_json(plan.adapter),
        "verify_device": str(device),
        **(provenance or {}),
        "verify_seconds": round(time.perf_counter() - started, 3),
    }
    details = {
        "structure": structure_data,
        "coverage": coverage_data,
        "tensors": tensors,
        "files": files_data,
        "notes": list(plan.notes),
        "provenance": prov,
    }
    return Report(shown_as or str(out), checks, details, folder=out, plan=plan)


def _adapters_json(adapter) -> dict:
    """Where each adapter came from, its format, weight, key config and file hashes."""
    described = [
        {
            **(_source_json(a.source) if a.source else {"path": str(a.path)}),
            "format": a.format,
            **({"weight": a.weight} if a.weight != 1.0 or len(adapter.members) > 1 else {}),
            "config": {k: a.config[k] for k in ADAPTER_CONFIG_KEYS if k in a.config},
            "files": {p.name: file_sha256(p) for p in a.files if p.is_file()},
        }
        for a in adapter.members
    ]
    return {"adapter": described[0]} if len(described) == 1 else {"adapters": described}


def load_out(out: Path) -> BaseModel:
    """The merged folder's headers, read like a base model's (any shard layout)."""
    return load_base(Source(str(out), out), role="OUT")


def _source_json(source: Source) -> dict:
    return {"spec": source.spec, "repo_id": source.repo_id, "path": str(source.path), "revision": source.revision}


# ------------------------------------------------------------------------------------------ structure


def _count(infos) -> dict:
    infos = list(infos)
    return {
        "tensors": len(infos),
        "parameters": sum(math.prod(i.shape) for i in infos),
        "bytes": sum(i.nbytes for i in infos),
    }


def _check_structure(plan: Plan, out_model: BaseModel) -> tuple[Check, dict]:
    expected = {e.name: e for e in plan.entries}
    actual = out_model.tensors
    base = plan.base.tensors
    differences = []
    for e in expected.values():
        if e.name not in base:
            differences.append({"tensor": e.name, "what": "not stored in BASE", "cause": f"untied from {e.base.name}"})
            continue
        if e.shape != e.base.shape:
            differences.append(
                {
                    "tensor": e.name,
                    "what": f"shape {list(e.base.shape)} -> {list(e.shape)}",
                    "cause": "vocabulary resized by the adapter",
                }
            )
        if e.dtype != e.base.dtype:
            differences.append(
                {"tensor": e.name, "what": f"dtype {e.base.dtype} -> {e.dtype}", "cause": "--dtype conversion"}
            )
    failures = []
    for name, e in expected.items():
        got = actual.get(name)
        if got is None:
            failures.append(f"{name}: missing from OUT")
            continue
        if got.shape != e.shape:
            failures.append(f"{name}: shape {list(got.shape)}, expected {list(e.shape)}")
        if got.dtype != e.dtype:
            failures.append(f"{name}: dtype {got.dtype}, expected {e.dtype}")
    failures += [
        f"{name}: in OUT but neither in BASE nor made by the adapter" for name in sorted(set(actual) - set(expected))
    ]
    out_counts, base_counts = _count(actual.values()), _count(base.values())
    summary = (
        f"{out_counts['tensors']} tensors, {out_counts['parameters']:,} parameters, {out_counts['bytes'] / 1e6:,.1f} MB; "
        + (
            "names, shapes and dtypes as BASE"
            if not failures
            else f"{len(failures)} differences from what BASE + ADAPTER make"
        )
        + (f" ({len(differences)} expected difference{'s' if len(differences) != 1 else ''})" if differences else "")
    )
    data = {"base": base_counts, "out": out_counts, "expected_differences": differences, "failures": failures}
    return Check("structure", not failures, summary, failures), data


# ------------------------------------------------------------------------------------------- coverage


def _check_coverage(plan: Plan) -> tuple[Check, dict]:
    """Every tensor of every adapter lands somewhere (or is ignored for a stated reason)."""
    entries = {e.name for e in plan.entries if e.is_merge}
    failures: list[str] = []
    members = []
    for i, adapter in enumerate(plan.adapter.members):
        data, left_over = _member_coverage(adapter)
        label = f"adapter {i + 1}: " if len(plan.adapter.members) > 1 else ""
        failures += [f"{label}{n}: adapter tensor used by no target" for n in left_over]
        members.append(data)
    ops = list(plan.adapter.targets.values())
    failures += [f"{op.name}: adapter target not written" for op in ops if op.name not in entries]
    if len(members) == 1:
        data = members[0]
        summary = _coverage_line(data)
    else:
        data = {"adapters": members, "targets": len(ops)}
        summary = f"{len(members)} adapters onto {len(ops)} base tensors: " + "; ".join(
            f"{i + 1}: {_coverage_line(m)}" for i, m in enumerate(members))
    return Check("coverage", not failures, summary, failures), data


def _member_coverage(adapter) -> tuple[dict, list[str]]:
    ops = list(adapter.targets.values())
    used = adapter.used_tensor_names()
    left_over = [n for n in adapter.tensor_names if n not in used and n not in adapter.ignored]
    data = {
        "adapter": str(adapter.path),
        "format": adapter.format,
        "weight": adapter.weight,
        "adapter_tensors": adapter.tensor_count,
        "adapter_modules": len({op.module for op in ops}),
        "targets": len(ops),
        "merged": sum(1 for op in ops if op.deltas or op.dora_magnitude is not None),
        "replaced": sum(1 for op in ops if op.replace is not None),
        "rows_replaced": sum(1 for op in ops if op.row_indices is not None),
        "left_over": left_over,
        "ignored": adapter.ignored,
        "direct": (len(adapter.mapped) if adapter.mapped else len(ops)) - adapter.placed_through_layout,
        "through_mapping": adapter.placed_through_layout,
        "mapping": adapter.layout,
    }
    return data, left_over


def _coverage_line(data: dict) -> str:
    weight = f" (weight {data['weight']:g})" if data["weight"] != 1.0 else ""
    return (
        f"{data['adapter_tensors']} adapter tensors in {data['adapter_modules']} modules{weight}: "
        f"{data['merged']} tensors merged, {data['replaced']} replaced, {data['rows_replaced']} with rows replaced, "
        f"{len(data['left_over'])} left over"
        + (f", {len(data['ignored'])} ignored by design" if data["ignored"] else "")
        + (f"; {data['through_mapping']} named for the model in memory, placed through {data['mapping']}"
           if data["through_mapping"] else "")
    )


# -------------------------------------------------------------------------------------------- tensors


def _check_tensors(plan: Plan, out_model: BaseModel, device, tensors: dict, progress, allow_nonfinite: bool):
    same_failures, merge_failures, finite_failures = [], [], []
    identical = checked = correctly_rounded = 0
    worst = worst_of_bound = 0.0
    fds: dict[Path, int] = {}

    def fd(path: Path) -> int:
        if path not in fds:
            fds[path] = os.open(path, os.O_RDONLY)
        return fds[path]

    try:
        for e in plan.entries:
            got = out_model.tensors.get(e.name)
            if got is None or got.shape != e.shape or got.dtype != e.dtype:
                continue  # reported by the structure check
            if e.is_copy:
                digest, differs, finite = _compare_copy(fd(got.path), got, fd(e.base.path), e.base)
                tensors[e.name] = {"check": "identical", "ok": differs is None and finite, HASH: digest}
                identical += differs is None
                if differs is not None:
                    same_failures.append(f"{e.name}: bytes differ from BASE, first at byte {differs} of the tensor")
            else:
                result = _check_elements(e, got, fd, device, allow_nonfinite)
                tensors[e.name] = result
                finite = result.pop("finite")
                checked += 1
                worst = max(worst, result["max_error_ulp"])
                worst_of_bound = max(worst_of_bound, result["max_error_of_bound"])
                correctly_rounded += result["correctly_rounded"]
                if not result["ok"]:
                    i = result["first_failure"]
                    merge_failures.append(
                        f"{e.name}: {result['failed_elements']} element(s) outside the rounding bound, "
                        f"first at {i['index']}: {i['value']!r}, expected {i['expected']!r} ± {i['bound']:.3g}"
                    )
            if not finite:
                tensors[e.name]["ok"] = tensors[e.name]["ok"] and allow_nonfinite
                finite_failures.append(f"{e.name}: holds NaN or Inf")
            if progress is not None:
                progress.update(e.nbytes)
    finally:
        for f in fds.values():
            os.close(f)
    copies = sum(1 for e in plan.entries if e.is_copy)
    untouched = Check(
        "untouched",
        not same_failures,
        f"{identical} of {copies} tensors byte-identical to BASE ({HASH})",
        same_failures,
    )
    converted = sum(1 for e in plan.entries if not e.is_copy and not e.is_merge)
    what = f"{checked - converted} merged" + (f" and {converted} converted" if converted else "")
    merged = Check(
        "merged",
        not merge_failures,
        f"{what} tensors within the rounding bound of W + s·B·A (max {worst_of_bound:.0%} of it); "
        f"max error {worst:.2f} ulp, {correctly_rounded} of {checked} correctly rounded (≤ 0.5 ulp)",
        merge_failures,
    )
    finite = Check(
        "finite",
        not finite_failures or allow_nonfinite,
        "no NaN or Inf" if not finite_failures else f"{len(finite_failures)} tensors hold NaN or Inf"
        + (" (allowed by --allow-nonfinite)" if allow_nonfinite else ""),
        finite_failures,
    )
    return untouched, merged, finite


def _compare_copy(out_fd: int, got: TensorInfo, base_fd: int, base: TensorInfo) -> tuple[str, int | None, bool]:
    """OUT's hash of a copied tensor, the first byte where it differs from BASE (None: identical), finiteness."""
    h = hashlib.new(HASH)
    finite = True
    differs = None
    is_float = got.dtype in FLOAT_DTYPES
    # whole rows per chunk, so that a chunk can be viewed as floats
    row = got.row_bytes if got.shape else got.nbytes
    step = max(1, CHUNK_BYTES // max(row, 1)) * max(row, 1)
    for offset in range(0, got.nbytes, step):
        n = min(step, got.nbytes - offset)
        chunk = pread_exact(out_fd, n, got.start + offset)
        h.update(chunk)
        if differs is None:
            theirs = pread_exact(base_fd, n, base.start + offset)
            if chunk != theirs:
                differs = offset + next(i for i in range(n) if chunk[i] != theirs[i])
        if is_float and finite:
            finite = all_finite(torch.frombuffer(chunk, dtype=torch_dtype(got.dtype)))
    return h.hexdigest(), differs, finite


def ulp(x, dtype: str):
    """The unit in the last place of ``dtype`` at each |x| (x float64), subnormals included."""
    # keeping only the exponent bits of a float64 gives 2^floor(log2|x|) (0 for 0, inf for inf/NaN)
    power = (x.view(torch.int64) & 0x7FF0000000000000).view(torch.float64)
    d = DTYPES[dtype]
    return power.mul_(2.0 ** -d.mantissa).clamp_(min=2.0 ** (d.min_exponent - d.mantissa))


def overflow_threshold(dtype: str) -> float:
    """The magnitude from which rounding to nearest in ``dtype`` gives infinity: max + ½ ulp(max)."""
    top, bits = DTYPES[dtype].max_exponent, DTYPES[dtype].mantissa
    largest = (2.0 - 2.0**-bits) * 2.0**top
    return largest + 2.0 ** (top - bits - 1)


class _Factors:
    """The adapter's factors in float64 on the device, read once per tensor."""

    def __init__(self, device):
        self.device = device
        self.cache: dict[int, object] = {}

    def get(self, t):
        if id(t) not in self.cache:
            self.cache[id(t)] = t.load().to(device=self.device, dtype=torch.float64)
        return self.cache[id(t)]


def _low_rank_rows(d: LowRank, f: _Factors, start: int, stop: int, shape: tuple[int, ...]):
    """Rows [start, stop) of the stored tensor's s·B·A, from the factors as peft stores them, and a
    function giving |s|·|B|·|A| at chosen elements of those rows (flat indices)."""
    a, b = f.get(d.a), f.get(d.b)
    block = (stop - start, *shape[1:])
    if d.experts:
        e = d.experts
        a = a.reshape(e, -1, a.shape[-1])[start:stop]  # expert-major rows of A: (E, r, in)
        b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)[start:stop]  # expert index fastest in B: (E, out, r)
        exact = torch.einsum("eor,eri->eoi", b * d.scale, a)
        bound = torch.einsum("eor,eri->eoi", b.abs() * abs(d.scale), a.abs())
        if d.transposed:
            exact, bound = exact.transpose(1, 2), bound.transpose(1, 2)
        bound = bound.reshape(-1)
        return exact.reshape(block), lambda flat: bound[flat]
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    width = math.prod(shape[1:])
    if d.transposed:  # the stored tensor is (in × out): its rows are columns of B·A
        exact = torch.einsum("or,ri->io", b2 * d.scale, a2[:, start:stop])

        def bound(flat):
            rows, cols = flat // width + start, flat % width
            return (b2[cols].abs() * a2[:, rows].T.abs()).sum(dim=1) * abs(d.scale)
    else:
        exact = torch.einsum("or,ri->oi", b2[start:stop] * d.scale, a2)

        def bound(flat):
            rows, cols = flat // width + start, flat % width
            return (b2[rows].abs() * a2[:, cols].T.abs()).sum(dim=1) * abs(d.scale)
    return exact.reshape(block), bound


def _expected_rows(e: Entry, ops: TargetOps | None, f: _Factors, start: int, stop: int, dora_norm):
    """Rows [start, stop) of the tensor: (exact value, exact delta or None, rank, products), where
    ``products(flat)`` gives the |factor| products the bound needs at chosen elements."""
    source = ops.replace if ops is not None and ops.replace is not None else FileTensor(e.base)
    # a copy: the value is built in place, and the rows may be a read-only view of the file's bytes
    w = (source.rows(start, stop) if e.shape else source.load()).to(f.device, torch.float64, copy=True)
    delta = None  # None: no delta (a copy, a conversion, a plain replacement)
    parts = []
    rank = 0
    for d in ops.deltas if ops is not None else ():
        if isinstance(d, LowRank):
            exact, bound = _low_rank_rows(d, f, start, stop, e.shape)
            rank += d.rank
        else:
            exact = d.scale * f.get(d.t)[start:stop]
            bound = exact.abs().reshape(-1).__getitem__
        delta = exact if delta is None else delta.add_(exact)
        parts.append(bound)

    def products(flat):
        total = torch.zeros(flat.shape, dtype=torch.float64, device=w.device)
        for part in parts:
            total += part(flat)
        return total

    if delta is None:
        value = w
    elif ops.dora_magnitude is not None:
        value = w + delta
        factor = _dora_factor(ops, f, value, start, stop, dora_norm).expand_as(value).reshape(-1)
        magnitude = w.abs().reshape(-1)
        value, delta = value * factor.reshape(value.shape), delta * factor.reshape(value.shape)
        plain = products
        products = lambda flat: (magnitude[flat] + plain(flat)) * factor[flat].abs()  # noqa: E731
    else:
        value = w.add_(delta)
    if ops is not None and ops.row_indices is not None:
        rows = f.get(ops.rows)
        replaced = torch.zeros(value.shape[0], dtype=torch.bool, device=value.device)
        for j, idx in enumerate(ops.row_indices):
            if start <= idx < stop:
                value[idx - start] = rows[j]
                replaced[idx - start] = True
                if delta is not None:
                    delta[idx - start] = 0
        width = math.prod(value.shape[1:])
        unreplaced = products
        products = lambda flat: torch.where(replaced[flat // width], 0.0, unreplaced(flat))  # noqa: E731
    return value, delta, rank, products


def _dora_factor(ops: TargetOps, f: _Factors, value, start: int, stop: int, column_norm):
    """m / ‖W + ΔW‖ along each logical output row, shaped to multiply the stored rows."""
    m = f.get(ops.dora_magnitude).reshape(-1)
    if ops.dora_transposed:
        return (m / column_norm).reshape(1, -1)
    norm = torch.linalg.vector_norm(value.reshape(value.shape[0], -1), dim=1)
    return (m[start:stop] / norm).reshape(-1, *([1] * (value.dim() - 1)))


def _column_norm(e: Entry, ops: TargetOps, f: _Factors, step: int):
    """For a transposed DoRA target the norms run down the stored columns: a first pass over all rows."""
    total = None
    plain = TargetOps(ops.name, ops.module, ops.replace, ops.deltas)
    for start in range(0, e.shape[0], step):
        value = _expected_rows(e, plain, f, start, min(e.shape[0], start + step), None)[0]
        part = value.square().sum(dim=0)
        total = part if total is None else total + part
    return torch.sqrt(total)


def _not_plainly_nearest(values, stored, dtype: str):
    """Elements to measure against the bound: all but those that are plainly the nearest value.

    torch's float64 conversion rounds through float32, so it gives the nearest value of a narrower
    dtype except where the float32 value lies exactly halfway between two of its values; where the
    stored element equals that conversion elsewhere, it is within half an ulp of the exact value.
    """
    if dtype == "F64":
        return stored != values
    v32 = values.to(torch.float32)
    if dtype == "F32":
        return stored.view(torch.int32) != v32.view(torch.int32)
    if dtype == "BF16":
        halfway = low_halves(v32) == -0x8000
    else:  # F16; its subnormal range has its halfway points elsewhere: all measured
        halfway = ((v32.view(torch.int32) & 0x1FFF) == 0x1000) | (v32.abs() < 2.0**-14)
    return (v32.to(stored.dtype).view(torch.int16) != stored.view(torch.int16)) | halfway


def _nan_is_inf(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _check_elements(e: Entry, got: TensorInfo, fd, device, allow_nonfinite: bool = False) -> dict:
    """Every element of a merged or converted tensor against its exact value and rounding bound."""
    ops = e.ops
    f = _Factors(device)
    h = hashlib.new(HASH)
    n = e.shape[0] if e.shape else 1
    step = rows_per_block(e, BLOCK_BYTES)
    column_norm = None
    if ops is not None and ops.dora_magnitude is not None and ops.dora_transposed:
        column_norm = _column_norm(e, ops, f, step)
    worst = worst_of_bound = 0.0
    failed = 0
    first = None
    finite = True
    for start in range(0, n, step):
        stop = min(n, start + step)
        value, delta, rank, products = _expected_rows(e, ops, f, start, stop, column_norm)
        rb = got.row_bytes if got.shape else got.nbytes
        raw = pread_exact(fd(got.path), rb * (stop - start), got.start + rb * start)
        h.update(raw)
        stored = torch.frombuffer(raw, dtype=torch_dtype(got.dtype)).reshape(value.shape)
        finite = finite and all_finite(stored)
        stored = stored.to(device).reshape(-1)
        values = value.reshape(-1)
        full = _not_plainly_nearest(values, stored, e.dtype)
        picked = flat_nonzero(full)
        if picked.numel() < values.numel():
            worst = max(worst, 0.5)  # the nearest value of the output dtype is within half an ulp
        if picked.numel() == 0:
            continue
        v = values[picked]
        have = stored[picked].to(torch.float64)
        unit = ulp(v, e.dtype)
        # ½ ulp(v) + ½ ulp(Δ) + (r + 2)·u32·|s|·|B|·|A|, plus float64 noise (and the norm for DoRA)
        bound = products(picked) * ((rank + 2) * COMPUTE_UNIT + 2.0**-45)
        bound.add_(
            v.abs(), alpha=2.0**-45 + (4 * COMPUTE_UNIT if ops is not None and ops.dora_magnitude is not None else 0)
        )
        bound.add_(unit, alpha=0.5)
        if delta is not None:
            bound.add_(ulp(delta.reshape(-1)[picked], e.dtype), alpha=0.5)
        error = (have - v).abs_()
        # past the largest finite value by half an ulp or more, the nearest value is the infinity itself
        overflow = have.isinf() & (v.abs() >= overflow_threshold(e.dtype)) & ((have > 0) == (v > 0))
        error[overflow] = 0.0
        bad = ~(error <= bound)  # NaN fails too
        if allow_nonfinite:  # NaN where the exact value is NaN, or the very infinity it is
            same = (have == v) | (have.isnan() & v.isnan())
            bad &= ~same
            error[same] = 0.0
        worst = max(worst, _nan_is_inf(float((error / unit).max())))
        worst_of_bound = max(worst_of_bound, _nan_is_inf(float((error / bound).nan_to_num(0.0).max())))
        count = int(bad.sum())
        if count:
            failed += count
            if first is None:
                i = int(bad.nonzero()[0])
                flat = int(picked[i])
                index = [int(x) for x in torch.unravel_index(torch.tensor(flat), value.shape)]
                if value.dim():
                    index[0] += start
                first = {"index": index, "value": float(have[i]), "expected": float(v[i]), "bound": float(bound[i])}
    # float64 noise on an exact tie can read as a hair above 0.5
    result = {
        "check": "merged" if e.is_merge else "converted",
        "ok": failed == 0,
        "max_error_ulp": round(worst, 4),
        "max_error_of_bound": round(worst_of_bound, 4),
        "correctly_rounded": worst <= 0.5 + 1e-6,
        "failed_elements": failed,
        HASH: h.hexdigest(),
        "finite": finite,
    }
    if first is not None:
        result["first_failure"] = first
    return result


# ---------------------------------------------------------------------------------------------- files


def _flatten(d, prefix: str = "") -> dict:
    flat = {}
    if isinstance(d, dict):
        for k, v in d.items():
            flat.update(_flatten(v, f"{prefix}{k}."))
        if d:
            return flat
    flat[prefix[:-1]] = d
    return flat


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _same_json(a: Path, b: Path) -> bool:
    ja, jb = _read_json(a), _read_json(b)
    if ja is None or jb is None:
        return False
    strip = lambda j: {k: v for k, v in _flatten(j).items() if k.rpartition(".")[2] not in IGNORED_CONFIG_KEYS}  # noqa: E731
    return strip(ja) == strip(jb)


def _check_files(plan: Plan, out: Path) -> tuple[Check, dict]:
    failures: list[str] = []
    hashes: dict[Path, str] = {}

    def file_hash(path: Path) -> str:  # each file is read once, however many comparisons it is in
        if path not in hashes:
            hashes[path] = file_sha256(path)
        return hashes[path]

    base_dir, adapter_dir = plan.base.path, plan.adapter.folder
    config_changes: dict[str, dict] = {}
    out_config = _read_json(out / "config.json")
    if (base_dir / "config.json").is_file():
        if not isinstance(out_config, dict):
            failures.append("config.json: missing or not JSON")
        else:
            base_flat, want_flat, got_flat = _flatten(plan.base.config), _flatten(plan.config), _flatten(out_config)
            expected = {
                k for k in set(base_flat) | set(want_flat) if base_flat.get(k, _MISSING) != want_flat.get(k, _MISSING)
            }
            for key in sorted(set(base_flat) | set(want_flat) | set(got_flat)):
                base_v, want, got = (x.get(key, _MISSING) for x in (base_flat, want_flat, got_flat))
                if got == base_v and key not in expected:
                    continue
                entry = {"base": _show(base_v), "out": _show(got)}
                if got == want:
                    entry["cause"] = "expected"
                elif key.rpartition(".")[2] in IGNORED_CONFIG_KEYS:
                    entry["cause"] = "ignored (rewritten by every save)"
                else:
                    entry["cause"] = "unexpected"
                    entry["expected"] = _show(want)
                    failures.append(f"config.json: {key} is {_show(got)!r}, expected {_show(want)!r}")
                config_changes[key] = entry
    copied: dict[str, dict] = {}
    # BASE's own model card is not copied: OUT gets a card of its own
    base_files = {p.name: p for p in extra_files(base_dir) if p.name != "config.json" and p.name not in OWN_FILES}
    # a tokenizer taken from the adapter (a resized vocabulary) replaces the base's tokenizer files as a set
    tokenizer_from_adapter = any(
        (out / n).is_file()
        and (adapter_dir / n).is_file()
        and file_hash(out / n) == file_hash(adapter_dir / n)
        and not ((base_dir / n).is_file() and file_hash(base_dir / n) == file_hash(out / n))
        for n in TOKENIZER_FILES
    )
    for name, path in base_files.items():
        target = out / name
        if not target.is_file():
            if tokenizer_from_adapter and name in TOKENIZER_FILES and not (adapter_dir / name).is_file():
                copied[name] = {"from": "not in the adapter's tokenizer", HASH: None}
                continue
            failures.append(f"{name}: missing from OUT (BASE has it)")
            continue
        digest = file_hash(target)
        if digest == file_hash(path):
            origin = "BASE"
        elif (adapter_dir / name).is_file() and digest == file_hash(adapter_dir / name):
            origin = "ADAPTER"
        elif name.endswith(".json") and _same_json(target, path):
            origin = "BASE (same JSON)"
        else:
            failures.append(f"{name}: differs from BASE")
            origin = "differs"
        copied[name] = {"from": origin, HASH: digest}
    added = sorted(
        p.name
        for p in extra_files(out)
        if p.name not in base_files and p.name != "config.json" and p.name not in OWN_FILES
    )
    unexpected = sum(1 for c in config_changes.values() if c["cause"] == "unexpected")
    expected = sum(1 for c in config_changes.values() if c["cause"] == "expected")
    summary = (
        f"config.json: {expected} expected change{'s' if expected != 1 else ''}, {unexpected} unexpected; "
        f"{sum(1 for c in copied.values() if c['from'] != 'differs')} of {len(base_files)} other files accounted for"
        + (f"; {len(added)} added" if added else "")
    )
    data = {"config_changes": config_changes, "copied": copied, "added": added}
    return Check("files", not failures, summary, failures), data


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def _show(v):
    return None if v is _MISSING else v
