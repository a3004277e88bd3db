"""FP8 checkpoints (``quant_method: fp8``, DeepSeek-V3 and Qwen3 FP8 releases, transformers' FineGrainedFP8).

A weight is stored as float8_e4m3fn codes with a companion ``weight_scale_inv``: one scale for each
``weight_block_size`` block (e.g. 128×128, the grid rounded up at the edges), for each row, or for the
whole tensor, in float32 or as power-of-two exponents (``ue8m0``). The dense value is code × scale. A
fresh scale is the block's largest |value| / 448 in float32 (or the smallest power of two at least that),
so that the largest value lands on e4m3's largest, 448.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..grid import E4M3, smallest_power_of_two
from ..quantized import QuantizedTensor

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Fp8Tensor(QuantizedTensor):
    block: tuple[int, int]  # rows × columns of the dense matrix that share a scale
    power_of_two: bool  # ue8m0 scales: powers of two (stored as float8_e8m0fnu or float32)
    origin: str = "fp8"  # the quant_method: "fp8", or "compressed-tensors" (float-quantized, ``weight_scale``)

    dtype = "F8_E4M3"
    requantizable = True

    @property
    def description(self) -> str:
        rows, cols = self.shape[-2:]
        bm, bn = self.block
        kind = "one per tensor" if (bm, bn) == (rows, cols) else "one per row" if (bm, bn) == (1, cols) \
            else f"{bm}×{bn} blocks"
        scale = "power-of-two" if self.power_of_two else _SCALE_NAMES.get(self.parts[1].dtype, self.parts[1].dtype)
        where = " (compressed-tensors)" if self.origin == "compressed-tensors" else ""
        return f"FP8 e4m3{where}, {scale} scales {kind}"

    @property
    def stacked(self) -> bool:
        """Experts stacked on a first axis: the rows of the dense tensor are whole matrices."""
        return len(self.shape) == 3

    @property
    def row_unit(self) -> int:
        return 1 if self.stacked else self.block[0]

    def part_rows(self, part: int, start: int, stop: int) -> tuple[int, int]:
        if part == 0 or self.stacked:
            return start, stop
        if not self.parts[1].shape:  # one scalar scale
            return 0, 1
        return start // self.block[0], -(-stop // self.block[0])

    # ------------------------------------------------------------------------------ decode, encode

    def decode(self, stored, start: int, stop: int) -> torch.Tensor:
        import torch

        return self._spread(stored[0].to(torch.float64), self.stored_scales(stored), start, stop, torch.mul)

    def encode(self, values, original, start: int, stop: int, prepared):
        import torch

        codes, old_scales = original
        largest, changed = prepared
        chosen = torch.where(changed, self.fresh_scales(largest), self.stored_scales(original))
        new = E4M3.nearest(self._spread(values, chosen, start, stop, torch.div)).to(torch.float8_e4m3fn)
        written = self._spread(new.view(torch.uint8), changed, start, stop,
                               lambda made, fresh: torch.where(fresh, made, self._columns(codes.view(torch.uint8))))
        if old_scales.element_size() == 1:  # float8_e8m0fnu: the exponent + 127
            exponents = (torch.frexp(chosen)[1] - 1 + 127).to(torch.uint8)
            return written.view(codes.dtype), exponents.reshape(old_scales.shape).view(old_scales.dtype)
        return written.view(codes.dtype), chosen.to(old_scales.dtype).reshape(old_scales.shape)

    # ------------------------------------------------------------------------------------ the check

    def spacing(self, stored, exact, start: int, stop: int) -> torch.Tensor:
        return self._spread(exact, self.stored_scales(stored), start, stop,
                            lambda x, scale: E4M3.spacing(x / scale).mul_(scale))

    def block_max(self, values, start: int, stop: int) -> torch.Tensor:
        per_row = self._columns(values).amax(dim=-1)  # (..., rows, column blocks)
        bm = self.block[0]
        first = 0 if self.stacked else start % bm
        rows = per_row.shape[-2]
        sr = -(-(first + rows) // bm)
        if first or rows != sr * bm:  # rows of a block outside [start, stop): they count as zeros
            padded = per_row.new_zeros((*per_row.shape[:-2], sr * bm, per_row.shape[-1]))
            padded[..., first:first + rows, :] = per_row
            per_row = padded
        return per_row.reshape(*per_row.shape[:-2], sr, bm, per_row.shape[-1]).amax(dim=-2)

    def stored_scales(self, stored) -> torch.Tensor:
        import torch

        scales = stored[1]
        if scales.element_size() == 1:  # float8_e8m0fnu: 2^(byte - 127)
            values = torch.ldexp(torch.ones(scales.shape, dtype=torch.float64, device=scales.device),
                                 scales.view(torch.uint8).to(torch.int64) - 127)
        else:
            values = scales.to(torch.float64)
        return values.reshape(self._grid_rows(values))

    def fresh_scales(self, largest, stored=None) -> torch.Tensor:
        import torch

        if self.power_of_two:
            scales = torch.ldexp(torch.ones_like(largest), smallest_power_of_two(largest, E4M3.largest))
        else:  # in float32, then in the scales' own dtype (compressed-tensors stores bfloat16 or float16 ones)
            scales = (largest / E4M3.largest).to(torch.float32)
            kind = _SCALE_TORCH.get(self.parts[1].dtype)
            scales = (scales.to(getattr(torch, kind)) if kind else scales).to(torch.float64)
        if self.origin == "compressed-tensors":  # an all-zero block: the scale dtype's epsilon, as its quantizer
            return torch.where(scales > 0, scales, _EPSILON[self.parts[1].dtype])
        return torch.where(largest > 0, scales, 1.0)  # an all-zero block: any scale; 1, as transformers uses

    # ------------------------------------------------------------------------------------- geometry
    # Column blocks are a view of the dense rows ((..., rows, column blocks, bn), padded only where the columns
    # do not fill the last block); row blocks are spread over the rows in the (bn times smaller) grid itself.

    def _grid_rows(self, scales) -> tuple[int, ...]:
        """The shape of stored scale rows as a grid: (rows, columns) of blocks, per expert when stacked."""
        rows, cols = self.shape[-2:]
        bm, bn = self.block
        sc = -(-cols // bn)
        if self.stacked:
            return scales.shape[0], -(-rows // bm), sc
        return scales.numel() // sc, sc

    def _spread(self, x, grid, start: int, stop: int, op):
        """``op(x, the grid value of each element's block)`` for dense rows [start, stop), shaped as ``x``."""
        bm = self.block[0]
        if self.stacked:
            rows = grid.repeat_interleave(bm, 1)[:, :self.shape[1]]
        else:
            first = start % bm
            rows = grid.repeat_interleave(bm, 0)[first:first + stop - start]
        out = op(self._columns(x), rows.unsqueeze(-1))
        return out.reshape(*out.shape[:-2], -1)[..., :x.shape[-1]]

    def _columns(self, x):
        """``x`` (..., columns) as (..., column blocks, bn): a view unless the last block needs padding."""
        import torch

        bn = self.block[1]
        cols = x.shape[-1]
        sc = -(-cols // bn)
        if cols != sc * bn:
            x = torch.nn.functional.pad(x, (0, sc * bn - cols))
        return x.reshape(*x.shape[:-1], sc, bn)


_SCALE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F8_E8M0": "power-of-two"}
_SCALE_TORCH = {"BF16": "bfloat16", "F16": "float16"}
_EPSILON = {"F32": 2.0**-23, "BF16": 2.0**-7, "F16": 2.0**-10}


def fp8_tensor(name: str, codes, scale, block_size, power_of_two: bool, origin: str = "fp8") -> Fp8Tensor | str:
    """The dense view of FP8 ``codes`` with ``scale`` (TensorInfos), or why they do not fit together."""
    shape = codes.shape
    if len(shape) not in (2, 3):
        return f"{name}: FP8 tensors of {len(shape)} dimensions are not supported"
    rows, cols = shape[-2:]
    grid = scale.shape[len(shape) - 2:] if len(scale.shape) == len(shape) else scale.shape
    if len(shape) == 3 and (len(scale.shape) != 3 or scale.shape[0] != shape[0]):
        return f"{name}: stacked FP8 experts need a scale per expert, got {list(scale.shape)}"
    count = math.prod(grid)
    if count == 1:
        block = (rows, cols)
    elif tuple(grid) in ((rows,), (rows, 1)):
        block = (1, cols)
    elif block_size and len(grid) == 2 and tuple(grid) == (-(-rows // block_size[0]), -(-cols // block_size[1])):
        block = (int(block_size[0]), int(block_size[1]))
    elif len(grid) == 2 and rows % grid[0] == 0 and cols % grid[1] == 0:
        block = (rows // grid[0], cols // grid[1])
    else:
        return (f"{name}: scales of shape {list(scale.shape)} do not tile a {rows}×{cols} weight "
                f"(weight_block_size {block_size})")
    return Fp8Tensor(name, tuple(shape), (codes, scale), block, power_of_two, origin)


@dataclass(frozen=True)
class Fp8Quantized(Fp8Tensor):
    """A float tensor of BASE written as FP8 (``--quantize fp8``): BASE's ``source`` tensor is decoded as it is
    stored, and OUT gets e4m3 codes with a float32 ``weight_scale_inv`` per block, every block freshly scaled.
    ``parts`` are OUT's tensors as planned (no bytes of BASE's until OUT has them: ``start`` -1)."""

    source: object = None  # BASE's TensorInfo

    @property
    def description(self) -> str:
        bm, bn = self.block
        return f"FP8 e4m3, float32 scales {bm}×{bn} blocks (--quantize fp8 from {self.source.dtype})"

    stored_as_is = False  # never BASE's bytes: quantized even where the adapter changes nothing

    def rows(self, start: int, stop: int):
        import torch

        from ..quantized import read_rows

        return read_rows(self.source, start, stop).to(torch.float64)

    def read(self, start: int, stop: int):
        if self.parts[0].start >= 0:  # OUT's parts, read back
            return super().read(start, stop)
        from ..quantized import read_rows

        return (read_rows(self.source, start, stop),)

    def decode(self, stored, start: int, stop: int):
        import torch

        return stored[0].to(torch.float64) if len(stored) == 1 else super().decode(stored, start, stop)

    def prepare(self, values, decoded, start: int, stop: int):
        largest = self.block_max(values.abs(), start, stop)
        return largest, largest >= 0  # every block: none is stored in this format yet

    def encode(self, values, original, start: int, stop: int, prepared):
        import torch

        largest = prepared[0]
        chosen = self.fresh_scales(largest)
        codes = E4M3.nearest(self._spread(values, chosen, start, stop, torch.div)).to(torch.float8_e4m3fn)
        return codes.contiguous(), chosen.to(torch.float32).contiguous()
