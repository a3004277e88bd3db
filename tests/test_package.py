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
