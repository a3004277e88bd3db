"""Picking up an interrupted merge: which finished shards of the partial output can be kept.

A journal in the partial folder records the plan's fingerprint and, for each shard written to the
end and flushed, its size and sha256. A later run keeps a shard only when the fingerprint is the
same (same lora-merge, same BASE files, same adapter bytes, same output layout and dtypes) and the
file still has its recorded size and hash; everything else in the folder is removed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .output import remove_path
from .paths import read_text, write_new
from .plan import Plan
from .safetensors_file import file_sha256
from .version import __version__

JOURNAL_NAME = ".lora-merge-resume.json"

log = logging.getLogger("lora_merge")


def fingerprint(plan: Plan) -> str:
    """What the merged bytes depend on, hashed; any change means the partial output is stale."""
    base_files = []
    for shard in plan.base.shards:
        st = os.stat(shard.path)
        base_files.append([shard.path.name, st.st_size, st.st_mtime_ns])
    adapter_files = [[a.weight, {p.name: file_sha256(p) for p in a.files if p.is_file()}]
                     for a in plan.adapter.members]
    layout = [[s.name, [[e.name, e.dtype, list(e.shape), e.note] for e in s.entries]] for s in plan.shards]
    data = {"version": __version__, "base": base_files, "adapter": adapter_files, "layout": layout}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Journal:
    """The record of finished shards in a partial output folder."""

    def __init__(self, folder: Path, plan: Plan):
        self.folder = folder
        self.path = folder / JOURNAL_NAME
        self.fingerprint = fingerprint(plan)
        self.done: dict[str, dict] = {}

    def reusable(self, plan: Plan) -> set[str]:
        """Shards of the partial folder that can be kept; everything else in it is removed."""
        try:
            recorded = json.loads(read_text(self.path))
        except (OSError, ValueError):
            recorded = None
        keep: set[str] = set()
        if isinstance(recorded, dict) and recorded.get("fingerprint") == self.fingerprint:
            wanted = {s.name: s for s in plan.shards}
            for name, info in (recorded.get("shards") or {}).items():
                path = self.folder / name
                if (
                    name in wanted
                    and isinstance(info, dict)
                    and path.is_file()
                    and not path.is_symlink()
                    and path.stat().st_size == info.get("bytes")
                    and file_sha256(path) == info.get("sha256")
                ):
                    keep.add(name)
                    self.done[name] = info
        elif recorded is not None:
            log.warning("the partial output in %s was made from other inputs or options: starting over", self.folder)
        for path in self.folder.iterdir():
            if path.name not in keep and path.name != JOURNAL_NAME:
                remove_path(path)
        self._save()
        return keep

    def finished(self, name: str, sha256: str) -> None:
        """Record a shard written to its end and flushed to disk (``sha256``: of what was written)."""
        self.done[name] = {"bytes": (self.folder / name).stat().st_size, "sha256": sha256}
        self._save()

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        write_new(tmp, json.dumps({"fingerprint": self.fingerprint, "shards": self.done}, indent=2))
        os.replace(tmp, self.path)
