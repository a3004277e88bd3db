"""The FP8 and MXFP4 passes' arguments, named: each call builds one of these and passes it in order, with the room
for the open elements (and the check's sums) after it. The C passes (``_fp8.c``, ``_mxfp4.c``) and their numpy
twins (``plain.py``) take the same fields in the same order, under the short names of their arithmetic
(``L``, ``R``, ``r``, ``ct``, ``c``, ``bn``, ``L0``, ``RT``, ``sc``, ``V``, ``E``, ``S``), given here beside each
field."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Product(NamedTuple):
    """A block's low-rank product as the passes compute it, and the constants of its rigorous error bound."""

    left: np.ndarray  # L: rows × r, float32, the scale folded in
    right: np.ndarray  # R: the packed r × cols factor
    rank: int  # r
    c_terms: float  # ct: the bound's factor on Σ|L||R|
    slack: float  # the bound's allowance for float32 underflow
    c: float  # the bound's factor on |value| (and |w|)


def _flat(args: tuple) -> tuple:
    """The arguments in the passes' order: each field, the product's fields in its place."""
    return tuple(x for field in args for x in (field if isinstance(field, Product) else (field,)))


class Fp8Merge(NamedTuple):
    """A band of an FP8 tensor merged: its blocks [first_block, last_block) decided, encoded and scaled."""

    codes: np.ndarray  # BASE's e4m3 codes, rows × cols (unused for --quantize)
    base_values: np.ndarray  # wf: a float BASE's values as float32 (--quantize), else empty
    base_scales: np.ndarray  # scales: BASE's block scales of the band
    product: Product
    rows: int
    cols: int
    block_cols: int  # bn: columns per scale block
    left_exact: np.ndarray  # L0: the adapter's left factor, exact float32, scale not folded
    right_exact: np.ndarray  # RT: the right factor, cols × r, exact float32
    column_scales: np.ndarray  # sc: each rank column's scale
    power_of_two: bool  # scales are powers of two (e8m0)
    fresh_all: bool  # every block scaled afresh (--quantize), changed or not
    first_block: int  # k_first
    last_block: int  # k_last
    values: np.ndarray  # V: out, each element's float32 merged value
    errors: np.ndarray  # E: out, each value's error bound
    states: np.ndarray  # S: out, 0 untouched, 1 maybe changed, 2 changed
    out_codes: np.ndarray  # out: the band's codes as written
    new_scales: np.ndarray  # out: each block's scale as written
    status: np.ndarray  # out: per block, 0 kept, 1 decided, 2 left to the caller

    flat = _flat


class Fp8Check(NamedTuple):
    """A band of an FP8 tensor as stored, checked against BASE and the adapter."""

    base_codes: np.ndarray
    base_scales: np.ndarray
    base_values: np.ndarray  # wf, as in Fp8Merge
    codes: np.ndarray  # OUT's codes
    scales: np.ndarray  # OUT's scales of the band
    product: Product  # the check's own factors (the scale folded into the right one)
    rows: int
    cols: int
    block_cols: int

    flat = _flat


class Mxfp4Merge(NamedTuple):
    """A block of an MXFP4 expert's stored rows merged, encoded and scaled."""

    blocks: np.ndarray  # BASE's packed e2m1 codes
    scales: np.ndarray  # BASE's e8m0 group scales
    product: Product
    rows: int
    width: int  # elements per stored row
    left_exact: np.ndarray  # L0
    right_exact: np.ndarray  # RT
    column_scales: np.ndarray  # sc
    out_blocks: np.ndarray
    out_scales: np.ndarray
    status: np.ndarray  # per group: decided, or left to the caller

    flat = _flat


class Mxfp4Check(NamedTuple):
    """A block of an MXFP4 expert's stored rows as stored, checked against BASE and the adapter."""

    base_blocks: np.ndarray
    base_scales: np.ndarray
    blocks: np.ndarray  # OUT's
    scales: np.ndarray  # OUT's
    product: Product
    rows: int
    width: int

    flat = _flat
