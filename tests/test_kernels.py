"""The CPU merge's passes: the C extension and the numpy passes give the same bytes, and those bytes are the exact
W + s·B·A rounded once, on inputs built to sit on and beside rounding midpoints (ties, a hair off them, off them by
less than float64 can see), subnormals, signed zeros, NaN and infinity, and a width that is not a multiple of the
passes' column blocks."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import bf16_factors, build_adapter, load_tensors
from safetensors.torch import load_file, save_file

from lora_merge import kernels, merge, unmerge

TARGET = "model.layers.0.self_attn.q_proj"  # 32 × 32 in the tiny llama
WIDE = "model.layers.0.mlp.down_proj"  # 32 × 64: one full block of columns and none left over
needs_c = pytest.mark.skipif(not kernels.ACCELERATED, reason="the C extension was not built here")
TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _adversarial(shape, r: int, seed: int, specials: bool = True):
    """W (bf16), A (r × in) and B (out × r), float32, with s = 1: ties, near ties and the odd special value."""
    rng = np.random.default_rng(seed)
    out, inp = shape
    w = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.05)
    a = torch.from_numpy(rng.standard_normal((r, inp)).astype(np.float32) * 0.1)
    b = torch.from_numpy(rng.standard_normal((out, r)).astype(np.float32) * 0.1)
    # rows 0-7: W in [1, 2) and a delta of exactly half its bfloat16 ulp (2^-8) from the first term: ties, and in
    # rows 2-7 a second term nudges them by 2^-30 either way (float32's product cannot see that; float64 can), or
    # in rows 6-7 by 2^-120 (float64 cannot either: the exact value decides)
    w[:8] = torch.from_numpy(rng.uniform(1, 1.99, (8, inp)).astype(np.float32))
    a[0], b[:8] = 2.0**-4, 0
    b[:8, 0] = 2.0**-4
    if r > 1:
        a[1] = 2.0**-15
        b[2:4, 1], b[4:6, 1] = 2.0**-15, -(2.0**-15)
        b[6, 1], b[7, 1] = 2.0**-105, -(2.0**-105)
    w = w.to(torch.bfloat16)
    if not specials:
        return w, a, b
    # specials in W, where the products are ordinary
    w[9, :4] = torch.tensor([0.0, -0.0, 2.0**-130, -(2.0**-133)])
    w[10, :3] = torch.tensor([float("nan"), float("inf"), -3.0e38])
    b[11] = 0  # a row the adapter does not change: BASE's bits, -0 included
    b[20] *= 1e-3  # a row with a small delta: one ulp off is plainly wrong there
    w[11, :2] = torch.tensor([-0.0, 2.0**-131])
    return w, a, b


def _write(models, tmp_path: Path, r: int, seed: int, specials: bool = True) -> tuple[Path, Path]:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(models["llama_bf16"], base)
    build_adapter(models["llama_bf16"], adapter, r=r, lora_alpha=r, target_modules=["q_proj", "down_proj"])
    weights = load_file(adapter / "adapter_model.safetensors")
    for k, module in enumerate((TARGET, WIDE)):
        shard = next(p for p in base.glob("*.safetensors") if f"{module}.weight" in load_file(p))
        tensors = load_file(shard)
        w, a, b = _adversarial(tuple(tensors[f"{module}.weight"].shape), r, seed + k, specials)
        tensors[f"{module}.weight"] = w
        save_file(tensors, shard, metadata={"format": "pt"})
        weights[f"base_model.model.{module}.lora_A.weight"], weights[f"base_model.model.{module}.lora_B.weight"] = a, b
    save_file(weights, adapter / "adapter_model.safetensors")
    return base, adapter


def _exact_rounding(w, a, b, dtype: str, scale: float = 1.0) -> torch.Tensor:
    """Every element's exact W + scale·B·A rounded once to ``dtype``, nearest, ties to even, by brute force in
    fractions: the candidates are the value torch gives from float64 and its two neighbours, whichever is nearest."""
    t = TORCH[dtype]
    w64, a64, b64 = w.double(), a.double(), b.double()
    got = torch.empty(w.shape, dtype=t)
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            x = float(w64[i, j])
            if not math.isfinite(x):
                got[i, j] = x  # NaN or infinity plus a finite product: itself
                continue
            terms = [Fraction(scale) * Fraction(float(b64[i, k])) * Fraction(float(a64[k, j])) for k in range(a.shape[0])]
            exact = Fraction(x) + sum(terms, Fraction(0))
            if all(term == 0 for term in terms):
                got[i, j] = w[i, j].to(t)  # nothing added: BASE's bits (-0 stays -0)
                continue
            info = torch.finfo(t)
            top = Fraction(float(info.max)) + Fraction(float(info.max)) * Fraction(float(info.eps)) / 4
            if abs(exact) >= top:  # half an ulp past the largest value or more: the infinity
                got[i, j] = math.copysign(math.inf, exact)
                continue
            c = torch.tensor(float(exact), dtype=torch.float64).to(t)
            candidates = [c, torch.nextafter(c, torch.tensor(math.inf, dtype=t)),
                          torch.nextafter(c, torch.tensor(-math.inf, dtype=t))]
            best = min(candidates, key=lambda v: (abs(Fraction(float(v)) - exact) if math.isfinite(float(v))
                                                  else Fraction(10) ** 400,
                                                  int(v.view({2: torch.int16, 4: torch.int32}[v.element_size()])) & 1))
            got[i, j] = best
    return got


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("dtype,flag", [("BF16", None), ("F16", "float16"), ("F32", "float32")])
@pytest.mark.parametrize("passes", ["numpy", pytest.param("C", marks=needs_c)])
def test_every_element_is_the_exact_value_rounded_once(models, tmp_path, monkeypatch, dtype, flag, passes):
    if passes == "numpy":
        for name in ("merge16", "merge32", "check16", "check32", "gather", "trip", "exact"):
            monkeypatch.setattr(kernels, name, getattr(kernels.plain, name))
    base, adapter = _write(models, tmp_path, r=3, seed=5)
    result = merge(str(base), str(adapter), tmp_path / "out", device="cpu", allow_nonfinite=True,
                   **({"dtype": flag} if flag else {}))
    assert result.report.ok, result.report.table()
    out, weights, before = load_tensors(tmp_path / "out"), load_file(adapter / "adapter_model.safetensors"), \
        load_tensors(base)
    for module in (TARGET, WIDE):
        a, b = weights[f"base_model.model.{module}.lora_A.weight"], weights[f"base_model.model.{module}.lora_B.weight"]
        expected = _exact_rounding(before[f"{module}.weight"], a, b, dtype)
        got = out[f"{module}.weight"]
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(_bits(got)[~nan], _bits(expected)[~nan]), module
    if dtype != "F32":  # the near ties float64 cannot resolve were decided exactly
        assert result.stats.exact > 0
    # ties went to even, and the hair either side of them decided the direction
    q = out[f"{TARGET}.weight"].float()
    w = before[f"{TARGET}.weight"].float()
    if dtype == "BF16":
        ulp = 2.0**-7
        assert torch.all((q[2:4] - w[2:4]) == ulp) and torch.all(q[4:6] == w[4:6])
        assert torch.all((q[6] - w[6]) == ulp) and torch.all(q[7] == w[7])


@pytest.mark.parametrize("r,alpha", [(4, 8), (3, 5)])  # alpha / r: a power of two (exact ties), 5/3 (near ones)
@pytest.mark.parametrize("passes", ["numpy", pytest.param("C", marks=needs_c)])
def test_an_adapter_of_bfloat16_values_is_rounded_once(models, tmp_path, monkeypatch, passes, r, alpha):
    """peft's adapter stored in bfloat16 (a model trained in bfloat16): its products are short, and many merged
    elements land exactly on a midpoint, or within float64's error of one; each is the exact value rounded once."""
    if passes == "numpy":
        for name in ("merge16", "merge32", "check16", "check32", "gather", "trip", "exact"):
            monkeypatch.setattr(kernels, name, getattr(kernels.plain, name))
    base = models["llama_bf16"]
    build_adapter(base, tmp_path / "adapter32", r=r, lora_alpha=alpha, target_modules=["q_proj", "down_proj"])
    adapter = bf16_factors(tmp_path / "adapter32", tmp_path / "adapter")
    result = merge(str(base), str(adapter), tmp_path / "out", device="cpu")
    assert result.report.ok and result.stats.exact > 0
    out, weights, before = load_tensors(tmp_path / "out"), load_file(adapter / "adapter_model.safetensors"), \
        load_tensors(base)
    for module in (TARGET, WIDE):
        a, b = weights[f"base_model.model.{module}.lora_A.weight"], weights[f"base_model.model.{module}.lora_B.weight"]
        expected = _exact_rounding(before[f"{module}.weight"], a.float(), b.float(), "BF16", alpha / r)
        assert torch.equal(_bits(out[f"{module}.weight"]), _bits(expected)), module


@pytest.mark.parametrize("passes", ["numpy", pytest.param("C", marks=needs_c)])
def test_exact_sums_are_the_exact_values_rounded_to_odd(monkeypatch, passes):
    """kernels.exact against fractions: the exact value where it is a double, else the odd one of the two doubles
    around it; NaN where a product's error falls below doubles' range, which ExactSums then sums in fractions."""
    from lora_merge.exact import ExactSums

    exact = kernels.plain.exact if passes == "numpy" else kernels._chosen.exact
    rng = np.random.default_rng(7)
    seen = {"exact": 0, "odd": 0, "nan": 0}
    for trial in range(60):
        r, width, rows = int(rng.integers(1, 24)), int(rng.integers(1, 40)), int(rng.integers(1, 12))
        bits = (3, 8, 24)[trial % 3]  # few bits: sums that are doubles, and ties; float32's: sums that are not

        def draw(shape):
            m, e = np.frexp(rng.standard_normal(shape) * float(rng.choice([1e-3, 1.0, 1e3])))
            return np.ldexp(np.round(m * 2**bits) / 2**bits, e).astype(np.float32)

        left, right = draw((rows, r)), draw((width, r))
        scales = rng.choice([2.0, 0.5, 5 / 3, 1e-280 if trial % 10 == 0 else 1.0], size=r)
        flat = rng.choice(rows * width, size=int(rng.integers(1, rows * width + 1)), replace=False).astype(np.int64)
        w = draw(len(flat)).astype(np.float64)
        out = np.empty(len(flat))
        exact(flat, width, left, right, scales, w, out)
        with monkeypatch.context() as m:
            m.setattr(kernels, "exact", exact)
            sums = ExactSums(left, right, scales, width)
            got = sums(flat, w)  # the NaNs summed in fractions instead
        assert sums.fractions == np.count_nonzero(np.isnan(out))
        for k, f in enumerate(flat):
            i, j = divmod(int(f), width)
            q = Fraction(float(w[k])) + sum(Fraction(float(s)) * Fraction(float(x)) * Fraction(float(y))
                                            for s, x, y in zip(scales, left[i], right[j]))
            if math.isnan(out[k]):
                assert any(0 < abs(s * x * y) < 2.0**-900 for s, x, y in zip(scales, left[i], right[j]))
                seen["nan"] += 1
            else:
                assert got[k] == out[k]
            if Fraction(got[k]) == q:
                seen["exact"] += 1
                continue
            assert int(got[k:k + 1].view(np.uint64)[0]) & 1 == 1, (trial, k)  # odd, and the neighbour on q's side
            assert Fraction(math.nextafter(got[k], -math.inf)) < q < Fraction(math.nextafter(got[k], math.inf))
            seen["odd"] += 1
    assert min(seen.values()) > 0, seen


@needs_c
def test_the_c_passes_and_the_numpy_ones_write_the_same_files(models, tmp_path):
    base, adapter = _write(models, tmp_path, r=3, seed=9)
    for name, env in (("c", {}), ("numpy", {"LORA_MERGE_PLAIN": "1"})):
        code = ("import sys; from lora_merge import merge, kernels\n"
                f"assert kernels.ACCELERATED == {name == 'c'}\n"
                "merge(sys.argv[1], sys.argv[2], sys.argv[3], device='cpu', allow_nonfinite=True)\n")
        r = subprocess.run([sys.executable, "-c", code, str(base), str(adapter), str(tmp_path / name)],
                           capture_output=True, text=True, env={**_environ(), **env})
        assert r.returncode == 0, r.stderr
    for f in (tmp_path / "c").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "numpy" / f.name).read_bytes(), f.name


def _environ() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "LORA_MERGE_PLAIN"}


@pytest.mark.parametrize("passes", ["numpy", pytest.param("C", marks=needs_c)])
def test_the_check_fails_an_element_one_ulp_off(models, tmp_path, monkeypatch, passes):
    """An element moved by one ulp (not a tie: its exact value is plainly nearer the right one) fails the check."""
    if passes == "numpy":
        for name in ("check16", "check32", "gather"):
            monkeypatch.setattr(kernels, name, getattr(kernels.plain, name))
    from lora_merge import verify

    base, adapter = _write(models, tmp_path, r=3, seed=3)
    merge(str(base), str(adapter), tmp_path / "out", device="cpu", allow_nonfinite=True)
    assert verify(tmp_path / "out", str(base), str(adapter), device="cpu", allow_nonfinite=True).ok
    shard = next(p for p in (tmp_path / "out").glob("*.safetensors") if f"{TARGET}.weight" in load_file(p))
    tensors = load_file(shard)
    moved = tensors[f"{TARGET}.weight"].clone()
    w = load_tensors(base)[f"{TARGET}.weight"].double()
    weights = load_file(adapter / "adapter_model.safetensors")
    exact = w + weights[f"base_model.model.{TARGET}.lora_B.weight"].double() @ \
        weights[f"base_model.model.{TARGET}.lora_A.weight"].double()
    col = int((exact[20] - moved[20].double()).abs().argmin())  # the stored value nearest its exact one
    bits = _bits(moved)
    bits[20, col] += 1
    tensors[f"{TARGET}.weight"] = moved
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify(tmp_path / "out", str(base), str(adapter), device="cpu", allow_nonfinite=True)
    assert not report.ok and report.failed_tensors == [f"{TARGET}.weight"]
    assert report.tensors[f"{TARGET}.weight"].failed_elements == 1
    assert report.tensors[f"{TARGET}.weight"].first_failure["index"] == [20, col]


@pytest.mark.parametrize("passes", ["numpy", pytest.param("C", marks=needs_c)])
def test_the_round_trip_counts_are_what_brute_force_finds(models, tmp_path, monkeypatch, passes):
    """Unmerge's "certainly the original": u merges to M and neither neighbour of u does, counted by brute force in
    fractions here, element by element."""
    if passes == "numpy":
        for name in ("merge16", "merge32", "check16", "check32", "gather", "trip", "exact"):
            monkeypatch.setattr(kernels, name, getattr(kernels.plain, name))
    base, adapter = _write(models, tmp_path, r=3, seed=11, specials=False)  # unmerge takes finite values only
    merge(str(base), str(adapter), tmp_path / "merged", device="cpu")
    result = unmerge(str(tmp_path / "merged"), str(adapter), tmp_path / "back", original=str(base), device="cpu")
    trip = result.report.details["round_trip"]["tensors"]
    merged, back = load_tensors(tmp_path / "merged"), load_tensors(tmp_path / "back")
    weights = load_file(adapter / "adapter_model.safetensors")
    for module in (TARGET, WIDE):
        a, b = weights[f"base_model.model.{module}.lora_A.weight"], weights[f"base_model.model.{module}.lora_B.weight"]
        m, u = merged[f"{module}.weight"], back[f"{module}.weight"]
        certain = 0
        for i in range(u.shape[0]):
            for j in range(u.shape[1]):
                x = u[i, j]
                near = [x, torch.nextafter(x, torch.tensor(math.inf, dtype=x.dtype)),
                        torch.nextafter(x, torch.tensor(-math.inf, dtype=x.dtype))]
                to = [_exact_rounding(v.reshape(1, 1), a[:, j:j + 1], b[i:i + 1], "BF16")[0, 0] for v in near]
                same = [bool(_bits(t.reshape(1)) == _bits(m[i, j].reshape(1))) for t in to]
                certain += same[0] and not same[1] and not same[2]
        assert trip[f"{module}.weight"]["certain"] == certain, module


def test_the_change_sums_in_c_and_in_numpy_are_the_float64_sums():
    from lora_merge.kernels import plain

    rng = np.random.default_rng(3)
    w = rng.standard_normal(100_003)
    v = w + rng.standard_normal(w.size) * 1e-3
    o = np.where(rng.random(w.size) < 0.3, w, v + rng.standard_normal(w.size) * 1e-6)
    d, r = v - w, o - w
    want = [d @ d, r @ r, (r - d) @ (r - d), r @ d, np.count_nonzero(r)]
    passes = [plain] + ([kernels._chosen] if kernels.ACCELERATED else [])
    for k in passes:
        sums = np.zeros(5)
        k.survival(w, v, o, sums)
        k.survival(w[:10], v[:10], o[:10], sums)  # adds
        extra = [d[:10] @ d[:10], r[:10] @ r[:10], (r - d)[:10] @ (r - d)[:10], r[:10] @ d[:10],
                 np.count_nonzero(r[:10])]
        np.testing.assert_allclose(sums, np.add(want, extra), rtol=1e-12)
