"""Reading an adapter's tensor file: safetensors lazily, a pickle only as plain tensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..adapter import AdapterTensor, FileTensor, MemoryTensor
from ..errors import (
    AdapterConfigError,
    HeaderError,
    InputFileError,
    SourceNotFoundError,
    first_line,
    name_list,
)
from ..paths import read_bytes, read_text
from ..safetensors_file import read_header


def read_tensor_file(path: Path) -> dict[str, AdapterTensor]:
    """The file's tensors by key; a ``.safetensors`` file is read on demand, a pickle at once."""
    if path.suffix == ".safetensors":
        return {k: FileTensor(v) for k, v in read_header(path).tensors.items()}
    import io
    import pickle

    import torch

    try:
        raw = read_bytes(path)
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except InputFileError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise HeaderError(
            f"{path}: refused: it cannot be loaded as plain tensors ({first_line(e)})",
            "ask for a safetensors adapter; lora-merge never runs code from a pickle",
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint that wraps the state dict
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeaderError(f"{path}: not a dictionary of tensors")
    return {k: MemoryTensor(k, v) for k, v in state.items()}


def read_adapter_config(folder: Path, missing: str, hint: str) -> dict:
    """``folder/adapter_config.json`` as a JSON object; ``missing`` and ``hint`` say what to do without it."""
    path = folder / "adapter_config.json"
    if not path.exists():
        raise SourceNotFoundError(f"ADAPTER {str(folder)!r} {missing}", hint)
    try:
        config = json.loads(read_text(path))
    except InputFileError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{path}: not a JSON object")
    return config


def positive_number(value, key: str, where, integer: bool = False):
    """``value`` from a config, if it is a positive finite number (an integer where ``integer``); else one line
    naming the key and the value found."""
    import math

    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        what = "a positive integer" if integer else "a positive finite number"
        raise AdapterConfigError(f"{where}: {key} must be {what}, found {value!r}")
    return value


def pattern_value(patterns: dict, module: str, default):
    """peft's rule: the first key, in order, with ``re.match(rf"(.*\\.)?({key})$", module)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def config_mapping(config: dict, key: str, where) -> dict:
    """``config[key]`` as a JSON object of string keys (absent or null: empty)."""
    value = config.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AdapterConfigError(f"{where}: {key} must be a JSON object, found {value!r}")
    return value


def floating_tensors_only(adapter, where) -> None:
    """Refuse adapter tensors the merge would use that are not floating point (integer factors would be used as
    integers), naming them."""
    from ..dtypes import FLOAT_DTYPES

    bad = sorted({f"{t.name} ({t.dtype})" for op in adapter.targets.values() for t in op.tensors()
                  if t.dtype not in FLOAT_DTYPES})
    if bad:
        raise AdapterConfigError(f"{where}: adapter tensors must be floating point; {len(bad)} are not: "
                                 f"{name_list(bad, 4)}",
                                 "save the adapter's factors as float32, bfloat16 or float16")
