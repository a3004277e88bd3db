"""FP8 (e4m3 codes with block scales) as defined, which the merge and the check both follow: the codes' values,
the scale a block of changed values gets, the nearest code to a value, and BASE's rows as stored."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from ... import kernels
from ...reader import read_into, stored_rows
from ..floats.spec import low_rank_only, round_fraction

LARGEST = 448.0  # e4m3's largest value
SCALE_DTYPES = ("F32", "F8_E8M0")
SOURCE_DTYPES = ("BF16", "F16", "F32")  # a float BASE written as FP8: exact in float32
NO_VALUES = np.zeros(0, np.float32)
BAND_ELEMENTS = 1 << 22  # a band is merged whole: larger ones (a scale per tensor, say) go through the torch codec
E4M3 = kernels.plain.E4M3  # each code's value (float64; NaN for 0x7F and 0xFF)


def base_rows(q, start: int, stop: int, buffers, name: str) -> Base:
    """BASE's dense rows [start, stop): its codes and rows of scales as stored, or a float BASE's values (float32,
    exact copies) for ``--quantize``."""
    if getattr(q, "source", None) is None:  # an FP8 BASE
        codes, raw = read_parts(q, start, stop, buffers, name)
        return Base(codes, scale_rows(q, raw), None)
    info, cols = q.source, q.shape[1]
    wf = kernels.plain.load(kernels.KINDS[info.dtype], stored_rows(info, start, stop, buffers, f"{name}values"))
    bands = -(-(stop - start) // q.block[0])
    unused = buffers(f"{name}no codes", ((stop - start) * cols,), np.uint8)  # the kernels read wf instead
    return Base(unused.reshape(stop - start, cols), np.ones((bands, -(-cols // q.block[1])), np.float32),
                wf.reshape(stop - start, cols))


@dataclass(frozen=True)
class Base:
    """BASE's rows as the FP8 kernels take them: codes and scales (an FP8 BASE), or float32 values ``wf``."""

    codes: np.ndarray  # rows × cols
    scales: np.ndarray  # bands × column blocks
    wf: np.ndarray | None = None  # rows × cols

    def band(self, k: int, rows: slice) -> Base:
        return Base(self.codes[rows], self.scales[k], None if self.wf is None else self.wf[rows])

    def values(self, flat: np.ndarray, bn: int) -> np.ndarray:
        """The float64 values of a band's flat indices (exact)."""
        if self.wf is not None:
            return self.wf.reshape(-1)[flat].astype(np.float64)
        return E4M3[self.codes.reshape(-1)[flat]] * self.scales[(flat % self.codes.shape[1]) // bn].astype(np.float64)

    @property
    def wf_arg(self):
        """``wf`` as the kernels take it: empty for an FP8 BASE."""
        return self.wf if self.wf is not None else NO_VALUES


def read_parts(q, start: int, stop: int, buffers, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Dense rows [start, stop) as stored: their codes (uint8, rows × cols) and the bytes of their rows of
    scales."""
    codes_info, scale_info = q.parts
    cols = q.shape[1]
    first, last = q.part_rows(1, start, stop)
    codes = buffers(f"{name}codes", ((stop - start) * cols,), np.uint8)
    raw = buffers(f"{name}scales", ((last - first) * scale_info.row_bytes,), np.uint8)
    read_into(codes_info.path, codes_info.start + start * cols, codes)
    read_into(scale_info.path, scale_info.start + first * scale_info.row_bytes, raw)
    return codes.reshape(stop - start, cols), raw


def scale_rows(q, raw: np.ndarray) -> np.ndarray:
    """Rows of stored scales (bytes) as float32 values, one row of column blocks each."""
    return scale_values(raw.reshape(-1).view(np.uint8), q.parts[1].dtype).reshape(-1, -(-q.shape[1] // q.block[1]))


def scale_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored scales as float32 values: float32 as they are, e8m0 bytes as 2^(byte - 127)."""
    if dtype == "F32":
        return raw.view(np.float32)
    return np.ldexp(np.float32(1), raw.astype(np.int32) - 127).astype(np.float32)


def scale_bytes(values: np.ndarray, dtype: str) -> np.ndarray:
    """Scales (float32 values) as stored: float32, or e8m0 exponent bytes."""
    if dtype == "F32":
        return np.ascontiguousarray(values, np.float32).view(np.uint8)
    return (np.frexp(values.astype(np.float64))[1] - 1 + 127).astype(np.uint8)


def fresh_scale(largest, power_of_two: bool) -> float:
    """The scale FP8 defines for a block whose largest |value| is ``largest`` (a float or an exact Fraction)."""
    if largest == 0:
        return 1.0  # an all-zero block: any scale; 1, as transformers uses
    q = Fraction(largest) / Fraction(LARGEST)
    if power_of_two:  # the smallest power of two at least q
        e = q.numerator.bit_length() - q.denominator.bit_length()
        while Fraction(2) ** e < q:
            e += 1
        while Fraction(2) ** (e - 1) >= q:
            e -= 1
        return math.ldexp(1.0, e)
    return round_fraction(q, "F32")


def fresh_scales(largest: np.ndarray, power_of_two: bool) -> np.ndarray:
    """``fresh_scale`` of each of the float64 ``largest`` (where it is computed through float64 rather than exactly:
    the caller widens what it asks for so that a rounding there cannot matter)."""
    with np.errstate(all="ignore"):
        q = largest / LARGEST
        if power_of_two:
            m, e = np.frexp(q)  # q = m 2^e, m in [0.5, 1): the smallest power of two at least q
            scales = np.ldexp(1.0, np.where(m == 0.5, e - 1, e))
        else:
            scales = q.astype(np.float32).astype(np.float64)
    return np.where(largest > 0, scales, 1.0)
MAGNITUDES = E4M3[:127]  # e4m3's magnitudes, increasing (codes 0 to 0x7E)
MIDPOINTS = (MAGNITUDES[1:] + MAGNITUDES[:-1]) / 2  # exact, as is each one times a float32 scale


def nearest_codes(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The e4m3 code nearest each x / s, exactly (doubles x, float32 scales s), ties to even, past 448 the largest:
    x is compared with each midpoint times its scale, itself a double."""
    a = np.abs(x)
    k = np.searchsorted(MIDPOINTS, a / s)  # the midpoints below a / s, off by one at most where it is rounded
    last = len(MIDPOINTS) - 1
    k -= (k > 0) & (a <= MIDPOINTS[np.maximum(k - 1, 0)] * s)
    k += (k <= last) & (a > MIDPOINTS[np.minimum(k, last)] * s)
    k += (k <= last) & (a == MIDPOINTS[np.minimum(k, last)] * s) & (k % 2 == 1)  # a tie: to the even code
    return (k | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def takes(entry, device_type: str) -> bool:
    """Whether ``entry`` is merged here: an FP8 matrix written back as FP8 on the CPU, with a grid of float32 or
    power-of-two scales, changed by low-rank products only; or a float matrix of BASE written as FP8
    (``--quantize fp8``), changed so or not at all."""
    from .codec import Fp8Quantized, Fp8Tensor

    q = entry.base
    if device_type != "cpu" or not entry.written_quantized or not isinstance(q, Fp8Tensor):
        return False
    quantize = isinstance(q, Fp8Quantized) and q.source.dtype in SOURCE_DTYPES
    if q.origin != "fp8" and not quantize:
        return False
    if q.stacked or len(q.parts[1].shape) != 2 or q.parts[1].dtype not in SCALE_DTYPES or q.parts[0].dtype != "F8_E4M3":
        return False
    if q.block[0] * q.shape[1] > BAND_ELEMENTS:
        return False
    return (entry.ops is None and quantize) or entry.ops is not None and low_rank_only(entry.ops, 2)
