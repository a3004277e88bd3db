"""Adapter formats: each is translated into the canonical ``Adapter`` at the edge.

``load_adapter`` detects the format from the files (or takes ``--adapter-format``) and calls the
format's loader; nothing past this package knows which format an adapter came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..adapter import Adapter
from ..errors import UnsupportedAdapterError
from ..names import ADAPTER_TENSOR_SUFFIXES
from .loralib import LoralibOptions

FORMATS = ("peft", "loralib", "mlx", "kohya")
LAYOUTS = {
    "peft": "a folder with adapter_config.json and adapter_model.safetensors (or .bin)",
    "mlx": "a folder with adapters.safetensors and adapter_config.json (lora_parameters.scale)",
    "loralib": "one tensor file of <module>.lora_A / <module>.lora_B (give --lora-alpha)",
    "kohya": "one safetensors file of <name>.lora_down.weight / .lora_up.weight / .alpha (LyCORIS LoHa and LoKr: "
             "<name>.hada_w1_a … / <name>.lokr_w1 …)",
}


@dataclass(frozen=True)
class AdapterOptions:
    """What the user says about an adapter beyond its files."""

    format: str = "auto"  # the adapter's layout ("auto": detected from its files and tensor names), or one of FORMATS
    loralib: LoralibOptions = field(default_factory=LoralibOptions)


def _keys(file: Path) -> list[str]:
    from .files import read_tensor_file

    return list(read_tensor_file(file))


def _format_of_keys(keys: list[str]) -> str | None:
    if any(k.endswith((".lora_down.weight", ".lora_up.weight", ".hada_w1_a", ".lokr_w1", ".lokr_w1_a")) for k in keys):
        return "kohya"
    if any(k.endswith((".lora_A", ".lora_B")) for k in keys):
        return "loralib"
    if any(k.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A")) for k in keys):
        return "peft"
    if any(k.endswith((".lora_a", ".lora_b")) for k in keys):
        return "mlx"
    return None


def detect_format(path: Path) -> str:
    """The format of the adapter at ``path`` (a folder or one file), or a refusal naming what was found."""
    if path.is_dir():
        if (path / "adapter_model.safetensors").exists() or (path / "adapter_model.bin").exists():
            return "peft"
        if (path / "adapters.safetensors").exists():
            return "mlx"
        files = sorted(p for p in path.iterdir() if not p.is_dir() and p.suffix in ADAPTER_TENSOR_SUFFIXES)
        found = f"the folder holds {', '.join(p.name for p in files[:5]) or 'no tensor file'}"
        if len(files) == 1:
            file = files[0]
        else:
            _refuse(path, found)
    else:
        file, found = path, "a file"
    keys = _keys(file)
    fmt = _format_of_keys(keys)
    if fmt in ("peft", "mlx"):
        expected = {"peft": ("adapter_model.safetensors", "adapter_model.bin"), "mlx": ("adapters.safetensors",)}[fmt]
        if file.name in expected and (file.parent / "adapter_config.json").is_file():
            return fmt  # the adapter's tensor file, given instead of its folder
        _refuse(path, f"{file.name} has {fmt} key names, and {fmt} keeps them in a folder as {expected[0]} beside "
                      "adapter_config.json", fmt)
    if fmt is None:
        sample = ", ".join(keys[:3]) + (" …" if len(keys) > 3 else "")
        _refuse(path, f"{found}; {file.name} holds {len(keys)} tensors ({sample or 'none'})")
    return fmt


def _refuse(path: Path, found: str, fmt: str | None = None):
    layouts = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    raise UnsupportedAdapterError(
        f"ADAPTER {str(path)!r} is not an adapter lora-merge recognises: {found}. Recognised layouts: {layouts}",
        f"save it as {LAYOUTS[fmt]}" if fmt else "pass --adapter-format if you know its format",
    )


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapters.safetensors")


def adapter_marker(folder: Path) -> str | None:
    """The file that shows ``folder`` to be an adapter (peft or mlx) and nothing more, if one does: a folder
    that also holds other safetensors weights is a model that ships its adapter beside it."""
    if not folder.is_dir() or any(p.name not in ADAPTER_WEIGHTS for p in folder.glob("*.safetensors")):
        return None
    return next((n for n in ("adapter_config.json", *ADAPTER_WEIGHTS) if (folder / n).is_file()), None)


def load_adapter(path: Path, layout, options: AdapterOptions | None = None) -> Adapter:
    """Translate the adapter at ``path`` against the model's tensors (``layout``: their names and shapes,
    from BASE's files or the model class; some formats need them to place deltas)."""
    from .files import floating_tensors_only

    adapter = _load(path, layout, options or AdapterOptions())
    floating_tensors_only(adapter, f"ADAPTER {str(path)!r}")
    return adapter


def _load(path: Path, layout, options: AdapterOptions) -> Adapter:
    fmt = detect_format(path) if options.format == "auto" else options.format
    if fmt == "peft":
        from .peft import load_peft_adapter

        return load_peft_adapter(path if path.is_dir() else path.parent, layout)
    if fmt == "mlx":
        from .mlx import load_mlx_adapter

        return load_mlx_adapter(path if path.is_dir() else path.parent)
    if fmt == "loralib":
        from .loralib import load_loralib_adapter

        return load_loralib_adapter(path, layout.shapes, options.loralib)
    if fmt == "kohya":
        from .kohya import load_kohya_adapter

        return load_kohya_adapter(path, list(layout.shapes))
    raise UnsupportedAdapterError(f"--adapter-format {fmt!r} is not one of {', '.join(FORMATS)}")
