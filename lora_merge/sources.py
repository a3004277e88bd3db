"""Finding the files of a base model and of an adapter.

``resolve_source`` is the one place that turns what the user typed into a local folder; Hub repo ids
plug in here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import HeaderError, InputFileError, SourceNotFoundError, name_list
from .names import is_weight_file, parse_spec
from .numbers import Quantization, find_quantization
from .paths import is_regular, read_text, resolved, within
from .safetensors_file import SafetensorsHeader, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass
class Source:
    """What the user named and the local folder that holds it."""

    spec: str
    path: Path
    revision: str | None = None  # the commit, for a Hub repo
    repo_id: str | None = None
    # links may point anywhere inside this folder: the model folder itself, or for a snapshot in the
    # huggingface_hub cache, the repo's cache folder (snapshots link into its blobs)
    root: Path | None = None

    @property
    def link_root(self) -> Path:
        return self.root or self.path


def resolve_source(spec: str, role: str, token: str | None = None) -> Source:
    """Turn BASE or ADAPTER as typed into a local folder: an existing path, else a Hub repo id."""
    spec = str(spec)  # a Path from a library caller
    path = Path(spec).expanduser()
    if path.is_dir():
        return Source(spec, resolved(path))
    if path.exists() and role == "ADAPTER":  # loralib and kohya adapters are one tensor file (read as a regular file)
        return Source(spec, resolved(path), root=resolved(path).parent)
    if path.exists():
        raise SourceNotFoundError(
            f"{role} {spec!r} is a file, not a folder", f"pass the folder that holds the {role.lower()}'s files"
        )
    if path.is_symlink():
        raise SourceNotFoundError(f"{role} {spec!r} is a symbolic link to nothing that exists (or one that loops)",
                                  "point it at the folder, or pass the folder itself")
    parsed = parse_spec(spec) if role in ("BASE", "ADAPTER") else None
    if parsed is None:
        hint = "check the path" + (", or name a Hub repo as org/name[@revision]" if role != "OUT" else "")
        raise SourceNotFoundError(f"{role} {spec!r} does not exist", hint)
    from .errors import RepoNotFoundError
    from .hub import fetch

    repo_id, revision = parsed
    try:
        snapshot = fetch(repo_id, revision, role, token)
    except RepoNotFoundError as e:  # the Hub does not show it either: it may as well be a mistyped path
        raise RepoNotFoundError(f"{role} {spec!r}: no such folder here, and as a Hub repo id: "
                                f"{_reason(str(e), role)}", _nearby(path) or e.hint) from None
    return Source(spec, snapshot.folder, revision=snapshot.commit, repo_id=repo_id, root=snapshot.cache_root)


def _reason(message: str, role: str) -> str:
    """A Hub error's message without its "ROLE org/name: " start."""
    return message.partition(": ")[2] or message if message.startswith(role + " ") else message


def _nearby(path: Path) -> str | None:
    """A hint naming the local folder ``path`` was likely meant to be, when its parent exists here."""
    import difflib

    parent = path.parent
    if str(parent) in ("", ".") or not parent.is_dir():
        return None
    names = [p.name for p in parent.iterdir()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    if close:
        return f"did you mean {parent / close[0]}? (a local path always wins over a Hub repo id)"
    return f"{parent} exists here but holds no {path.name!r}: check the path"


def looks_like_model(folder: Path) -> bool:
    """A folder with a model's config.json (a model_type or architectures) and safetensors weights."""
    try:
        config = json.loads(read_text(folder / "config.json"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("model_type" in config or "architectures" in config) \
        and any(folder.glob("*.safetensors"))


@dataclass
class BaseModel:
    source: Source
    shards: list[SafetensorsHeader]  # in shard order
    stored: dict[str, TensorInfo]  # every tensor of the files
    config: dict
    index_metadata: dict
    index_name: str = INDEX_NAME  # what the index is called (diffusers: diffusion_pytorch_model.safetensors.index.json)
    quantization: Quantization | None = None

    def __post_init__(self):
        # the tensors as the model computes with them: a quantized weight's codes and scales are one dense tensor
        self.tensors = self.quantization.view(self.stored) if self.quantization else self.stored

    @property
    def path(self) -> Path:
        return self.source.path


def _no_duplicate_keys(pairs: list) -> dict:
    """A JSON object that names a key twice (a tensor listed in two shards) is refused, not silently resolved."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"{key!r} is listed twice")
        seen[key] = value
    return seen


def load_base(source: Source, role: str = "BASE") -> BaseModel:
    """Read a model folder's config and every shard header; no tensor data is read."""
    folder = source.path
    index_path = _index_path(folder)
    if index_path.exists():
        weight_map, index_metadata = _read_index(index_path)
        shard_names = _indexed_shards(index_path, weight_map, source, role)
    else:
        weight_map, index_metadata, shard_names = None, {}, _single_shard(source, role)
    shards = []
    tensors: dict[str, TensorInfo] = {}
    for name in shard_names:
        shard_path = folder / name
        if not within(shard_path, source.link_root):
            raise HeaderError(f"{shard_path}: a link that points outside the model folder")
        header = read_header(shard_path)
        shards.append(header)
        for tname, info in header.tensors.items():
            if tname in tensors:
                raise HeaderError(f"{role}: tensor {tname!r} is stored twice ({tensors[tname].path.name} and {name})")
            tensors[tname] = info
    if weight_map is not None:
        _check_index(index_path, weight_map, tensors)
    config = _read_config(folder / "config.json")
    return BaseModel(source, shards, tensors, config, index_metadata, index_path.name,
                     find_quantization(config, tensors, role))


def _index_path(folder: Path) -> Path:
    """Where the folder's index is, or would be (a diffusers component names its index after its weights)."""
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        others = sorted(folder.glob("*.safetensors.index.json"))
        if len(others) == 1:
            return others[0]
    return index_path


def _read_index(index_path: Path) -> tuple[dict, dict]:
    """An index's weight map and metadata, checked for their types."""
    try:
        index = json.loads(read_text(index_path), object_pairs_hook=_no_duplicate_keys)
        weight_map = index["weight_map"]
        index_metadata = index.get("metadata") or {}
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to file names")
        if not isinstance(index_metadata, dict):
            raise TypeError("metadata must be a JSON object")
    except InputFileError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HeaderError(f"{index_path}: not a valid safetensors index ({e})", "re-download the base model") from e
    return weight_map, index_metadata


def _indexed_shards(index_path: Path, weight_map: dict, source: Source, role: str) -> list[str]:
    """The files an index names, each inside the folder and there."""
    shard_names = sorted(dict.fromkeys(weight_map.values()))
    bad = [n for n in shard_names if "/" in n or "\\" in n or n in ("", ".", "..")]
    if bad:
        raise HeaderError(f"{index_path}: weight_map names files outside the model folder: {name_list(bad)}")
    missing = [n for n in shard_names if not (source.path / n).exists()]  # anything else is read and refused by kind
    if missing:
        raise SourceNotFoundError(
            f"{role} {source.spec!r}: the index lists shards that are missing: {', '.join(missing)}",
            "re-download the base model",
        )
    return shard_names


def _single_shard(source: Source, role: str) -> list[str]:
    """The one weights file of a folder without an index, or why there is none."""
    folder = source.path
    if (folder / SINGLE_NAME).exists():
        return [SINGLE_NAME]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if found:
        raise SourceNotFoundError(
            f"{role} {source.spec!r} holds several .safetensors files but no {INDEX_NAME}",
            "add the index that maps tensors to files",
        )
    others = sorted(p.name for p in folder.iterdir() if p.name.endswith((".bin", ".pt", ".pth")))
    hint = (
        "convert it first, e.g. `python -c \"from transformers import AutoModelForCausalLM as M; "
        f"M.from_pretrained('{source.spec}').save_pretrained('{source.spec}-st')\"`"
    )
    what = f" (found {', '.join(others[:3])})" if others else ""
    raise SourceNotFoundError(f"{role} {source.spec!r} has no safetensors weights{what}", hint)


def _check_index(index_path: Path, weight_map: dict, tensors: dict[str, TensorInfo]) -> None:
    """The index and the shards' headers agree on where every tensor is."""
    for tname, shard in weight_map.items():
        info = tensors.get(tname)
        if info is None or info.path.name != shard:
            raise HeaderError(
                f"{index_path}: says {tname!r} is in {shard} but that file does not hold it",
                "re-download the base model",
            )
    extra = sorted(set(tensors) - set(weight_map))
    if extra:
        raise HeaderError(f"{index_path}: shards hold tensors the index does not list: {name_list(extra)}")


def _read_config(config_path: Path) -> dict:
    if not config_path.exists():
        return {}
    try:
        config = json.loads(read_text(config_path))
    except InputFileError:
        raise
    except (OSError, ValueError) as e:
        raise HeaderError(f"{config_path}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise HeaderError(f"{config_path}: not a JSON object", "restore the config.json the model was published with")
    return config


def extra_files(folder: Path) -> list[Path]:
    """Top-level non-weight files of a model folder (config, tokenizer, generation config, license...)."""
    return sorted(
        p for p in folder.iterdir()
        if is_regular(p) and not p.name.startswith(".") and not is_weight_file(p.name)
    )
