"""One run, from its plan to a committed OUT: OUT locked and staged, the shards written and checked, the files
beside them, the report and the model card, then the commit (or, when a check fails, the failed output kept beside
OUT, OUT as it was)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import card
from .check.readback import Found
from .check.report import REPORT_NAME, Report, verify_output
from .devices import resolve
from .dtypes import FLOAT_DTYPES
from .errors import NonFiniteError, ParityError, QuantizationError, name_list
from .memory import measure, megabytes
from .options import MergeOptions, jobs_for
from .output import (
    OutputLock,
    StagedOutput,
    check_output,
    check_space,
    clear_leftovers,
    no_room,
)
from .paths import copy_new, write_new
from .plan import Plan
from .progress import no_bar
from .resume import Journal
from .route import block_bytes_for
from .sources import extra_files
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
            "config_changes": list(self.plan.config_changes),
            "notes": list(self.plan.notes),
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


def write_run(plan: Plan, out, options: MergeOptions, *, progress, command: str, check=None,
           model_card: bool = True) -> MergeResult:
    """Write the planned output to OUT through a staged folder, check it and commit it.

    ``check(folder, plan, device, provenance, progress, found)`` makes the report (default: the parity report;
    ``found`` is what the merge's own checks found as it wrote)."""
    return Run(plan, options, resolve(options.device), progress, command, check, model_card).write(out)


@dataclass
class Run:
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
                bad = report.nonfinite_tensors
                if report.only_nonfinite and set(bad) <= {e.name for e in plan.entries if e.is_merge}:
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
        if bad and not self.options.check.allow_nonfinite:
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
        stats = with_bar(self.progress, plan.total_bytes, "merging",
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
            accept=options.check, jobs=jobs_for(options.jobs)))
        kept = sum(e.nbytes for s in plan.shards if s.name in reuse for e in s.entries)
        report = with_bar(self.progress, kept, "verifying",
                           lambda bar: check(staged.tmp, plan, dev, provenance, bar, found))
        if journal is not None:
            staged.flushed()  # the flush thread records each shard in the journal: done with it before it goes
            journal.remove()
        return stats, copied, report


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


def parity_error(report: Report, hint: str = "the failures are listed above") -> ParityError:
    named = f": {name_list(report.failed_tensors)}" if report.failed_tensors else ""
    found = report.diagnosis()
    if found is not None:
        named += f"; {found[0]}"
        hint = f"{found[1]}; {hint}"
    return ParityError(f"the parity check failed ({', '.join(report.failed_checks)}){named}", report, hint)


def with_bar(factory, total: int, label: str, work):
    bar = (factory or no_bar)(total, label)
    try:
        return work(bar)
    finally:
        bar.close()
