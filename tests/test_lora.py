"""eora_lora_t / eora_lora_add: LoRA terms in llama.cpp's own CPU arithmetic (what the llama.cpp patch runs).

Three oracles: the SIMD kernels against the portable emulation of each summation order (bit for bit), the F16
rounding against numpy's, and stock ggml itself — tests/ggml_lora_oracle.c builds the four-op LoRA graph of
llama.cpp's build_lora_mm on ggml's CPU backend and compares every output with ours, bit for bit.
"""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from eora_gguf import _native

F32, F16 = 0, 1
# the header's names (the numbers come from the library: _native.const)
ORDERS = {"lanes8": "EORA_ORDER_LANES8", "lanes16": "EORA_ORDER_LANES16", "vec8": "EORA_ORDER_VEC8",
          "vec16": "EORA_ORDER_VEC16"}
FLAT_LANES = {"lanes8": 8, "lanes16": 16, "vec8": 32, "vec16": 64}
SCALAR, AVX2 = "EORA_FLAG_ISA_SCALAR", "EORA_FLAG_ISA_AVX2"


def _const(v):
    """A header constant by name (ints pass through: deliberately bad values)."""
    return _native.const(v) if isinstance(v, str) else v


def _ptr(ffi, arr):
    return ffi.cast("void *", ffi.from_buffer(arr)), arr.nbytes


def _buffers(ffi, need, *arrays):
    """(pointer, bytes) of each array, then (pointer, array) of a fresh scratch buffer of `need` bytes (at least
    1): the caller keeps that array bound while the C call runs."""
    scratch = np.zeros(max(need, 1), np.uint8)
    return (*(_ptr(ffi, a) for a in arrays), (_ptr(ffi, scratch)[0], scratch))


def lora_t(native, a_raw, x, order, rows=None, flags=0, scratch_bytes=None):
    """t (n_tokens, rank) = A x through eora_lora_t, over the given row ranges (default: all rows at once)."""
    ffi, lib = native
    rank, d_in = a_raw.shape
    n = x.shape[0]
    a_type = F16 if a_raw.dtype == np.float16 else F32
    t = np.full((n, rank), np.nan, np.float32)
    need = lib.eora_lora_scratch(d_in, n) if scratch_bytes is None else scratch_bytes
    (ap, ab), (xp, xb), (tp, tb), (sp, _scratch) = _buffers(ffi, need, a_raw, x, t)
    am, xm = _native.matrix(ffi, a_type, ap, ab, rank, d_in), _native.matrix(ffi, F32, xp, xb, n, d_in)
    for r0, r1 in rows or [(0, rank)]:
        _native.check(lib.eora_lora_t(am, xm, _const(order), r0, r1, ffi.cast("float *", tp), tb, sp, need,
                                      _const(flags)), "lora_t")
    return t


def lora_add(native, b_raw, t, y, scale, order, rows=None, flags=0):
    """y + scale * B t through eora_lora_add (y is not modified)."""
    ffi, lib = native
    d_out, rank = b_raw.shape
    n = t.shape[0]
    b_type = F16 if b_raw.dtype == np.float16 else F32
    out = y.copy()
    need = lib.eora_lora_scratch(rank, n)
    (bp, bb), (tp, tb), (op, ob), (sp, _scratch) = _buffers(ffi, need, b_raw, t, out)
    bm, tm = _native.matrix(ffi, b_type, bp, bb, d_out, rank), _native.matrix(ffi, F32, tp, tb, n, rank)
    for r0, r1 in rows or [(0, d_out)]:
        _native.check(lib.eora_lora_add(bm, tm, scale, _const(order), r0, r1, ffi.cast("float *", op), ob, sp, need,
                                        _const(flags)), "lora_add")
    return out


def _data(rng, rows, k, n, dtype):
    m = (rng.standard_normal((rows, k)) * rng.choice([0.01, 1.0, 30.0], (rows, 1))).astype(dtype)
    x = (rng.standard_normal((n, k)) * rng.choice([0.1, 1.0, 20.0], (n, k))).astype(np.float32)
    return m, x


@pytest.mark.native
@pytest.mark.parametrize("order", list(ORDERS), ids=str)
@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["F16", "F32"])
def test_simd_paths_match_the_portable_emulation(native, order, dtype):
    """Every instruction-set path gives the reference's bits, whatever the row split; results are exact dots up
    to fp32 summation error."""
    rng = np.random.default_rng(list(ORDERS).index(order) * 10 + 10 + (dtype == np.float16))
    L = FLAT_LANES[order]
    ks = [L, 3 * L, 576 // L * L + L]
    if order.startswith("vec") and dtype == np.float16:
        ks += [L + 5, 7, 200]  # a tail after the last whole block, added in fp64
    for k in ks:
        for n in (1, 2, 5):
            m, x = _data(rng, 13, k, n, dtype)
            ref = lora_t(native, m, x, ORDERS[order], flags=SCALAR)
            for flags in (0, AVX2):
                got = lora_t(native, m, x, ORDERS[order], rows=[(0, 4), (4, 5), (5, 13)], flags=flags)
                np.testing.assert_array_equal(got, ref)
            xs = x.astype(np.float16).astype(np.float64) if dtype == np.float16 else x.astype(np.float64)
            exact = xs @ m.astype(np.float64).T
            err = np.abs(ref - exact).max() / max(np.abs(exact).max(), 1e-30)
            assert err < 1e-5, (k, n, err)


@pytest.mark.native
def test_orders_are_different_sums(native):
    """The orders really differ (else matching one of them against ggml would prove nothing)."""
    rng = np.random.default_rng(5)
    m, x = _data(rng, 16, 576, 1, np.float16)
    results = {o: lora_t(native, m, x, v) for o, v in ORDERS.items()}
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(results[a], results[b]), (a, b)


@pytest.mark.native
def test_add_is_y_plus_scaled_dot(native):
    """eora_lora_add = y + (dot * scale), each rounded as a separate fp32 operation (ggml's scale, then add)."""
    rng = np.random.default_rng(9)
    d_out, rank, n = 40, 64, 3
    b, t = _data(rng, d_out, rank, n, np.float16)
    y = rng.standard_normal((n, d_out)).astype(np.float32)
    for order in ("lanes8", "vec8"):
        dots = lora_t(native, b, t, ORDERS[order])  # the same dot, as a product on its own
        for scale in (1.0, 0.37):
            got = lora_add(native, b, t, y, scale, ORDERS[order], rows=[(0, 8), (8, 40)])
            np.testing.assert_array_equal(got, y + (dots * np.float32(scale)).astype(np.float32))


@pytest.mark.native
def test_f16_rounding_matches_numpy(native):
    """The F16 operand rounding (round to nearest even, subnormals, the largest finite values) is numpy's: with A
    the identity, t = f16(x) exactly."""
    rng = np.random.default_rng(2)
    k = 64
    vals = np.concatenate([
        rng.standard_normal(2000) * 10.0 ** rng.integers(-9, 5, 2000),
        np.float32(2.0**-25) * np.array([1.0, 1.0000001, 0.9999999, 3.0, 1.5, 2.5]),  # ties and near ties
        np.array([65504.0, 65519.0, 65519.99, 6.1035156e-05, 6.1e-05, -0.0, 0.0, 1e-30]),
    ]).astype(np.float32)
    vals = vals[: len(vals) // k * k].reshape(-1, k)
    eye = np.eye(k, dtype=np.float16)
    for flags in (0, SCALAR):
        got = lora_t(native, eye, vals, ORDERS["lanes8"], flags=flags)
        np.testing.assert_array_equal(got, vals.astype(np.float16).astype(np.float32))


@pytest.mark.native
def test_bad_input_is_an_error_not_a_crash(native):
    ffi, lib = native
    rng = np.random.default_rng(1)
    a, x = _data(rng, 8, 64, 2, np.float16)
    with pytest.raises(_native.NativeShapeError, match="row range"):
        lora_t(native, a, x, 1, rows=[(4, 9)])
    with pytest.raises(_native.NativeArgumentError, match="unknown order"):
        lora_t(native, a, x, 7)
    with pytest.raises(_native.NativeBufferError, match="scratch"):
        lora_t(native, a, x, 1, scratch_bytes=16)
    with pytest.raises(_native.NativeShapeError, match="multiple"):
        lora_t(native, a[:, :60].copy(), x[:, :60].copy(), 1)  # tinyBLAS sums whole blocks only
    with pytest.raises(_native.NativeShapeError, match="multiple"):
        lora_t(native, a[:, :60].astype(np.float32), x[:, :60].copy(), 3)  # an F32 tail is not reproduced
    with pytest.raises(_native.NativeTypeError, match="F16 or F32"):
        ap, ab = _ptr(ffi, a)
        xp, xb = _ptr(ffi, x)
        t = np.zeros((2, 8), np.float32)
        tp, tb = _ptr(ffi, t)
        _native.check(lib.eora_lora_t(_native.matrix(ffi, 8, ap, ab, 8, 64), _native.matrix(ffi, F32, xp, xb, 2, 64),
                                      1, 0, 8, ffi.cast("float *", tp), tb, ffi.NULL, 0, 0))
    assert lib.eora_lora_scratch(0, 3) == 0


# --------------------------------------------------------------------------------------------------------------
# against stock ggml


@pytest.fixture(scope="module")
def oracle(llama, native, tmp_path_factory):
    """tests/ggml_lora_oracle.c built against the ggml of the llama.cpp build in use and our library."""
    lib_dir = llama.bin_dir
    if not (lib_dir / "libggml-cpu.so").is_file() and not (lib_dir / "libggml-cpu.dylib").is_file():
        pytest.skip(f"no shared ggml libraries in {lib_dir} (a static LLAMA_CPP_DIR build?)")
    return _native.build_helper("ggml_lora_oracle", tmp_path_factory.mktemp("oracle"), llama_source=llama.source_dir,
                                llama_lib=lib_dir)


@pytest.mark.native
@pytest.mark.llama_cpp
def test_stock_ggml_lora_ops_are_reproduced_bit_for_bit(oracle):
    res = subprocess.run([str(oracle)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    cases = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(cases) >= 14
    one, many = set(), set()
    for c in cases:
        if c["type"] == "f32" and c["tokens"] == 1 and (c["d_in"] % 32 or c["rank"] % 32):
            # ggml_vec_dot_f32 adds a tail in fp32 that its compiler may contract: we refuse it (the patch then
            # keeps the stock ops for such an adapter)
            continue
        assert c["t_orders"] and c["y_orders"], c  # some order gives ggml's exact t, and its exact y
        (one if c["tokens"] == 1 else many).add(c["t_orders"][0])
    # one order per path for the whole build: vec_dot for a single token, tinyBLAS for more
    assert len(one) == 1 and len(many) == 1 and one != many, (one, many)
    assert one <= {"vec8", "vec16"} and many <= {"lanes8", "lanes16"}
