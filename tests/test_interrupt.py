"""Ctrl-C and SIGTERM in the middle of writing: no OUT, no temporary files, a clean message."""

from __future__ import annotations

import os
import signal
import time

import pytest
from helpers import paced_cli
from make_model import make

SHAPE = dict(hidden=512, inter=1536, layers=6, heads=8, kv=4, head_dim=64, vocab=8000)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    make(SHAPE, root, rank=16, shards=2)
    return root


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_leaves_nothing(medium, tmp_path, sig):
    out = tmp_path / "out"
    proc = paced_cli(medium / "base", medium / "adapter", out, "--block-mb", "1", "--device", "cpu")
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".out.lora-merge-tmp-*/*.safetensors")):
        time.sleep(0.01)
    assert proc.poll() is None, "the merge ended before it could be interrupted"
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.startswith("error: interrupted") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
