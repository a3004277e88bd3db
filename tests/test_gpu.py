"""The CUDA path gives the same bytes as the CPU path."""

from __future__ import annotations

import pytest
import torch
from helpers import build_adapter

from lora_merge import merge

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kwargs", [
    dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "embed_tokens"]),
])
def test_cuda_equals_cpu_bit_for_bit(models, tmp_path, kwargs):
    base = models["llama_bf16"]
    build_adapter(base, tmp_path / "adapter", **kwargs)
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "cpu", device="cpu")
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "gpu", device="cuda", block_bytes=4096)
    for f in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "gpu" / f.name).read_bytes(), f.name


def test_cuda_report_and_latency(models, tmp_path):
    """The parity checks and the latency runs on the GPU; the report agrees with the CPU's."""
    import json

    from click.testing import CliRunner

    from lora_merge.cli import cli

    base = models["llama_bf16"]
    build_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj", "down_proj"])
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "out", device="cuda")
    gpu = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert gpu["status"] == "passed" and gpu["provenance"]["device"].startswith("cuda")
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "out"), "--base", str(base), "--adapter",
                                 str(tmp_path / "adapter"), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    cpu = json.loads(r.output)
    assert cpu["files"]["weights"] == gpu["files"]["weights"]  # the merge's hashes of what it wrote, read back
    assert {k: v["ok"] for k, v in cpu["tensors"].items()} == {k: v["ok"] for k, v in gpu["tensors"].items()}
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "out"), "--base", str(base), "--adapter",
                                 str(tmp_path / "adapter"), "--device", "cuda", "--latency", "--new-tokens", "4",
                                 "--runs", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["latency"]["device"].startswith("cuda")


def test_cuda_quantized_equals_cpu(models, tmp_path):
    """FP8 written back in its format, encoded on the GPU: the same bytes, and its check passes there."""
    from quantized import to_fp8

    base = to_fp8(models["llama_bf16"], tmp_path / "fp8", block=(16, 16))
    build_adapter(models["llama_bf16"], tmp_path / "adapter", r=4, target_modules=["q_proj", "down_proj"])
    merge(str(base), str(tmp_path / "adapter"), tmp_path / "cpu", device="cpu")
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "gpu", device="cuda", block_bytes=4096)
    assert result.report.ok
    for f in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "gpu" / f.name).read_bytes(), f.name


def test_cuda_quantize_fp8_equals_cpu(tmp_path):
    """--quantize fp8 on the GPU (the torch codec) writes the bytes the CPU kernels write."""
    from helpers import build_model

    base = tmp_path / "base"
    build_model("qwen3", base, dtype=torch.bfloat16, hidden_size=256, intermediate_size=384, head_dim=64,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    build_adapter(base, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    assert merge(str(base), str(tmp_path / "adapter"), tmp_path / "cpu", device="cpu", quantize="fp8").report.ok
    result = merge(str(base), str(tmp_path / "adapter"), tmp_path / "gpu", device="cuda", block_bytes=4096,
                   quantize="fp8")
    assert result.report.ok
    for f in sorted((tmp_path / "cpu").glob("*.safetensors")):
        assert f.read_bytes() == (tmp_path / "gpu" / f.name).read_bytes(), f.name
