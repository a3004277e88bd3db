"""Work buffers reused block after block: torch's on a device (``Buffers``), numpy's on the host (``HostBuffers``);
and ``flat_nonzero``, which the merge's and the check's torch code both use to find the few elements a mask picks.

A fresh multi-megabyte tensor for every block of every tensor costs a page fault per page on common
systems (the allocator hands large blocks back to the kernel), more than the arithmetic done in it.
"""

from __future__ import annotations

import math


class Buffers:
    """Named buffers on one device, each grown to the largest size asked for and reused."""

    def __init__(self, device, pinned: bool = False):
        import torch

        self.device = torch.device(device)
        self.pinned = pinned  # page-locked host memory, for copies to and from a GPU without a stop
        self.held: dict[str, object] = {}
        self.views: dict[tuple, object] = {}  # the last view asked for, per name: blocks repeat their shapes

    def take(self, name: str, shape: tuple[int, ...], dtype):
        """A tensor of ``shape`` and ``dtype`` whose contents are undefined, valid until ``name`` is taken again."""
        key = (name, shape, dtype)
        view = self.views.get(key)
        if view is not None:
            return view
        import torch

        n = math.prod(shape)
        held = self.held.get(name)
        if held is None or held.dtype != dtype or held.numel() < n:
            held = self.held[name] = torch.empty(max(n, 1), dtype=dtype, device=self.device, pin_memory=self.pinned)
            self.views = {k: v for k, v in self.views.items() if k[0] != name}
        view = self.views[key] = held[:n].view(shape)
        return view


class HostBuffers:
    """Named numpy buffers on the host, each grown to the largest size asked for and reused: ``buffers(name, shape,
    dtype)`` is a view whose contents are undefined, valid until ``name`` is asked for again."""

    def __init__(self):
        self.held: dict = {}

    def __call__(self, name: str, shape: tuple, dtype):
        import numpy as np

        n = math.prod(shape)
        held = self.held.get(name)
        if held is None or held.dtype != dtype or held.size < n:
            held = self.held[name] = np.empty(max(n, 1), dtype)
        return held[:n].reshape(shape)


def flat_nonzero(mask):
    """Flat indices of the true elements of a torch mask; on the CPU through numpy, several times faster than torch
    for the usual case of a large mask with few or no true elements."""
    import numpy as np
    import torch

    if mask.device.type != "cpu":
        return mask.reshape(-1).nonzero().reshape(-1)
    flat = mask.reshape(-1).numpy()
    if not flat.any():
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.flatnonzero(flat))
