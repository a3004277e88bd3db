"""Reading an adapter's tensor file: safetensors lazily, a pickle only as plain tensors."""

from __future__ import annotations

import json
from pathlib import Path

from ..adapter import AdapterTensor, FileTensor, MemoryTensor
from ..errors import AdapterConfigError, HeaderError, SourceNotFoundError
from ..safetensors_file import read_header

TENSOR_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def read_tensor_file(path: Path) -> dict[str, AdapterTensor]:
    """The file's tensors by key; a ``.safetensors`` file is read on demand, a pickle at once."""
    if path.suffix == ".safetensors":
        return {k: FileTensor(v) for k, v in read_header(path).tensors.items()}
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HeaderError(
            f"{path}: refused: it cannot be loaded as plain tensors ({first})",
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
    if not path.is_file():
        raise SourceNotFoundError(f"ADAPTER {str(folder)!r} {missing}", hint)
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterConfigError(f"{path}: not a JSON object")
    return config
