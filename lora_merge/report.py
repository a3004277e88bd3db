"""The parity report: a merged folder against BASE and ADAPTER.

Nothing here trusts the merge. Every merged element must lie within a rounding bound of its exact
value W + s·B·A, computed by the check's own code (``exact``); untouched tensors must be BASE's bytes.
During a merge each block is checked before it is written and read back from the file right after,
so that the file is known to hold the checked bytes (``writer``); ``verify`` reads any folder back and
runs the same element checks on what it finds, tensors matched by name, whatever the shard layout.
Then names, shapes and dtypes, the adapter's coverage, NaN/Inf, config.json and the other files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import __version__
from .dtypes import DTYPES, torch_dtype
from .exact import CHECK_BLOCK_BYTES, ElementCheck, rows_per_block
from .paths import read_text
from .plan import Entry, Plan
from .progress import no_bar
from .quant import QuantizedTensor
from .quant.check import GridCheck
from .safetensors_file import TensorInfo, file_sha256, pread_exact
from .sources import TOKENIZER_FILES, BaseModel, Source, extra_files, load_base

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
CHUNK_BYTES = 4 * 1024 * 1024  # copied tensors are read and compared in pieces of this size
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
    device: object = None  # where the checks computed

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
            for f in c.failures[:MAX_LISTED]:
                lines.append(f"  {c.name}: {f}")
            if len(c.failures) > MAX_LISTED:
                lines.append(f"  {c.name}: … and {len(c.failures) - MAX_LISTED} more (see the JSON report)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- entry


@dataclass
class Found:
    """What the checks found in the weights files: per tensor, and each weights file's sha256."""

    tensors: dict[str, dict] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)


def verify_output(
    out: Path,
    plan: Plan,
    device,
    *,
    out_model: BaseModel | None = None,
    found: Found | None = None,
    shown_as: str | None = None,
    provenance: dict | None = None,
    progress=None,
    allow_nonfinite: bool = False,
) -> Report:
    """Check the merged folder ``out`` against the plan of BASE + ADAPTER; a failed check does not raise.

    ``found``: what the merge's own checks found as it wrote (the shards they cover are not read again;
    any other shard, one kept from an interrupted run say, is read back and checked here)."""
    started = time.perf_counter()
    out_model = out_model or load_out(out)
    found = found or Found()
    unread = {h.path.name for h in out_model.shards} - set(found.digests)
    if unread:
        read = read_back(out_model, plan, device, progress if progress is not None else no_bar(), allow_nonfinite,
                         unread)
        found = Found({**found.tensors, **read.tensors}, {**found.digests, **read.digests})
    structure, structure_data = _check_structure(plan, out_model)
    coverage, coverage_data = _check_coverage(plan)
    untouched, merged, finite = _check_tensors(plan, out_model, found.tensors, allow_nonfinite)
    files, files_data = _check_files(plan, out, found.digests)
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
        "tensors": found.tensors,
        "files": files_data,
        "notes": list(plan.notes),
        "provenance": prov,
    }
    return Report(shown_as or str(out), checks, details, folder=out, plan=plan, device=device)


def read_back(out_model: BaseModel, plan: Plan, device, progress, allow_nonfinite: bool = False,
              only: set[str] | None = None) -> Found:
    """Read the weights files of a folder front to back (``only``: these files), hashing each, checking
    every tensor the plan has: copies byte for byte against BASE, the others element by element."""
    entries = {e.name: e for e in plan.entries}
    parts = {p.name: e for e in plan.entries if e.requantized for p in e.base.parts}
    found = Found()
    for header in out_model.shards:
        if only is not None and header.path.name not in only:
            continue
        digest = hashlib.sha256()
        fd = os.open(header.path, os.O_RDONLY)
        try:
            at = 0
            for info in sorted(header.tensors.values(), key=lambda i: i.start):
                _hash_range(fd, digest, at, info.start)  # the header (and any gap)
                e = entries.get(info.name)
                if info.name in parts:  # a quantized format's codes or scales: checked all together, once
                    _hash_range(fd, digest, info.start, info.start + info.nbytes)
                    e = parts[info.name]
                    if info.name == e.base.parts[0].name:
                        result = _check_requantized(out_model, e, device)
                        if result is not None:
                            found.tensors[e.name] = result
                elif e is None or e.shape != info.shape or e.dtype != info.dtype:  # the structure check says so
                    _hash_range(fd, digest, info.start, info.start + info.nbytes)
                elif e.is_copy:
                    found.tensors[e.name] = compare_copy(fd, info, e.base, digest)
                else:
                    found.tensors[e.name] = _check_stored(fd, info, e, device, allow_nonfinite, digest)
                at = info.start + info.nbytes
                progress.update(info.nbytes)
            _hash_range(fd, digest, at, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        found.digests[header.path.name] = digest.hexdigest()
    return found


def _hash_range(fd: int, digest, start: int, stop: int) -> None:
    for at in range(start, stop, CHUNK_BYTES):
        digest.update(pread_exact(fd, min(CHUNK_BYTES, stop - at), at))


def _check_stored(fd: int, got: TensorInfo, e: Entry, device, allow_nonfinite: bool, digest) -> dict:
    """Every element of a merged or converted tensor, as stored, against its exact value."""
    import torch

    check = ElementCheck(e, device, allow_nonfinite)
    n = e.shape[0] if e.shape else 1
    step = rows_per_block(e, CHECK_BLOCK_BYTES)
    row = got.row_bytes if got.shape else got.nbytes
    for start in range(0, n, step):
        stop = min(n, start + step)
        raw = pread_exact(fd, row * (stop - start), got.start + row * start)
        digest.update(raw)
        shape = (stop - start, *e.shape[1:]) if e.shape else ()
        check.block(start, stop, torch.frombuffer(raw, dtype=torch_dtype(got.dtype)).reshape(shape))
    return check.result()


def _check_requantized(out_model: BaseModel, e: Entry, device) -> dict | None:
    """A tensor stored in BASE's quantized format, its parts read from OUT (None: OUT does not store them as
    planned; the structure check says so)."""
    got = [out_model.stored.get(p.name) for p in e.base.parts]
    if any(g is None or (g.dtype, g.shape) != (p.dtype, p.shape) for g, p in zip(got, e.base.parts)):
        return None
    stored = replace(e.base, parts=tuple(got))
    check = GridCheck(e, device)
    n = e.shape[0]
    step = rows_per_block(e, CHECK_BLOCK_BYTES)
    for start in range(0, n, step):
        check.block(start, min(n, start + step), stored.read(start, min(n, start + step)))
    return check.result()


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
    expected = {name: (dtype, shape) for e in plan.entries for name, dtype, shape in e.stored}
    actual = out_model.stored
    base = plan.base.tensors
    differences = []
    for e in plan.entries:
        if e.name not in base and e.name not in plan.base.stored:
            differences.append({"tensor": e.name, "what": f"not stored in {plan.role}", "cause": f"untied from {e.base.name}"})
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
            dequantized = isinstance(e.base, QuantizedTensor)
            differences.append(
                {"tensor": e.name, "what": f"dtype {e.base.dtype} -> {e.dtype}",
                 "cause": f"--dtype: dequantized from {e.base.description}" if dequantized else "--dtype conversion"}
            )
    failures = []
    for name, (dtype, shape) in expected.items():
        got = actual.get(name)
        if got is None:
            failures.append(f"{name}: missing from OUT")
            continue
        if got.shape != shape:
            failures.append(f"{name}: shape {list(got.shape)}, expected {list(shape)}")
        if got.dtype != dtype:
            failures.append(f"{name}: dtype {got.dtype}, expected {dtype}")
    failures += [
        f"{name}: in OUT but neither in {plan.role} nor made by the adapter" for name in sorted(set(actual) - set(expected))
    ]
    out_counts, base_counts = _count(actual.values()), _count(plan.base.stored.values())
    summary = (
        f"{out_counts['tensors']} tensors, {out_counts['parameters']:,} parameters, {out_counts['bytes'] / 1e6:,.1f} MB; "
        + (
            f"names, shapes and dtypes as {plan.role}"
            if not failures
            else f"{len(failures)} differences from what {plan.role} and ADAPTER make"
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


@dataclass
class _Rounding:
    """How close a set of checked tensors came to their exact values (in ulp, or in steps of a quantized format)."""

    checked: int = 0
    correctly_rounded: int = 0
    worst: float = 0.0
    worst_of_bound: float = 0.0
    failed: int = 0  # tensors with elements outside the bound
    scale_failures: int = 0  # blocks of a quantized format without the format's scale

    def add(self, result: dict) -> None:
        self.checked += 1
        self.correctly_rounded += result["correctly_rounded"]
        self.worst = max(self.worst, result["max_error_ulp"])
        self.worst_of_bound = max(self.worst_of_bound, result["max_error_of_bound"])
        self.failed += result["failed_elements"] > 0
        self.scale_failures += result.get("scale_failures", 0)

    def verdict(self, within: str = "within the rounding bound", beyond: str = "outside the rounding bound") -> str:
        """How the tensors stand against their bound, in words that are true either way."""
        return within if not self.failed else f"checked, {self.failed} {beyond}"


def _check_tensors(plan: Plan, out_model: BaseModel, tensors: dict, allow_nonfinite: bool):
    """The untouched, merged and finite checks, from what was found for each tensor."""
    same_failures, merge_failures, finite_failures = [], [], []
    identical = 0
    dense, requantized = _Rounding(), _Rounding()
    for e in plan.entries:
        result = tensors.get(e.name)
        if result is None:
            continue  # not in OUT as planned: the structure check says so
        if e.is_copy:
            identical += result["ok"]
            if not result["ok"]:
                same_failures.append(f"{e.name}: bytes differ from {plan.role}, first at byte {result['differs_at']} "
                                     "of the tensor")
        else:
            (requantized if e.requantized else dense).add(result)
            merge_failures += _merge_failures(e, result)
        if not result["finite"]:
            result["ok"] = result["ok"] and allow_nonfinite
            finite_failures.append(f"{e.name}: holds NaN or Inf")
    copies = sum(1 for e in plan.entries if e.is_copy)
    untouched = Check(
        "untouched",
        not same_failures,
        f"{identical} of {copies} tensors byte-identical to {plan.role}",
        same_failures,
    )
    converted = sum(1 for e in plan.entries if not e.is_copy and not e.is_merge)
    what = f"{dense.checked - converted} merged" + (f" and {converted} converted" if converted else "")
    summary = _dense_summary(what, dense, plan.formula)
    if requantized.checked:
        formats = ", ".join(sorted({e.base.description for e in plan.entries if e.requantized}))
        summary = (f"{requantized.checked} merged tensors written as {formats}: "
                   f"{requantized.verdict('every element within half a step', 'with elements beyond half a step')} of "
                   f"{plan.formula} at its block's scale (max {requantized.worst:.2f} step), "
                   f"{requantized.correctly_rounded} of {requantized.checked} correctly rounded, "
                   + ("every changed block scaled as the format defines" if not requantized.scale_failures
                      else f"{requantized.scale_failures} blocks not scaled as the format defines")
                   + (f"; {summary}" if dense.checked else ""))
    merged = Check("merged", not merge_failures, summary, merge_failures)
    finite = Check(
        "finite",
        not finite_failures or allow_nonfinite,
        "no NaN or Inf" if not finite_failures else f"{len(finite_failures)} tensors hold NaN or Inf"
        + (" (allowed by --allow-nonfinite)" if allow_nonfinite else ""),
        finite_failures,
    )
    return untouched, merged, finite


def _dense_summary(what: str, dense: _Rounding, formula: str) -> str:
    """The merged check's line, read once: a pass reads as one, and says whether the elements are also the nearest
    values of their dtype."""
    if dense.failed:
        return (f"{what} tensors checked, {dense.failed} outside the rounding bound of {formula} (their worst element "
                f"at {dense.worst_of_bound:.0%} of it); max error {dense.worst:,.2f} ulp")
    if dense.correctly_rounded == dense.checked:
        return (f"{what} tensors: every element is {formula} correctly rounded, the nearest value of its dtype "
                f"(max error {dense.worst:.2f} ulp)")
    off = dense.checked - dense.correctly_rounded
    return (f"{what} tensors pass: every element within the bound of {formula} that a sound merge meets, one rounded "
            f"once or computed in float32 (max {dense.worst_of_bound:.0%} of the bound); {off} of {dense.checked} are "
            f"not correctly rounded (max error {dense.worst:,.2f} ulp, where W and the delta nearly cancel)")


def _merge_failures(e: Entry, result: dict) -> list[str]:
    failures = []
    if result.get("on_disk_differs_at") is not None:
        failures.append(f"{e.name}: the file does not hold the bytes that were checked, first "
                        f"at byte {result['on_disk_differs_at']} of the tensor")
    if result["failed_elements"]:
        i = result["first_failure"]
        failures.append(
            f"{e.name}: {result['failed_elements']} element(s) outside the rounding bound, "
            f"first at {i['index']}: {i['value']!r}, expected {i['expected']!r} ± {i['bound']:.3g}"
        )
    if result.get("scale_failures"):
        b = result["first_scale_failure"]
        failures.append(f"{e.name}: {result['scale_failures']} block(s) not scaled as {result['format']} defines, "
                        f"first block {b['block']}: scale {b['scale']!r}, expected {b['expected']!r}")
    return failures


def compare_copy(out_fd: int, got: TensorInfo, base: TensorInfo, digest=None) -> dict:
    """A copied tensor in OUT against BASE's: the first byte where it differs (None: identical), finiteness."""
    import torch

    finite, differs = True, None
    d = DTYPES[got.dtype]
    piece = max(d.size, CHUNK_BYTES // d.size * d.size)  # whole elements, to be viewed as numbers
    base_fd = os.open(base.path, os.O_RDONLY)
    try:
        for offset in range(0, got.nbytes, piece):
            n = min(piece, got.nbytes - offset)
            chunk = pread_exact(out_fd, n, got.start + offset)
            if digest is not None:
                digest.update(chunk)
            if differs is None:
                theirs = pread_exact(base_fd, n, base.start + offset)
                if chunk != theirs:
                    differs = offset + next(i for i in range(n) if chunk[i] != theirs[i])
            if d.computed and finite:
                low, high = torch.aminmax(torch.frombuffer(chunk, dtype=torch_dtype(got.dtype)))
                finite = math.isfinite(float(low)) and math.isfinite(float(high))
    finally:
        os.close(base_fd)
    return {"check": "identical", "ok": differs is None, "differs_at": differs, "finite": finite}


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
        return json.loads(read_text(path))
    except (OSError, ValueError):
        return None


def _same_json(a: Path, b: Path) -> bool:
    ja, jb = _read_json(a), _read_json(b)
    if ja is None or jb is None:
        return False
    strip = lambda j: {k: v for k, v in _flatten(j).items() if k.rpartition(".")[2] not in IGNORED_CONFIG_KEYS}  # noqa: E731
    return strip(ja) == strip(jb)


def _check_files(plan: Plan, out: Path, weights: dict[str, str]) -> tuple[Check, dict]:
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
        + f"; {len(weights)} weights file{'s' if len(weights) != 1 else ''} hashed ({HASH})"
    )
    data = {"config_changes": config_changes, "copied": copied, "added": added,
            "weights": {name: {HASH: digest} for name, digest in sorted(weights.items())}}
    return Check("files", not failures, summary, failures), data


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def _show(v):
    return None if v is _MISSING else v
