"""The one progress bar: bytes written, on stderr, only for a person watching a terminal."""

from __future__ import annotations

import sys


def byte_bar(total: int, label: str = "writing", enabled: bool = True):
    """A tqdm bar over ``total`` bytes, or None when progress is off or stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label, file=sys.stderr, leave=False)
