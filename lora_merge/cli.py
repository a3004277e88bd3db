"""The command line: parse options, call the library, print results. Nothing else lives here."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import click

from .errors import LoraMergeError, OutputError, ParityError
from .memory import megabytes
from .version import __version__

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
DEBUG_ENV = "LORA_MERGE_DEBUG"


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that the temporary output is cleaned up on the way out."""


class DefaultGroup(click.Group):
    """`lora-merge BASE ADAPTER OUT` runs the `merge` subcommand; other subcommands keep their names."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            self._refuse_misspelt_command(ctx, args[0])
            args = ["merge", *args]
        return super().parse_args(ctx, args)

    def _refuse_misspelt_command(self, ctx, word: str) -> None:
        """A first word that is no path and nearly a subcommand's name is a typo, not BASE."""
        import difflib

        if word.startswith("-") or "/" in word or Path(word).expanduser().exists():
            return
        close = difflib.get_close_matches(word, list(self.commands), n=1, cutoff=0.7)
        if close:
            raise click.UsageError(f"no command {word!r} (and no such path); did you mean {close[0]!r}?", ctx)

    def invoke(self, ctx):
        debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if _main_thread() else None
        try:
            return super().invoke(ctx)
        except LoraMergeError as e:
            if debug:
                raise
            # about OUT itself (it exists, is locked, has no room): its own hint, never "run again with --resume"
            _fail(str(e), e.hint if isinstance(e, OutputError) else _kept_hint(ctx) or e.hint)
        except (KeyboardInterrupt, Terminated):
            kept = _kept(ctx)
            what = f"the finished shards are kept in {kept}" if kept else "the temporary output was removed"
            _fail(f"interrupted; {what} and OUT was not changed", _kept_hint(ctx), code=130)
        except OSError as e:
            if debug:
                raise
            where = f" ({e.filename})" if e.filename else ""
            full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
            _fail(f"{e.strerror or e}{where}", _kept_hint(ctx) or ("free some disk space or choose another OUT" if full else None))
        except MemoryError:
            _fail("out of memory", "use a smaller --block-mb")
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _kept(ctx) -> Path | None:
    """The folder where a failed --resume run kept its finished shards, if it did."""
    from .output import partial_folder

    out = ctx.meta.get("resumable_out")
    return partial_folder(out) if out is not None and partial_folder(out).is_dir() else None


def _kept_hint(ctx) -> str | None:
    kept = _kept(ctx)
    return f"run the same command again (with --resume) to continue from {kept}" if kept else None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_terminated(signum, frame):
    raise Terminated()


def _fail(message: str, hint: str | None = None, code: int = 1):
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)
    sys.exit(code)


def token_option(f):
    return click.option("--token", envvar="HF_TOKEN", default=None, show_envvar=True,
                        help="Hugging Face token. Default: HF_TOKEN, else the stored login.")(f)


def push_options(f):
    from .flags import add_options
    from .options import PushOptions

    return add_options(PushOptions, ("private", "revision", "create_pr", "commit_message"))(f)


def parse_adapter(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:WEIGHT`` (``./a:0.5``); a path that exists as typed is never split."""
    import math

    if Path(text).expanduser().exists() or ":" not in text:
        return text, 1.0
    spec, _, weight = text.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not spec or not math.isfinite(value):
        where = f"no path {text!r} exists, so {weight!r} after the last ':' is the weight, and it" if spec else \
            f"{text!r}: the weight after ':'"
        raise click.BadParameter(f"{where} must be a finite number (ADAPTER[:WEIGHT], e.g. ./adapter:0.5)",
                                 param_hint="--adapter")
    return spec, value


def merge_inputs(paths: tuple[str, ...], adapters: tuple[str, ...]) -> tuple[str, list[tuple[str, float]], str]:
    """BASE ADAPTER OUT, or BASE OUT with one or more --adapter."""
    if adapters:
        if len(paths) != 2:
            raise click.UsageError("with --adapter, give BASE and OUT only: lora-merge BASE OUT --adapter A1 --adapter A2:0.5")
        return paths[0], [parse_adapter(a) for a in adapters], paths[1]
    if len(paths) != 3:
        raise click.UsageError("give BASE ADAPTER OUT (or BASE OUT with --adapter, once per adapter)")
    return paths[0], [(paths[1], 1.0)], paths[2]


def _check_push_options(push) -> None:
    repo_id = push.repo_id
    if not repo_id and (push.private or push.revision or push.create_pr or push.commit_message):
        raise click.UsageError("--private, --revision, --create-pr and --commit-message need --push-to-hub")
    if push.create_pr and push.revision:
        raise click.UsageError("--create-pr opens a pull request against the main branch; leave out --revision")
    if repo_id:
        from .names import parse_spec

        parsed = parse_spec(repo_id)
        if parsed is None or parsed[1] is not None:
            raise click.BadParameter(f"{repo_id!r} is not a Hub repo id (org/name)", param_hint="REPO_ID")


def _quiet_hub() -> None:
    """huggingface_hub's download and upload bars follow --quiet too."""
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def _command_line() -> str:
    """The command as typed, for the model card and the report; a token is never written down."""
    import shlex

    shown = []
    for arg in sys.argv[1:]:
        if shown and shown[-1] == "--token":
            arg = "***"
        elif arg.startswith("--token="):
            arg = "--token=***"
        shown.append(arg)
    return "lora-merge " + shlex.join(shown)


@click.group(cls=DefaultGroup, context_settings=CONTEXT, invoke_without_command=False)
@click.version_option(__version__, "--version", prog_name="lora-merge")
def cli():
    """Fold a LoRA adapter into its base model and write the merged checkpoint.

    \b
        lora-merge BASE ADAPTER OUT [OPTIONS]

    BASE is a model folder with safetensors weights; ADAPTER a PEFT or mlx-lm adapter folder, or a
    loralib or kohya tensor file. The base is streamed one tensor at a time: untouched tensors are
    copied as bytes, each merged element is the exact W + s·B·A rounded once to the output dtype. OUT
    gets the base's shard layout, config, tokenizer and other files.

    \b
    Examples:
        lora-merge ./Qwen3-0.6B ./my-adapter ./merged
        lora-merge ./Qwen3-0.6B ./my-adapter ./merged --dtype bfloat16 --device cuda
        lora-merge ./Qwen3-0.6B ./my-adapter ./merged --dry-run
        lora-merge ./Qwen3-0.6B ./merged --adapter ./style --adapter ./task:0.5
        lora-merge unmerge ./merged ./my-adapter ./base-again

    Every merge ends with a parity report (OUT/merge_report.json); `lora-merge verify OUT --base BASE
    --adapter ADAPTER` checks any merged folder the same way.

    Run `lora-merge merge --help`, `lora-merge verify --help` or `lora-merge unmerge --help` for
    every option. Set LORA_MERGE_DEBUG=1 to see tracebacks.
    """


def verify_options(f):
    from .flags import add_options
    from .options import VerifyOptions

    return add_options(VerifyOptions)(f)


def unmerge_options(f):
    from .flags import add_options
    from .options import UnmergeOptions

    return add_options(UnmergeOptions)(f)


def merge_options(f):
    """The options of a merge: each field of MergeOptions (its flag in ``flags.FLAGS``), then the command's own."""
    from .flags import add_options
    from .options import MergeOptions, PushOptions

    f = add_options(PushOptions)(f)
    f = token_option(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Log what is decided along the way.")(f)
    f = click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the summary (or the plan) as JSON on stdout.")(f)
    f = click.option("--dry-run", is_flag=True, help="Print the plan (targets, counts, bytes, peak memory) and "
                     "write nothing.")(f)
    return add_options(MergeOptions)(f)


@cli.command("merge", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, metavar="BASE [ADAPTER] OUT")
@click.option("--adapter", "adapters", multiple=True, metavar="ADAPTER[:WEIGHT]",
              help="An adapter to merge, with an optional weight (default 1); repeat it to sum several adapters "
                   "in one pass. Replaces the ADAPTER argument.")
@merge_options
def merge_command(paths, adapters, dry_run, as_json, quiet, verbose, token, **given):
    """Merge ADAPTER into BASE and write the merged model to OUT.

    \b
    Examples:
        lora-merge ./base ./adapter ./merged
        lora-merge merge ./base ./adapter ./merged --dtype float16 --overwrite
        lora-merge ./base ./merged --adapter ./style --adapter ./task:0.5
        lora-merge ./gpt2 ./lora.pt ./merged --lora-alpha 16 --enable-lora q,v

    ADAPTER is a PEFT or mlx-lm adapter folder, or one loralib or kohya tensor file (the format is
    detected; --adapter-format names it).

    OUT must not exist or be empty (else --overwrite). The output is written beside OUT under a
    temporary name and renamed at the end, so an error or Ctrl-C leaves OUT as it was.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    from . import pipeline
    from .flags import take
    from .options import MergeOptions, PushOptions
    from .progress import byte_bar

    push = take(PushOptions, given)
    _check_push_options(push)
    push = push if push.repo_id else None
    base, adapter, out = merge_inputs(paths, adapters)
    options = take(MergeOptions, given, push=push)
    if options.quantize and options.dtype:
        raise click.UsageError("--quantize and --dtype both say what OUT's weights are: give one")
    if options.resume:
        click.get_current_context().meta["resumable_out"] = Path(os.path.abspath(Path(out).expanduser()))
    if quiet:
        _quiet_hub()
    if dry_run:
        plan = pipeline.prepare(base, adapter, options, token=token)
        described = pipeline.describe_plan(plan, options)
        click.echo(json.dumps(described, indent=2) if as_json else _format_plan(described, every=verbose))
        return
    if push:
        from . import hub

        hub.whoami(token)  # before a long merge: logged in, with a token that can write
    try:
        result = pipeline.merge(base, adapter, out, options, token=token, command=_command_line(),
                                progress=lambda total, label: byte_bar(total, label, not quiet))
    except ParityError as e:  # the summary (of the output kept beside OUT), or the table of what failed
        click.echo(json.dumps(e.result.summary(), indent=2) if as_json and e.result else e.report.table())
        raise
    summary = result.summary()
    if push:
        from . import hub

        summary["pushed_to"] = hub.push(result.out, push, token=token)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif not quiet:
        click.echo(result)
        click.echo(result.report.table())
    if push and not as_json:
        click.echo(f"pushed to {summary['pushed_to']}")


@cli.command("push", context_settings=CONTEXT)
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.argument("repo_id")
@token_option
@push_options
def push_command(out, repo_id, token, **given):
    """Upload a merged folder OUT to the Hub repo REPO_ID (created if needed), e.g. to retry a push.

    \b
    Examples:
        lora-merge push ./merged me/qwen3-0.6b-merged
        lora-merge push ./merged me/qwen3-0.6b-merged --revision v2 --commit-message "retrain"

    OUT must hold a merge_report.json whose parity checks passed.
    """
    from . import hub
    from .check.report import REPORT_NAME
    from .flags import take
    from .options import PushOptions
    from .output import report_status

    push = take(PushOptions, given, repo_id=repo_id)
    _check_push_options(push)
    folder = Path(out)
    report_path = folder / REPORT_NAME
    if not folder.is_dir():
        raise OutputError(f"OUT {out!r} is not a folder", "pass the folder lora-merge wrote")
    status = report_status(folder)
    if status != "passed":
        what = "failed its parity checks" if status == "failed" else f"has no readable {REPORT_NAME}"
        raise OutputError(
            f"OUT {out!r} {what}; only a checked merge is pushed",
            f"merge again, or check it: lora-merge verify {out} --base BASE --adapter ADAPTER --report {report_path}",
        )
    hub.whoami(token)
    url = hub.push(folder, push, token=token)
    click.echo(f"pushed to {url}")


@cli.command("verify", context_settings=CONTEXT)
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--base", required=True, help="The base model the merge started from.")
@click.option("--adapter", "adapters", required=True, multiple=True, metavar="ADAPTER[:WEIGHT]",
              help="The adapter that was merged (repeat it for several, with their weights).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout instead of the table.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Also write the report as JSON to FILE.")
@verify_options
@click.option("--latency", is_flag=True,
              help="Also time greedy decoding with the base, the unmerged adapter and OUT, on --device "
                   "(needs the latency extra: pip install 'lora-merge[latency]').")
@click.option("--new-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Tokens decoded per timed run.")
@click.option("--runs", type=click.IntRange(2), default=10, show_default=True,
              help="Timed runs per condition, after one warm-up.")
@click.option("--prompt", default=None, help="Prompt text (uses OUT's tokenizer). Default: 16 fixed token ids.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table; the exit code tells.")
@token_option
def verify_command(out, base, adapters, as_json, report_path, latency, new_tokens, runs, prompt, quiet, token,
                   **given):
    """Check a merged folder against BASE and ADAPTER; exit 1 when a check fails.

    \b
    Examples:
        lora-merge verify ./merged --base ./Qwen3-0.6B --adapter ./my-adapter
        lora-merge verify ./merged --base ./base --adapter ./adapter --report report.json
        lora-merge verify ./merged --base ./base --adapter ./adapter --latency --runs 10

    OUT may come from any tool and have any shard layout: tensors are matched by name. Checked:
    every name, shape and dtype against BASE; the adapter's coverage; untouched tensors byte for byte;
    every merged element within the rounding bound of W + s·B·A; no NaN or Inf; config.json,
    tokenizer and other files.
    """
    from . import pipeline
    from .flags import take
    from .options import VerifyOptions
    from .progress import byte_bar

    if quiet:
        _quiet_hub()
    options = take(VerifyOptions, given)
    report = pipeline.verify(out, base, [parse_adapter(a) for a in adapters], options, token=token,
                             progress=lambda total, label: byte_bar(total, label, not quiet))
    if latency:
        from .latency import latency_table, measure_latency

        result = measure_latency(report.plan.base.path, report.plan.adapter.path, report.folder, report.device,
                                 new_tokens=new_tokens, runs=runs, prompt=prompt)
        report.details["latency"] = result
    if report_path:
        Path(report_path).write_text(report.text())
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not quiet:
        click.echo(report.table())
        if latency:
            click.echo(latency_table(report.details["latency"]))
    if not report.ok:
        where = f"see {report_path}" if report_path else "the failures are listed above" if not quiet else \
            "run without --quiet (or with --report FILE) to see the failures"
        from .run import parity_error

        raise parity_error(report, where)


@cli.command("unmerge", context_settings=CONTEXT)
@click.argument("merged")
@click.argument("adapter")
@click.argument("out", type=click.Path(file_okay=False, path_type=str))
@click.option("--base", "original", default=None, metavar="ORIGINAL",
              help="The base model the merge started from: count the elements that come back bit-identical "
                   "and the worst error in ulp.")
@unmerge_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@token_option
def unmerge_command(merged, adapter, out, original, as_json, quiet, token, **given):
    """Subtract ADAPTER from the merged model MERGED and write the base back to OUT.

    \b
    Examples:
        lora-merge unmerge ./merged ./adapter ./base-again
        lora-merge unmerge ./merged ./adapter ./base-again --base ./Qwen3-0.6B

    Rounding on the way in cannot always be undone: the report counts, per tensor and in total, the
    elements that are certainly the original (the only value that merges to MERGED's bits) and, with
    --base, the elements that came back bit-identical and the worst error in ulp. DoRA and adapters
    that replace tensors outright cannot be undone from the adapter alone and are refused.
    """
    from . import pipeline
    from .flags import take
    from .options import UnmergeOptions
    from .progress import byte_bar

    if quiet:
        _quiet_hub()
    options = take(UnmergeOptions, given)
    try:
        result = pipeline.unmerge(merged, [parse_adapter(adapter)], out, options, original=original, token=token,
                                  command=_command_line(),
                                  progress=lambda total, label: byte_bar(total, label, not quiet))
    except ParityError as e:
        click.echo(json.dumps(e.report.to_json(), indent=2) if as_json else e.report.table())
        raise
    if as_json:
        click.echo(json.dumps(result.report.to_json(), indent=2))
    elif not quiet:
        click.echo(f"unmerged {result.summary()['merged']} tensors -> {result.out}")
        click.echo(result.report.table())


def _format_plan(d: dict, every: bool = False) -> str:
    """The plan in a few lines: its targets counted by operation, or each listed (``every``, with -v)."""
    c = d["counts"]
    lines = [
        f"plan: {d['adapter']} into {d['base']}",
        f"  {c['merged']} tensors merged, {c['copied']} copied as bytes, {c['converted']} converted "
        f"({c['tensors']} in all, {len(d['shards'])} shard{'s' if len(d['shards']) != 1 else ''}, "
        f"{megabytes(d['bytes'])})",
        f"  adapter: {c['adapter_tensors']} tensors onto {c['adapter_targets']} base tensors",
        _memory_line(d["memory"], d["jobs"]),
    ]
    lines += [f"  {n} targets named for the model in memory, placed through {how}"
              for how, n in d["placed_through_layout"].items()]
    if every:
        lines += [f"  {t['tensor']}  [{t['dtype']} {t['shape']}]  {t['operation']}" for t in d["targets"]]
    else:
        kinds = Counter(t["operation"] for t in d["targets"])
        lines += [f"  {n} target{'s' if n != 1 else ''}: {op}" for op, n in kinds.items()]
        if d["targets"]:
            lines.append("  (-v lists every target)")
    lines += [f"  config: {c}" for c in d["config_changes"]]
    lines += [f"  note: {n}" for n in d["notes"]]
    lines.append("dry run: nothing was written")
    return "\n".join(lines)


def _memory_line(m: dict, jobs: int) -> str:
    line = (f"  estimated peak memory: {megabytes(m['estimated_peak_bytes'])} (this process holds "
            f"{megabytes(m['baseline_bytes'])} now; the merge adds about {megabytes(m['estimated_added_bytes'])} "
            f"with --jobs {jobs})")
    if m.get("estimated_gpu_bytes"):
        line += f", and about {megabytes(m['estimated_gpu_bytes'])} on the GPU"
    return line


class _ClosedStdoutIsFine:
    """stdout that a closed reader (`lora-merge … | head -3`) does not turn into a failed merge: from the first
    broken pipe on, what would be printed goes to /dev/null and the work goes on."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text):
        return self._guarded(self._stream.write, text)

    def flush(self):
        return self._guarded(self._stream.flush)

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # the interpreter's own flush at exit goes there too
            os.close(devnull)
            return len(args[0]) if args else None

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main():
    sys.stdout = _ClosedStdoutIsFine(sys.stdout)
    cli(prog_name="lora-merge")


if __name__ == "__main__":
    main()
