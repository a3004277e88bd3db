"""Property tests: many adapter configurations against peft, and many damaged headers and indexes.

A damaged file may be accepted (when what is left still describes valid tensors) or refused with a
LoraMergeError; it never raises anything else, never takes long, and never writes outside OUT.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import build_adapter, load_tensors, peft_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_merge import merge
from lora_merge.cli import cli
from lora_merge.errors import LoraMergeError
from lora_merge.safetensors_file import read_header
from lora_merge.sources import Source, load_base

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
FAST = settings(max_examples=300, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)


# ----------------------------------------------------------------------------- adapters against peft


@st.composite
def lora_configs(draw):
    targets = draw(st.lists(st.sampled_from(LINEAR), min_size=1, max_size=7, unique=True))
    config = {
        "r": draw(st.integers(1, 8)),
        "lora_alpha": draw(st.sampled_from([1, 2.5, 8, 16, 64])),
        "use_rslora": draw(st.booleans()),
        "target_modules": targets,
    }
    if draw(st.booleans()):
        config["layers_to_transform"] = draw(st.sampled_from([[0], [1]]))
    if draw(st.booleans()):
        config["rank_pattern"] = {targets[0]: draw(st.integers(1, 8))}
    if draw(st.booleans()):
        config["alpha_pattern"] = {targets[-1]: draw(st.sampled_from([3, 32]))}
    return config


@SLOW
@given(config=lora_configs(), seed=st.integers(0, 2**16))
def test_any_lora_config_merges_like_peft(models, config, seed):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_adapter(models["llama"], tmp / "adapter", seed=seed, **config)
        result = merge(models["llama"], tmp / "adapter", tmp / "out", device="cpu")
        assert result.report.ok, result.report.table()
        ours = load_tensors(tmp / "out")
        theirs = peft_reference(models["llama"], tmp / "adapter")
        base = load_tensors(models["llama"])
        changed = 0
        for name, tensor in ours.items():
            torch.testing.assert_close(tensor, theirs[name], rtol=2e-6, atol=1e-7, msg=name)
            changed += not torch.equal(tensor, base[name])
        assert changed == result.stats.merged > 0


# ------------------------------------------------------------------------------- damaged safetensors


def _valid_file() -> bytes:
    from safetensors.torch import save

    return save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
                 "c": torch.zeros(0, 5)}, metadata={"format": "pt"})


VALID = _valid_file()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "F16", "I8", "F12", "", 3]),
    "shape": st.lists(st.integers(-2, 10), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-5, 200), min_size=0, max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=6), entry | json_values, max_size=4)


@st.composite
def damaged_files(draw, valid: bytes = VALID) -> bytes:
    raw = bytearray(valid)
    kind = draw(st.sampled_from(["truncate", "flip", "length", "header", "json"]))
    if kind == "truncate":
        return bytes(raw[:draw(st.integers(0, len(raw) - 1))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
        return bytes(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    data = bytes(raw[8 + n:])
    if kind == "length":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + bytes(raw[8:])
    text = json.dumps(draw(headers if kind == "header" else json_values)).encode()
    return struct.pack("<Q", len(text)) + text + data


@FAST
@given(blob=damaged_files())
def test_a_damaged_header_is_read_or_refused(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        try:
            header = read_header(path)
        except LoraMergeError:
            return
        for info in header.tensors.values():  # accepted: every tensor lies inside the file
            assert 0 < info.start and info.start + info.nbytes <= len(blob)


# ----------------------------------------------------------------------------------- damaged indexes


shard_names = st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                               "../model-00001-of-00002.safetensors", "/etc/passwd", "", ".", "..",
                               "sub/x.safetensors", "missing.safetensors"])
indexes = st.one_of(
    json_values,
    st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=40), shard_names | json_values,
                                                         max_size=6)}),
    st.fixed_dictionaries({"metadata": json_values, "weight_map": json_values}),
)


@pytest.fixture(scope="module")
def sharded_copy(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("index") / "base"
    shutil.copytree(models["llama_sharded"], folder)
    real = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder, real


@FAST
@given(index=indexes, keep_real=st.booleans())
def test_a_damaged_index_is_read_or_refused(sharded_copy, index, keep_real):
    folder, real = sharded_copy
    if keep_real and isinstance(index, dict) and isinstance(index.get("weight_map"), dict):
        index["weight_map"] = {**real["weight_map"], **index["weight_map"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        model = load_base(Source(str(folder), folder))
    except LoraMergeError:
        return
    finally:
        (folder / "model.safetensors.index.json").write_text(json.dumps(real))
    for info in model.tensors.values():  # accepted: only files of the folder itself
        assert info.path.resolve().parent == folder.resolve()


# --------------------------------------------------------------------------- the whole command line


@pytest.fixture(scope="module")
def real_adapter(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prop") / "adapter"
    build_adapter(models["llama"], folder, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    return folder


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data(), which=st.sampled_from(["base", "adapter"]))
def test_the_command_line_never_leaks_a_traceback_or_a_file(models, real_adapter, data, which):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, adapter = tmp / "base", tmp / "adapter"
        shutil.copytree(models["llama"], base)
        shutil.copytree(real_adapter, adapter)
        target = (base / "model.safetensors") if which == "base" else (adapter / "adapter_model.safetensors")
        target.write_bytes(data.draw(damaged_files(target.read_bytes())))
        before = set(tmp.rglob("*"))
        r = CliRunner().invoke(cli, [str(base), str(adapter), str(tmp / "out"), "-q"])
        assert r.exit_code in (0, 1) and "Traceback" not in r.output, r.output
        if r.exit_code == 1:
            assert r.output.startswith("error: ") or "parity report" in r.output, r.output
        after = set(tmp.rglob("*")) - before
        kept = tmp / "out.lora-merge-failed"  # an output that failed its checks, kept beside OUT for a look
        assert all(p in (tmp / "out", kept) or {tmp / "out", kept} & set(p.parents) for p in after), after
        assert r.exit_code == 1 or (tmp / "out" / "merge_report.json").is_file()


# ----------------------------------------------------------------------- any JSON value in any config key

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, -1, 1, 0.0, -0.5, 1e308])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.sampled_from(LINEAR), inner,
                                                                 max_size=3),
    max_leaves=6,
)
ADAPTER_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora", "fan_in_fan_out",
                "modules_to_save", "trainable_token_indices", "layers_to_transform", "layers_pattern", "use_dora",
                "lora_bias", "bias", "peft_type", "target_parameters", "base_model_name_or_path",
                "init_lora_weights", "exclude_modules", "task_type"]
MODEL_KEYS = ["model_type", "architectures", "tie_word_embeddings", "vocab_size", "hidden_size", "torch_dtype",
              "dtype", "quantization_config", "num_hidden_layers", "text_config", "num_local_experts"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(which=st.sampled_from(["adapter_config.json", "config.json"]), data=st.data())
def test_any_json_in_any_config_key_merges_or_is_one_line(models, real_adapter, which, data):
    """Whatever a config key holds: exit 0 with a passing report, or one line and exit 1; never a traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, adapter = tmp / "base", tmp / "adapter"
        shutil.copytree(models["llama"], base)
        shutil.copytree(real_adapter, adapter)
        path = (adapter if which == "adapter_config.json" else base) / which
        config = json.loads(path.read_text())
        key = data.draw(st.sampled_from(ADAPTER_KEYS if which == "adapter_config.json" else MODEL_KEYS))
        config[key] = data.draw(JSON_VALUES)
        path.write_text(json.dumps(config))
        r = CliRunner().invoke(cli, [str(base), str(adapter), str(tmp / "out"), "-q"])
        assert r.exception is None or isinstance(r.exception, SystemExit), (key, config[key], r.exception)
        assert r.exit_code in (0, 1), (key, config[key], r.output)
        if r.exit_code == 0:
            assert json.loads((tmp / "out" / "merge_report.json").read_text())["status"] == "passed"
        else:
            lines = [line for line in r.output.splitlines() if line.strip()]
            assert lines[0].startswith("error: ") and len(lines) <= 2, (key, config[key], r.output)
            assert not (tmp / "out").exists(), (key, config[key])


# ------------------------------------- any JSON in quantization_config, and in configs read through the tables


def _one_refusal(r, what):
    """Exit 0, or exit 1 with one error line, its hint, and the offenders listed one a line; never a traceback."""
    assert r.exception is None or isinstance(r.exception, SystemExit), (what, r.exception)
    assert r.exit_code in (0, 1) and "Traceback" not in r.output, (what, r.output)
    if r.exit_code == 1:
        lines = [line for line in r.output.splitlines() if line.strip()]
        assert lines[0].startswith("error: "), (what, r.output)
        assert all(line.startswith(("  - ", "hint: ")) for line in lines[1:]), (what, r.output)


QUANT_KEYS = ["quant_method", "weight_block_size", "fmt", "activation_scheme", "scale_fmt", "modules_to_not_convert",
              "dequantize", None]  # None: the whole quantization_config


@pytest.fixture(scope="module")
def fp8_llama(models, tmp_path_factory):
    from quantized import to_fp8

    root = tmp_path_factory.mktemp("prop_fp8")
    build_adapter(models["llama_bf16"], root / "adapter", r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    return to_fp8(models["llama_bf16"], root / "fp8", block=(16, 16)), root / "adapter"


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(key=st.sampled_from(QUANT_KEYS), data=st.data())
def test_any_json_in_quantization_config_merges_or_is_one_line(fp8_llama, key, data):
    fp8, adapter = fp8_llama
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(fp8, tmp / "base")
        config = json.loads((tmp / "base" / "config.json").read_text())
        value = data.draw(JSON_VALUES)
        if key is None:
            config["quantization_config"] = value
        else:
            config["quantization_config"][key] = value
        (tmp / "base" / "config.json").write_text(json.dumps(config))
        r = CliRunner().invoke(cli, [str(tmp / "base"), str(adapter), str(tmp / "out"), "-q"])
        _one_refusal(r, (key, value))
        if r.exit_code == 0:
            assert json.loads((tmp / "out" / "merge_report.json").read_text())["status"] == "passed"
        else:
            assert not (tmp / "out").exists()


MOE_KEYS = ["model_type", "architectures", "hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
            "head_dim", "num_attention_heads", "num_hidden_layers", "intermediate_size", "decoder_sparse_step",
            "mlp_only_layers", "tie_word_embeddings", "vocab_size", "rope_parameters", "layer_types"]


@pytest.fixture(scope="module")
def mapped_moe(tmp_path_factory):
    """A tiny Qwen3-MoE and an all-linear adapter that only transformers' tables place on its experts."""
    import transformers
    from architectures import tiny_config
    from helpers import peft

    root = tmp_path_factory.mktemp("prop_moe")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_config("qwen3_moe")).to(torch.bfloat16).save_pretrained(
        root / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
                        ).save_pretrained(root / "adapter")
    return root


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(key=st.sampled_from(MOE_KEYS), data=st.data())
def test_any_json_in_a_config_read_through_the_tables_merges_or_is_one_line(mapped_moe, key, data):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(mapped_moe / "base", tmp / "base")
        config = json.loads((tmp / "base" / "config.json").read_text())
        config[key] = data.draw(JSON_VALUES)
        (tmp / "base" / "config.json").write_text(json.dumps(config))
        r = CliRunner().invoke(cli, [str(tmp / "base"), str(mapped_moe / "adapter"), str(tmp / "out"), "-q"])
        _one_refusal(r, (key, config[key]))
        if r.exit_code == 0:
            assert json.loads((tmp / "out" / "merge_report.json").read_text())["status"] == "passed"
        else:
            assert not (tmp / "out").exists()
