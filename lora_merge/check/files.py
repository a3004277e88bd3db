"""The files beside the weights: config.json differs from BASE's only where the merge changes it, and every other
file of BASE (tokenizer, chat template, generation config, processor files…) is in OUT, from BASE or where the
adapter's replaces it, each with its hash."""

from __future__ import annotations

import json
from pathlib import Path

from ..paths import read_text
from ..plan import Plan
from ..safetensors_file import file_sha256
from ..sources import extra_files
from ..tokenizer import TOKENIZER_FILES
from .verdict import Check

OWN_FILES = ("merge_report.json", "README.md")  # written by lora-merge itself, not copies of BASE files
IGNORED_CONFIG_KEYS = ("transformers_version", "_name_or_path")  # rewritten by any save_pretrained
HASH = "sha256"


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


def check_files(plan: Plan, out: Path, weights: dict[str, str]) -> tuple[Check, dict]:
    """OUT's files beside the weights: config.json as planned, each of BASE's other files there (BASE's, or the
    adapter's tokenizer), and each weights file's sha256."""
    failures: list[str] = []
    hashes = _Hashes()
    config_changes = _config_changes(plan, out, failures)
    base_files = {p.name: p for p in extra_files(plan.base.path) if p.name != "config.json" and p.name not in OWN_FILES}
    copied = _copied(plan, out, base_files, hashes, failures)
    added = sorted(p.name for p in extra_files(out)
                   if p.name not in base_files and p.name != "config.json" and p.name not in OWN_FILES)
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


class _Hashes(dict):
    """Each file's sha256, read once however many comparisons it is in."""

    def __call__(self, path: Path) -> str:
        if path not in self:
            self[path] = file_sha256(path)
        return self[path]


def _config_changes(plan: Plan, out: Path, failures: list[str]) -> dict[str, dict]:
    """Each key of config.json that differs from BASE's, or should: expected, ignored or unexpected."""
    if not (plan.base.path / "config.json").is_file():
        return {}
    out_config = _read_json(out / "config.json")
    if not isinstance(out_config, dict):
        failures.append("config.json: missing or not JSON")
        return {}
    base_flat, want_flat, got_flat = _flatten(plan.base.config), _flatten(plan.config), _flatten(out_config)
    expected = {k for k in set(base_flat) | set(want_flat) if base_flat.get(k, _MISSING) != want_flat.get(k, _MISSING)}
    changes: dict[str, dict] = {}
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
        changes[key] = entry
    return changes


def _copied(plan: Plan, out: Path, base_files: dict[str, Path], file_hash: _Hashes, failures: list[str]) -> dict:
    """Where each of BASE's other files in OUT comes from (BASE's model card is not copied: OUT gets its own)."""
    base_dir, adapter_dir = plan.base.path, plan.adapter.folder
    # a tokenizer taken from the adapter (a resized vocabulary) replaces the base's tokenizer files as a set
    tokenizer_from_adapter = any(
        (out / n).is_file()
        and (adapter_dir / n).is_file()
        and file_hash(out / n) == file_hash(adapter_dir / n)
        and not ((base_dir / n).is_file() and file_hash(base_dir / n) == file_hash(out / n))
        for n in TOKENIZER_FILES
    )
    copied: dict[str, dict] = {}
    for name, path in base_files.items():
        target = out / name
        if not target.is_file():
            if tokenizer_from_adapter and name in TOKENIZER_FILES and not (adapter_dir / name).is_file():
                copied[name] = {"from": "not in the adapter's tokenizer", HASH: None}
            else:
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
    return copied


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def _show(v):
    return None if v is _MISSING else v
