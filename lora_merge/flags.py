"""Options declared where they live: a dataclass field states its command-line flag and help beside its default,
and ``add_options`` turns such fields into click options, so that the help shows the default the code uses."""

from __future__ import annotations

from dataclasses import MISSING, field, fields


def cli_flag(flag: str, help: str, default=None, **click_settings):
    """A dataclass field that the command line sets with ``flag``: its default, its help, and how click reads it
    (``type``, ``is_flag``, ``callback`` to turn what was typed into the field's value, ``metavar``...)."""
    return field(default=default, metadata={"flag": flag, "help": help, **click_settings})


def add_options(cls, only: tuple[str, ...] | None = None):
    """A decorator that gives a click command one option per field of ``cls`` that declares a flag (``only``:
    these fields, in this order), each read into a parameter named as the field."""
    import click

    declared = {f.name: f for f in fields(cls) if "flag" in f.metadata}
    chosen = [declared[n] for n in only] if only is not None else list(declared.values())

    def decorate(command):
        for f in reversed(chosen):
            settings = {k: v for k, v in f.metadata.items() if k != "flag"}
            default = f.default if f.default is not MISSING else None
            command = click.option(f.metadata["flag"], f.name, default=default, **settings)(command)
        return command

    return decorate


def take(cls, given: dict, **more):
    """``cls`` from the parameters ``add_options`` gave a command (removed from ``given``), and ``more``."""
    names = {f.name for f in fields(cls) if "flag" in f.metadata}
    return cls(**{n: given.pop(n) for n in list(given) if n in names}, **more)
