"""The merge as a library call: resolve, plan, stream, finish. The CLI is a thin layer over ``merge``."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import card
from .adapter import combine
from .check.readback import Found
from .check.report import REPORT_NAME, Report, load_out, verify_output
from .devices import resolve
from .dtypes import DTYPES, FLOAT_DTYPES
from .errors import (
    NonFiniteError,
    ParityError,
    QuantizationError,
    WrongInputError,
    name_list,
)
from .formats import AdapterOptions
from .memory import measure, megabytes, resident_bytes
from .names import family
from .options import MergeOptions
from .output import (
    OutputLock,
    StagedOutput,
    check_output,
    check_space,
    clear_leftovers,
    no_room,
)
from .paths import copy_new, write_new
from .placement import Placement
from .plan import Plan, make_plan
from .progress import no_bar
from .quantize import Quantization
from .quantize import choose as choose_quantization
from .resume import Journal
from .route import block_bytes_for, working_set
from .sources import (
    BaseModel,
    Source,
    extra_files,
    load_base,
    looks_like_model,
    resolve_source,
)
from .tokenizer import TokenizerChoice, choose_tokenizer
from .writer import WriteStats, write_shards

log = logging.getLogger("lora_merge")

@dataclass
class MergeResult:
    plan: Plan
    out: Path | None
    device: str
    seconds: float = 0.0
    stats: WriteStats | None = None
    files_copied: list[str] = field(default_factory=list)
    report: Report | None = None

    def __str__(self) -> str:
        """The summary as the command line prints it, a few lines (the report's table is ``report.table()``)."""
        s = self.summary()
        lines = [f"merged {s['merged']} tensors, copied {s['copied']}, converted {s['converted']} -> {s['out']}"]
        if self.stats is not None:
            lines.append(f"  {megabytes(s['bytes'])} in {s['seconds']:.2f} s ({s['throughput_mb_s']} MB/s) on "
                         f"{s['device']}, every merged block checked as it was made and read back as it was written")
        if self.report is not None:
            m = s["memory"]
            lines.append(f"  peak memory {megabytes(m['peak_bytes'])}: {megabytes(m['added_bytes'])} above the "
                         f"{megabytes(m['baseline_bytes'])} the process held before the merge"
                         + (f"; {megabytes(m['gpu_peak_bytes'])} on the GPU" if m.get("gpu_peak_bytes") else ""))
            lines.append(f"  parity: {s['parity']} (report: {s['report']})")
        if s.get("shards_reused"):
            lines.append(f"  {s['shards_reused']} shard(s) kept from the interrupted run (--resume), checked like the "
                         "rest")
        lines += [f"  config: {c}" for c in s["config_changes"]]
        lines += [f"  note: {n}" for n in s["notes"]]
        return "\n".join(lines)

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
            result["shards_reused"] = self.stats.reused
        if self.report is not None:
            result["parity"] = "passed" if self.report.ok else "failed"
            result["verify_seconds"] = self.report.details["provenance"]["verify_seconds"]
            result["memory"] = self.report.details["provenance"]["memory"]
            result["delta_survival"] = self.report.details["delta_survival"]
            result["report"] = str(self.out / REPORT_NAME) if self.out else None
        return result


def resolve_device(spec: str):
    """The Device that computes (``devices.resolve``): 'auto' is CUDA when present, else the CPU."""
    return resolve(spec)


def describe_plan(plan: Plan, options: MergeOptions | None = None) -> dict:
    """The plan as data: what --dry-run prints."""
    options = options or MergeOptions()
    device = resolve_device(options.device)
    host, gpu = working_set(plan, device, options.block_bytes)
    baseline = resident_bytes()
    return {
        "base": str(plan.base.path),
        "adapter": ", ".join(f"{a.path}" + (f" (weight {a.weight:g})" if a.weight != 1.0 else "") for a in plan.adapter.members),
        "counts": plan.counts(),
        "bytes": plan.total_bytes,
        "memory": {"baseline_bytes": baseline, "estimated_added_bytes": host,
                   "estimated_peak_bytes": baseline + host, "estimated_gpu_bytes": gpu or None},
        "shards": [s.name for s in plan.shards],
        "targets": [
            {"tensor": e.name, "shard": s.name, "operation": e.note, "shape": list(e.shape), "dtype": e.dtype}
            for s in plan.shards for e in s.entries if e.is_merge or not e.is_copy
        ],
        "config_changes": plan.config_changes,
        "notes": plan.notes,
        "placed_through_layout": {a.layout: a.placed_through_layout for a in plan.adapter.members
                                  if a.placed_through_layout},
    }


Adapters = "str | Path | list[str | Path | tuple[str | Path, float]]"


def adapter_list(adapter) -> list[tuple[str, float]]:
    """ADAPTER as given to the library: one spec, or several, each a spec or a (spec, weight) pair."""
    items = adapter if isinstance(adapter, (list, tuple)) and not _is_pair(adapter) else [adapter]
    return [(str(a[0]), float(a[1])) if _is_pair(a) else (str(a), 1.0) for a in items]


def _is_pair(x) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) and not isinstance(x[1], bool)


def prepare(base: str, adapter: Adapters, options: MergeOptions | None = None, *, token: str | None = None,
            **settings) -> Plan:
    """Resolve the inputs (local folders or Hub repos) and plan the merge from headers; ``adapter``
    is one adapter, or a list of adapters (or (adapter, weight) pairs) whose deltas are summed.
    ``settings`` change single fields of ``options`` (see MergeOptions).

    Raises before anything is written.
    """
    return _prepare(base, adapter, MergeOptions.make(options, **settings), token)


def _prepare(base: str, adapter: Adapters, options: MergeOptions, token: str | None) -> Plan:
    base_model, loaded, placement = _load_inputs(base, adapter_list(adapter), token, options.adapter_options)
    for member in loaded.members:
        for mismatch in (_trained_on_other_base(member.config, base_model.source),
                         _trained_on_other_architecture(member.config, base_model.config)):
            if mismatch:
                log.warning(mismatch)
                loaded.notes.append(mismatch)
    plan = make_plan(base_model, loaded, dtype=options.dtype,
                     quantize=_quantization(options.quantize, base_model, placement))
    if options.max_shard_bytes is not None:
        from .sharding import resharded

        plan = resharded(plan, options.max_shard_bytes)
    _log_plan(plan)
    return plan


def _log_plan(plan: Plan) -> None:
    """What the plan decided, for --verbose."""
    c = plan.counts()
    log.info("plan: %d tensors merged, %d copied as bytes, %d converted to another dtype, in %d shard(s)",
             c["merged"], c["copied"], c["converted"], len(plan.shards))
    for member in plan.adapter.members:
        log.info("adapter %s: %s format, %d tensors onto %d base tensors", member.path, member.format,
                 member.tensor_count, len(member.targets))
        families: dict[str, list[str]] = {}
        for name, disk in member.mapped.items():
            if disk != [name]:
                families.setdefault(family(name), []).extend(disk)
        for kind, disk in families.items():
            log.info("  %s: placed through %s onto %d on-disk tensors (%s)", kind, member.layout, len(disk),
                     ", ".join(sorted({family(d) for d in disk})))
    converted = {(e.base.dtype, e.dtype) for e in plan.entries if not e.is_copy and e.base is not None
                 and e.base.dtype != e.dtype}
    for source, target in sorted(converted):
        log.info("dtype: %s tensors written as %s", source, target)
    for change in plan.config_changes:
        log.info("config.json: %s", change)
    for note in plan.notes:
        log.info("note: %s", note)


def _load_inputs(base: str, adapters: list[tuple[str, float]], token: str | None,
                 options: AdapterOptions | None, role: str = "BASE", each=None):
    """BASE's headers, the adapters translated onto its files (summed, with their weights) and the placement that
    did it (it knows the model in memory, if that was needed); nothing is planned yet."""
    base_source = resolve_source(base, role, token)
    sources = [(resolve_source(spec, "ADAPTER", token), weight) for spec, weight in adapters]
    check_order(base_source, [s for s, _ in sources], role)
    base_model = load_base(base_source, role)
    placement = Placement(base_model)
    loaded = []
    for source, weight in sources:
        adapter = placement.place(source.path, options)
        adapter.source, adapter.weight = source, weight
        if each is not None:
            each(adapter)
        loaded.append(adapter)
    return base_model, combine(loaded), placement


def _quantization(method: str | None, base: BaseModel, placement: Placement) -> Quantization | None:
    """What ``--quantize method`` does to BASE's tensors (a quantized BASE is refused by the plan, unasked)."""
    if method is None:
        return None
    return Quantization(method) if base.quantization is not None else choose_quantization(method, base,
                                                                                          placement.layout)


def check_order(base: Source, adapters: list[Source], role: str = "BASE") -> None:
    """Refuse an adapter given as BASE, or a model given as ADAPTER, saying which is which."""
    from .formats import adapter_marker

    marker = adapter_marker(base.path)
    if marker is not None:
        same = any(a.path == base.path for a in adapters)
        also = " and as ADAPTER" if same else ""
        raise WrongInputError(f"{role} {base.spec!r}{also} is a LoRA adapter (it holds {marker}), not a model",
                              f"the order is {role} ADAPTER OUT: {role} is the model the adapter was trained on")
    for a in adapters:
        if a.path.is_dir() and not (a.path / "adapter_config.json").is_file() and looks_like_model(a.path):
            raise WrongInputError(f"ADAPTER {a.spec!r} is a model (config.json and weights, no adapter files), "
                                  "not an adapter", f"the order is {role} ADAPTER OUT")


def _trained_on_other_base(adapter_config: dict, base) -> str | None:
    """A warning when the adapter's base_model_name_or_path names another model than BASE."""
    from .names import repo_named

    named = adapter_config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named.strip():
        return None
    named_repo = repo_named(named)
    if base.repo_id and named_repo:
        same = named_repo[0].lower() == base.repo_id.lower()
    else:  # a local folder on either side: compare the model names
        ours = base.repo_id or str(base.path)
        same = Path(named.rstrip("/")).name.lower() == Path(ours.rstrip("/")).name.lower()
        same = same or Path(named).expanduser().resolve() == base.path
    if same:
        return None
    return f"the adapter was trained on {named!r} (base_model_name_or_path) but BASE is {base.repo_id or base.spec!r}"


def _trained_on_other_architecture(adapter_config: dict, base_config: dict) -> str | None:
    """A warning when the adapter's config names the model class it was trained on (peft's auto_mapping) and BASE's
    config.json names other classes: same-shaped tensors of another architecture would merge without a word."""
    mapping = adapter_config.get("auto_mapping")
    trained = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    classes = base_config.get("architectures")
    if not isinstance(trained, str) or not isinstance(classes, list) or not classes or trained in classes:
        return None
    return (f"the adapter was trained on a {trained} (auto_mapping.base_model_class) but BASE is a "
            f"{', '.join(map(str, classes))}: check that it is the model the adapter was made for")


def finish_files(plan: Plan, folder: Path, tokenizer: TokenizerChoice) -> list[str]:
    """config.json (as planned), then the base's other non-weight files, and the adapter's tokenizer files that
    ``tokenizer`` takes instead of BASE's."""
    written = []
    try:
        write_new(folder / "config.json", json.dumps(plan.config, indent=2) + "\n")
        written.append("config.json")
        for path in extra_files(plan.base.path):
            if path.name in ("config.json", card.CARD_NAME, REPORT_NAME) or path.name in tokenizer.skipped:
                continue  # the base's model card (and a merged base's report) describe the base; OUT gets its own
            copy_new(path, folder / path.name)
            written.append(path.name)
        for name in tokenizer.taken:
            copy_new(tokenizer.folder / name, folder / name)
            written.append(name)
    except OSError as e:
        no_room(e, "the files beside the weights")
        raise
    return written


def merge(base: str, adapter: Adapters, out: str | Path, options: MergeOptions | None = None, *,
          token: str | None = None, progress=None, command: str | None = None, **settings) -> MergeResult:
    """Merge ADAPTER into BASE, write the result to OUT and check it.

    ``options`` says how (MergeOptions; ``settings`` change single fields of it: ``device="cpu"``),
    ``progress(total, label)`` makes a progress bar, ``command`` says how the merge was asked for (the
    model card and the report show it).

    Nothing exists at OUT unless the merge completes. OUT then holds merge_report.json and a model
    card (README.md). When a parity check fails, OUT stays (marked failed in its report) and ParityError
    is raised. NaN or Inf in the adapter or in a merged tensor is an error unless ``allow_nonfinite``.
    With ``resume``, the temporary output survives a failure or an interruption, and a later run with
    ``resume`` keeps the shards it finished (when their hashes and the plan still match).
    """
    options = MergeOptions.make(options, **settings)
    plan = _prepare(base, adapter, options, token)
    return _write(plan, out, options, progress=progress, command=command or _python_call("merge", base, adapter, out))


def _write(plan: Plan, out, options: MergeOptions, *, progress, command: str, check=None,
           model_card: bool = True) -> MergeResult:
    """Write the planned output to OUT through a staged folder, check it and commit it.

    ``check(folder, plan, device, provenance, progress, found)`` makes the report (default: the parity report;
    ``found`` is what the merge's own checks found as it wrote)."""
    return _Run(plan, options, resolve_device(options.device), progress, command, check, model_card).write(out)


@dataclass
class _Run:
    """One merge (or unmerge) from plan to committed OUT."""

    plan: Plan
    options: MergeOptions
    device: object  # the torch device, resolved once
    progress: object
    command: str
    check: object
    model_card: bool
    tokenizer: TokenizerChoice | None = None  # chosen before anything is written

    def write(self, out) -> MergeResult:
        plan, options, dev = self.plan, self.options, self.device
        protected = {plan.role: plan.base.path} | {
            f"ADAPTER {i + 1}" if len(plan.adapter.members) > 1 else "ADAPTER": a.path
            for i, a in enumerate(plan.adapter.members)}
        out_path = check_output(Path(out), options.overwrite, protected)
        self._refuse_nonfinite_adapter()
        self._refuse_nonfinite_scales()
        self.tokenizer = choose_tokenizer(plan.base.path, plan.adapter.folder, options.tokenizer_from,
                                          any("resized" in n for n in plan.notes))
        plan = self.plan = self.plan.with_notes(self.tokenizer.note)
        log.info("%s", self.tokenizer.note or "tokenizer: from BASE")
        log.info("computing on %s, in blocks of %.1f MiB of float64", dev,
                 block_bytes_for(dev, options.block_bytes) / (1 << 20))
        started = time.perf_counter()
        with OutputLock(out_path):
            clear_leftovers(out_path)  # what killed runs left: no other run can be writing it now
            check_output(out_path, options.overwrite, protected)  # again: a run that held the lock may have written OUT
            with StagedOutput(out_path, resume=options.resume) as staged:
                with measure(dev) as usage:
                    stats, copied, report = self._merge_and_check(staged, out_path, dev)
                prov = report.details["provenance"]
                prov["wall_seconds"] = round(time.perf_counter() - started, 3)
                prov["memory"] = usage.to_json()
                prov["command"] = self.command
                try:
                    write_new(staged.tmp / REPORT_NAME, report.text())
                    if self.model_card:
                        card.write(staged.tmp, plan, report, command=self.command,
                                   repo_id=options.push.repo_id if options.push else None)
                except OSError as e:
                    no_room(e, REPORT_NAME)
                    raise
                merged = {e.name for e in plan.entries if e.is_merge}
                bad = sorted(n for n, v in report.tensors.items() if not v.finite)
                if [c.name for c in report.checks if not c.ok] == ["finite"] and set(bad) <= merged:
                    raise NonFiniteError(  # the bytes are right, the values are not usable: nothing is kept
                        f"the merge gives NaN or Inf in {len(bad)} tensor(s): {name_list(bad)}",
                        "the adapter's scale overflows the output dtype (try --dtype float32), or the adapter is "
                        "broken; --allow-nonfinite writes it anyway")
                result = MergeResult(plan, out_path, str(dev), prov["merge_seconds"], stats,
                                     copied + [REPORT_NAME] + ([card.CARD_NAME] if self.model_card else []), report)
                if not report.ok:  # never OUT: kept beside it for a look, OUT as it was
                    kept = staged.keep_failed()
                    error = parity_error(report, f"OUT was not changed; the failed output is kept in {kept} (its "
                                                 f"report: {kept / REPORT_NAME})")
                    error.result = replace(result, out=kept)
                    raise error
                staged.commit()
        return result

    def _refuse_nonfinite_adapter(self) -> None:
        bad = nonfinite_adapter_tensors(self.plan)
        if bad and not self.options.allow_nonfinite:
            raise NonFiniteError(
                f"the adapter holds NaN or Inf in {len(bad)} tensor(s): {name_list(bad)}",
                "repair or retrain the adapter; --allow-nonfinite merges it anyway (the report says so)",
            )
        if bad:
            self.plan = self.plan.with_notes(f"merged with NaN or Inf in {len(bad)} adapter tensor(s) "
                                             f"(--allow-nonfinite): {name_list(bad)}")

    def _refuse_nonfinite_scales(self) -> None:
        """A quantized BASE whose scales hold NaN or Inf where the adapter changes it: its weights there are not
        numbers, and no merge of them is."""
        from .numbers.quantized import QuantizedTensor

        bad = sorted(name for e in self.plan.entries if e.is_merge and isinstance(e.base, QuantizedTensor)
                     for name in e.base.nonfinite_scales())
        if bad:
            raise QuantizationError(
                f"{self.plan.role}'s scales hold NaN or Inf in {len(bad)} tensor(s) the adapter changes: "
                f"{name_list(bad)}", [],
                f"{self.plan.role}'s files are damaged: download them again, or merge into the unquantized model "
                "it was made from")

    def _merge_and_check(self, staged: StagedOutput, out_path: Path, dev):
        """The shards written (each block checked as it is made, each shard flushed as it is finished), the other
        files, and the report; shards kept from an interrupted run are read back and checked."""
        plan, options = self.plan, self.options
        journal = Journal(staged.tmp, plan) if staged.resume else None
        reuse = journal.reusable(plan) if journal is not None else set()
        check_space(out_path.parent, _bytes_to_write(plan, reuse))

        def finished(shard: str, sha256: str) -> None:  # on disk before the journal says so
            staged.flush(shard, then=(lambda: journal.finished(shard, sha256)) if journal else None)

        started = time.perf_counter()
        stats = _with_bar(self.progress, plan.total_bytes, "merging",
                          lambda bar: write_shards(plan, staged.tmp, dev, options, bar, reuse=reuse, on_shard=finished))
        copied = finish_files(plan, staged.tmp, self.tokenizer)
        provenance = {
            "device": str(dev),
            "dtype": options.dtype or "as BASE",
            "options": options.to_json(),
            "merge_seconds": round(time.perf_counter() - started, 3),
            "shards_reused": sorted(reuse),
        }
        found = Found(stats.tensors, stats.digests)  # checked as written; kept shards are read back
        check = self.check or (lambda folder, plan, dev, provenance, bar, found: verify_output(
            folder, plan, dev, found=found, shown_as=str(out_path), provenance=provenance, progress=bar,
            acceptance=options.acceptance))
        kept = sum(e.nbytes for s in plan.shards if s.name in reuse for e in s.entries)
        report = _with_bar(self.progress, kept, "verifying",
                           lambda bar: check(staged.tmp, plan, dev, provenance, bar, found))
        if journal is not None:
            staged.flushed()  # the flush thread records each shard in the journal: done with it before it goes
            journal.remove()
        return stats, copied, report


def unmerge(merged: str, adapter: Adapters, out: str | Path, options: MergeOptions | None = None, *,
            original: str | None = None, token: str | None = None, progress=None, command: str | None = None,
            **settings) -> MergeResult:
    """Subtract ADAPTER's delta from the merged model MERGED and write the base back to OUT.

    The report (OUT/merge_report.json) checks OUT against MERGED minus the adapter like a merge's, and
    adds the round trip: elements certainly recovered and, when ``original`` (the base model the merge
    started from) is given, elements bit-identical to it and the worst error in ulp.
    """
    from .unmerge import add_round_trip, refuse_irreversible

    options = MergeOptions.make(options, **settings)
    if options.dtype or options.quantize or options.resume or options.allow_nonfinite or options.push:
        raise ValueError("unmerge writes MERGED's dtypes, all at once, with finite values only, and pushes nothing")
    specs = [(spec, -weight) for spec, weight in adapter_list(adapter)]
    merged_model, loaded, _ = _load_inputs(merged, specs, token, options.adapter_options, role="MERGED",
                                           each=refuse_irreversible)
    if merged_model.quantization is not None:
        raise QuantizationError(
            f"MERGED is stored quantized ({merged_model.quantization.description}): its merged weights were rounded "
            "to that format, so subtracting the adapter cannot give back BASE's", [],
            "unmerge works on a merge written in a float dtype (without --quantize; from a quantized BASE, with "
            "--dtype); otherwise keep BASE, which the merged model cannot give back")
    plan = make_plan(merged_model, loaded, role="MERGED").with_notes("unmerged: the adapter's delta was subtracted")
    original_model = load_base(resolve_source(original, "BASE")) if original is not None else None

    def check(folder, plan, dev, provenance, bar, found):
        report = verify_output(folder, plan, dev, found=found, provenance=provenance, progress=bar,
                               shown_as=str(Path(out).expanduser().resolve()))
        return add_round_trip(report, folder, plan, dev, original_model)

    return _write(plan, out, options, progress=progress, check=check, model_card=False,
                  command=command or _python_call("unmerge", merged, adapter, out))


def nonfinite_adapter_tensors(plan: Plan) -> list[str]:
    """Names of the adapter tensors the merge uses that hold NaN or Inf (each stored tensor read once;
    adapters are small)."""
    from .check.readback import finite
    from .reader import raw_bytes

    stored = {id(t.stored): t.stored for op in plan.adapter.targets.values() for t in op.tensors()}
    return sorted({t.name for t in stored.values() if t.dtype in FLOAT_DTYPES and not finite(raw_bytes(t), t.dtype)})


def _bytes_to_write(plan: Plan, reuse: set[str]) -> int:
    """Bytes the output still needs on disk: the shards not kept from an earlier run and the other files."""
    shards = sum(e.nbytes for s in plan.shards if s.name not in reuse for e in s.entries)
    others = sum(p.stat().st_size for p in extra_files(plan.base.path))
    return shards + others + 1024 * 1024  # headers, index, report and card


def _python_call(function: str, base, adapter, out) -> str:
    return f"lora_merge.{function}({str(base)!r}, {str(adapter)!r}, {str(out)!r})"


def verify(out: str | Path, base: str, adapter: Adapters, options: MergeOptions | None = None, *,
           token: str | None = None, progress=None, **settings) -> Report:
    """Check a merged folder (written by any tool, any shard layout) against BASE and ADAPTER(s)."""
    options = MergeOptions.make(options, **settings)
    out_src = resolve_source(str(out), "OUT")
    out_model = load_out(out_src.path)
    base_model, loaded, placement = _load_inputs(base, adapter_list(adapter), token, options.adapter_options)
    quantize = "fp8" if base_model.quantization is None and out_model.quantization is not None \
        and out_model.quantization.method == "fp8" else None  # written with --quantize fp8
    plan = make_plan(base_model, loaded, dtype=None if quantize else _output_dtype(base_model, out_model),
                     quantize=_quantization(quantize, base_model, placement))
    dev = resolve_device(options.device)
    log.info("checking on %s", dev)
    return _with_bar(progress, plan.total_bytes, "verifying",
                     lambda bar: verify_output(out_src.path, plan, dev, out_model=out_model, progress=bar,
                                               acceptance=options.acceptance))


def _output_dtype(base_model, out_model) -> str | None:
    """The --dtype a merged folder was written with: one float dtype throughout that BASE does not have, or
    for a quantized BASE written dequantized, the dtype of its dequantized tensors."""
    quant = base_model.quantization
    if quant is not None and out_model.quantization is None:
        found = {out_model.tensors[n].dtype for n in quant.tensors if n in out_model.tensors}
        single = next(iter(found)) if len(found) == 1 else None
        return DTYPES[single].config_name if single in FLOAT_DTYPES else None
    out_floats = {i.dtype for i in out_model.tensors.values() if i.dtype in FLOAT_DTYPES}
    base_floats = {i.dtype for i in base_model.tensors.values() if i.dtype in FLOAT_DTYPES}
    if len(out_floats) == 1 and out_floats != base_floats:
        return DTYPES[next(iter(out_floats))].config_name
    return None


def parity_error(report: Report, hint: str = "the failures are listed above") -> ParityError:
    checks = [c.name for c in report.checks if not c.ok]
    named = f": {name_list(report.failed_tensors)}" if report.failed_tensors else ""
    found = report.diagnosis()
    if found is not None:
        named += f"; {found[0]}"
        hint = f"{found[1]}; {hint}"
    return ParityError(f"the parity check failed ({', '.join(checks)}){named}", report, hint)


def _with_bar(factory, total: int, label: str, work):
    bar = (factory or no_bar)(total, label)
    try:
        return work(bar)
    finally:
        bar.close()
