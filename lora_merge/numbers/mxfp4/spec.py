"""MXFP4 (e2m1 codes in groups of 32 sharing a power-of-two scale) as defined, which the merge and the check both
follow: the codes' values and midpoints, the exponent a group of changed values gets, and the experts' stored rows
and factors."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ... import kernels
from ...adapter import FileTensor, LowRank, MemoryTensor
from ...exact import ExactSums
from ...reader import as_float32, read_into
from ..floats.spec import FLOATS

GROUP = 32  # elements sharing a scale

E2M1 = kernels.plain.E2M1.astype(np.float64)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)  # between e2m1's magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
ROW_ELEMENTS = 1 << 21  # a block of stored rows holds about this many elements


class ExpertFactors:
    """Each expert's delta on its stored rows as ``left @ right``: the adapter's factors (exact float32) with each
    column's scale, and the kernel's forms of them (the scale folded into ``left``, ``right`` packed)."""

    def __init__(self, entry, fold_right: bool = False):
        self.entry = entry
        self.deltas = []
        for d in entry.ops.deltas:
            e = d.experts
            a = as_float32(d.a).reshape(e, -1, d.a.shape[-1])  # (E, r, ·): peft's ParamWrapper, expert-major
            b = as_float32(d.b).reshape(d.b.shape[0], -1, e).transpose(2, 0, 1)  # (E, ·, r): the expert fastest
            self.deltas.append((d, a, b))
        self.rank = sum(a.shape[1] for _, a, _ in self.deltas)
        self.fold_right = fold_right  # the check folds the scale into the right factor, the merge into the left
        self.cached = None

    def expert(self, k: int):
        """(left, right packed, left0, right0 (width × r), scales) of expert k."""
        if self.cached is not None and self.cached[0] == k:
            return self.cached[1]
        lefts, rights, scales = [], [], []
        for d, a, b in self.deltas:
            if d.transposed:  # dense (E, in, out): stored row o is B[o] · A
                left, right = b[k], a[k]
            else:  # dense (E, out', in') = B A: stored row o (a column of it) is A[:, o] · B^T
                left, right = a[k].T, b[k].T
            lefts.append(left)
            rights.append(right)
            scales.append(np.full(left.shape[1], d.scale))
        left0 = np.ascontiguousarray(np.concatenate(lefts, axis=1), np.float32)
        right = np.concatenate(rights, axis=0)
        sc = np.concatenate(scales)
        if self.fold_right:
            kl, kr = left0, kernels.pack((right.astype(np.float64) * sc[:, None]).astype(np.float32))
        else:
            kl, kr = np.ascontiguousarray((left0.astype(np.float64) * sc).astype(np.float32)), kernels.pack(right)
        made = (kl, kr, left0, np.ascontiguousarray(right.T, np.float32), sc)
        self.cached = (k, made)
        return made

    def sums(self, k: int, o0: int) -> ExactSums:
        """The exact values of expert k's stored rows from ``o0`` on (a block's flat indices)."""
        _, _, left0, right0, sc = self.expert(k)
        return ExactSums(left0[o0:], right0, sc, right0.shape[0])


def read_rows(q, first: int, last: int, buffers, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Stored rows [first, last) (expert-major): their block bytes and their scale bytes."""
    out = []
    for part, label in zip(q.parts, ("blocks", "scales"), strict=True):
        row = part.shape[-1] * (part.shape[-2] if label == "blocks" else 1)  # bytes per stored row
        raw = buffers(f"{name}{label}", ((last - first) * row,), np.uint8)
        read_into(part.path, part.start + first * row, raw)
        out.append(raw)
    return out[0], out[1]


def spans(q):
    """The blocks of stored rows a tensor is merged in: within one expert each, about ROW_ELEMENTS elements."""
    experts, width, out = q.shape
    step = max(1, min(out, ROW_ELEMENTS // width))
    return [(k * out + o, k * out + min(out, o + step)) for k in range(experts) for o in range(0, out, step)]


def nearest_codes(t: np.ndarray) -> np.ndarray:
    """The e2m1 code nearest each t (doubles), ties to the even code, past 6 the largest."""
    return kernels.plain.e2m1_nearest(t, np.zeros_like(t))[0]


def fresh_exponent(largest) -> int:
    """The exponent gpt-oss's quantizer gives a group whose largest |value| is ``largest`` (exact): the smallest e
    with largest <= 6 2^e, within [-127, 127]; -127 for a group of zeros."""
    if largest == 0:
        return -127
    q = Fraction(largest) / 6
    e = q.numerator.bit_length() - q.denominator.bit_length()
    while Fraction(2) ** e < q:
        e += 1
    while Fraction(2) ** (e - 1) >= q:
        e -= 1
    return max(-127, min(127, e))


def takes(entry, device_type: str) -> bool:
    """Whether ``entry`` is merged here: MXFP4 experts written back as MXFP4 on the CPU, changed by low-rank
    products per expert only, the input axis a multiple of 64."""
    q, ops = entry.base, entry.ops
    if device_type != "cpu" or not entry.written_quantized or q.dtype != "MXFP4" or ops is None:
        return False
    if q.shape[1] % 64 or not ops.deltas or not all(isinstance(d, LowRank) and d.experts == q.shape[0]
                                                    for d in ops.deltas):
        return False
    if ops.replace is not None or ops.dora_magnitude is not None or ops.row_indices is not None:
        return False
    return all(isinstance(t, (FileTensor, MemoryTensor)) and t.dtype in FLOATS for d in ops.deltas for t in (d.a, d.b))
