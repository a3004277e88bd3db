"""A tensor the files store quantized, as the dense tensor the model computes with.

Each format is a codec over a group of stored tensors (the codes and their scales): ``rows`` decodes
rows of the dense tensor exactly, in float64; formats that can be written back (``requantizable``)
also read the stored rows as they are (``read``), decode them (``decode``), and encode merged rows
(``encode``): fresh scales for each block whose values changed, each element rounded once to the
nearest value of the format, and the stored bytes of every block whose values did not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..dtypes import DTYPES, torch_dtype
from ..reader import read_into
from ..safetensors_file import TensorInfo

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class QuantizedTensor:
    """The dense tensor ``name`` of ``shape`` that the stored ``parts`` (codes first) make."""

    name: str
    shape: tuple[int, ...]
    parts: tuple[TensorInfo, ...]

    dtype = "quantized"  # the format's name (F8_E4M3, MXFP4, NF4, ...): what the report calls it
    requantizable = False
    stored_as_is = True  # BASE stores it so: untouched, it is copied as bytes
    global_scale = False  # a scale over the whole tensor that a merge may have to change: a first pass finds out
    row_unit = 1  # rows of the dense tensor that share scales: the blocks a merge encodes are multiples of it
    exponent_bytes = False  # scales stored as uint8 biased exponents (e8m0, where 255 is NaN)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def description(self) -> str:
        """The format in words, for the report."""
        return self.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of the dense tensor, exactly, as float64 on the CPU."""
        return self.decode(self.read(start, stop), start, stop)

    def nonfinite_scales(self) -> list[str]:
        """The stored scale parts that hold NaN or Inf (each read whole: scales are small)."""
        if not self.stored_as_is:
            return []  # its parts are OUT's, not BASE's
        return [p.name for p in self.parts[1:] if _nonfinite(p, self.exponent_bytes)]

    # --- requantizable formats

    def read(self, start: int, stop: int) -> tuple[torch.Tensor, ...]:
        """Each part's rows that hold dense rows [start, stop) (``part_rows``), as stored."""
        return tuple(read_rows(p, *self.part_rows(i, start, stop)) for i, p in enumerate(self.parts))

    def part_rows(self, part: int, start: int, stop: int) -> tuple[int, int]:
        """The rows of part ``part`` that hold dense rows [start, stop)."""
        raise NotImplementedError

    def decode(self, stored: tuple[torch.Tensor, ...], start: int, stop: int) -> torch.Tensor:
        """The float64 values of dense rows [start, stop) from their stored parts (any device)."""
        raise NotImplementedError

    def encode(self, values: torch.Tensor, original: tuple[torch.Tensor, ...], start: int, stop: int,
               prepared: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The stored parts of merged rows [start, stop) (float64 ``values``): each block that ``prepared`` (see
        ``prepare``) marks changed gets a fresh scale for its largest |value| and its elements rounded to nearest;
        the others keep ``original``'s bytes."""
        raise NotImplementedError

    def prepare(self, values, decoded, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For each block with elements in rows [start, stop), shaped as the scale rows: the largest |value| of
        its merged ``values`` there, and whether any of them differs from BASE's (``decoded``). A block that
        spans more rows than one call sees takes the maximum and the or of every call's findings."""
        return self.block_max(values.abs(), start, stop), self.block_any(values != decoded, start, stop)

    def settle(self, prepared: tuple) -> tuple:
        """``prepared`` over the whole tensor (every block's largest |value| and whether it changed), with what the
        format decides from all of it (a tensor-wide scale); as it is for formats without one."""
        return prepared

    def check_global(self, stored: tuple, largest: float) -> tuple[float, float] | None:
        """Whether a tensor-wide scale in ``stored`` is BASE's or the format's for merged values whose largest
        |value| is ``largest``: None when it is (or the format has none), else (the scale found, the expected one)."""
        return None

    # --- what the check needs: the format's grid, scales and blocks

    def spacing(self, stored: tuple[torch.Tensor, ...], exact: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The distance between neighbouring stored values at each exact value (float64, per element)."""
        raise NotImplementedError

    def block_max(self, values: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The largest |value| of each scale block within rows [start, stop), shaped as the scale rows."""
        raise NotImplementedError

    def block_any(self, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Whether any element of each scale block within rows [start, stop) is set."""
        import torch

        return self.block_max(mask.to(torch.float64), start, stop) > 0

    def stored_scales(self, stored: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The scale of each block (float64), as stored for the rows."""
        raise NotImplementedError

    def fresh_scales(self, largest: torch.Tensor, stored: tuple | None = None) -> torch.Tensor:
        """The scale the format defines for blocks whose largest |value| is ``largest`` (float64); ``stored``: the
        parts written, for a format whose block scales depend on a tensor-wide one."""
        raise NotImplementedError


# the bits all set in a NaN (or infinity) of an 8-bit float, and in no finite value
_NOT_FINITE_8 = {"F8_E4M3": 0x7F, "F8_E8M0": 0xFF}


def _nonfinite(info: TensorInfo, exponent_bytes: bool) -> bool:
    """Whether a stored tensor of floats (or of e8m0 exponent bytes) holds a NaN or an infinity."""
    import numpy as np

    from .. import kernels
    from ..adapter import FileTensor
    from ..reader import raw_bytes

    mark = 0xFF if exponent_bytes and info.dtype == "U8" else _NOT_FINITE_8.get(info.dtype)
    if mark is None and info.dtype not in kernels.KINDS:
        return False  # integers: no NaN to hold
    raw = raw_bytes(FileTensor(info))
    if mark is not None:
        return bool(np.any((raw & mark) == mark))
    return kernels.nonfinite(kernels.KINDS[info.dtype], raw)


def read_rows(info: TensorInfo, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a stored tensor (the whole of a scalar), in its dtype."""
    if not info.shape:
        return read_flat(info, 0, 1).reshape(())
    width = math.prod(info.shape[1:])
    return read_flat(info, start * width, stop * width).reshape(stop - start, *info.shape[1:])


def read_flat(info: TensorInfo, first: int, last: int) -> torch.Tensor:
    """Elements [first, last) of a stored tensor, flattened, in its dtype."""
    import torch

    size = DTYPES[info.dtype].size
    raw = torch.empty((last - first) * size, dtype=torch.uint8)
    read_into(info.path, info.start + first * size, raw.numpy())
    return raw.view(torch_dtype(info.dtype))
