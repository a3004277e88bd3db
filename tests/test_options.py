"""Options: a plain frozen value per command, the check's part shared; each field's flag in the CLI's table."""

from __future__ import annotations

import dataclasses

import click
import pytest

from lora_merge import CheckOptions, MergeOptions, UnmergeOptions, VerifyOptions
from lora_merge.cli import cli
from lora_merge.flags import FLAGS, Flag, _table, add_options, take


def flags_of(command: str) -> set[str]:
    return {o for p in cli.commands[command].params if isinstance(p, click.Option) for o in p.opts}


def test_every_field_of_every_options_type_has_its_entry_in_the_flags_table():
    for cls, table in FLAGS.items():
        assert list(table) == [f.name for f in dataclasses.fields(cls)], cls.__name__
        assert all(e is None or isinstance(e, Flag) or e in FLAGS for e in table.values()), cls.__name__


def test_a_renamed_field_fails_loudly():
    @dataclasses.dataclass(frozen=True)
    class Renamed:
        devices: str = "auto"

    FLAGS[Renamed] = {"device": FLAGS[VerifyOptions]["device"]}
    try:
        with pytest.raises(AssertionError, match="lists \\['device'\\], the fields are \\['devices'\\]"):
            _table(Renamed)
    finally:
        del FLAGS[Renamed]


def test_each_command_offers_the_flags_of_its_own_options_only():
    merge, verify, unmerge = flags_of("merge"), flags_of("verify"), flags_of("unmerge")
    assert {"--dtype", "--quantize", "--resume", "--allow-nonfinite", "--min-delta-kept", "--push-to-hub",
            "--adapter-format", "--lora-alpha"} <= merge
    assert {"--device", "--allow-nonfinite", "--min-delta-kept", "--adapter-format"} <= verify
    assert not {"--dtype", "--overwrite", "--resume", "--quantize"} & verify
    assert {"--device", "--overwrite", "--adapter-format"} <= unmerge
    assert not {"--dtype", "--quantize", "--resume", "--allow-nonfinite", "--push-to-hub"} & unmerge


def test_options_are_frozen_values_and_make_changes_a_copy():
    options = MergeOptions.make(device="cpu", allow_nonfinite=True, min_delta_kept=0.5)
    assert options.check == CheckOptions(allow_nonfinite=True, min_delta_kept=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.device = "cuda"
    again = MergeOptions.make(options, dtype="bf16")
    assert (again.dtype, again.device, again.check, options.dtype) == ("bfloat16", "cpu", options.check, None)
    assert options.to_json()["allow_nonfinite"] is True and "check" not in options.to_json()


def test_a_setting_a_command_does_not_have_is_refused_by_name():
    with pytest.raises(TypeError, match="unknown UnmergeOptions field.*dtype"):
        UnmergeOptions.make(dtype="bf16")
    with pytest.raises(TypeError, match="unknown VerifyOptions field.*overwrite"):
        VerifyOptions.make(overwrite=True)
    with pytest.raises(ValueError, match="min_delta_kept"):
        VerifyOptions.make(min_delta_kept=2)


def test_another_commands_options_give_their_shared_fields():
    merge = MergeOptions.make(device="cpu", dtype="fp16", min_delta_kept=0.25)
    verify = VerifyOptions.make(merge)
    assert (verify.device, verify.check) == ("cpu", merge.check)
    run = UnmergeOptions(device="cpu", overwrite=True, block_bytes=1 << 20).as_run()
    assert (run.device, run.overwrite, run.block_bytes, run.dtype, run.check) == ("cpu", True, 1 << 20, None,
                                                                                  CheckOptions())


def test_take_builds_the_options_back_from_what_click_parsed():
    @click.command()
    @add_options(MergeOptions)
    def command(**given):
        given["options"] = take(MergeOptions, given)
        seen.update(given)

    seen: dict = {}
    command(["--dtype", "fp16", "--allow-nonfinite", "--max-shard-size", "2M", "--lora-alpha", "8"],
            standalone_mode=False)
    options = seen.pop("options")
    assert seen == {}  # every parameter taken into the options
    assert (options.dtype, options.check.allow_nonfinite, options.max_shard_bytes) == ("float16", True, 2 << 20)
    assert options.adapter_options.loralib.lora_alpha == 8.0 and options.push is None
