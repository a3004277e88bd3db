"""Tiny real models and real peft adapters, built in the test session (no network)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")
torch.set_num_threads(2)

from helpers import build_model  # noqa: E402


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Base models shared by the session (read-only): name -> folder."""
    root = tmp_path_factory.mktemp("bases")
    made = {}
    for name, kind, kw in [
        ("llama", "llama", {}),
        ("llama_sharded", "llama", {"sharded": True}),
        ("qwen3_tied", "qwen3", {"sharded": True}),
        ("qwen2", "qwen2", {}),
        ("gpt2", "gpt2", {}),
        ("llama_bf16", "llama", {"dtype": torch.bfloat16, "sharded": True}),
    ]:
        build_model(kind, root / name, **kw)
        made[name] = root / name
    return made


@pytest.fixture
def no_transformers(monkeypatch):
    """As if transformers were not installed: importing it fails."""
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)
