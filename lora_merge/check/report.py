"""The parity report: a merged folder against BASE and ADAPTER, as JSON beside the model and as a table.

Nothing here trusts the merge. Every merged element must lie within a rounding bound of its exact value W + s·B·A,
computed by the check's own code (``numbers/<format>/check.py``, ``elements``, ``grid``); untouched tensors must be
BASE's bytes. During a merge each block is checked before it is written and read back from the file right after, so
that the file is known to hold the checked bytes (``writer``); ``verify`` reads any folder back (``readback``) and
runs the same checks on what it finds, tensors matched by name, whatever the shard layout. Then names, shapes and
dtypes and the adapter's coverage (``structure``), NaN/Inf, how much of the adapter's change the stored values carry
(``survival``), config.json and the other files (``files``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..options import CheckOptions
from ..paths import is_regular
from ..plan import Entry, Plan
from ..progress import no_bar
from ..safetensors_file import file_sha256
from ..sources import BaseModel, Source, load_base
from ..version import __version__
from .files import check_files
from .readback import Found, read_back
from .structure import check_coverage, check_structure
from .survival import check_survival, diagnose
from .verdict import Check, Survival, TensorVerdict

REPORT_NAME = "merge_report.json"
ADAPTER_CONFIG_KEYS = (
    "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "modules_to_save",
    "base_model_name_or_path", "fan_in_fan_out",
    "enable_lora",  # loralib
    "fine_tune_type", "lora_parameters", "num_layers",  # mlx-lm
    "prefixes",  # kohya
)
MAX_LISTED = 20  # failures listed per check on the terminal (the JSON has them all)


@dataclass
class Report:
    out: str  # OUT as shown to the user
    checks: list[Check]
    details: dict
    tensors: dict[str, TensorVerdict] = field(default_factory=dict)
    folder: Path | None = None  # the folder that was read
    plan: Plan | None = None
    device: object = None  # where the checks computed

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def tensor_ok(self, name: str) -> bool:
        """The tensor's bytes are right, and NaN or Inf in it (if any) was accepted by the finite check."""
        verdict = self.tensors[name]
        return verdict.ok and (verdict.finite or self.check("finite").ok)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    @property
    def failed_checks(self) -> list[str]:
        """The names of the checks that failed, in the report's order."""
        return [c.name for c in self.checks if not c.ok]

    @property
    def only_nonfinite(self) -> bool:
        """Every byte is right and the only failure is NaN or Inf that was not accepted."""
        return self.failed_checks == ["finite"]

    @property
    def nonfinite_tensors(self) -> list[str]:
        """The tensors that hold NaN or Inf, accepted or not."""
        return sorted(n for n, v in self.tensors.items() if not v.finite)

    @property
    def failed_tensors(self) -> list[str]:
        return sorted(n for n in self.tensors if not self.tensor_ok(n))

    def diagnosis(self) -> tuple[str, str] | None:
        """What the tensors outside their rounding bound hold instead, and what to do (None: there are none)."""
        return _diagnosis(self.tensors, self.plan.role if self.plan is not None else "BASE")

    def to_json(self) -> dict:
        return {
            "status": "passed" if self.ok else "failed",
            "out": self.out,
            "checks": {c.name: c.to_json() for c in self.checks},
            **self.details,
            "tensors": {name: t.to_json() | {"ok": self.tensor_ok(name)} for name, t in self.tensors.items()},
        }

    def text(self) -> str:
        """The report as the JSON file holds it."""
        return json.dumps(self.to_json(), indent=2) + "\n"

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
            for w in c.warnings[:MAX_LISTED]:
                lines.append(f"  {c.name}: warning: {w}")
            if len(c.warnings) > MAX_LISTED:
                lines.append(f"  {c.name}: … and {len(c.warnings) - MAX_LISTED} more warnings (see the JSON report)")
            for f in c.failures[:MAX_LISTED]:
                lines.append(f"  {c.name}: {f}")
            if len(c.failures) > MAX_LISTED:
                lines.append(f"  {c.name}: … and {len(c.failures) - MAX_LISTED} more (see the JSON report)")
        return "\n".join(lines)


def verify_output(out: Path, plan: Plan, device, *, out_model: BaseModel | None = None, found: Found | None = None,
                  shown_as: str | None = None, provenance: dict | None = None, progress=None,
                  accept: CheckOptions = CheckOptions(), jobs: int = 1) -> Report:
    """Check the merged folder ``out`` against the plan of BASE + ADAPTER; a failed check does not raise.

    ``found``: what the merge's own checks found as it wrote (the shards they cover are not read again; any other
    shard, one kept from an interrupted run say, is read back and checked here, ``jobs`` files at once)."""
    started = time.perf_counter()
    out_model = out_model or load_out(out)
    found = found or Found()
    unread = {h.path.name for h in out_model.shards} - set(found.digests)
    if unread:
        read = read_back(out_model, plan, device, progress if progress is not None else no_bar(), unread, jobs)
        found = Found({**found.tensors, **read.tensors}, {**found.digests, **read.digests})
    structure, structure_data = check_structure(plan, out_model)
    coverage, coverage_data = check_coverage(plan)
    untouched, merged, finite = _check_tensors(plan, found.tensors, accept.allow_nonfinite)
    delta, delta_data = check_survival(plan, found.tensors, accept.min_delta_kept)
    files, files_data = check_files(plan, out, found.digests)
    checks = [structure, coverage, untouched, merged, finite, delta, files]
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
        "delta_survival": delta_data,
        "files": files_data,
        "notes": list(plan.notes),
        "provenance": prov,
    }
    return Report(shown_as or str(out), checks, details, dict(found.tensors), folder=out, plan=plan, device=device)


def _adapters_json(adapter) -> dict:
    """Where each adapter came from, its format, weight, key config and file hashes."""
    described = [
        {
            **(_source_json(a.source) if a.source else {"path": str(a.path)}),
            "format": a.format,
            **({"weight": a.weight} if a.weight != 1.0 or len(adapter.members) > 1 else {}),
            "config": {k: a.config[k] for k in ADAPTER_CONFIG_KEYS if k in a.config},
            "files": {p.name: file_sha256(p) for p in a.files if is_regular(p)},
        }
        for a in adapter.members
    ]
    return {"adapter": described[0]} if len(described) == 1 else {"adapters": described}


def load_out(out: Path) -> BaseModel:
    """The merged folder's headers, read like a base model's (any shard layout)."""
    return load_base(Source(str(out), out), role="OUT")


def _source_json(source: Source) -> dict:
    return {"spec": source.spec, "repo_id": source.repo_id, "path": str(source.path), "revision": source.revision}


# -------------------------------------------------------------------------------------------- tensors


@dataclass
class _Rounding:
    """How close a set of checked tensors came to their exact values (in ulp, or in steps of a quantized format)."""

    checked: int = 0
    correctly_rounded: int = 0
    worst: float = 0.0
    worst_of_bound: float = 0.0
    failed: int = 0  # tensors with elements outside the bound
    scale_failures: int = 0  # blocks of a quantized format without the format's scale

    def add(self, verdict: TensorVerdict) -> None:
        self.checked += 1
        self.correctly_rounded += verdict.correctly_rounded
        self.worst = max(self.worst, verdict.max_error_ulp)
        self.worst_of_bound = max(self.worst_of_bound, verdict.max_error_of_bound)
        self.failed += verdict.failed_elements > 0
        self.scale_failures += verdict.scale_failures


def _check_tensors(plan: Plan, tensors: dict[str, TensorVerdict], allow_nonfinite: bool):
    """The untouched, merged and finite checks, from each tensor's verdict."""
    same_failures, merge_failures, finite_failures = [], [], []
    identical = 0
    floats, quantized = _Rounding(), _Rounding()
    for e in plan.entries:
        verdict = tensors.get(e.name)
        if verdict is None:
            continue  # not in OUT as planned: the structure check says so
        if e.is_copy:
            identical += verdict.differs_at is None
            if verdict.differs_at is not None:
                same_failures.append(f"{e.name}: bytes differ from {plan.role}, first at byte {verdict.differs_at} "
                                     "of the tensor")
        else:
            (quantized if e.written_quantized else floats).add(verdict)
            merge_failures += _merge_failures(e, verdict)
        if not verdict.finite:
            finite_failures.append(f"{e.name}: holds NaN or Inf")
    copies = sum(1 for e in plan.entries if e.is_copy)
    untouched = Check("untouched", not same_failures, f"{identical} of {copies} tensors byte-identical to {plan.role}",
                      same_failures)
    converted = sum(1 for e in plan.entries if not e.is_copy and not e.is_merge)
    what = f"{floats.checked - converted} merged" + (f" and {converted} converted" if converted else "")
    summary = _float_summary(what, floats, plan.formula)
    if quantized.checked:
        formats = ", ".join(sorted({e.base.description for e in plan.entries if e.written_quantized}))
        within = ("every element within half a step" if not quantized.failed
                  else f"checked, {quantized.failed} with elements beyond half a step")
        summary = (f"{quantized.checked} merged tensors written as {formats}: {within} of {plan.formula} at its "
                   f"block's scale (max {readable(quantized.worst)} step), {quantized.correctly_rounded} of "
                   f"{quantized.checked} correctly rounded, "
                   + ("every changed block scaled as the format defines" if not quantized.scale_failures
                      else f"{quantized.scale_failures} blocks not scaled as the format defines")
                   + (f"; {summary}" if floats.checked else ""))
    found = _diagnosis(tensors, plan.role)
    if found is not None:
        summary += f": {found[0]}"
    merged = Check("merged", not merge_failures, summary, merge_failures)
    finite = Check(
        "finite",
        not finite_failures or allow_nonfinite,
        "no NaN or Inf" if not finite_failures else f"{len(finite_failures)} tensors hold NaN or Inf"
        + (" (allowed by --allow-nonfinite)" if allow_nonfinite else ""),
        finite_failures,
    )
    return untouched, merged, finite


def _float_summary(what: str, floats: _Rounding, formula: str) -> str:
    """The merged check's line, read once: a pass reads as one, and says whether the elements are also the nearest
    values of their dtype."""
    if floats.failed:
        return (f"{what} tensors checked, {floats.failed} outside the rounding bound of {formula} (elements up to "
                f"{readable(floats.worst)} ulp off, {readable(floats.worst_of_bound)} times the bound)")
    if floats.correctly_rounded == floats.checked:
        return (f"{what} tensors: every element is {formula} correctly rounded, the nearest value of its dtype "
                f"(max error {floats.worst:.2f} ulp)")
    off = floats.checked - floats.correctly_rounded
    return (f"{what} tensors pass: every element within the bound of {formula} that a sound merge meets, one rounded "
            f"once or computed in float32 (max {floats.worst_of_bound:.0%} of the bound); {off} of {floats.checked} are "
            f"not correctly rounded (max error {readable(floats.worst)} ulp, where W and the delta nearly cancel)")


def readable(x: float) -> str:
    """A figure a person reads at a glance: 0.73, 1,234, 2.1 million, 10^41."""
    if not math.isfinite(x):
        return str(x)
    if x < 1000:
        return f"{x:.2f}"
    if x < 1e6:
        return f"{x:,.0f}"
    if x < 1e9:
        return f"{x / 1e6:.1f} million"
    return f"10^{int(math.log10(x))}"


def _diagnosis(tensors: dict[str, TensorVerdict], role: str) -> tuple[str, str] | None:
    """``survival.diagnose`` of the tensors with elements outside their rounding bound."""
    failed = [v for v in tensors.values() if v.failed_elements and v.survival is not None]
    if not failed:
        return None
    unit = "steps" if any(v.check == "requantized" for v in failed) else "ulp"
    return diagnose(sum((v.survival for v in failed), Survival()), max(v.max_error_ulp for v in failed), unit, role)


def _merge_failures(e: Entry, v: TensorVerdict) -> list[str]:
    failures = []
    if v.on_disk_differs_at is not None:
        failures.append(f"{e.name}: the file does not hold the bytes that were checked, first "
                        f"at byte {v.on_disk_differs_at} of the tensor")
    if v.failed_elements:
        i = v.first_failure
        failures.append(f"{e.name}: {v.failed_elements} element(s) outside the rounding bound, first at {i['index']}: "
                        f"{i['value']!r}, expected {i['expected']!r} ± {i['bound']:.3g}")
    if v.scale_failures:
        b = v.first_scale_failure
        failures.append(f"{e.name}: {v.scale_failures} block(s) not scaled as {v.format} defines, "
                        f"first block {b['block']}: scale {b['scale']!r}, expected {b['expected']!r}")
    return failures
