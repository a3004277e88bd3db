"""The arithmetic on its own: one rounding, and blocks that add up to the whole."""

from __future__ import annotations

import pytest
import torch
from test_peft_oracle import round_bf16_reference

from lora_merge.adapter import LowRank, MemoryTensor
from lora_merge.mathops import add_delta, round_to


def test_torch_rounds_twice_and_we_do_not():
    # 1 + 2^-8 is halfway between two bfloat16 neighbours; a hair above it must round up
    x = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30), 1 + 2**-8, 1 + 3 * 2**-8], dtype=torch.float64)
    assert x.to(torch.bfloat16)[0].item() == 1.0  # torch: via float32, rounded twice
    got = round_to(x, torch.bfloat16).tolist()
    assert got == [1 + 2**-7, -(1 + 2**-7), 1.0, 1 + 2**-6]
    h = torch.tensor([1 + 2**-11 + 2**-40], dtype=torch.float64)
    assert round_to(h, torch.float16).item() == 1 + 2**-10


def test_round_to_bf16_matches_integer_reference():
    torch.manual_seed(0)
    x = torch.randn(200_000, dtype=torch.float64) * 3
    # many values just off a halfway point, where double rounding goes wrong
    mids = (x.to(torch.bfloat16).double() + torch.finfo(torch.bfloat16).eps * x.abs() / 4)
    x = torch.cat([x, mids + 2**-40 * mids.abs(), mids - 2**-40 * mids.abs(), mids])
    ours = round_to(x, torch.bfloat16).view(torch.int16)
    assert torch.equal(ours, round_bf16_reference(x).view(torch.int16))


def test_round_to_fp16_and_fp32_are_nearest():
    torch.manual_seed(1)
    x = torch.randn(100_000, dtype=torch.float64)
    for dtype in (torch.float16, torch.float32):
        r = round_to(x, dtype).double()
        err = (r - x).abs()
        up = torch.nextafter(round_to(x, dtype), torch.tensor(float("inf"), dtype=dtype)).double()
        down = torch.nextafter(round_to(x, dtype), torch.tensor(float("-inf"), dtype=dtype)).double()
        assert bool((err <= (up - x).abs()).all()) and bool((err <= (down - x).abs()).all())


@pytest.mark.parametrize("transposed", [False, True])
def test_blocks_add_up_to_the_whole(transposed):
    torch.manual_seed(2)
    a, b = torch.randn(3, 7), torch.randn(5, 3)
    w = torch.randn(7, 5) if transposed else torch.randn(5, 7)
    d = LowRank(MemoryTensor("a", a), MemoryTensor("b", b), 0.5, transposed=transposed)
    whole = w.double().clone()
    add_delta(whole, d, 0, w.shape[0], {})
    expected = w.double() + 0.5 * ((b.double() @ a.double()).T if transposed else b.double() @ a.double())
    torch.testing.assert_close(whole, expected, rtol=0, atol=1e-12)
    cache = {}
    parts = []
    for start in range(0, w.shape[0], 2):
        block = w[start:start + 2].double().clone()
        add_delta(block, d, start, min(start + 2, w.shape[0]), cache)
        parts.append(block)
    # float64 sums may be ordered differently by the BLAS for other sizes: equal to float64 precision
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_rounding_equals_round_to_odd_everywhere(dtype):
    """The fast path redoes only suspected elements; it must agree with round-to-odd on all of them."""
    from lora_merge.mathops import _round_via_odd

    torch.manual_seed(3)
    finfo = torch.finfo(dtype)
    x = torch.cat([
        torch.randn(300_000, dtype=torch.float64) * 0.05,
        torch.randn(50_000, dtype=torch.float64) * finfo.max / 4,  # up to overflow
        torch.randn(50_000, dtype=torch.float64) * finfo.tiny * 8,  # subnormals of the target
        torch.tensor([0.0, -0.0, finfo.max, -finfo.max, finfo.max * 1.0001, finfo.tiny / 3], dtype=torch.float64),
    ])
    y = x.to(dtype).double()
    up = torch.nextafter(x.to(dtype), torch.tensor(float("inf"), dtype=dtype)).double()
    mid = (y + up) / 2  # exact halfway points, and values a hair to either side of them
    x = torch.cat([x, mid, mid + mid.abs() * 2**-45, mid - mid.abs() * 2**-45, mid + 2**-160, mid - 2**-160])
    x = x[torch.isfinite(x)]
    assert torch.equal(round_to(x, dtype).view(torch.int16), _round_via_odd(x, dtype).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rounding_into_reused_buffers_gives_the_same_bits(dtype):
    """The writer rounds into buffers it keeps from block to block, of changing shapes."""
    from lora_merge.buffers import Buffers

    torch.manual_seed(4)
    buffers, outs = Buffers("cpu"), Buffers("cpu")
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    for shape in [(64, 33), (7, 5), (64, 33), (200, 40), (1,), ()]:
        x = torch.randn(shape, dtype=torch.float64) * 0.3
        y = round_to(x, dtype, out=outs.take("out", shape, dtype), buffers=buffers)
        assert y.shape == x.shape and y.data_ptr() == outs.take("out", shape, dtype).data_ptr()
        assert torch.equal(y.view(bits), round_to(x, dtype).view(bits))
