"""The passes in numpy: what ``_kernels.c`` does in one pass, here in several (the product by BLAS). The same rules,
so the same bytes: an element is written only where its value is proven to round to it, and the others are
listed for the caller to decide exactly (see ``_kernels.c`` for the arguments)."""

from __future__ import annotations

import math

import numpy as np

BF16, F16, F32 = 0, 1, 2
COLS = 64  # the columns of a block of R as packed, and of a bound's term


def pack(right: np.ndarray) -> np.ndarray:
    """R (r × width) packed by blocks of COLS columns, as the passes read it: blocks × r × COLS, zero past the end."""
    r, width = right.shape
    blocks = -(-width // COLS)
    padded = np.zeros((r, blocks * COLS), right.dtype)
    padded[:, :width] = right
    return np.ascontiguousarray(padded.reshape(r, blocks, COLS).transpose(1, 0, 2))


def unpack(packed: np.ndarray, r: int, width: int) -> np.ndarray:
    return packed.reshape(-1, r, COLS).transpose(1, 0, 2).reshape(r, -1)[:, :width]


def _product(L, R, r, rows, width, dtype) -> tuple[np.ndarray, np.ndarray]:
    """L @ R, and |L| @ |R| (the sizes of its terms, for the error bound)."""
    if not r:
        return np.zeros((rows, width), dtype), np.zeros((rows, width), dtype)
    left, right = np.asarray(L, dtype).reshape(rows, r), unpack(np.asarray(R, dtype), r, width)
    return left @ right, np.abs(left) @ np.abs(right)


def load(in_kind: int, w: np.ndarray, wide: bool = False) -> np.ndarray:
    """BASE's elements as float32 (or float64 when ``wide``), exactly."""
    if in_kind == BF16:
        x = (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif in_kind == F16:
        x = w.view(np.float16).astype(np.float32)
    else:
        x = w.view(np.float32)
    return x.astype(np.float64) if wide else x


def add(w: np.ndarray, p: np.ndarray) -> np.ndarray:
    """w + p, where a product of exactly zero leaves w as it is (-0 stays -0: a delta of zero changes no bit)."""
    return np.where(p == 0, w, w + p)


def _listed(flags: np.ndarray, idx: np.ndarray) -> int:
    found = np.flatnonzero(flags)
    n = min(len(found), len(idx))
    idx[:n] = found[:n]
    return len(found)


def midpoint16(kind: int, y: np.ndarray) -> np.ndarray:
    u = y.view(np.uint32)
    if kind == BF16:
        return ((u & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
    normal = ((u & np.uint32(0xFFFFE000)) | np.uint32(0x1000)).view(np.float32)
    sub = np.copysign((np.floor(np.abs(y) * np.float32(2.0**24)) + np.float32(0.5)) * np.float32(2.0**-24), y)
    return np.where((u & np.uint32(0x7FFFFFFF)) >= np.uint32(0x38800000), normal, sub)


def round16(kind: int, y: np.ndarray) -> np.ndarray:
    if kind == F16:
        return y.astype(np.float16).view(np.uint16)  # numpy's conversion: to nearest even, subnormals included
    u = y.view(np.uint32)
    out = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, ((u >> 16) | np.uint32(0x40)).astype(np.uint16), out)


def merge16(kind, w, in_kind, L, R, r, ct, slack, rows, width, c, out, idx) -> int:
    with np.errstate(all="ignore"):
        p, m = _product(L, R, r, rows, width, np.float32)
        y = add(load(in_kind, w).reshape(rows, width), p)
        out.reshape(rows, width)[...] = round16(kind, y)
        a = np.abs(y)
        e = np.float32(c) * a + (np.float32(ct) * m + np.float32(slack))
        d = np.abs(y - midpoint16(kind, y))
        quarter, top = (np.float32(2.0**-10), np.float32(float.fromhex("0x1.fep127"))) if kind == BF16 else \
            (np.float32(2.0**-13), np.float32(65000.0))
        flags = ~(d > e) | ~(e <= a * quarter) | ~(a < top)
    return _listed(flags.reshape(-1), idx)


def merge32(w, in_kind, L, R, r, ct, slack, rows, width, c, out, idx) -> int:
    with np.errstate(all="ignore"):
        p, sizes = _product(L, R, r, rows, width, np.float64)
        y = add(load(in_kind, w, wide=True).reshape(rows, width), p)
        out.reshape(rows, width)[...] = y.astype(np.float32)
        m = ((y.view(np.uint64) & np.uint64(0xFFFFFFFFE0000000)) | np.uint64(0x10000000)).view(np.float64)
        a = np.abs(y)
        e = c * a + (ct * sizes + slack)
        flags = ~(np.abs(y - m) > e) | ~(e <= a * 2.0**-26) | ~(a < float.fromhex("0x1.fffffcp127")) | (
            ~(a >= 2.0**-126) & ~((a == 0) & (e == 0)))
    return _listed(flags.reshape(-1), idx)


def half_spacing16(kind: int, o: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Half the spacing at the stored ``o`` (16-bit elements), toward zero where ``below``, else away from it."""
    mbits, ebits, bias = (7, 8, 127) if kind == BF16 else (10, 5, 15)
    o = o.astype(np.int64)
    e = (o >> mbits) & ((1 << ebits) - 1)
    h = np.ldexp(np.float32(1.0), (np.maximum(e, 1) - bias - mbits - 1).astype(np.int32)).astype(np.float32)
    h = np.where(below & ((o & ((1 << mbits) - 1)) == 0) & (e > 1), h * np.float32(0.5), h)
    return np.where(e == (1 << ebits) - 1, np.float32(0.0), h)


def half_spacing32(o: np.ndarray, below: np.ndarray) -> np.ndarray:
    """Half the spacing at the stored ``o`` (float32), toward zero where ``below``, else away from it (float64)."""
    bits = o.view(np.uint32).astype(np.int64)
    e = (bits >> 23) & 0xFF
    h = np.ldexp(1.0, (np.maximum(e, 1) - 127 - 23 - 1).astype(np.int32))
    h = np.where(below & ((bits & 0x7FFFFF) == 0) & (e > 1), h * 0.5, h)
    return np.where(e == 0xFF, 0.0, h)


def _survival(w, v, o, sums) -> None:
    """Adds to ``sums`` the survival of the change d = v - w in the stored r = o - w (see ``_kernels.c``)."""
    d, r = (v - w).astype(np.float64), (o - w).astype(np.float64)
    sums[:5] += [float(np.dot(d.ravel(), d.ravel())), float(np.dot(r.ravel(), r.ravel())),
             float(np.square(r - d).sum()), float(np.dot(r.ravel(), d.ravel())), float(np.count_nonzero(r))]


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 ``x`` rounded to bfloat16, to nearest even (as float32): ``to_bf16`` of ``_common.h``."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) & np.uint32(0xFFFF0000)).view(np.float32)


def _bf16_survival(w, v, sums) -> None:
    """Adds to ``sums[5:9]`` what --dtype bfloat16 would store of the change d = v - w: ‖b − w‖², ‖(b − w) − d‖²,
    ⟨b − w, d⟩ and the count of b != bf16(w), b = bf16(v) (the quantized checks' second figure)."""
    b = to_bf16(v)
    d, r = (v - w).astype(np.float64).ravel(), (b - w).astype(np.float64).ravel()
    sums[5:9] += [float(r @ r), float((r - d) @ (r - d)), float(r @ d), float(np.count_nonzero(b != to_bf16(w)))]


def survival(w, v, o, sums) -> None:
    """``_kernels.survival``: float64 buffers w, v, o of one length; adds the change's five sums to ``sums``."""
    x, y, z = (np.frombuffer(a, np.float64) for a in (w, v, o))
    out = np.frombuffer(sums, np.float64)
    _survival(x, y, z, out)


def check16(kind, w, in_kind, L, R, r, ct, slack, rows, width, c, stored, idx, sums) -> int:
    with np.errstate(all="ignore"):
        w0 = load(in_kind, w).reshape(rows, width)
        q, m = _product(L, R, r, rows, width, np.float32)
        v = add(w0, q)
        o = stored.view(np.uint16).reshape(rows, width)
        o32 = load(kind, o)
        e = np.float32(c) * np.abs(v) + (np.float32(ct) * m + np.float32(slack))
        flags = ~(np.abs(v - o32) + e < half_spacing16(kind, o, ~(np.abs(v) >= np.abs(o32) + e)))
        _survival(w0, v, o32, sums)
    return _listed(flags.reshape(-1), idx)


def check32(w, in_kind, L, R, r, ct, slack, rows, width, c, stored, idx, sums) -> int:
    with np.errstate(all="ignore"):
        w0 = load(in_kind, w, wide=True).reshape(rows, width)
        q, sizes = _product(L, R, r, rows, width, np.float64)
        v = add(w0, q)
        o = stored.view(np.float32).reshape(rows, width)
        e = c * np.abs(v) + (ct * sizes + slack)
        flags = ~(np.abs(v - o) + e < half_spacing32(o, ~(np.abs(v) >= np.abs(o) + e)))
        _survival(w0, v, o.astype(np.float64), sums)
    return _listed(flags.reshape(-1), idx)


def first_difference(a, b) -> int:
    """The first byte where two buffers differ (-1: none; the shorter one's length if one is a prefix)."""
    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    n = min(len(x), len(y))
    if np.array_equal(x[:n], y[:n]):
        return -1 if len(x) == len(y) else n
    return int(np.flatnonzero(x[:n] != y[:n])[0])


def nonfinite(kind: int, a) -> bool:
    """Whether a buffer of float elements of ``kind`` holds a NaN or an infinity."""
    if kind == F32:
        x, mask = np.frombuffer(a, np.uint32), 0x7F800000
    else:
        x, mask = np.frombuffer(a, np.uint16), 0x7F80 if kind == BF16 else 0x7C00
    return bool(((x & mask) == mask).any())


def gather(flat, w, in_kind, L, RT, scales, width, base, delta, size) -> None:
    """For each flat index of a block: BASE's element, the delta Σ_k scale_k L[row, k] RT[col, k] and the size
    |w| + Σ_k |scale_k L RT| for its error bound, in float64 (each product of two float32 factors is exact there)."""
    i, j = flat // width, flat % width
    products = np.asarray(L).reshape(-1, len(scales))[i].astype(np.float64) * np.asarray(RT).reshape(
        width, len(scales))[j].astype(np.float64) * scales
    n = len(flat)
    base[:n] = load(in_kind, np.asarray(w)[flat], wide=True) if n else 0
    delta[:n] = products.sum(axis=1)
    size[:n] = np.abs(base[:n]) + np.abs(products).sum(axis=1)


EXACT_TOP, EXACT_LOW = 2.0**1000, 2.0**-900


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a = hi + lo exactly, each with at most 26 significant bits (Veltkamp's split; |a| < 2^995)."""
    c = a * 134217729.0  # 2^27 + 1
    hi = c - (c - a)
    return hi, a - hi


def product_error(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """a·b - p exactly, p = fl(a·b) (Dekker's product: what a fused multiply-add gives, without one)."""
    ah, al = _split(a)
    bh, bl = _split(b)
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


def exact(flat, width, L, RT, scales, w, out) -> None:
    """``_kernels.exact``: w + Σ_k scale_k L[row, k] RT[col, k] for each flat index, exactly, rounded to odd (the
    nearest double by math.fsum of the same terms, moved to its odd neighbour toward what that rounding left); NaN
    where they cannot be split exactly in doubles."""
    n, r = len(flat), len(scales)
    if not n:
        return
    i, j = flat // width, flat % width
    with np.errstate(all="ignore"):
        x = np.asarray(L, np.float32).reshape(-1, r)[i].astype(np.float64) * \
            np.asarray(RT, np.float32).reshape(width, r)[j].astype(np.float64)
        s = np.broadcast_to(np.asarray(scales, np.float64), x.shape)
        p = x * s
        e = product_error(x, s, p)
    there = (p != 0) | ((x != 0) & (s != 0))
    ok = np.all(~there | ((np.abs(p) >= EXACT_LOW) & (np.abs(p) <= EXACT_TOP)), axis=1) & (np.abs(w[:n]) <= EXACT_TOP)
    terms = np.concatenate([np.asarray(w[:n], np.float64)[:, None], p, e], axis=1)  # a row not ok is not summed
    out[:n] = [_to_odd(row) if good else math.nan for row, good in zip(terms.tolist(), ok.tolist(), strict=True)]


def _to_odd(terms: list[float]) -> float:
    nearest = math.fsum(terms)
    left = math.fsum([*terms, -nearest])
    if left != 0 and int(np.float64(nearest).view(np.uint64)) & 1 == 0:
        return math.nextafter(nearest, math.copysign(math.inf, left))
    return nearest


def next_up(x: np.ndarray, top: int) -> np.ndarray:
    """The next value toward +infinity of floats given by their bits (unsigned; ``top`` the sign bit)."""
    t = x.dtype.type
    neg = (x & t(top)) != 0
    return np.where(neg, np.where(x == t(top), t(1), x - t(1)), x + t(1)).astype(x.dtype)


def next_down(x: np.ndarray, top: int) -> np.ndarray:
    """The next value toward -infinity of floats given by their bits."""
    t = x.dtype.type
    neg = (x & t(top)) != 0
    return np.where(neg, x + t(1), np.where(x == 0, t(top | 1), x - t(1))).astype(x.dtype)


def _judged(v, o, e, h_in, h_out) -> np.ndarray:
    """1 where v (within e of the exact sum) rounds to o, 0 where it certainly does not, 2 where it cannot be told."""
    d = np.abs(v - o)
    h_yes = np.where(np.abs(v) >= np.abs(o) + e, h_out, h_in)
    h_no = np.where(np.abs(v) + e < np.abs(o), h_in, h_out)
    return np.where(d + e < h_yes, 1, np.where(d - e > h_no, 0, 2))


def _ulps(u, w, o, mant: int, emin: int) -> float:
    a = np.maximum(np.abs(w), np.abs(o)).astype(np.float64)
    e = np.clip(((a.view(np.uint64) >> np.uint64(52)) & np.uint64(0x7FF)).astype(np.int64) - 1023, emin, 1023)
    err = np.abs(u.astype(np.float64) - w.astype(np.float64)) / np.ldexp(1.0, (e - mant).astype(np.int32))
    err = np.nan_to_num(err, nan=0.0, posinf=np.inf)
    return float(err.max()) if err.size else 0.0


def trip(kind, u, merged, orig, L, R, r, ct, slack, rows, width, c, idx, stats) -> int:
    wide = kind == F32
    bits, top, inf = (np.uint32, 0x80000000, 0x7F800000) if wide else (np.uint16, 0x8000, 0x7F80 if kind == BF16
                                                                        else 0x7C00)
    compute = np.float64 if wide else np.float32
    with np.errstate(all="ignore"):
        p, m = _product(L, R, r, rows, width, compute)
        ub = np.asarray(u).view(bits).reshape(rows, width)
        ob = np.asarray(merged).view(bits).reshape(rows, width)
        value = (lambda x: x.view(np.float32).astype(np.float64)) if wide else (lambda x: load(kind, x))
        o = value(ob)
        eb = compute(ct) * m + compute(slack)
        if wide:
            h_in, h_out = half_spacing32(ob.view(np.float32), True), half_spacing32(ob.view(np.float32), False)
        else:
            h_in, h_out = half_spacing16(kind, ob, True), half_spacing16(kind, ob, False)

        def judged(x):
            v = add(value(x), p)
            return _judged(v, o, compute(c) * np.abs(v) + eb, h_in, h_out)

        at, up, down = judged(ub), judged(next_up(ub, top)), judged(next_down(ub, top))
        finite = ((ub & bits(inf)) != bits(inf)) & ((ob & bits(inf)) != bits(inf))
        no = ~finite | (at == 0) | (up == 1) | (down == 1)
        verdict = np.where(no, 0, np.where((at == 1) & (up == 0) & (down == 0), 1, 2))
        stats[0] += float(np.count_nonzero(verdict == 1))
        if len(orig):
            wb = np.asarray(orig).view(bits).reshape(rows, width)
            stats[1] += float(np.count_nonzero(ub == wb))
            mant, emin = (23, -126) if wide else ((7, -126) if kind == BF16 else (10, -14))
            stats[2] = max(stats[2], _ulps(value(ub), value(wb), o, mant, emin))
    return _listed((verdict == 2).reshape(-1), idx)


# ------------------------------------------------------------------------------ FP8 e4m3 with block scales (_fp8.c)

def _e4m3_table() -> np.ndarray:
    """Each e4m3 code's value (float64; NaN for 0x7F and 0xFF)."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, c & 7
    mag = np.where(e == 0, m * 2.0**-9, np.ldexp(1 + m / 8, e - 7))
    mag = np.where((c & 0x7F) == 0x7F, np.nan, mag)
    return np.where(c & 0x80, -mag, mag)


E4M3 = _e4m3_table()
E4M3_32 = E4M3.astype(np.float32)


def _per_column(values: np.ndarray, cols: int, bn: int) -> np.ndarray:
    return np.repeat(np.asarray(values), bn)[:cols]


def _block_max(x: np.ndarray, cols: int, bn: int) -> np.ndarray:
    """The largest of each block of bn columns over all rows (x rows × cols, non-negative)."""
    blocks = -(-cols // bn)
    padded = np.zeros((x.shape[0], blocks * bn), x.dtype)
    padded[:, :cols] = x
    return padded.reshape(x.shape[0], blocks, bn).max(axis=(0, 2)) if x.shape[0] else np.zeros(blocks, x.dtype)


class _Fp8:
    """The FP8 passes in numpy, as ``_fp8.c`` makes them (their arguments: ``kernels.args``)."""

    @staticmethod
    def fp8_merge(codes, wf, scales, L, R, r, ct, slack, c, rows, cols, bn, L0, RT, sc, power_of_two, fresh_all,
                  k_first, k_last, V, E, S, out, new_scales, status, idx) -> int:
        with np.errstate(all="ignore"):
            p, m = _product(L, R, r, rows, cols, np.float32)
            w = _w32(codes, wf, scales, rows, cols, bn)
            v = add(w, p)
            eb = np.float32(ct) * m + np.float32(slack)
            a = np.abs(v)
            e = np.float32(c) * (a + np.abs(w)) + eb
            state = np.where(np.abs(p) > eb, 2, np.where(m > 0, 1, 0)).astype(np.uint8)
            V[:rows * cols], E[:rows * cols], S[:rows * cols] = v.reshape(-1), e.reshape(-1), state.reshape(-1)
            # the largest exact |value| of each block, in float64 (every product of two float32 factors is exact)
            left = np.asarray(L0, np.float64).reshape(rows, r) * np.asarray(sc)
            right = np.asarray(RT, np.float64).reshape(cols, r).T
            w64 = w.astype(np.float64) if len(wf) else \
                E4M3[np.asarray(codes).reshape(rows, cols)] * _per_column(scales, cols, bn).astype(np.float64)  # exact
            v64 = w64 + left @ right
            size = np.abs(w64) + np.abs(left) @ np.abs(right)
            b = (r + 4) * 2.0**-52 * size + 2.0**-1070
            lo = _block_max(np.maximum(np.abs(v64) - b, 0), cols, bn)
            hi = _block_max(np.abs(v64) + b, cols, bn)
            most = np.full(-(-cols // bn), 2, np.uint8) if fresh_all else _block_max(state, cols, bn)

            def fresh(x):
                q = x / 448.0
                if power_of_two:
                    mant, ex = np.frexp(q)
                    return np.ldexp(1.0, np.where(mant == 0.5, ex - 1, ex))
                return q.astype(np.float32).astype(np.float64)

            low, high = fresh(lo * (1 - 2.0**-50)), fresh(hi * (1 + 2.0**-50))
            decided = (most == 2) & (lo > 0) & (low == high) & (low >= 2.0**-126) & (low <= 2.0**127)
            ours = slice(k_first, k_last)
            status[ours] = np.where(most == 0, 0, np.where(decided, 1, 2))[ours]
            new_scales[ours] = np.where(decided, low, scales).astype(np.float32)[ours]
        keep = np.full(len(most), 2, np.uint8)
        keep[ours] = np.where(status[ours] == 1, 0, np.where(status[ours] == 0, 1, 2))
        return _Fp8.fp8_encode(V, E, new_scales, keep, codes, rows, cols, bn, out, idx)

    @staticmethod
    def fp8_encode(V, E, scales, keep, codes, rows, cols, bn, out, idx) -> int:
        with np.errstate(all="ignore"):
            s = _per_column(scales, cols, bn)
            t = np.asarray(V)[:rows * cols].reshape(rows, cols) / s
            et = np.asarray(E)[:rows * cols].reshape(rows, cols) / s * np.float32(1 + 2.0**-22) + \
                np.abs(t) * np.float32(2.0**-23)
            a = np.abs(t)
            bits = a.view(np.uint32)
            r = (bits + np.uint32(0x7FFFF) + ((bits >> 20) & np.uint32(1))) >> 20
            normal = np.minimum(r.astype(np.int64) - (120 << 3), 0x7E)
            sub = ((a * np.float32(512) + np.float32(2.0**23)) - np.float32(2.0**23)).astype(np.int64)
            big = a >= np.float32(2.0**-6)
            code = np.where(a >= np.float32(448), 0x7E, np.where(big, normal, sub))
            code |= np.where(t.view(np.uint32) >> 31 == 1, 0x80, 0)
            mid = np.where(big, ((bits & np.uint32(0xFFF00000)) | np.uint32(0x00080000)).view(np.float32),
                           (np.floor(a * np.float32(512)) + np.float32(0.5)) * np.float32(2.0**-9))
            quarter = np.where(big, a * np.float32(2.0**-6), np.float32(2.0**-11))
            flag = (~(np.abs(a - mid) > et) | ~(et <= quarter)) & ~(a - et > np.float32(432))
            flag |= ~(a < np.float32(2.0**127))
            kind = _per_column(np.asarray(keep), cols, bn)  # 0: encoded, 1: BASE's codes, 2: left as they are
            stored = np.asarray(codes).reshape(rows, cols)
            target = out.reshape(rows, cols)
            target[...] = np.where(kind == 0, code.astype(np.uint8), np.where(kind == 1, stored, target))
            flag &= kind == 0
        return _listed(flag.reshape(-1), idx)

    @staticmethod
    def fp8_check(base_codes, base_scales, wf, codes, scales, L, R, r, ct, slack, c, rows, cols, bn, idx, sums,
                  blocks) -> int:
        f32 = np.float32
        with np.errstate(all="ignore"):
            p, m = _product(L, R, r, rows, cols, np.float32)
            o = np.asarray(codes).reshape(rows, cols)
            w = _w32(base_codes, wf, base_scales, rows, cols, bn)
            scale = _per_column(scales, cols, bn).astype(np.float32)
            got = E4M3_32[o] * scale
            v = add(w, p)
            a, d = np.abs(v), np.abs(v - got)
            e = f32(c) * (a + np.abs(w) + np.abs(got)) + (f32(ct) * m + f32(slack))
            field = (o.astype(np.int64) >> 3) & 15
            h = scale * np.ldexp(f32(1), (np.maximum(field, 1) - 7 - 3 - 1).astype(np.int32)).astype(np.float32)
            h = np.where(~(a >= np.abs(got) + e) & ((o & 7) == 0) & (field > 1), h * f32(0.5), h)
            flag = ~(d + e < h)
            blocks = np.asarray(blocks).reshape(-1, 3)
            blocks[:, 0] = _block_max(np.maximum(a - e, 0), cols, bn)
            blocks[:, 1] = _block_max(a + e, cols, bn)
            blocks[:, 2] = _block_max((d > e).astype(np.float64), cols, bn)
            _survival(w, v, got, sums)
            _bf16_survival(w, v, sums)
        return _listed(flag.reshape(-1), idx)


def _w32(codes, wf, scales, rows: int, cols: int, bn: int) -> np.ndarray:
    """BASE's values in float32: a float BASE's own (``wf`` not empty), else each code times its block's scale."""
    if len(wf):
        return np.asarray(wf, np.float32)[:rows * cols].reshape(rows, cols)
    return E4M3_32[np.asarray(codes).reshape(rows, cols)] * _per_column(scales, cols, bn)


FP8 = _Fp8()


# ------------------------------------------------------------------------ MXFP4 experts, by stored rows (_mxfp4.c)

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def unpack_nibbles(blocks, rows: int, width: int) -> np.ndarray:
    b = np.asarray(blocks).reshape(rows, width // 2)
    return np.stack((b & 0x0F, b >> 4), axis=-1).reshape(rows, width)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def e8m0(scales) -> np.ndarray:
    s = np.asarray(scales).astype(np.int32)
    return np.where(s == 255, np.float32(np.inf), np.ldexp(np.float32(1), s - 127).astype(np.float32))


def fresh_exponent(x: np.ndarray) -> np.ndarray:
    """The exponent of the smallest power of two s with x <= 6 s (x > 0, float64)."""
    m, e = np.frexp(x / 6.0)
    return np.where(m == 0.5, e - 1, e)


def e2m1_nearest(t: np.ndarray, et: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nearest e2m1 code to t (ties to the even code, 6 at most, the sign kept) and whether et reaches a
    midpoint (as _mxfp4.c)."""
    a = np.abs(t)
    m = ((a > 0.25).astype(np.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    d = np.min(np.abs(a[..., None] - _MIDPOINTS), axis=-1)
    open_ = ~(d > et) | ~(a < np.float32(2.0**127))
    return (m | np.where(np.signbit(t), 8, 0)).astype(np.uint8), open_


class _Mxfp4:
    """The MXFP4 passes in numpy, as ``_mxfp4.c`` makes them (their arguments: ``kernels.args``)."""

    @staticmethod
    def mx_merge(blocks, scales, L, R, r, ct, slack, c, rows, width, L0, RT, sc, out_blocks, out_scales, status,
                 idx) -> int:
        f32, groups = np.float32, width // 32
        with np.errstate(all="ignore"):
            p, m = _product(L, R, r, rows, width, np.float32)
            nib = unpack_nibbles(blocks, rows, width)
            s = np.repeat(e8m0(scales).reshape(rows, groups), 32, axis=1)
            w = E2M1[nib] * s
            v = add(w, p)
            eb = f32(ct) * m + f32(slack)
            a = np.abs(v)
            e = f32(c) * (a + np.abs(w)) + eb
            state = np.where(np.abs(p) > eb, 2, np.where(m > 0, 1, 0)).reshape(rows, groups, 32)
            lo = np.maximum((a - e).reshape(rows, groups, 32).max(axis=2), 0).astype(np.float64)
            hi = (a + e).reshape(rows, groups, 32).max(axis=2).astype(np.float64)
            most = state.max(axis=2)
            ex = fresh_exponent(lo * (1 - 2.0**-22))
            ok = (most == 2) & (hi < 2.0**127) & (lo > 0) & (ex == fresh_exponent(hi * (1 + 2.0**-22))) & \
                (ex >= -127) & (ex <= 127)
            near = (most == 2) & (hi < 2.0**127) & ~ok  # near a boundary: every element in float64
            if near.any():
                w64 = w.astype(np.float64)
                left = np.asarray(L0, np.float64).reshape(rows, r) * np.asarray(sc)
                right = np.asarray(RT, np.float64).reshape(width, r).T
                a64 = np.abs(w64 + left @ right)
                b64 = (r + 4) * 2.0**-52 * (np.abs(w64) + np.abs(left) @ np.abs(right)) + 2.0**-1070
                lo64 = np.maximum((a64 - b64).reshape(rows, groups, 32).max(axis=2), 0)
                hi64 = (a64 + b64).reshape(rows, groups, 32).max(axis=2)
                ex64 = fresh_exponent(np.where(lo64 > 0, lo64, 1.0))
                decided = near & (lo64 > 0) & (ex64 == fresh_exponent(hi64)) & (ex64 >= -127) & (ex64 <= 127)
                ex, ok = np.where(decided, ex64, ex), ok | decided
            st = np.where(most == 0, 0, np.where(ok, 1, 2)).astype(np.uint8)
            status[:] = st.reshape(-1)
            ex = np.where(ok, ex, 0)
            out_scales[:] = np.where(st == 0, np.asarray(scales).reshape(rows, groups), ex + 127).astype(np.uint8).reshape(-1)
            inv = np.repeat(np.ldexp(f32(1), -ex).astype(np.float32), 32, axis=1)
            codes, open_ = e2m1_nearest(v * inv, e * inv)
            merged = np.repeat(st == 1, 32, axis=1)
            codes = np.where(merged, codes, nib)
            np.asarray(out_blocks).reshape(rows, width // 2)[...] = pack_nibbles(codes)
        return _listed((open_ & merged).reshape(-1), idx)

    @staticmethod
    def mx_check(base_blocks, base_scales, blocks, scales, L, R, r, ct, slack, c, rows, width, idx, sums,
                 verdicts) -> int:
        f32, groups = np.float32, width // 32
        with np.errstate(all="ignore"):
            p, m = _product(L, R, r, rows, width, np.float32)
            bn, on = unpack_nibbles(base_blocks, rows, width), unpack_nibbles(blocks, rows, width)
            scale = np.repeat(e8m0(scales).reshape(rows, groups), 32, axis=1)
            w = E2M1[bn] * np.repeat(e8m0(base_scales).reshape(rows, groups), 32, axis=1)
            got = E2M1[on] * scale
            v = add(w, p)
            a, d = np.abs(v), np.abs(v - got)
            e = f32(c) * (a + np.abs(w) + np.abs(got)) + (f32(ct) * m + f32(slack))
            mag = on & 7
            h_out = np.where(mag < 4, f32(0.25), np.where(mag < 6, f32(0.5), f32(1.0)))
            h_in = np.where(mag < 5, f32(0.25), np.where(mag < 7, f32(0.5), f32(1.0)))
            below = ~(a >= np.abs(got) + e)
            flag = ~(d + e < np.where(below, h_in, h_out) * scale)
            lo = np.maximum((a - e).reshape(rows, groups, 32).max(axis=2), 0).astype(np.float64)
            hi = np.maximum((a + e).reshape(rows, groups, 32).max(axis=2), 0).astype(np.float64)
            differs = (d > e).reshape(rows, groups, 32).any(axis=2)
            low = np.clip(np.where(lo > 0, fresh_exponent(lo * (1 - 2.0**-22)), -127), -127, None)
            high = np.clip(np.where(hi > 0, fresh_exponent(hi * (1 + 2.0**-22)), -127), -127, 127)
            have = np.asarray(scales).reshape(rows, groups).astype(np.int64) - 127
            wrong = differs & ~((low <= have) & (have <= high))
            verdicts[:] = (differs.astype(np.uint8) | (wrong.astype(np.uint8) << 1)).reshape(-1)
            _survival(w, v, got, sums)
            _bf16_survival(w, v, sums)
        return _listed(flag.reshape(-1), idx)


MXFP4 = _Mxfp4()
