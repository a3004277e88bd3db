"""What names mean, without reading anything: Hub repo ids as typed, and which file names hold weights."""

from __future__ import annotations

import re
from pathlib import Path

# org/name, optionally @revision (a branch, tag or commit); the Hub's own naming rules
REPO_SPEC = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^\s@]+))?$")

# Every file suffix that holds weights, by kind: the one list the merge, the Hub download and the copy of
# BASE's other files all go by.
SAFETENSORS = ".safetensors"
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # read only as plain tensors, and only for adapters
OTHER_FORMATS = (".gguf", ".onnx", ".h5", ".msgpack", ".tflite", ".mlmodel", ".ot", ".npz")  # never read
WEIGHT_SUFFIXES = (SAFETENSORS, *PICKLED, *OTHER_FORMATS)
WEIGHT_PREFIXES = ("tf_model", "flax_model", "model.ckpt", "pytorch_model")  # sharded weights of other frameworks
ADAPTER_TENSOR_SUFFIXES = (SAFETENSORS, ".bin", ".pt", ".pth")  # an adapter's one tensor file


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.startswith(WEIGHT_PREFIXES) or name.endswith(".index.json")


def parse_spec(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``spec`` reads as a Hub repo id, else None."""
    m = REPO_SPEC.match(spec.strip())
    if not m or ".." in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return m["repo"], m["revision"]


def repo_named(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision) when ``text`` names a Hub repo rather than an existing local path."""
    return None if Path(text).expanduser().exists() else parse_spec(text)


def family(name: str) -> str:
    """A tensor name with its layer and expert numbers as N (``model.layers.N.mlp.down_proj.weight``): the family
    of tensors it belongs to."""
    return re.sub(r"\.\d+(?=\.|$)", ".N", name)
