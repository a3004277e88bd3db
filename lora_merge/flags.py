"""The command line's options, one table per options type (``FLAGS``): for each field, its flag, its help and how
click reads it. ``add_options`` gives a command one option per field, in the fields' order, and ``take`` builds the
options value back from what click parsed; the default the help states is the field's default.

A field of an options type is in its table, as a ``Flag``, as the options type it nests (added in its place), or as
``None``: set by the command itself, not by a flag. A field missing from its table, or a table entry for no field,
fails when the CLI is imported (and in tests/test_cli.py), so a renamed field cannot lose its flag silently.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import click

from .dtypes import OUTPUT_DTYPES, output_dtype
from .formats import FORMATS, AdapterOptions
from .formats.loralib import LoralibOptions, parse_enable_lora
from .options import (
    MIB,
    CheckOptions,
    MergeOptions,
    PushOptions,
    UnmergeOptions,
    VerifyOptions,
    block_help,
    parse_size,
)


@dataclass(frozen=True)
class Flag:
    """A field's command-line option: its flag, its help, and click's settings (``type``, ``is_flag``, ``callback``
    to turn what was typed into the field's value, ``metavar``...)."""

    flag: str
    help: str
    settings: dict


def flag(name: str, help: str, **settings) -> Flag:
    return Flag(name, help, settings)


def _parsed(parse):
    """A click callback that reads the value with ``parse`` (a ValueError is click's BadParameter)."""

    def callback(ctx, param, value):
        try:
            return parse(value) if value is not None else None
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


def _mib(ctx, param, value):
    return value * MIB if value is not None else None


DEVICE = flag("--device", "Where the arithmetic runs. auto: the CPU for every tensor it has kernels for, CUDA (when "
              "present) for the rest.",
              metavar="auto|cpu|cuda|cuda:N|mps", show_default=True)
JOBS = flag("--jobs", "Tensors merged and checked at once. Default: one for every two CPUs this process may use (each "
            "job keeps about 1.5 cores busy and holds its own blocks: --dry-run says how much memory).", metavar="N",
            type=click.IntRange(1))
OVERWRITE = flag("--overwrite", "Replace OUT if it exists (only once the new output is complete and has passed its "
                 "checks).", is_flag=True)
TOKENIZER_FROM = flag("--tokenizer-from", "Where the tokenizer and chat template come from. Default: the base's, the "
                      "adapter's tokenizer when it resized the vocabulary, and the adapter's chat template when it "
                      "differs from the base's.", type=click.Choice(["base", "adapter"]))
BLOCK = flag("--block-mb", block_help(), type=click.IntRange(1, 65536), callback=_mib)
MAX_SHARD = flag("--max-shard-size", "Cut OUT's weights into files of at most SIZE (5GB, 500MB, 2GiB or 2G), in "
                 "BASE's tensor order, with an index. Default: the same files as BASE.", metavar="SIZE",
                 callback=_parsed(parse_size))

FLAGS: dict[type, dict[str, Flag | type | None]] = {
    LoralibOptions: {
        "lora_alpha": flag("--lora-alpha", "loralib: the lora_alpha the layers were built with (a loralib state dict "
                           "does not record it).", type=float),
        "fan_in_fan_out": flag("--fan-in-fan-out", "loralib: the layers were built with fan_in_fan_out=True (weights "
                               "stored in × out).", is_flag=True),
        "enable_lora": flag("--enable-lora", "loralib MergedLinear: the fused parts that have LoRA, as names among "
                            "q,k,v (e.g. q,v) or one flag per part (e.g. 1,0,1).", metavar="PARTS",
                            callback=_parsed(parse_enable_lora)),
    },
    AdapterOptions: {
        "format": flag("--adapter-format", "The adapter's layout. auto: detected from its files and tensor names.",
                       type=click.Choice(["auto", *FORMATS]), show_default=True),
        "loralib": LoralibOptions,
    },
    CheckOptions: {
        "allow_nonfinite": flag("--allow-nonfinite", "Accept NaN or Inf in the adapter and where the exact merge "
                                "holds them (refused otherwise; the report says so).", is_flag=True),
        "min_delta_kept": flag("--min-delta-kept", "Fail the check when the stored model keeps less than this share "
                               "(0 to 1) of the adapter's change, or when a tensor the adapter changes is stored "
                               "unchanged (default: report the figures only).", metavar="F",
                               type=click.FloatRange(0, 1)),
    },
    PushOptions: {
        "repo_id": flag("--push-to-hub", "After the merge and its parity checks pass, upload OUT to this Hub repo "
                        "(created if needed).", metavar="REPO_ID"),
        "private": flag("--private", "Create the Hub repo as private (when it does not exist yet).", is_flag=True),
        "revision": flag("--revision", "Push to this branch (created if needed).", metavar="BRANCH"),
        "create_pr": flag("--create-pr", "Open a pull request instead of committing to the branch.", is_flag=True),
        "commit_message": flag("--commit-message", "Message of the Hub commit."),
    },
    MergeOptions: {
        "dtype": flag("--dtype", "Output dtype of floating-point tensors (bf16, fp16 and fp32 name them too). "
                      "Default: the base's.", metavar="|".join(OUTPUT_DTYPES), callback=_parsed(output_dtype)),
        "quantize": flag("--quantize", "Write BASE's float Linear weights in this format, each merged element rounded "
                         "once: fp8 (e4m3 with a float32 scale per 128×128 block, as DeepSeek-V3 and Qwen3-FP8 "
                         "releases store them).", type=click.Choice(["fp8"])),
        "device": DEVICE,
        "jobs": JOBS,
        "overwrite": OVERWRITE,
        "tokenizer_from": TOKENIZER_FROM,
        "block_bytes": BLOCK,
        "max_shard_bytes": MAX_SHARD,
        "resume": flag("--resume", "Keep finished shards when the run is interrupted, and continue from them on the "
                       "next --resume run (only when their hashes and the plan still match).", is_flag=True),
        "check": CheckOptions,
        "adapter_options": AdapterOptions,
        "push": None,  # the merge command's push options: added after its own
    },
    UnmergeOptions: {
        "device": DEVICE,
        "jobs": JOBS,
        "overwrite": OVERWRITE,
        "tokenizer_from": None,  # as a merge of MERGED would choose (not asked for on the command line)
        "block_bytes": None,
        "max_shard_bytes": None,
        "adapter_options": AdapterOptions,
    },
    VerifyOptions: {
        "device": DEVICE,
        "jobs": flag("--jobs", "Weights files read back and checked at once. Default: one for every two CPUs this "
                     "process may use.", metavar="N", type=click.IntRange(1)),
        "check": CheckOptions,
        "adapter_options": AdapterOptions,
    },
}


def _table(cls) -> dict:
    """``cls``'s table, with every field in it and nothing else (a renamed field fails here, loudly)."""
    table = FLAGS[cls]
    names = [f.name for f in fields(cls)]
    if list(table) != names:
        raise AssertionError(f"flags.FLAGS[{cls.__name__}] lists {list(table)}, the fields are {names}")
    return table


def add_options(cls, only: tuple[str, ...] | None = None):
    """A decorator that gives a click command one option per field of ``cls`` that has a flag (``only``: these
    fields), in the fields' order, nested options types in their place; each read into a parameter named as the
    field."""
    table = _table(cls)
    defaults = cls()

    def decorate(command):
        for name, entry in reversed(table.items()):
            if only is not None and name not in only or entry is None:
                continue
            if isinstance(entry, type):
                command = add_options(entry)(command)
                continue
            command = click.option(entry.flag, name, default=getattr(defaults, name), help=entry.help,
                                   **entry.settings)(command)
        return command

    return decorate


def take(cls, given: dict, **more):
    """``cls`` from the parameters ``add_options`` gave a command (removed from ``given``), and ``more``."""
    values = {}
    for name, entry in _table(cls).items():
        if name in more or entry is None:
            continue
        if isinstance(entry, type):
            values[name] = take(entry, given)
        elif name in given:
            values[name] = given.pop(name)
    return cls(**values, **more)


for _cls in FLAGS:  # every table against its fields, when the CLI is imported
    _table(_cls)
