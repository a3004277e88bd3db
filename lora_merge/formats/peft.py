"""PEFT adapters (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``): LoRA here, the other kinds
in ``peft_kinds.py``."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from pathlib import Path

from ..adapter import Adapter, AddScaled, LowRank, TargetOps
from ..errors import (
    AdapterConfigError,
    LayoutNeeded,
    PlanError,
    SourceNotFoundError,
    UnsupportedAdapterError,
)
from .files import (
    config_mapping,
    pattern_value,
    positive_number,
    read_adapter_config,
    read_tensor_file,
)
from .peft_kinds import load_kind, refuse

PREFIX = "base_model.model."
# key suffix -> role; longest first so that "lora_magnitude_vector.weight" wins over its prefix
ROLES = [
    ("token_adapter.trainable_tokens_delta", "rows"),
    ("lora_magnitude_vector.weight", "magnitude"),
    ("lora_magnitude_vector", "magnitude"),
    ("lora_embedding_A", "emb_a"),
    ("lora_embedding_B", "emb_b"),
    ("lora_A.weight", "a"),
    ("lora_B.weight", "b"),
    ("lora_B.bias", "b_bias"),
]
# Inits that rewrite the base weights: the adapter alone does not describe the merged model.
BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "mica", "lora_ga")
# Variants whose merged form lora-merge does not compute.
UNSUPPORTED_FIELDS = {
    "use_qalora": "QALoRA's pooled input cannot be folded into a dense weight",
    "alora_invocation_tokens": "aLoRA activates only after its invocation tokens, so it has no merged form",
    "layer_replication": "layer replication changes the model's structure",
    "velora_config": "VeLoRA is not supported",
    "kasa_config": "KaSA is not supported",
    "arrow_config": "Arrow routing depends on the input and has no merged form",
    "monteclora_config": "MonteCLoRA is not supported",
    "use_bdlora": "BD-LoRA is not supported",
}


def peft_type_of(config: dict) -> str:
    return str(config.get("peft_type", "LORA")).upper()


def check_config(config: dict, where: Path) -> None:
    refuse(peft_type_of(config), where)
    if peft_type_of(config) != "LORA":
        return
    for name, why in UNSUPPORTED_FIELDS.items():
        if config.get(name):
            raise UnsupportedAdapterError(f"{where}: {name} is set: {why}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_MUTATING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} changed the base weights during training, "
            "so this adapter cannot be merged into the original base",
            "convert it first with peft (save_pretrained(..., path_initial_model_for_weight_conversion=...))",
        )
    positive_number(config.get("r", 8), "r", where, integer=True)
    positive_number(config.get("lora_alpha", 8), "lora_alpha", where)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        for pattern, value in config_mapping(config, key, where).items():
            positive_number(value, f"{key}[{pattern!r}]", where, integer)
    for key in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config.get(key, False), (bool, type(None))):
            raise AdapterConfigError(f"{where}: {key} must be true or false, found {config[key]!r}")


def read_config(folder: Path) -> dict:
    return read_adapter_config(folder, "has no adapter_config.json", "pass the folder written by peft's save_pretrained")


def read_tensors(folder: Path) -> tuple[dict, list[Path]]:
    """The adapter's tensors by key, as lazily read objects."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).exists():
            return read_tensor_file(folder / name), [folder / name]
    raise SourceNotFoundError(
        f"ADAPTER {str(folder)!r} has no adapter_model.safetensors or adapter_model.bin",
        "pass the folder written by peft's save_pretrained",
    )


def _split_key(key: str) -> tuple[str, str]:
    """(module path, role) of an adapter key; role 'full' for a whole saved tensor."""
    path = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, role in ROLES:
        if path.endswith("." + suffix):
            return path[: -len(suffix) - 1], role
    return path, "full"


def _unwrap(module: str) -> tuple[str, int]:
    """A nested ParamWrapper's module path and depth: ``experts.base_layer`` is ``experts`` at depth 1."""
    depth = 0
    while module.endswith(".base_layer"):
        module, depth = module[: -len(".base_layer")], depth + 1
    return module, depth


def _wrapped(config: dict, module: str, layout) -> list[str]:
    """The parameters of ``module`` that peft wraps, matched as peft matches them (``module.param`` equal to
    a ``target_parameters`` entry or ending with ``.entry``), in the layout's order of them."""
    targets = config.get("target_parameters") or []
    params, _ = layout.parameters(module)
    return [p for p in params if any(f"{module}.{p}" == t or f"{module}.{p}".endswith("." + t) for t in targets)]


def _could_name(config: dict, module: str) -> bool:
    """Whether some ``target_parameters`` entry can name a parameter of ``module``, by its path alone."""
    for target in config.get("target_parameters") or []:
        owner = target.rpartition(".")[0]
        if not owner or module == owner or module.endswith("." + owner):
            return True
    return False


def _take_wrappers(config: dict, groups: dict, layout) -> dict[str, dict[int, dict]]:
    """The groups of ParamWrapper layers (target_parameters), taken out of ``groups``: module -> depth -> tensors."""
    if not config.get("target_parameters"):
        return {}
    unwrapped = {m: _unwrap(m) for m in groups}
    nested = {base for base, depth in unwrapped.values() if depth}
    wrappers: dict[str, dict[int, dict]] = defaultdict(dict)
    unknown = []
    for module, (base, depth) in unwrapped.items():
        params, ordered = layout.parameters(base)
        if base in nested or _wrapped(config, base, layout):
            wrappers[base][depth] = groups.pop(module)
        elif _could_name(config, base) and not params and not ordered:
            unknown.append(f"{base}: not in the files, and target_parameters may name one of its parameters")
    if unknown:
        raise LayoutNeeded("the files alone do not say what the adapter's modules are:", unknown)
    return dict(sorted(wrappers.items()))


class _Wrappers:
    """peft's ParamWrapper layers on one module, one per wrapped parameter, nested as ``.base_layer``.

    peft wraps a module's parameters in the order the module registered them, each wrapper around the
    last, so the first one wrapped ends up innermost: with k wrapped, parameter i is at depth k-1-i.
    That order is the model's; from the files alone, the one assignment the tensors' shapes allow is taken.
    """

    def __init__(self, config: dict, module: str, by_depth: dict[int, dict], layout):
        self.config, self.module, self.by_depth, self.layout = config, module, by_depth, layout

    def targets(self, scale_of) -> tuple[list[TargetOps], list[str]]:
        module, layout = self.module, self.layout
        ordered = layout.parameters(module)[1]
        wrapped = _wrapped(self.config, module, layout)
        depths = sorted(self.by_depth)
        if depths != list(range(len(wrapped))):
            if not ordered:
                raise LayoutNeeded("the files alone do not say which parameters the adapter wraps:", [
                    (f"{module}: {len(depths)} nested LoRA wrapper(s), and the files hold "
                     f"{len(wrapped) or 'none'} of its parameters that target_parameters names")])
            return [], [(f"{module}: the adapter nests {len(depths)} LoRA wrapper(s) but target_parameters names "
                         f"{len(wrapped)} of its parameters ({', '.join(wrapped) or 'none'})")]
        if ordered:
            params = [wrapped[len(wrapped) - 1 - d] for d in depths]
        else:
            fitting = [list(c) for c in itertools.permutations(wrapped) if self._fits(c, scale_of)]
            if len(fitting) != 1:
                raise LayoutNeeded("the files alone do not say which parameter each nested LoRA wrapper holds:", [
                    f"{module}: {len(fitting)} ways of giving {', '.join(wrapped)} to the wrappers fit the shapes"])
            params = fitting[0]
        out, problems = [], []
        for depth, param in zip(depths, params):
            parts = self.by_depth[depth]
            a, b = parts.pop("a", None), parts.pop("b", None)
            if a is None or b is None or parts:
                problems.append(f"{module} (depth {depth}): a ParamWrapper holds lora_A and lora_B only, found "
                                f"{sorted(['a'] * (a is not None) + ['b'] * (b is not None) + list(parts))}")
                continue
            shape = layout.shapes[f"{module}.{param}"]
            r, scale = scale_of(f"{module}.{param}")
            op = TargetOps(name=f"{module}.{param}", module=module)
            if len(shape) == 3:
                op.deltas.append(LowRank(a, b, scale, transposed=layout.experts_transposed(module), experts=shape[0]))
            else:  # a 2-D parameter: peft's delta is (out, in) as stored, whatever the layer
                op.deltas.append(LowRank(a, b, scale, transposed=False))
            if a.shape[0] != r * (shape[0] if len(shape) == 3 else 1):
                problems.append(f"{module}.{param}: lora_A has {a.shape[0]} rows, not r={r} per expert "
                                "from adapter_config.json")
            out.append(op)
        return out, problems

    def _fits(self, params, scale_of) -> bool:
        for depth, param in zip(sorted(self.by_depth), params):
            parts = self.by_depth[depth]
            a, b = parts.get("a"), parts.get("b")
            shape = self.layout.shapes.get(f"{self.module}.{param}")
            if a is None or b is None or shape is None or len(a.shape) != 2 or len(b.shape) != 2:
                return False
            r, _ = scale_of(f"{self.module}.{param}")
            if len(shape) == 3:
                e, ways = shape[0], [(shape[1], shape[2]), (shape[2], shape[1])]
                if shape[1] == shape[2] and self.layout.experts_transposed(self.module) is None:
                    return False  # square: only the model class knows which way round
            elif len(shape) == 2:
                e, ways = 1, [(shape[0], shape[1])]
            else:
                return False
            if not any(tuple(b.shape) == (out, r * e) and tuple(a.shape) == (r * e, inn) for out, inn in ways):
                return False
        return True


def load_peft_adapter(folder: Path, layout) -> Adapter:
    """The adapter in ``folder`` as canonical targets; ``layout`` says which parameters the model's
    modules have (for target_parameters), from the files or from the model class."""
    config = read_config(folder)
    check_config(config, folder / "adapter_config.json")
    tensors, files = read_tensors(folder)
    if peft_type_of(config) != "LORA":
        return load_kind(folder, config, peft_type_of(config), tensors, files)

    r_default = config.get("r", 8)
    alpha_default = config.get("lora_alpha", 8)
    rank_pattern = config_mapping(config, "rank_pattern", folder)
    alpha_pattern = config_mapping(config, "alpha_pattern", folder)
    rslora = bool(config.get("use_rslora"))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    token_indices = config.get("trainable_token_indices")

    groups: dict[str, dict[str, object]] = defaultdict(dict)
    full: dict[str, object] = {}
    ignored: dict[str, str] = {}
    for key, t in tensors.items():
        module, role = _split_key(key)
        if role != "full":
            groups[module][role] = t
        elif ".original_module." in module:
            # the untrained copy kept beside a modules_to_save module: the merged model uses the trained one
            ignored[key] = "the untrained original of a modules_to_save module"
        elif ".modules_to_save." in module:
            name = module.replace(".modules_to_save.", ".")
            if name in full:  # the trained copy wins over the same tensor saved plainly
                ignored[full[name].name] = f"superseded by the modules_to_save copy {key}"
            full[name] = t
        else:
            name = module.replace(".base_layer.", ".")
            if name in full:
                ignored[key] = f"superseded by {full[name].name}"
            else:
                full[name] = t

    targets: dict[str, TargetOps] = {}
    problems: list[str] = []

    def target(name: str, module: str) -> TargetOps:
        if name not in targets:
            targets[name] = TargetOps(name=name, module=module)
        return targets[name]

    for name, t in full.items():
        op = target(name, name.rpartition(".")[0])
        op.replace = t
        op.may_resize = True

    def scale_of(path: str) -> tuple[int, float]:
        """r and the scale for a module (or a wrapped ``module.param``), as peft picks them by pattern."""
        r = pattern_value(rank_pattern, path, r_default)
        alpha = pattern_value(alpha_pattern, path, alpha_default)
        return r, alpha / math.sqrt(r) if rslora else alpha / r

    for module, by_depth in _take_wrappers(config, groups, layout).items():
        placed, found = _Wrappers(config, module, by_depth, layout).targets(scale_of)
        problems += found
        for op in placed:
            targets[op.name] = op

    for module, parts in sorted(groups.items()):
        r, scale = scale_of(module)

        if "rows" in parts:
            rows = parts.pop("rows")
            indices = token_indices
            if isinstance(indices, dict):
                indices = pattern_value(indices, module, None)
            if not isinstance(indices, list) or len(indices) != rows.shape[0]:
                problems.append(
                    f"{module}: trainable_tokens_delta has {rows.shape[0]} rows but trainable_token_indices "
                    f"gives {indices!r}"
                )
            else:
                op = target(f"{module}.weight", module)
                op.row_indices = [int(i) for i in indices]
                op.rows = rows

        a, b = parts.pop("a", None), parts.pop("b", None)
        emb_a, emb_b = parts.pop("emb_a", None), parts.pop("emb_b", None)
        magnitude = parts.pop("magnitude", None)
        b_bias = parts.pop("b_bias", None)
        for role in parts:
            problems.append(f"{module}: unexpected adapter tensor role {role!r}")

        if emb_a is not None or emb_b is not None:
            a, b, embedding = emb_a, emb_b, True
        else:
            embedding = False
        if (a is None) != (b is None):
            problems.append(f"{module}: has lora_{'A' if a is not None else 'B'} but not its partner")
            continue
        if a is None:
            if magnitude is not None or b_bias is not None:
                problems.append(f"{module}: DoRA magnitude or LoRA bias without lora_A/lora_B")
            continue

        if a.shape[0] != r or b.shape[1] != r:
            problems.append(
                f"{module}: the tensors have rank {a.shape[0]} but adapter_config.json says r={r}"
            )
            continue
        op = target(f"{module}.weight", module)
        op.embedding = embedding
        # None: decided by the planner from the base shape (Conv1D layers store W as in × out).
        op.deltas.append(LowRank(a, b, scale, transposed=True if embedding else None))
        op.fan_in_fan_out = fan_in_fan_out
        if magnitude is not None:
            op.dora_magnitude = magnitude  # its orientation is fixed by the planner with the LoRA's
        if b_bias is not None:
            target(f"{module}.bias", module).deltas.append(AddScaled(b_bias, scale))

    if problems:
        raise PlanError(f"ADAPTER {str(folder)!r} is inconsistent:", problems)
    return Adapter(folder, "peft", config, targets, list(tensors), files=[*files, folder / "adapter_config.json"],
                   ignored=ignored)
