"""The one reader of stored tensors: under paths.py's rules, each file opened once within a run, closed after."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_merge import reader
from lora_merge.errors import InputFileError
from lora_merge.safetensors_file import read_header


@pytest.fixture
def stored(tmp_path):
    t = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    save_file({"w": t, "s": torch.tensor(3.0)}, tmp_path / "x.safetensors")
    return read_header(tmp_path / "x.safetensors").tensors, t


def opened_count(monkeypatch) -> list:
    opened = []
    real = reader.open_read

    def counting(path):
        fd = real(path)
        opened.append(fd)
        return fd

    monkeypatch.setattr(reader, "open_read", counting)
    return opened


def test_rows_and_scalars_read_as_stored(stored):
    tensors, t = stored
    rows = reader.read_rows(tensors["w"], 2, 5).view(np.float32).reshape(3, 8)
    assert np.array_equal(rows, t[2:5].numpy())
    assert reader.read_rows(tensors["s"], 0, 1).view(np.float32)[0] == 3.0


def test_within_a_run_each_file_is_opened_once_and_closed_after(stored, monkeypatch):
    tensors, _ = stored
    opened = opened_count(monkeypatch)
    with reader.kept_open():
        with reader.kept_open():  # nested: the outer one closes
            for start in range(6):
                reader.read_rows(tensors["w"], start, start + 1)
        threads = [threading.Thread(target=reader.read_rows, args=(tensors["w"], 0, 6)) for _ in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(opened) == 1 and os.fstat(opened[0])  # still open inside the run
    with pytest.raises(OSError):
        os.fstat(opened[0])  # closed when the run ends


def test_outside_a_run_each_read_opens_and_closes(stored, monkeypatch):
    tensors, _ = stored
    opened = opened_count(monkeypatch)
    reader.read_rows(tensors["w"], 0, 1)
    reader.read_rows(tensors["w"], 1, 2)
    assert len(opened) == 2
    for fd in opened:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_file_replaced_by_a_pipe_is_refused_by_name(stored, tmp_path):
    tensors, _ = stored
    os.remove(tmp_path / "x.safetensors")
    os.mkfifo(tmp_path / "x.safetensors")
    with pytest.raises(InputFileError, match="not a regular file"):
        reader.read_rows(tensors["w"], 0, 1)
