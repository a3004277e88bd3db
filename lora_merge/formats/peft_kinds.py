"""peft's adapter kinds other than LoRA: which are merged, which are refused and why, and the readers of the
merged ones (AdaLoRA, LoHa, LoKr, IA3) into the canonical operations of ``adapter.py`` and ``kinds.py``."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import KIND_NAMES, Adapter, DerivedTensor, LowRank, TargetOps
from ..errors import PlanError, UnsupportedAdapterError
from ..kinds import Spectrum, Tiled, Vera
from ..transforms import Pairs, Reflection, Rotation, Scaling
from . import lycoris
from .files import config_mapping, pattern_value, positive_number

PREFIX = "base_model.model."

# kinds that add no weight: nothing to fold into the model
NO_WEIGHT = {
    "PROMPT_TUNING": "prompt tuning learns virtual tokens fed beside the input",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning learns virtual tokens fed beside the input",
    "P_TUNING": "p-tuning learns virtual tokens (through a prompt encoder) fed beside the input",
    "PREFIX_TUNING": "prefix tuning learns keys and values prepended in every attention layer",
    "ADAPTION_PROMPT": "an adaption prompt adds gated prompt tokens inside attention",
    "CPT": "context-aware prompt tuning learns virtual tokens fed beside the input",
    "CARTRIDGE": "a cartridge is a trained key-value cache prepended to the input",
    "XLORA": "X-LoRA mixes its LoRA experts per token, by a classifier on the hidden states",
    "POLY": "Poly routes between its LoRA modules per task at run time",
}
# kinds whose merge peft itself does not define
NOT_MERGEABLE = {
    "LILY": "peft does not define a merge for Lily (its shared projectors are chosen by a router)",
    "SHADOW": "peft does not define a merge for Shadow",
}
MERGED = tuple(KIND_NAMES)  # the kinds lora-merge merges, by their peft_type


def refuse(peft_type: str, where: Path) -> None:
    """Raise, naming the kind and why, unless lora-merge merges ``peft_type``."""
    if peft_type in MERGED:
        return
    if peft_type in NO_WEIGHT:
        raise UnsupportedAdapterError(f"{where}: peft_type is {peft_type}: {NO_WEIGHT[peft_type]}, so there is no "
                                      "weight to merge into the model", "serve it with peft, beside the base model")
    if peft_type in NOT_MERGEABLE:
        raise UnsupportedAdapterError(f"{where}: peft_type is {peft_type}: {NOT_MERGEABLE[peft_type]}",
                                      "serve it with peft, beside the base model")
    raise UnsupportedAdapterError(
        f"{where}: peft_type is {peft_type}, which lora-merge does not merge yet (it merges "
        f"{', '.join(k.replace('_', '-') for k in MERGED)})",
        "merge it with peft's own merge_and_unload, if that method supports merging")


# key suffix -> role, per kind (peft saves ParameterDicts without ".weight")
ROLES = {
    "ADALORA": ("lora_A", "lora_B", "lora_E"),
    "LOHA": lycoris.LOHA_ROLES,
    "LOKR": lycoris.LOKR_ROLES,
    "IA3": ("ia3_l",),
    "VERA": ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B"),
    "MISS": ("miss_block",),
    "OFT": ("oft_R",),
    "HRA": ("hra_u",),
    "FOURIERFT": ("fourierft_spectrum",),
    "BOFT": ("boft_R", "boft_s"),
    "ROAD": ("road_theta", "road_alpha"),
}
SHARED = "base_model"  # the module peft saves a kind's shared tensors under (VeRA's projections)


def groups_of(tensors: dict, peft_type: str) -> tuple[dict[str, dict], list[str]]:
    """The adapter's tensors by module and role, and the keys that are no role of the kind."""
    groups: dict[str, dict] = defaultdict(dict)
    unknown = []
    for key, t in tensors.items():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        module, _, role = path.rpartition(".")
        if role == "weight":  # a Linear-style save of the same parameter
            module, _, role = module.rpartition(".")
        if role in ROLES[peft_type]:
            groups[module][role] = t
        else:
            unknown.append(key)
    return groups, unknown


@dataclass
class _Reading:
    """What reading an adapter's modules gives: the targets, the tensors knowingly not merged (with why), and those
    folded into scales as they were read."""

    config: dict
    targets: dict[str, TargetOps] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)
    read_at_load: set[str] = field(default_factory=set)
    shared: dict = field(default_factory=dict)  # tensors every module uses (VeRA's vera_A, vera_B)

    def target(self, name: str, module: str) -> TargetOps:
        op = self.targets.setdefault(name, TargetOps(name=name, module=module))
        op.fan_in_fan_out = bool(self.config.get("fan_in_fan_out"))
        return op


def load_kind(folder: Path, config: dict, peft_type: str, tensors: dict, files: list[Path]) -> Adapter:
    """An adapter of a kind other than LoRA, as canonical targets; every inconsistency at once."""
    groups, unknown = groups_of(tensors, peft_type)
    problems = [f"{key}: not a tensor {peft_type} stores (modules_to_save and biases are not merged for this kind "
                "yet)" for key in unknown]
    reading = _Reading(config, shared=groups.pop(SHARED, {}))
    read = READERS[peft_type]
    for module, parts in sorted(groups.items()):
        found = read(module, parts, reading)
        if found:
            problems.append(f"{module}: {found}")
    if problems:
        raise PlanError(f"ADAPTER {str(folder)!r} is inconsistent:", problems)
    return Adapter(folder, "peft", config, reading.targets, list(tensors), ignored=reading.ignored,
                   read_at_load=reading.read_at_load, files=[*files, folder / "adapter_config.json"])


def _pattern(config: dict, key: str, module: str, default):
    return pattern_value(config_mapping(config, key, Path("adapter_config.json")), module, default)


def _lycoris_scale(config: dict, module: str) -> float:
    """alpha / r for a LoHa or LoKr module, each picked by pattern as peft picks them."""
    r = _pattern(config, "rank_pattern", module, config.get("r", 8))
    alpha = _pattern(config, "alpha_pattern", module, config.get("alpha", 8))
    positive_number(r, "r", Path("adapter_config.json"), integer=True)
    return alpha / r


def _adalora(module, parts, reading: _Reading) -> str | None:
    """AdaLoRA: ΔW = B·(A ⊙ E)·α / (ranknum + 1e-5), ranknum peft's init_r: one LowRank of the kept rank components
    (E ≠ 0), A's rows times E in float64 (exact: each a product of two values of at most 24 bits; stored in float64,
    one rank-one product per component instead)."""
    import torch

    a, b, e = parts.get("lora_A"), parts.get("lora_B"), parts.get("lora_E")
    if a is None or b is None or e is None:
        return f"AdaLoRA needs lora_A, lora_B and lora_E; found {sorted(parts)}"
    r = a.shape[0]
    if tuple(b.shape[1:]) != (r,) or math.prod(e.shape) != r:
        return f"lora_A{list(a.shape)}, lora_B{list(b.shape)} and lora_E{list(e.shape)} do not compose"
    alpha = reading.config.get("lora_alpha", 8)
    init_r = reading.config.get("init_r", 12)
    scaling = alpha if alpha > 0 else float(init_r)
    common = scaling / (float(init_r) + 1e-5)
    values = e.load().reshape(-1).to(torch.float64)
    reading.read_at_load.add(e.name)
    kept = values.nonzero().reshape(-1)
    if not len(kept):
        for t in (a, b):
            reading.ignored[t.name] = "every rank component pruned by AdaLoRA's budget (lora_E is zero)"
        return None
    op = reading.target(f"{module}.weight", module)
    if any(t.dtype == "F64" for t in (a, e)):  # A·E would round: each component a rank-one product, E in its scale
        for k in kept.tolist():
            row = DerivedTensor(a, (1, *a.shape[1:]), lambda x, k=k: x[k:k + 1])
            col = DerivedTensor(b, (b.shape[0], 1), lambda x, k=k: x[:, k:k + 1])
            op.deltas.append(LowRank(row, col, common * float(values[k]), kind="adalora"))
        return None
    scales = values[kept]

    def scaled(x):
        return x[kept.to(x.device)].to(torch.float64) * scales.to(x.device).reshape(-1, *[1] * (x.dim() - 1))

    row = DerivedTensor(a, (len(kept), *a.shape[1:]), scaled)
    col = DerivedTensor(b, (b.shape[0], len(kept)), lambda x: x[:, kept.to(x.device)])
    op.deltas.append(LowRank(row, col, common, kind="adalora"))
    return None


def _loha(module, parts, reading: _Reading) -> str | None:
    d = lycoris.loha(parts, _lycoris_scale(reading.config, module))
    return d if isinstance(d, str) else _add(reading, module, d)


def _lokr(module, parts, reading: _Reading) -> str | None:
    d = lycoris.lokr(parts, _lycoris_scale(reading.config, module))
    return d if isinstance(d, str) else _add(reading, module, d)


def _add(reading: _Reading, module: str, d) -> str | None:
    """The module's weight gets the delta ``d``, or why its factors do not compose."""
    found = d.problem()
    if not found:
        reading.target(f"{module}.weight", module).deltas.append(d)
    return found


def _ia3(module, parts, reading: _Reading) -> str | None:
    """IA3: W ⊙ l, along the input for ``feedforward_modules`` (peft's ``l`` is 1 × in), else along the output
    (out × 1), where peft scales the layer's bias too."""
    l = parts["ia3_l"]  # noqa: E741
    feedforward = reading.config.get("feedforward_modules") or []
    if isinstance(feedforward, str):
        is_ff = bool(pattern_value({feedforward: True}, module, False))
    else:
        is_ff = any(module == f or module.endswith("." + f) for f in feedforward)
    if len(l.shape) != 2 or (l.shape[0] != 1 if is_ff else l.shape[1] != 1):
        return f"ia3_l has shape {list(l.shape)}, not [1, in] (feedforward) or [out, 1]"
    reading.target(f"{module}.weight", module).multiply = Scaling(l, columns=is_ff)
    if not is_ff:  # peft scales the bias where the layer has one: the planner leaves this out where BASE has none
        bias = reading.target(f"{module}.bias", module)
        bias.multiply = Scaling(l, columns=False)
        bias.optional = True
    return None


def _vera(module, parts, reading: _Reading) -> str | None:
    """VeRA: the module's λ_b and λ_d scale slices of the shared projections (``kinds.Vera``)."""
    import torch

    a, b = reading.shared.get("vera_A"), reading.shared.get("vera_B")
    if a is None or b is None:
        why = "were not saved (save_projection is false)" if reading.config.get("save_projection", True) is False \
            else "are not in the adapter's files"
        raise UnsupportedAdapterError(f"VeRA's shared projections vera_A and vera_B {why}, so its layers cannot be "
                                      "rebuilt", "save the adapter again with save_projection=True")
    lb, ld = parts.get("vera_lambda_b"), parts.get("vera_lambda_d")
    if lb is None or ld is None:
        return f"VeRA needs vera_lambda_b and vera_lambda_d; found {sorted(parts)}"
    if any(t.dtype == "F64" for t in (a, b, lb, ld)):
        return "VeRA stored in float64 is not merged yet (its scaled factors would not be exact)"
    reading.read_at_load |= {lb.name, ld.name}
    scales = [t.load().reshape(-1).to(torch.float64) for t in (lb, ld)]
    return _add(reading, module, Vera(a, b, *scales))


def _miss(module, parts, reading: _Reading) -> str | None:
    """MiSS: its block tiled over W (``kinds.Tiled``), in peft's default and "mini" forms."""
    form = reading.config.get("init_weights", True)
    if form == "bat":
        return "MiSS's \"bat\" form (its update a product with W's own blocks) is not merged yet"
    block = parts["miss_block"]
    if len(block.shape) != 2:
        return f"miss_block has shape {list(block.shape)}, not [r, out] or [r, mini_r]"
    if form == "mini" and block.shape[1] != reading.config.get("mini_r", block.shape[1]):
        return f"miss_block has shape {list(block.shape)} but mini_r is {reading.config.get('mini_r')}"
    reading.target(f"{module}.weight", module).deltas.append(Tiled(block))
    return None


def _oft(module, parts, reading: _Reading) -> str | None:
    """OFT in peft's block layout: ``oft_R.weight`` holds each block's skew-symmetric Q by its upper triangle
    (``transforms.Rotation``). COFT projects a block back within ``eps`` of zero only where it has left that ball:
    where none has, the projection changes nothing, and otherwise it is refused."""
    import torch

    q = parts["oft_R"]
    n = q.shape[-1] if len(q.shape) == 2 else -1
    b = round((1 + math.sqrt(1 + 8 * n)) / 2) if n >= 0 else 0
    if len(q.shape) != 2 or b * (b - 1) // 2 != n or b < 2:
        return f"oft_R has shape {list(q.shape)}, not [blocks, b(b-1)/2] (peft's current OFT layout)"
    config = reading.config
    if config.get("coft"):
        # peft: ‖Q − 0‖_F ≤ eps / √blocks leaves the block as it is, in Q's own (float32) arithmetic
        norms = q.load().to(torch.float64).norm(dim=1) * math.sqrt(2)  # each value twice in the skew matrix
        limit = float(config.get("eps", 6e-5)) / math.sqrt(q.shape[0])
        if float(norms.max()) > limit * (1 - 1e-6):
            return (f"COFT would project a block of norm {float(norms.max()):.3g} back to {limit:.3g} (a square "
                    "root lora-merge does not round exactly yet)")
    terms = int(config.get("num_cayley_neumann_terms", 5)) if config.get("use_cayley_neumann", True) else 0
    shared = bool(config.get("block_share"))
    reading.target(f"{module}.weight", module).multiply = Rotation(q, b, terms, shared)
    return None


def _hra(module, parts, reading: _Reading) -> str | None:
    """HRA: W times r Householder reflections (``transforms.Reflection``), as peft merges it without Gram–Schmidt."""
    if reading.config.get("apply_GS"):
        return "HRA with apply_GS (its reflections orthogonalised first) is not merged yet"
    reading.target(f"{module}.weight", module).multiply = Reflection(parts["hra_u"])
    return None


def _fourierft(module, parts, reading: _Reading) -> str | None:
    """FourierFT: its spectrum at positions drawn from ``random_loc_seed`` (``kinds.Spectrum``)."""
    spectrum = parts["fourierft_spectrum"]
    if len(spectrum.shape) != 1:
        return f"fourierft_spectrum has shape {list(spectrum.shape)}, not [n_frequency]"
    seed = reading.config.get("random_loc_seed", 777)
    scale = reading.config.get("scaling", 150.0)
    if not isinstance(seed, int) or isinstance(scale, bool) or not isinstance(scale, (int, float)):
        return f"random_loc_seed {seed!r} and scaling {scale!r} must be an integer and a number"
    reading.target(f"{module}.weight", module).deltas.append(Spectrum(spectrum, float(scale), seed))
    return None


def _boft(module, parts, reading: _Reading) -> str | None:
    """BOFT with one butterfly factor (peft's default, ``boft_n_butterfly_factor`` 1): its blocks' Cayley maps on
    W's columns in their own order, then each row scaled by ``boft_s`` (``transforms.Rotation``)."""
    r, s = parts.get("boft_R"), parts.get("boft_s")
    if r is None or s is None:
        return f"BOFT needs boft_R and boft_s; found {sorted(parts)}"
    if len(r.shape) != 4 or r.shape[2] != r.shape[3]:
        return f"boft_R has shape {list(r.shape)}, not [factors, blocks, b, b]"
    if r.shape[0] != 1:
        return (f"BOFT with {r.shape[0]} butterfly factors (each a permutation of W's columns) is not merged yet; "
                "one factor is")
    reading.target(f"{module}.weight", module).multiply = Rotation(r, r.shape[2], 0, full=True, rows=s)
    return None


def _road(module, parts, reading: _Reading) -> str | None:
    """RoAd: pairs of output rows turned into each other (``transforms.Pairs``), the layer's bias too where BASE has one
    (peft turns it alike)."""
    theta, alpha = parts.get("road_theta"), parts.get("road_alpha")
    if theta is None or alpha is None:
        return f"RoAd needs road_theta and road_alpha; found {sorted(parts)}"
    group = reading.config.get("group_size", 64)
    variant = reading.config.get("variant", "road_1")
    if not isinstance(group, int) or isinstance(group, bool) or group < 2:
        return f"group_size {group!r} is not an even number of rows"
    m = Pairs(theta, alpha, variant, group)
    reading.target(f"{module}.weight", module).multiply = m
    bias = reading.target(f"{module}.bias", module)
    bias.multiply, bias.optional = m, True
    return None


READERS = {"ADALORA": _adalora, "LOHA": _loha, "LOKR": _lokr, "IA3": _ia3, "VERA": _vera, "MISS": _miss,
           "OFT": _oft, "HRA": _hra, "FOURIERFT": _fourierft, "BOFT": _boft,
           "ROAD": _road}
