"""mlx-lm adapters: ``adapters.safetensors`` + ``adapter_config.json``.

Keys are module paths: ``<module>.lora_a`` (in × r) and ``<module>.lora_b`` (r × out), the
transpose of PEFT's orientation, so A = lora_aᵀ and B = lora_bᵀ. There is no alpha:
``lora_parameters.scale`` is the scale itself. ``W += scale · lora_bᵀ @ lora_aᵀ``; for an
embedding (vocab × dims) that is ``W += scale · lora_a @ lora_b``. Mixture-of-experts layers
(``SwitchLinear``) keep one (r × in) and (out × r) pair per expert: lora_a (E, r, in), lora_b
(E, out, r). DoRA (``fine_tune_type: dora``) adds ``<module>.m``, the magnitude of each output row.
"""

from __future__ import annotations

from pathlib import Path

from ..adapter import Adapter, DerivedTensor, LowRank, TargetOps, transposed
from ..errors import (
    AdapterConfigError,
    PlanError,
    UnsupportedAdapterError,
)
from .files import positive_number, read_adapter_config, read_tensor_file

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"
ROLES = {"lora_a": "a", "lora_b": "b", "m": "m"}
EMBEDDING_SUFFIXES = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings")


def read_config(folder: Path) -> dict:
    return read_adapter_config(folder, f"has {WEIGHTS} but no {CONFIG}", "pass the folder mlx_lm.lora wrote (it holds both)")


def _scale(config: dict, where: Path) -> float:
    params = config.get("lora_parameters")
    scale = params.get("scale") if isinstance(params, dict) else None
    if scale is None:
        raise AdapterConfigError(f"{where}: lora_parameters.scale is missing",
                                 "mlx-lm's scale is the LoRA scale itself; add it as the adapter was trained")
    return float(positive_number(scale, "lora_parameters.scale", where))


def _expert_factors(a, b):
    """Per-expert factors in peft's ParamWrapper layout: A (E·r × in) expert-major, B (out × r·E)
    with the expert index fastest."""
    e, r, inn = a.shape
    out = b.shape[1]
    return (DerivedTensor(a, (e * r, inn), lambda t: t.reshape(e * r, inn)),
            DerivedTensor(b, (out, r * e), lambda t: t.permute(1, 2, 0).reshape(out, r * e)))


def load_mlx_adapter(folder: Path) -> Adapter:
    config = read_config(folder)
    where = folder / CONFIG
    kind = str(config.get("fine_tune_type", "lora")).lower()
    if kind == "full":
        raise UnsupportedAdapterError(f"{where}: fine_tune_type is full: the folder holds whole weights, "
                                      "not an adapter", "load those weights as the model itself")
    if kind not in ("lora", "dora"):
        raise UnsupportedAdapterError(f"{where}: fine_tune_type {kind!r} is not LoRA or DoRA")
    scale = _scale(config, where)
    tensors = read_tensor_file(folder / WEIGHTS)
    groups: dict[str, dict] = {}
    problems: list[str] = []
    for key, t in tensors.items():
        module, _, last = key.rpartition(".")
        if last in ROLES:
            groups.setdefault(module, {})[ROLES[last]] = t
        else:
            problems.append(f"{key}: not an mlx-lm adapter tensor (lora_a, lora_b or m)")
    targets: dict[str, TargetOps] = {}
    for module, parts in sorted(groups.items()):
        a, b, m = parts.get("a"), parts.get("b"), parts.get("m")
        if a is None or b is None:
            problems.append(f"{module}: has lora_{'a' if a is not None else 'b'} but not its partner")
            continue
        op = TargetOps(name=f"{module}.weight", module=module)
        if len(a.shape) == 3 and len(b.shape) == 3 and a.shape[0] == b.shape[0]:  # SwitchLinear experts
            fa, fb = _expert_factors(a, b)
            op.deltas.append(LowRank(fa, fb, scale, transposed=False, experts=a.shape[0]))  # mlx stores (E, out, in)
        elif len(a.shape) == 2 and len(b.shape) == 2:
            embedding = module.rpartition(".")[2] in EMBEDDING_SUFFIXES
            op.embedding = embedding
            op.deltas.append(LowRank(transposed(a), transposed(b), scale, transposed=True if embedding else None))
        else:
            problems.append(f"{module}: lora_a {list(a.shape)} and lora_b {list(b.shape)} do not compose")
            continue
        if m is not None:
            if op.embedding or op.deltas[0].experts:
                problems.append(f"{module}: DoRA on an embedding or on experts is not supported "
                                "(mlx-lm normalises those differently from a linear layer)")
                continue
            op.dora_magnitude = m
        targets[op.name] = op
    if problems:
        raise PlanError(f"ADAPTER {str(folder)!r} (mlx-lm) is inconsistent:", problems)
    return Adapter(folder, "mlx", config, targets, list(tensors), files=[folder / WEIGHTS, where])
