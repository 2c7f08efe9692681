"""The C API checks every shape relation it is given; the Python wrappers raise only our typed errors (issue 16)."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from eora_gguf import _native, kernels
from eora_gguf.errors import EoraError

T = gguf.GGMLQuantizationType
pytestmark = pytest.mark.usefixtures("native")


@pytest.fixture
def w():
    rng = np.random.default_rng(0)
    return gguf.quants.quantize(rng.standard_normal((16, 64)).astype(np.float32), T.Q8_0), rng


def ones(*shape):
    return np.ones(shape, np.float32)


@pytest.mark.parametrize("case", ["a rank 4, b rank 8", "a wider than d_in", "b taller than d_out",
                                  "b narrower than the rank"])
def test_adapter_shapes_must_fit_w(w, case):
    raw, rng = w
    x = rng.standard_normal((2, 64)).astype(np.float32)
    a, b = {"a rank 4, b rank 8": (ones(4, 64), ones(16, 8)), "a wider than d_in": (ones(4, 128), ones(16, 4)),
            "b taller than d_out": (ones(4, 64), ones(32, 4)), "b narrower than the rank": (ones(8, 64), ones(16, 4)),
            }[case]
    for kw in ({}, {"reference": True}):
        with pytest.raises(_native.NativeShapeError, match="do not fit"):
            kernels.fused_matmul(raw, "Q8_0", (16, 64), x, a, b, **kw)


@pytest.mark.parametrize("fn", ["eora_fused_matmul", "eora_fused_matmul_ref"])
@pytest.mark.parametrize("case", ["oversized w", "a of rank 8 for rank 4", "b of rank 8 for rank 4", "oversized x",
                                  "oversized y", "adapter bytes with rank 0"])
def test_c_api_refuses_buffers_that_do_not_match_their_shapes(w, fn, case):
    """The library itself, called as a C user would: every byte count must be exactly what the shapes need."""
    raw, rng = w
    ffi, lib = _native.ffi_lib()
    d_out, d_in, n, rank = 16, 64, 2, 4
    bufs = {"w": raw, "x": rng.standard_normal((n, d_in)).astype(np.float32), "a": ones(rank, d_in),
            "b": ones(d_out, rank), "y": np.zeros((n, d_out), np.float32)}
    if case == "oversized w":
        bufs["w"] = np.concatenate([raw, raw])
    elif case == "a of rank 8 for rank 4":
        bufs["a"] = ones(8, d_in)
    elif case == "b of rank 8 for rank 4":
        bufs["b"] = ones(d_out, 8)
    elif case == "oversized x":
        bufs["x"] = ones(n + 1, d_in)
    elif case == "oversized y":
        bufs["y"] = np.zeros((n, d_out + 1), np.float32)
    r = 0 if case == "adapter bytes with rank 0" else rank

    def desc(k, type_, rows, cols):
        return _native.matrix(ffi, type_, ffi.from_buffer(bufs[k]), bufs[k].nbytes, rows, cols)

    args = [desc("w", T.Q8_0, d_out, d_in), desc("x", T.F32, n, d_in), desc("a", T.F32, r, d_in),
            desc("b", T.F32, d_out, r), ffi.cast("float *", ffi.from_buffer(bufs["y"])), bufs["y"].nbytes]
    if fn == "eora_fused_matmul":
        args += [1, 0]
    status = getattr(lib, fn)(*args)
    assert status in (lib.EORA_ERR_SHAPE, lib.EORA_ERR_BUFFER), ffi.string(lib.eora_last_error()).decode()
    assert np.all(bufs["y"] == 0)


def test_dequantize_refuses_an_oversized_source():
    ffi, lib = _native.ffi_lib()
    src = np.zeros(34 * 3, np.uint8)  # three Q8_0 blocks for two blocks' worth of elements
    dst = np.zeros(64, np.float32)
    for fn in (lib.eora_dequantize, lib.eora_dequantize_ref):
        assert fn(int(T.Q8_0), ffi.from_buffer(src), src.nbytes, 64, ffi.cast("float *", ffi.from_buffer(dst)),
                  dst.nbytes) == lib.EORA_ERR_BUFFER


@pytest.mark.parametrize("call", [
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", ("16", 64), x),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", (16.5, 64), x),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", (2**70, 64), x),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", 16, x),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", (16, 64), x, threads=2**70),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", (16, 64), x, threads=1.5),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", (16, 64), x, isa=["avx2"]),
    lambda raw, x: kernels.fused_matmul(raw, 2**70, (16, 64), x),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", (16, 64), x.astype(np.complex64)),
    lambda raw, x: kernels.fused_matmul(raw, "Q8_0", (16, 64), np.zeros((0, 64), np.float32)),
    lambda raw, x: kernels.dequantize(raw, "Q8_0", (2**40, 2**20)),
    lambda raw, x: kernels.dequantize(raw, "Q8_0", ("a", 64)),
    lambda raw, x: kernels.dequantize(raw, [8], (16, 64)),
])
def test_odd_arguments_raise_typed_errors(w, call):
    raw, rng = w
    x = rng.standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(EoraError):
        call(raw, x)
