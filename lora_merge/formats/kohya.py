"""kohya / Stable Diffusion LoRA: one safetensors file of ``<name>.lora_down.weight`` (A),
``<name>.lora_up.weight`` (B) and ``<name>.alpha`` (0-d), ``s = alpha / r`` (alpha = r when absent).
LyCORIS's LoHa and LoKr files use the same names with their own roles (``<name>.hada_w1_a`` …, ``<name>.lokr_w1``
…, ``formats/lycoris.py``), scaled as LyCORIS scales them: alpha over the rank of a low-rank factor (for LoKr, w2's
where it has one, else w1's), and 1 where alpha is absent or both of LoKr's factors are full.

``<name>`` is a module path with ``.`` replaced by ``_`` behind a prefix that names the component:
``lora_unet_`` for the UNet (or a transformer), ``lora_te_``, ``lora_te1_``, ``lora_te2_`` for text
encoders. BASE is one component's folder (diffusers layout), so names are matched against BASE's
own module paths; the file's other components are left for their own folders, and say so.
Convolutions (3×3 included) take A (r, in, k, k) and B (out, r, 1, 1), as PEFT's do.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from ..adapter import Adapter, LowRank, TargetOps
from ..errors import PlanError, UnsupportedAdapterError
from . import lycoris
from .files import read_tensor_file
from .loralib import tensor_file

PREFIXES = ("lora_unet_", "lora_transformer_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_")
ROLES = {"lora_down.weight": "a", "lora_up.weight": "b", "alpha": "alpha",
         **{r: r for r in lycoris.LOHA_ROLES + lycoris.LOKR_ROLES}}
# other trainers' tensors in kohya-style files: what they are, for the refusal
UNSUPPORTED_ROLES = {
    "dora_scale": "DoRA (dora_scale)", "lora_mid.weight": "LoCon's Tucker decomposition (lora_mid)",
    "diff": "a full weight difference", "diff_b": "a full bias difference",
}


def _split(key: str) -> tuple[str, str]:
    name, _, role = key.partition(".")
    return name, role


def load_kohya_adapter(path: Path, base_names: list[str]) -> Adapter:
    file = tensor_file(path, "kohya")
    tensors = read_tensor_file(file)
    modules = _modules(path, tensors)
    spelled, clashes = _spelled(base_names)
    by_prefix: dict[str, list[str]] = {}
    for name in modules:
        prefix = next((p for p in PREFIXES if name.startswith(p)), name.split("_", 2)[0] + "_")
        by_prefix.setdefault(prefix, []).append(name)
    matching = {p for p, names in by_prefix.items() if any(n[len(p):] in spelled for n in names)}
    if not matching:
        raise PlanError(
            f"ADAPTER {str(path)!r} (kohya) names no module of BASE:",
            [f"{p}…: {len(names)} modules, e.g. {min(names)}" for p, names in sorted(by_prefix.items())],
            "pass the component folder these modules belong to (e.g. the unet/ or text_encoder/ folder)",
        )
    targets: dict[str, TargetOps] = {}
    ignored: dict[str, str] = {}
    notes: list[str] = []
    problems: list[str] = []
    for prefix, names in sorted(by_prefix.items()):
        if prefix not in matching:
            for name in names:
                for t in modules[name].values():
                    ignored[t.name] = f"for another component ({prefix}…): merge it into that component's folder"
            notes.append(f"{len(names)} {prefix}… modules are for another component and were not merged "
                         "(merge the same file into that component's folder)")
            continue
        for name in sorted(names):
            found = _target(name, modules[name], name[len(prefix):], spelled, clashes)
            if isinstance(found, str):
                problems.append(found)
            else:
                targets[found.name] = found
    if problems:
        raise PlanError(f"ADAPTER {str(path)!r} (kohya) does not fit BASE:", problems)
    alphas = {parts["alpha"].name for parts in modules.values() if "alpha" in parts} - set(ignored)
    return Adapter(path, "kohya", {"prefixes": sorted(matching)}, targets, list(tensors), files=[file],
                   notes=notes, ignored=ignored, read_at_load=alphas)


def _modules(path: Path, tensors: dict) -> dict[str, dict]:
    """The file's tensors by module and role (a, b, alpha); what is not a plain LoRA tensor is refused by name."""
    modules: dict[str, dict] = {}
    problems: list[str] = []
    unsupported: dict[str, list[str]] = {}
    for key, t in tensors.items():
        name, role = _split(key)
        if role in ROLES:
            modules.setdefault(name, {})[ROLES[role]] = t
        elif role in UNSUPPORTED_ROLES or role.rpartition(".")[0] in UNSUPPORTED_ROLES:
            unsupported.setdefault(UNSUPPORTED_ROLES.get(role) or UNSUPPORTED_ROLES[role.rpartition(".")[0]],
                                   []).append(key)
        else:
            problems.append(f"{key}: not a kohya LoRA tensor (lora_down.weight, lora_up.weight or alpha) nor a "
                            "LyCORIS LoHa or LoKr one (hada_…, lokr_…)")
    if unsupported:
        what, keys = next(iter(unsupported.items()))
        raise UnsupportedAdapterError(f"ADAPTER {str(path)!r} holds {what}, e.g. {keys[0]}; lora-merge merges "
                                      "LoRA (lora_down/lora_up/alpha), LoHa (hada_…) and LoKr (lokr_…)")
    if problems:
        raise PlanError(f"ADAPTER {str(path)!r} is not a kohya LoRA file:", problems)
    return modules


def _spelled(base_names: list[str]) -> tuple[dict[str, str], set[str]]:
    """BASE's module paths as kohya spells them (dots as underscores), and the spellings two modules share."""
    spelled: dict[str, str] = {}
    clashes: set[str] = set()
    for name in base_names:
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            flat = module.replace(".", "_")
            if flat in spelled and spelled[flat] != module:
                clashes.add(flat)
            spelled[flat] = module
    return spelled, clashes


def _target(name: str, parts: dict, flat: str, spelled: dict[str, str], clashes: set[str]) -> TargetOps | str:
    """The module's target, or the problem with it."""
    if flat not in spelled:
        return f"{name}: BASE has no module spelled {flat!r}"
    if flat in clashes:
        return f"{name}: more than one module of BASE is spelled {flat!r}"
    alpha = None
    if "alpha" in parts:
        value = parts["alpha"].load()
        if value.numel() != 1:
            return f"{name}: alpha has shape {list(value.shape)}, expected a single number"
        alpha = float(value.reshape(-1)[0])
        if not math.isfinite(alpha) or alpha <= 0:
            return f"{name}: alpha must be a positive finite number, found {alpha!r}"
    module = spelled[flat]
    op = TargetOps(name=f"{module}.weight", module=module)
    d = _lycoris(parts, alpha) if any(role.startswith(("hada_", "lokr_")) for role in parts) else \
        _low_rank(name, parts, alpha)
    found = d if isinstance(d, str) else None if isinstance(d, LowRank) else d.problem()
    if found:
        return found if found.startswith(name) else f"{name}: {found}"
    op.deltas.append(d)
    return op


def _low_rank(name: str, parts: dict, alpha: float | None) -> LowRank | str:
    a, b = parts.get("a"), parts.get("b")
    if a is None or b is None:
        return f"{name}: has lora_{'down' if a is not None else 'up'} but not its partner"
    r = a.shape[0] if a.shape else 0
    if r <= 0:
        return f"{name}: lora_down has shape {list(a.shape)}"
    return LowRank(a, b, (r if alpha is None else alpha) / r)


def _lycoris(parts: dict, alpha: float | None):
    """LyCORIS's LoHa or LoKr, scaled as LyCORIS scales it."""
    if any(role.startswith("hada_") for role in parts):
        found = lycoris.loha(parts, 1.0)
        if isinstance(found, str) or alpha is None:
            return found
        rank = found.w1[-1].shape[0]  # hada_w1_b: (r, …)
        return replace(found, scale=alpha / rank)
    factors = lycoris.lokr_factors(parts)
    if isinstance(factors, str):
        return factors
    low = [f[-1].shape[0] for f in factors if len(f) > 1]  # lokr_wN_b: (r, …); w2's counts last
    return lycoris.lokr(parts, alpha / low[-1] if alpha is not None and low else 1.0)
