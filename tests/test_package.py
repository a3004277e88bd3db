"""The package as a newcomer meets it: what it exports, what the repository holds, what the demo leaves behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_import_without_torch():
    code = ("import sys, lora_merge\n"
            "assert 'torch' not in sys.modules, 'torch imported with the package'\n"
            "from lora_merge import LoraMergeError, MergeOptions, PushOptions, AdapterOptions, ParityError\n"
            "assert 'torch' not in sys.modules\n"
            "for name in lora_merge.__all__:\n"
            "    assert getattr(lora_merge, name) is not None, name\n"
            "from lora_merge import merge, MergeResult, Report\n"
            "assert merge.__module__ == 'lora_merge.pipeline' and Report.__module__ == 'lora_merge.check.report'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_a_plain_merge_never_imports_torch(models, tmp_path):
    """A bf16 model merged on the CPU: numpy only (torch's import alone costs seconds and hundreds of MB)."""
    from helpers import build_adapter

    build_adapter(models["llama_bf16"], tmp_path / "adapter", r=4, target_modules="all-linear")
    code = ("import sys; from lora_merge import merge, verify\n"
            "r = merge(sys.argv[1], sys.argv[2], sys.argv[3], device='cpu')\n"
            "assert r.report.ok and verify(sys.argv[3], sys.argv[1], sys.argv[2], device='cpu').ok\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    r = subprocess.run([sys.executable, "-c", code, str(models["llama_bf16"]), str(tmp_path / "adapter"),
                        str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_the_repository_holds_no_binaries():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.split()
    binary = (".whl", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".prof", ".so", ".tar.gz", ".zip")
    assert [f for f in tracked if f.endswith(binary)] == []


def test_the_demo_cleans_up_after_itself(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(ROOT)}, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "largest relative error" in r.stdout
    assert list(temp.iterdir()) == []
