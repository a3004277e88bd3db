"""The check's own values of the adapter kinds of ``kinds.py`` and ``transforms.py``, in float64, apart from the
merge's (``kindmath.py`` and the modules it calls).

LoHa's two products are taken as one product of rank r1·r2 (each term a pair of factors multiplied first), its CP
halves each in one contraction; LoKr's rows as a slice of torch's own ``kron`` over the few rows of the first factor
they come from; MiSS by repeating its block; FourierFT through torch's FFT; IA3 by broadcasting; OFT's series by
Horner's rule and its Cayley map through torch's inverse; HRA in the compact WY form; RoAd through complex numbers.
Each gives, beside the value, the sum of the magnitudes of its terms at chosen elements, which the rounding bound
needs.
"""

from __future__ import annotations

import torch

from ..kinds import Hadamard, Kronecker, Spectrum, Tiled
from ..transforms import Pairs, Reflection, Rotation, Scaling


def _factor(f, t):
    return f.get(t).reshape(t.shape[0], -1)


def kind_rows(d, f, start: int, stop: int):
    """(value, at) of rows [start, stop) of the delta ``d`` on the stored tensor seen as rows × columns: ``at(flat)``
    the sum of the magnitudes of the terms at chosen flat indices (the bound needs them only where it measures)."""
    if isinstance(d, Hadamard):
        if len(d.w1) == 3:  # the CP form (a kernel, never transposed): each half in one contraction
            (h1, m1), (h2, m2) = (_cp(f, parts, start, stop) for parts in (d.w1, d.w2))
            return h1 * h2 * d.scale, _everywhere(m1 * m2 * abs(d.scale))
        w1a, w1b, w2a, w2b = (_factor(f, t) for t in d.tensors())
        if d.transposed:  # stored rows are the logical columns
            w1a, w1b, w2a, w2b = w1b.T, w1a.T, w2b.T, w2a.T
        r1, r2 = w1a.shape[1], w2a.shape[1]
        left = (w1a[start:stop, :, None] * w2a[start:stop, None, :]).reshape(stop - start, r1 * r2)
        right = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, -1)
        la, ra, width, scale = left.abs(), right.abs(), right.shape[1], abs(d.scale)
        return (left @ right) * d.scale, lambda flat: (la[flat // width] * ra[:, flat % width].T).sum(1) * scale
    if isinstance(d, Kronecker):
        w1, w2 = (_full(f, parts, False) for parts in (d.w1, d.w2))
        m1, m2 = (_full(f, parts, True) for parts in (d.w1, d.w2))
        if d.transposed:
            w1, w2, m1, m2 = w1.T, w2.T, m1.T, m2.T
        m = w2.shape[0]
        first, last = start // m, (stop - 1) // m + 1
        skip = start - first * m
        value = torch.kron(w1[first:last], w2)[skip:skip + stop - start] * d.scale
        n, width, scale = w2.shape[1], value.shape[1], abs(d.scale)

        def at(flat):
            i, j = flat // width + start, flat % width
            return m1[i // m, j // n] * m2[i % m, j % n] * scale

        return value, at
    if isinstance(d, Tiled):  # the block's transpose repeated down the rows asked for and across, then cut
        t = _factor(f, d.block).T
        (m, r), width = t.shape, d.size[1]
        first = start // m
        rows = t.repeat(-(-stop // m) - first, 1)[start - first * m:stop - first * m]
        value = rows.repeat(1, -(-width // r))[:, :width] * d.scale
        return value, lambda flat: value.reshape(-1)[flat].abs()
    if isinstance(d, Spectrum):
        return _spectrum_rows(d, f, start, stop)
    raise AssertionError(f"no check for the delta {d!r}")


def _spectrum_rows(d: Spectrum, f, start: int, stop: int):
    """FourierFT through torch's FFT: each spectrum row's inverse FFT along the columns, then the real part of the
    rows' sum weighted by e^{2πi·u·i/M}, one weight per distinct row (the merge sums each term's cosines instead);
    |terms| ≤ K·Σ|c| at every element."""
    rows, columns, m, total = f.derived(("spectrum", id(d)), lambda: _spectrum_columns(d, f))
    i = torch.arange(start, stop, device=columns.device)
    turns = (i[:, None] * rows[None, :]) % m
    angle = turns.to(torch.float64) * (2 * torch.pi / m)
    value = (angle.cos() @ columns.real - angle.sin() @ columns.imag) * (d.scale / m)  # the real part only
    return value, lambda flat: torch.full(flat.shape, total, dtype=torch.float64, device=value.device)


def _spectrum_columns(d: Spectrum, f):
    """Once per tensor: the distinct stored rows of the spectrum, each one's inverse FFT along the columns, the
    stored row count M, and K·Σ|c|."""
    u, v = d.positions()
    m, n = d.size
    c = f.get(d.spectrum).reshape(-1)
    if d.transposed:  # stored rows are logical columns
        u, v, m, n = v, u, n, m
    rows, at = torch.unique(u, return_inverse=True)
    dense = torch.zeros(len(rows), n, dtype=torch.complex128, device=c.device)
    dense[at.to(c.device), v.to(c.device)] = c.to(torch.complex128)
    columns = torch.fft.ifft(dense, dim=1)  # (1/N) Σ_v S[u, v] e^{2πi v j / N}
    total = float(c.abs().sum()) * abs(d.scale) / (m * n)
    return rows.to(c.device), columns, m, total


def _everywhere(magnitude):
    """Σ|terms| at chosen elements, from all of them."""
    return magnitude.reshape(-1).__getitem__


def _cp(f, parts, start: int, stop: int):
    """Rows [start, stop) of a CP factor, F[p, c, k, l] = Σᵢⱼ t[i, j, k, l] a[i, p] b[j, c], and of Σ|terms|."""
    t, a, b = (f.get(x) for x in parts)
    a = a[:, start:stop]
    value = torch.einsum("ijkl,ip,jc->pckl", t, a, b).reshape(stop - start, -1)
    magnitude = torch.einsum("ijkl,ip,jc->pckl", t.abs(), a.abs(), b.abs()).reshape(stop - start, -1)
    return value, magnitude


def _full(f, parts, magnitude: bool):
    """A LoKr factor as a full matrix (of magnitudes: |a| @ |b| for a low-rank one), a kernel flattened."""
    if len(parts) == 3:
        return _cp(f, parts, 0, parts[1].shape[1])[int(magnitude)]
    if len(parts) == 1:
        t = _factor(f, parts[0])
        return t.abs() if magnitude else t
    a, b = _factor(f, parts[0]), _factor(f, parts[1])
    return a.abs() @ b.abs() if magnitude else a @ b


def multiplied(value, m, f, start: int, stop: int) -> tuple[int, list]:
    """``value`` (rows [start, stop) of the stored tensor, float64: BASE's) transformed in place by IA3 or OFT;
    returns the terms and the bound's products, as ``_add_deltas`` does (none for IA3's product: exact in
    float64)."""
    if isinstance(m, Rotation):
        return m.size + len(m.powers()) + 2, [_rotated(value, m, f, start, stop)]
    if isinstance(m, Reflection):
        return m.u.shape[0] + 2 * m.u.shape[1], [_reflected(value, m, f)]
    if isinstance(m, Pairs):
        return 8, [_paired(value, m, f, start, stop)]
    _scaled(value, m, f, start, stop)
    if m.inverse:  # W ⊘ l rounds once in float64: |W ⊘ l| in the bound covers it
        return 1, [_everywhere(value.abs())]
    return 0, []


def _rotated(value, m: Rotation, f, start: int, stop: int):
    """OFT and BOFT: each row's blocks times Rᵀ (BOFT's rows then scaled). Returns Σ|W||R| at chosen elements."""
    b = m.size
    n = value.shape[-1] // b
    r, size = f.derived(("rotation", id(m)), lambda: _rotation(m, f))
    if m.shared:
        r, size = r.expand(n, -1, -1), size.expand(n, -1, -1)
    w = value.reshape(value.shape[0], n, b)
    total = torch.einsum("nrk,rck->nrc", w, r)  # w · rᵀ per block
    s = f.get(m.rows).reshape(-1)[start:stop] if m.rows is not None else None
    if s is not None:  # BOFT's scale of each output row
        total = total * s.reshape(-1, 1, 1)
    w_abs, width = w.abs(), n * b
    scale = s.abs() if s is not None else None

    def at(flat):  # Σₖ |W[i, g·b + k]|·|R_g[c, k]| at chosen elements
        i, j = flat // width, flat % width
        g, c = j // b, j % b
        sizes = (w_abs[i, g] * size[g, c]).sum(1)
        return sizes * scale[i] if scale is not None else sizes

    value.copy_(total.reshape(value.shape))
    return at


def _rotation(m: Rotation, f):
    """(R, Σ|terms| of R) of every block, once per tensor: the Neumann series by Horner's rule (the merge sums the
    powers), the Cayley map through torch's inverse (the merge solves)."""
    b = m.size
    if m.full:  # BOFT stores whole matrices D: Q = ½(D − Dᵀ)
        d = f.get(m.q).reshape(-1, b, b)
        skew = 0.5 * d - 0.5 * d.transpose(1, 2)
    else:
        q = f.get(m.q).reshape(m.q.shape[0], -1)
        rows, cols = torch.triu_indices(b, b, 1, device=q.device)
        upper = torch.zeros(q.shape[0], b, b, dtype=q.dtype, device=q.device)
        upper[:, rows, cols] = q
        skew = upper - upper.transpose(1, 2)
    if not m.terms:
        eye = torch.eye(b, dtype=skew.dtype, device=skew.device)
        r = (eye - skew) @ torch.linalg.inv(eye + skew)
        return r, r.abs()
    # R by Horner's rule, c₀I + Q(c₁I + Q(c₂I + …)), and Σ|cₖ|·|Q|^k the same way
    coefficients = dict(m.powers())
    eye = torch.eye(b, dtype=skew.dtype, device=skew.device).expand_as(skew)
    r, size = torch.zeros_like(skew), torch.zeros_like(skew)
    for k in range(max(coefficients), -1, -1):
        c = coefficients.get(k, 0.0)
        r, size = c * eye + skew @ r, abs(c) * eye + skew.abs() @ size
    return r, size


def _reflected(value, m: Reflection, f):
    """HRA in the compact WY form: H₀H₁⋯H_{r−1} = I − U·T·Uᵀ, T upper triangular from τᵢ = 2 / uᵢᵀuᵢ and UᵀU
    (never the reflections one by one, as the merge applies them); returns Σ|W||H| at chosen elements."""
    u = f.get(m.u)
    r = u.shape[1]
    gram = u.T @ u
    tau = 2 / gram.diagonal()
    t = torch.zeros(r, r, dtype=u.dtype, device=u.device)
    for k in range(r):  # [T, −τ T Uᵀu; 0, τ]
        t[:k, k] = -tau[k] * (t[:k, :k] @ gram[:k, k])
        t[k, k] = tau[k]
    w = value.clone()
    value.sub_((w @ u) @ t @ u.T)
    ua = u.abs()
    left, width = (w.abs() @ ua) @ t.abs(), w.shape[1]  # (rows × r)

    def at(flat):  # |W| + |W||U||T||U|ᵀ at chosen elements
        i, j = flat // width, flat % width
        return w[i, j].abs() + (left[i] * ua[j]).sum(1)

    return at


def _paired(value, m: Pairs, f, start: int, stop: int):
    """RoAd as peft's own forward writes it, applied to the rows: value·f + rotate_half(value)·s, f and s taken from
    one complex number α·e^{iθ} per column (never the merge's cos and sin); returns |f||W| + |s||W'| at chosen
    elements."""
    a1, t1, a2, t2 = m.per_row(f.get(m.theta).reshape(-1), f.get(m.alpha).reshape(-1))
    first = torch.polar(a1.abs(), t1).real * a1.sign()
    second = torch.polar(a2.abs(), t2).imag * a2.sign()
    rows = value.shape[0]
    flat = value.reshape(rows, -1)
    halves = flat.reshape(-1, 2, m.group // 2, flat.shape[1])
    rotated = torch.stack((-halves[:, 1], halves[:, 0]), dim=1).reshape(flat.shape)
    fc, sc = first[start:stop, None], second[start:stop, None]
    flat.copy_(flat * fc + rotated * sc)
    g, h, width = m.group, m.group // 2, flat.shape[1]

    def at(flat_index):  # |f||W| + |s||W's partner|; W[i] is ±rotated[partner of i]
        i, j = flat_index // width, flat_index % width
        partner = torch.where(i % g < h, i + h, i - h)
        return rotated[partner, j].abs() * fc[i, 0].abs() + rotated[i, j].abs() * sc[i, 0].abs()

    return at


def _scaled(value, m: Scaling, f, start: int, stop: int) -> None:
    """IA3: ``value`` (rows [start, stop) of the stored tensor, float64) times its factors (divided by them where
    IA3 is taken back out), in place."""
    l = f.get(m.l).reshape(-1)  # noqa: E741
    if value.dim() == 1:
        factor = l[start:stop]
    else:
        shape = [1] * value.dim()
        axis = m.stored_axis(value.dim())
        shape[axis] = -1
        factor = l[start:stop].reshape(shape) if axis == 0 else l.reshape(shape)
    if m.inverse:
        value.div_(factor)
    else:
        value.mul_(factor)
