"""The merge's arithmetic for the kinds that mix each stored row's columns, rounded once from the exact value:
OFT and BOFT (``transforms.Rotation``, ``W' = W · Rᵀ`` block by block, BOFT's rows then scaled) and HRA
(``transforms.Reflection``, ``W' = W · H₀H₁⋯``).

Each block's R is computed in float64 together with a bound on every element's error: through each power of Q for
the Neumann series (a product of b terms errs by at most γ_b times the product of magnitudes), or, for the Cayley
map, from the residual R̃(I + Q) − (I − Q), since a skew-symmetric Q gives ‖(I + Q)⁻¹‖₂ ≤ 1 and so no row of
R̃ − R is longer than that row of the residual. A merged element then errs by at most |W| · (γ_b|R̃| + E)ᵀ over its
block, itself at most Σ|W| over the block times that matrix's largest entry (the bound taken). Where that bound
holds a rounding boundary of the output dtype, the exact value is taken in fractions (the row of the exact R: the
series applied to a unit vector, or a solve of (I − Q) x = (I + Q) e_c) and rounded to odd (``exact.to_odd``), so
that the one rounding that follows is the exact value's.

HRA reflects each row in turn, x ← x − t·u with t = 2(x·u)/(u·u), as peft does, and carries a bound on each
element's error through every reflection: the error already in x, the rounding of the dot products (γₙ times the sum
of magnitudes) and of the division, times |u|, plus the rounding of the update. Its exact value is the same
reflections in integers over one common denominator (u·u is a sum of squares of stored values: the row stays
rational).
"""

from __future__ import annotations

from fractions import Fraction

import torch

from .transforms import Reflection, Rotation

UNIT = 2.0**-53
SLACK = 1.01  # covers the float64 roundings of the bound's own computation, many times over


def skew(q: torch.Tensor, b: int) -> torch.Tensor:
    """(n, b, b) skew-symmetric matrices from their upper triangles (n, b(b−1)/2), as peft lays them out."""
    rows, cols = torch.triu_indices(b, b, 1, device=q.device)
    m = torch.zeros(q.shape[0], b, b, dtype=q.dtype, device=q.device)
    m[:, rows, cols] = q
    return m - m.transpose(1, 2)


class Rotated:
    """One OFT target's blocks: R̃ (float64), each element's error bound, and exact rows on demand."""

    def __init__(self, m: Rotation, device):
        self.m, b = m, m.size
        raw = m.q.load().to(device=device, dtype=torch.float64)
        if m.full:  # BOFT: Q = ½(D − Dᵀ), the difference rounded once in float64
            self.stored = raw.reshape(-1, b, b)
            self.q = (self.stored - self.stored.transpose(1, 2)) * 0.5
            self.q_error = self.q.abs() * UNIT
        else:
            self.stored = None
            self.q = skew(raw.reshape(m.q.shape[0], -1), b)
            self.q_error = torch.zeros_like(self.q)
        self.s = m.rows.load().to(device=device, dtype=torch.float64).reshape(-1) if m.rows is not None else None
        gamma = (b + 1) * UNIT
        self.r, err = self._neumann(gamma) if m.terms else self._cayley(gamma)
        self.magnitude = (self.r.abs() * gamma + err) * SLACK  # per unit of |W|
        self.largest = (self.magnitude.amax(dim=(1, 2)), self.r.abs().amax(dim=(1, 2)))  # each block's, for bound
        self._rows: dict[tuple[int, int], list[Fraction]] = {}

    def _neumann(self, gamma: float):
        q, aq = self.q, self.q.abs()
        eye = torch.eye(self.m.size, dtype=q.dtype, device=q.device).expand_as(q)
        r, err, total = torch.zeros_like(q), torch.zeros_like(q), torch.zeros_like(q)
        power, power_err = eye, torch.zeros_like(q)
        coefficients = dict(self.m.powers())
        for k in range(max(coefficients) + 1):
            if k == 1:
                power = q  # exact
            elif k > 1:
                power_err = power_err @ aq + gamma * (power.abs() @ aq)
                power = power @ q
            if k in coefficients:
                c = coefficients[k]
                r = r + c * power
                err += abs(c) * power_err
                total += abs(c) * power.abs()
        return r, err + len(coefficients) * UNIT * total

    def _cayley(self, gamma: float):
        q = self.q
        eye = torch.eye(self.m.size, dtype=q.dtype, device=q.device).expand_as(q)
        r = torch.linalg.solve(eye + q, eye - q, left=False)
        residual = r @ (eye + q) - (eye - q)
        # the residual's own roundings, and Q's (BOFT's ½(D − Dᵀ)): R̃(I + Q) − (I − Q) differs by |R̃||ΔQ| + |ΔQ|
        noise = gamma * (r.abs() @ (eye + q).abs() + (eye - q).abs()) + r.abs() @ self.q_error + self.q_error
        row = residual.norm(dim=2) + noise.norm(dim=2)  # (n, b): no row of R̃ − R is longer
        return r, row[:, :, None].expand_as(r)

    def _blocks(self, t: torch.Tensor, width: int) -> torch.Tensor:
        n = width // self.m.size
        return t.expand(n, -1, -1) if self.m.shared else t

    def _turn(self, w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        rows, width = w.shape[0], w.shape[-1]
        blocks = w.reshape(rows, width // self.m.size, self.m.size)
        return torch.einsum("nrk,rck->nrc", blocks, self._blocks(r, width)).reshape(w.shape)

    def apply(self, v: torch.Tensor, start: int) -> None:
        """Rows ``v`` (float64, rows × width, from row ``start``) times Rᵀ, block by block (then BOFT's row scale),
        in place."""
        v.copy_(self._turn(v, self.r))
        if self.s is not None:
            v.mul_(self.s[start:start + v.shape[0], None])

    def bound(self, w: torch.Tensor, start: int) -> torch.Tensor:
        """Each merged element's error bound, from BASE's rows ``w`` (float64) from row ``start``: per row and block,
        Σ|W| over the block times the block's largest error per unit (looser than Σ|W||E| by at most b, and no
        second product as large as the transform's)."""
        b = self.m.size
        sums = w.abs().reshape(w.shape[0], -1, b).sum(2, keepdim=True)  # (rows × blocks × 1)
        largest, size = (x.reshape(1, -1, 1) for x in self.largest)
        bound = (sums * largest).expand(-1, -1, b)
        if self.s is not None:  # |s|·(bound + u·|W·Rᵀ|): the scaling's own rounding
            bound = bound + (sums * size * SLACK + bound) * UNIT
            bound = bound * self.s[start:start + w.shape[0], None, None].abs()
        return bound.reshape(w.shape).contiguous()

    def exact(self, w_row: list[float], j: int, row: int) -> Fraction:
        """The exact merged value at column ``j`` of stored row ``row``, whose BASE values are ``w_row``."""
        b = self.m.size
        g, c = divmod(j, b)
        coefficients = self._row(0 if self.m.shared else g, c)
        value = sum((Fraction(w_row[g * b + k]) * coefficients[k] for k in range(b)), Fraction(0))
        return value if self.s is None else value * Fraction(float(self.s[row]))

    def _row(self, g: int, c: int) -> list[Fraction]:
        """Row ``c`` of block ``g``'s exact R, in fractions."""
        if (g, c) not in self._rows:
            if self.stored is not None:  # Q = ½(D − Dᵀ) from the stored values
                d = [[Fraction(float(x)) for x in row] for row in self.stored[g].tolist()]
                q = [[(d[i][k] - d[k][i]) / 2 for k in range(len(d))] for i in range(len(d))]
            else:
                q = [[Fraction(float(x)) for x in row] for row in self.q[g].tolist()]
            self._rows[g, c] = _series_row(q, c, self.m.powers()) if self.m.terms else _cayley_row(q, c)
        return self._rows[g, c]


def _series_row(q, c: int, powers) -> list[Fraction]:
    """Row c of Σ coefficient · Q^k: the unit row vector carried through the powers."""
    b = len(q)
    x = [Fraction(int(k == c)) for k in range(b)]
    out = [Fraction(0)] * b
    coefficients = dict(powers)
    for k in range(max(coefficients) + 1):
        if k:
            x = [sum((x[i] * q[i][j] for i in range(b)), Fraction(0)) for j in range(b)]
        if k in coefficients:
            out = [o + Fraction(coefficients[k]) * xi for o, xi in zip(out, x)]
    return out


def _cayley_row(q, c: int) -> list[Fraction]:
    """Row c of (I − Q)(I + Q)⁻¹: the solution x of (I − Q) x = (I + Q) e_c (Q skew), by elimination."""
    b = len(q)
    a = [[Fraction(int(i == j)) - q[i][j] for j in range(b)] + [Fraction(int(i == c)) + q[i][c]] for i in range(b)]
    for col in range(b):
        pivot = next(i for i in range(col, b) if a[i][col] != 0)  # I − Q is never singular
        a[col], a[pivot] = a[pivot], a[col]
        for i in range(b):
            if i != col and a[i][col] != 0:
                f = a[i][col] / a[col][col]
                a[i] = [x - f * y for x, y in zip(a[i], a[col])]
    return [a[i][b] / a[i][i] for i in range(b)]


class Reflected:
    """One HRA target: its reflections applied to rows in float64, with each element's error bound, and exactly."""

    def __init__(self, m: Reflection, device):
        self.u = m.u.load().to(device=device, dtype=torch.float64)
        self.uu = (self.u * self.u).sum(dim=0)
        n = self.u.shape[0]
        self.gamma = n * UNIT / (1 - n * UNIT)
        self._row = (None, None)
        self._columns = None  # each column of u as integers (``_integers``), made at the first exact row

    def apply(self, v: torch.Tensor, start: int = 0) -> None:
        """Rows ``v`` (float64) reflected by each column of u in turn, in place."""
        for k in range(self.u.shape[1]):
            u = self.u[:, k]
            t = (v @ u) * 2 / self.uu[k]
            v.sub_(t[:, None] * u[None, :])

    def bound(self, w: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Each element's error bound after ``apply`` on BASE's rows ``w`` (float64): the reflections again, each
        one's roundings carried into the next. The bound before reflection k is kept as
        ``Σ_{k'<k} b_k' |u_k'| + u·ρ·k·|W|`` (one coefficient per row and earlier reflection), using
        ``|x̃_m| ≤ ρ(|W| + Σ_{k'<m} |t̃_k'||u_k'|)``, ρ = 1 + 3ru ≥ (1 + u)^{2r}; its products with |u_k| then come
        from |W|·|U| and |U|ᵀ|U|, and only the last is as large as W."""
        g, r = self.gamma, self.u.shape[1]
        if not r:
            return torch.zeros_like(w)
        rho = 1 + 3 * r * UNIT
        au = self.u.abs()
        gram, p = au.T @ au, w.abs() @ au  # (r × r), (rows × r)
        x, ts, a = w.clone(), [], []  # |t̃_k| and dt_k + u|t̃_k| per reflection, one value per row
        for k in range(r):
            u = self.u[:, k]
            t = (x @ u) * 2 / self.uu[k]
            e_dot = p[:, k] * (UNIT * rho * k)  # (bound before reflection k)·|u_k|
            x_dot = p[:, k].clone()  # at least |x̃_k|·|u_k|, over ρ
            for j in range(k):
                e_dot += (a[j] + ts[j] * (UNIT * rho * (k - j))) * gram[j, k]
                x_dot += ts[j] * gram[j, k]
            dt = (e_dot + x_dot * (rho * g)) * (2 * (1 + 2 * g) / self.uu[k]) + t.abs() * (g + 3 * UNIT)
            x.sub_(t[:, None] * u[None, :])
            ts.append(t.abs())
            a.append(dt + ts[-1] * UNIT)
        coefficients = torch.stack([a[k] + ts[k] * (UNIT * rho * (r - k)) for k in range(r)], dim=1)
        return (coefficients @ au.T).add_(w.abs(), alpha=UNIT * rho * r).mul_(SLACK)

    def exact(self, w_row: list[float], j: int, row: int = 0) -> Fraction:
        """The exact reflected value at column ``j`` of the row whose BASE values are ``w_row``: the reflections in
        integers over one common denominator, x ← (x·(u·u) − 2(x·u)·u) / (u·u) with u scaled to integers (the
        scale cancels), so no fraction is reduced on the way."""
        if self._row[0] is not w_row:
            if self._columns is None:
                self._columns = [_integers(col) for col in self.u.T.tolist()]
            x, denominator = _integers(w_row)
            for u, _ in self._columns:
                uu = sum(a * a for a in u)
                xu2 = 2 * sum(a * b for a, b in zip(x, u))
                x = [a * uu - xu2 * b for a, b in zip(x, u)]
                denominator *= uu
            self._row = (w_row, (x, denominator))
        x, denominator = self._row[1]
        return Fraction(x[j], denominator)


def _integers(values: list[float]) -> tuple[list[int], int]:
    """Doubles as integers over one common power of two: (numerators, denominator)."""
    parts = [v.as_integer_ratio() for v in values]
    denominator = max(d for _, d in parts)
    return [n * (denominator // d) for n, d in parts], denominator


def transform(m, device):
    """The merge's arithmetic for one OFT, BOFT or HRA target."""
    return Rotated(m, device) if isinstance(m, Rotation) else Reflected(m, device)
