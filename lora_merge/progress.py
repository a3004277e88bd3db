"""The one progress bar: bytes written, on stderr, only for a person watching a terminal."""

from __future__ import annotations

import sys

# bytes in decimal units (1.19GB), as the summary counts MB (1,192.1 MB)
UNITS = {"unit": "B", "unit_scale": True, "unit_divisor": 1000}


def byte_bar(total: int = 0, label: str = "writing", enabled: bool = True):
    """A tqdm bar over ``total`` bytes, counted in decimal units as the summary counts MB; disabled (its
    updates do nothing) when progress is off or stderr is not a terminal."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, file=sys.stderr, leave=False, disable=not enabled or not sys.stderr.isatty(),
                **UNITS)


def no_bar(total: int = 0, label: str = ""):
    """A bar that shows nothing: for library calls that ask for no progress."""
    return byte_bar(total, label, enabled=False)
