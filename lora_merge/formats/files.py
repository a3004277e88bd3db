"""Reading an adapter's tensor file: safetensors lazily, a pickle only as plain tensors."""

from __future__ import annotations

from pathlib import Path

from ..adapter import AdapterTensor, FileTensor, MemoryTensor
from ..errors import HeaderError
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
