"""loralib, the original LoRA code: a plain state dict of ``<module>.lora_A`` / ``.lora_B``, no config.

r comes from the shapes; alpha is not saved, so the user gives it. ``s = lora_alpha / r``.
- Linear: ``W += s · T(B @ A)``, T a transpose for layers built with ``fan_in_fan_out``.
- Embedding: ``W += s · (B @ A)^T`` (A is r × vocab).
- MergedLinear (fused qkv, ``enable_lora``): A is (r·k × in), B (out/n·k × r) for k of n parts
  enabled; part g's delta ``B_g @ A_g`` fills the g-th enabled block of rows, the others get zero.
- ConvLoRA (Conv2d, weight ``<module>.conv.weight``): ``W += s · (B @ A).view(W.shape)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..adapter import Adapter, DerivedTensor, LowRank, TargetOps
from ..errors import AdapterConfigError, PlanError
from .files import positive_number, read_tensor_file

ROLES = {"lora_A": "a", "lora_B": "b"}


def parse_enable_lora(text: str | None) -> list[bool] | None:
    """``q,v`` (of a fused q,k,v) or ``1,0,1`` / ``true,false,true``, as loralib's enable_lora list."""
    if text is None:
        return None
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    flags = {"1": True, "true": True, "0": False, "false": False}
    if parts and all(p in flags for p in parts):
        return [flags[p] for p in parts]
    if parts and set(parts) <= set("qkv") and len(set(parts)) == len(parts):
        return [n in parts for n in "qkv"]
    raise ValueError(f"{text!r}: name parts among q,k,v (e.g. q,v) or give one flag per part (e.g. 1,0,1)")


@dataclass(frozen=True)
class LoralibOptions:
    """What a loralib state dict does not record."""

    lora_alpha: float | None = None  # the lora_alpha the layers were built with
    fan_in_fan_out: bool = False  # the layers were built with fan_in_fan_out=True (weights stored in × out)
    enable_lora: list[bool] | None = None  # MergedLinear: which fused parts have LoRA (``parse_enable_lora``)


def _padded_b(b, enable: list[bool], r: int) -> DerivedTensor:
    """MergedLinear's B as one (out × r·k) matrix: part g's B in the g-th enabled row block and the
    g-th block of r columns, zero elsewhere; then ``B_full @ A`` is loralib's zero-padded grouped product."""
    k = sum(enable)
    part = b.shape[0] // k
    out = part * len(enable)
    blocks = [i for i, on in enumerate(enable) if on]

    def make(t):
        full = t.new_zeros((out, r * k))
        for g, p in enumerate(blocks):
            full[p * part:(p + 1) * part, g * r:(g + 1) * r] = t[g * part:(g + 1) * part]
        return full

    return DerivedTensor(b, (out, r * k), make)


def _conv_factors(a, b, w_shape: tuple[int, ...]):
    """ConvLoRA's ``(B @ A).view(W.shape)`` as a product of a (out × R) and a (R × in·k·k) matrix:
    row o of W is rows o·k … o·k+k-1 of B @ A laid end to end, so B is regrouped by k rows and A
    repeated k times down a block diagonal (the zeros add nothing)."""
    import torch

    k = w_shape[-1]
    out = w_shape[0]
    rk = a.shape[0]
    a_full = DerivedTensor(a, (k * rk, *w_shape[1:]),
                           lambda t: torch.block_diag(*([t] * k)).reshape(k * rk, *w_shape[1:]))
    b_full = DerivedTensor(b, (out, k * rk, *([1] * (len(w_shape) - 2))),
                           lambda t: t.reshape(out, k * rk, *([1] * (len(w_shape) - 2))))
    return a_full, b_full


def tensor_file(path: Path, what: str) -> Path:
    """The one tensor file of a single-file adapter: PATH itself, or the only one in the folder PATH."""
    from ..names import ADAPTER_TENSOR_SUFFIXES

    if not path.is_dir():
        return path
    found = sorted(p for p in path.iterdir() if not p.is_dir() and p.suffix in ADAPTER_TENSOR_SUFFIXES)
    if len(found) != 1:
        raise AdapterConfigError(
            f"ADAPTER {str(path)!r}: a {what} adapter is one tensor file, and this folder holds "
            f"{len(found) or 'no'} ({', '.join(p.name for p in found[:5])})" if found else
            f"ADAPTER {str(path)!r}: a {what} adapter is one tensor file, and this folder holds none",
            "pass the file itself as ADAPTER",
        )
    return found[0]


def load_loralib_adapter(path: Path, base_shapes: dict[str, tuple[int, ...]], options: LoralibOptions) -> Adapter:
    file = tensor_file(path, "loralib")
    if options.lora_alpha is None:
        raise AdapterConfigError(
            f"ADAPTER {str(path)!r} is a loralib state dict, which does not record lora_alpha",
            "pass --lora-alpha with the value the LoRA layers were built with",
        )
    positive_number(options.lora_alpha, "--lora-alpha", f"ADAPTER {str(path)!r}")
    tensors = read_tensor_file(file)
    groups: dict[str, dict] = {}
    targets: dict[str, TargetOps] = {}
    problems: list[str] = []
    for key, t in tensors.items():
        module, _, last = key.rpartition(".")
        if last in ROLES:
            groups.setdefault(module, {})[ROLES[last]] = t
        elif "lora_" in key:
            problems.append(f"{key}: not a loralib tensor (lora_A or lora_B)")
        else:  # a trained bias saved with lora_state_dict(bias='all' or 'lora_only'): it replaces the base's
            targets[key] = TargetOps(name=key, module=module, replace=t)

    for module, parts in sorted(groups.items()):
        a, b = parts.get("a"), parts.get("b")
        if a is None or b is None:
            problems.append(f"{module}: has lora_{'A' if a is not None else 'B'} but not its partner")
            continue
        name = next((n for n in (f"{module}.weight", f"{module}.conv.weight") if n in base_shapes), None)
        if name is None:
            problems.append(f"{module}: BASE has no {module}.weight (or {module}.conv.weight for ConvLoRA)")
            continue
        w_shape = base_shapes[name]
        op = TargetOps(name=name, module=module, fan_in_fan_out=options.fan_in_fan_out)
        if len(a.shape) != 2 or len(b.shape) != 2:
            problems.append(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not matrices")
            continue
        if len(w_shape) == 4:  # ConvLoRA: A (r·k × in·k), B (out·k × r·k)
            k = w_shape[-1]
            if a.shape[0] % k or b.shape[1] != a.shape[0] or b.shape[0] * a.shape[1] != math.prod(w_shape):
                problems.append(f"{module}: ConvLoRA lora_A {list(a.shape)} and lora_B {list(b.shape)} do not "
                                f"fit the kernel {list(w_shape)}")
                continue
            r = a.shape[0] // k
            a_full, b_full = _conv_factors(a, b, w_shape)
            op.deltas.append(LowRank(a_full, b_full, options.lora_alpha / r, transposed=False))
        elif a.shape[0] != b.shape[1]:  # MergedLinear: A has r rows per enabled part
            r = b.shape[1]
            enable = options.enable_lora
            k = a.shape[0] // r if r and a.shape[0] % r == 0 else 0
            if not k:
                problems.append(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not compose")
                continue
            if enable is None or sum(enable) != k or b.shape[0] % k:
                given = "" if enable is None else f" (--enable-lora gives {sum(enable)} of {len(enable)})"
                problems.append(f"{module}: a MergedLinear with {k} enabled parts{given}: pass --enable-lora "
                                "naming the enabled parts, e.g. q,v for a fused q,k,v")
                continue
            op.deltas.append(LowRank(a, _padded_b(b, enable, r), options.lora_alpha / r,
                                     transposed=True if options.fan_in_fan_out else None))
        else:  # Linear or Embedding: the base's shape tells which way round
            r = a.shape[0]
            op.deltas.append(LowRank(a, b, options.lora_alpha / r, transposed=True if options.fan_in_fan_out else None))
        targets[name] = op
    if problems:
        raise PlanError(f"ADAPTER {str(path)!r} (loralib) does not fit BASE:", problems)
    config = {"lora_alpha": options.lora_alpha, "fan_in_fan_out": options.fan_in_fan_out,
              "enable_lora": options.enable_lora}
    return Adapter(path, "loralib", config, targets, list(tensors), files=[file])
