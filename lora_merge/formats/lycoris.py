"""LoHa and LoKr tensors by the role names LyCORIS gave them, which peft's adapters and kohya-style files share
(``hada_w1_a`` …, ``lokr_w1`` …): the factors of ``kinds.Hadamard`` and ``kinds.Kronecker``, or what is missing."""

from __future__ import annotations

from ..kinds import Hadamard, Kronecker

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def loha(parts: dict, scale: float) -> Hadamard | str:
    """Each half a low-rank product, or with ``hada_t1``/``hada_t2`` its CP form (a convolution's)."""
    need = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
    cp = "hada_t1" in parts or "hada_t2" in parts
    if cp:
        need += ["hada_t1", "hada_t2"]
    if any(n not in parts for n in need):
        return f"LoHa needs {', '.join(need)}; found {sorted(parts)}"
    halves = [tuple(parts[f"hada_{n}"] for n in ((f"t{i}",) if cp else ()) + (f"w{i}_a", f"w{i}_b")) for i in (1, 2)]
    return Hadamard(halves[0], halves[1], scale)


def lokr_factors(parts: dict) -> list[tuple] | str:
    """(w1, w2): each full (``lokr_wN``) or a low-rank product (``lokr_wN_a``, ``lokr_wN_b``), w2 also the CP form
    with ``lokr_t2``."""
    factors = []
    for i in (1, 2):
        full, low = parts.get(f"lokr_w{i}"), (parts.get(f"lokr_w{i}_a"), parts.get(f"lokr_w{i}_b"))
        core = parts.get("lokr_t2") if i == 2 else None
        if full is not None and low == (None, None) and core is None:
            factors.append((full,))
        elif full is None and None not in low:
            factors.append(low if core is None else (core, *low))
        else:
            return f"LoKr needs lokr_w{i}, or lokr_w{i}_a and lokr_w{i}_b; found {sorted(parts)}"
    return factors


def lokr(parts: dict, scale: float) -> Kronecker | str:
    factors = lokr_factors(parts)
    return factors if isinstance(factors, str) else Kronecker(factors[0], factors[1], scale)
