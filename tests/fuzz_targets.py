"""Fuzz targets (hypothesis) over the GGUF reading path, the adapter reader and every public native entry point.

Each target takes a hypothesis `data` object, runs one input and returns normally when the code under test either
succeeds or raises our typed error (EoraError and its subclasses); anything else (a bare ValueError, an
IndexError from gguf-py, a crash, a sanitizer report) is a finding. tests/test_fuzz.py runs them briefly with the
ordinary library; tools/fuzz.py runs them for a set time against a library built with AddressSanitizer and
UndefinedBehaviorSanitizer (EORA_SANITIZE=address,undefined), where an out-of-bounds access aborts the process.

The native targets call the C functions through cffi with random shapes, types, flags and row ranges but with
buffers whose stated lengths are never longer than the real ones: the header promises that every buffer is
checked against its length, so no shape argument may make the library read or write outside them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from hypothesis import strategies as st

from tiny_models import model_writer, write_out

T = gguf.GGMLQuantizationType
# 1 layer, hidden 64: the whole model GGUF stays a few tens of KB, so mutating and re-reading it is quick.
CONFIG = dict(model_type="llama", num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=128)
_QTYPES = (T.Q8_0, T.Q4_0, T.F16, T.Q5_1, T.F32, T.Q4_1, T.BF16)


def _tmpdir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="eora-fuzz-", dir=base))


class Seeds:
    """The valid files the GGUF targets mutate: a small model GGUF and a LoRA adapter for it."""

    def __init__(self) -> None:
        from eora_gguf import adapter as adapter_io
        from eora_gguf.naming import LINEAR_MODULES, NameMap, model_dims

        self.dir = _tmpdir()
        dims = model_dims(dict(CONFIG))
        names = NameMap(dims)
        rng = np.random.default_rng(0)
        self.model_path = self.dir / "model.gguf"
        writer = model_writer(self.model_path, dims)
        factors = {}
        for i, module in enumerate(LINEAR_MODULES):
            name = names.to_gguf(f"model.layers.0.{module}")
            w = rng.standard_normal(dims.linear_shape(module)).astype(np.float32)
            qtype = _QTYPES[i % len(_QTYPES)]
            if qtype == T.F32:
                writer.add_tensor(name, w)
            elif qtype == T.F16:
                writer.add_tensor(name, w.astype(np.float16))
            elif qtype == T.BF16:
                data = gguf.quants.quantize(w, qtype)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            else:
                data = gguf.quants.quantize(w, qtype)
                writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
            factors[name] = (rng.standard_normal((w.shape[0], 2)), rng.standard_normal((2, w.shape[1])))
        k = rng.integers(0, 256, (2, 144), dtype=np.uint8)  # two Q4_K rows of random blocks (no quantizer in gguf-py)
        writer.add_tensor("extra.k_quant.weight", k, raw_shape=k.shape, raw_dtype=T.Q4_K)
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(dims.hidden, np.float32))
        write_out(writer)
        self.model = self.model_path.read_bytes()
        self.adapter_path = adapter_io.write_gguf_lora(self.dir / "adapter.gguf", factors, arch=dims.arch,
                                                       dtype="q8_0", metadata={"eora.rank": 2})
        self.adapter = self.adapter_path.read_bytes()


@st.composite
def mutated(draw: Any, seed: bytes) -> bytes:
    """`seed` with a few byte edits (mostly in the header and tensor directory), maybe truncated or extended."""
    buf = bytearray(seed)
    head = min(len(buf), 4096)
    for _ in range(draw(st.integers(0, 8))):
        where = draw(st.one_of(st.integers(0, head - 1), st.integers(0, len(buf) - 1)))
        kind = draw(st.sampled_from(("byte", "u32", "u64")))
        if kind == "byte":
            buf[where] = draw(st.integers(0, 255))
        else:
            n = 4 if kind == "u32" else 8
            value = draw(st.sampled_from((0, 1, 2, 7, 31, 32, 255, 256, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1)))
            value = value % (1 << (8 * n))
            buf[where:where + n] = value.to_bytes(n, "little")[: len(buf) - where]
    cut = draw(st.one_of(st.none(), st.integers(0, len(buf))))
    if cut is not None:
        buf = buf[:cut]
    if draw(st.booleans()):
        buf += draw(st.binary(max_size=64))
    return bytes(buf)


def _write(seeds: Seeds, name: str, data: bytes) -> Path:
    path = seeds.dir / name
    path.write_bytes(data)
    return path


def target_gguf(seeds: Seeds, data: Any) -> None:
    """Open a mutated model GGUF, read every tensor and compare it with the config: EoraError or success only."""
    from eora_gguf.errors import EoraError
    from eora_gguf.gguf_io import check_matches, open_gguf

    path = _write(seeds, "fuzz-model.gguf", data.draw(mutated(seeds.model), label="model bytes"))
    try:
        with open_gguf(path) as m:
            for name in m.names:
                info = m.tensor(name)
                out = m.dequantize(name)
                assert out.shape == info.shape and out.dtype == np.float32
            check_matches(dict(CONFIG), m)
    except EoraError:
        pass


def target_adapter(seeds: Seeds, data: Any) -> None:
    """Read a mutated adapter and check it against the seed model, as compensate/validate/eval do."""
    from eora_gguf import adapter as adapter_io
    from eora_gguf.errors import EoraError

    path = _write(seeds, "fuzz-adapter.gguf", data.draw(mutated(seeds.adapter), label="adapter bytes"))
    try:
        info, factors = adapter_io.read_gguf_lora(path)
        for name, (b, a) in factors.items():
            assert b.ndim == 2 and a.ndim == 2 and b.shape[1] == a.shape[0] == info.ranks[name]
        adapter_io.check_gguf_lora(path, seeds.model_path)
    except EoraError:
        pass


# ------------------------------------------------------------------------------------------------- native

_INTERESTING = (0, 1, 2, 3, 4, 8, 16, 31, 32, 33, 64, 255, 256, 512, -1, -32, 2**31 - 1, 2**31, 2**32 + 32,
                2**62, 2**63 - 1, -(2**63))
_TYPES = (0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 20, 23, 30, 4, 5, 9, 15, 16, 24, 31, 39, -1, 255, 2**31 - 1)


def _dim(draw: Any) -> int:
    return draw(st.one_of(st.sampled_from(_INTERESTING), st.integers(-4, 600)))


def _buffer(draw: Any, ffi: Any, label: str, *, max_bytes: int = 4096) -> tuple[Any, int, Any]:
    """(pointer, stated length <= real length, owner): random bytes (often valid floats), or NULL."""
    if draw(st.integers(0, 15), label=f"{label} null") == 0:
        return ffi.NULL, draw(st.sampled_from((0, 4, 64))), None
    n = draw(st.one_of(st.sampled_from((0, 4, 18, 34, 64, 128, 136, 144, 256, 1024, 2048, 4096)),
                       st.integers(0, max_bytes)), label=f"{label} bytes")
    if draw(st.booleans()):
        raw = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(n // 4 + 1)
        arr = np.frombuffer(raw.astype(np.float32).tobytes()[:n], np.uint8).copy()
    else:
        arr = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), np.uint8).copy()
    if n == 0:
        arr = np.zeros(16, np.uint8)  # a real pointer that is stated to hold nothing
    stated = draw(st.one_of(st.just(n), st.integers(0, n)), label=f"{label} stated")
    return ffi.cast("void *", ffi.from_buffer(arr)), stated, arr


def _matrix(draw: Any, ffi: Any, label: str, p: Any, nbytes: int, type_: int, rows: int, cols: int,
            keep: list) -> Any:
    """An eora_matrix * over (p, nbytes) of the given type and shape, sometimes another type or size, or NULL."""
    if draw(st.integers(0, 15), label=f"{label} desc null") == 0:
        return ffi.NULL
    if draw(st.integers(0, 7), label=f"{label} odd type") == 0:
        type_ = draw(st.sampled_from(_TYPES))
    if draw(st.integers(0, 7), label=f"{label} odd rows") == 0:
        rows = _dim(draw)
    if draw(st.integers(0, 7), label=f"{label} odd cols") == 0:
        cols = _dim(draw)
    from eora_gguf import _native

    m = _native.matrix(ffi, type_, p, nbytes, rows, cols)
    keep.append(m)
    return m


def _check_status(ffi: Any, lib: Any, status: int, fn: str) -> None:
    from eora_gguf import _native

    assert status in _native.status_names(), f"{fn} returned status {status}"
    if status:
        msg = ffi.string(lib.eora_last_error()).decode(errors="replace")
        assert msg and "\n" not in msg, f"{fn} failed without a one-line message: {msg!r}"


_BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
           10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 20: (32, 18),
           23: (256, 136)}


def _random_bytes(draw: Any, n: int) -> np.ndarray:
    """n bytes: random, or float32 noise (so float and scale fields are mostly finite)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        return rng.integers(0, 256, n, dtype=np.uint8)
    return np.frombuffer(rng.standard_normal(n // 4 + 1).astype(np.float32).tobytes()[:n], np.uint8).copy()


def target_native_valid(data: Any) -> None:
    """Consistent shapes and exact buffers (random contents): every such call must succeed (status 0)."""
    from eora_gguf import _native

    ffi, lib = _native.ffi_lib()
    draw = data.draw
    fn = draw(st.sampled_from(("dequantize", "fused", "lora")), label="entry")

    def ptr(arr: np.ndarray) -> Any:
        return ffi.cast("void *", ffi.from_buffer(arr))

    if fn == "dequantize":
        t = draw(st.sampled_from(sorted(_BLOCKS)))
        elems, nbytes = _BLOCKS[t]
        n_blocks = draw(st.integers(1, 24))
        src = _random_bytes(draw, n_blocks * nbytes)
        dst = np.empty(n_blocks * elems, np.float32)
        call = lib.eora_dequantize if draw(st.booleans()) else lib.eora_dequantize_ref
        status = call(t, ptr(src), src.nbytes, n_blocks * elems, ffi.cast("float *", ffi.from_buffer(dst)), dst.nbytes)
    elif fn == "fused":
        t = draw(st.sampled_from(sorted(_BLOCKS)))
        elems, nbytes = _BLOCKS[t]
        d_in = max(elems, 32) * draw(st.integers(1, 3))
        d_out, n_tok = draw(st.integers(1, 40)), draw(st.integers(1, 9))
        w = _random_bytes(draw, d_out * d_in // elems * nbytes)
        x = np.random.default_rng(draw(st.integers(0, 99))).standard_normal((n_tok, d_in)).astype(np.float32)
        at, bt = draw(st.sampled_from((0, 1, 8))), draw(st.sampled_from((0, 1, 8)))
        rank = draw(st.integers(0, min(d_in, d_out)))
        if bt == 8:
            rank -= rank % 32
        a = _random_bytes(draw, rank * d_in // _BLOCKS[at][0] * _BLOCKS[at][1]) if rank else None
        b = _random_bytes(draw, d_out * rank // _BLOCKS[bt][0] * _BLOCKS[bt][1]) if rank else None
        y = np.empty((n_tok, d_out), np.float32)
        args = (_native.matrix(ffi, t, ptr(w), w.nbytes, d_out, d_in),
                _native.matrix(ffi, 0, ptr(x), x.nbytes, n_tok, d_in),
                _native.matrix(ffi, at, ptr(a), a.nbytes, rank, d_in) if rank else ffi.NULL,
                _native.matrix(ffi, bt, ptr(b), b.nbytes, d_out, rank) if rank else ffi.NULL,
                ffi.cast("float *", ffi.from_buffer(y)), y.nbytes)
        if draw(st.booleans()):
            status = lib.eora_fused_matmul(*args, draw(st.integers(0, 2)), draw(st.sampled_from((0, 1, 2, 4, 5, 3))))
        else:
            status = lib.eora_fused_matmul_ref(*args)
    else:
        mtype, order = draw(st.sampled_from((0, 1))), draw(st.integers(1, 4))
        lanes = {1: 8, 2: 16, 3: 32, 4: 64}[order]
        k = lanes * draw(st.integers(1, 4))
        if mtype == 1 and order >= 3 and draw(st.booleans()):
            k += draw(st.integers(1, lanes - 1))  # vec_dot orders add an F16 tail one by one
        rows, n_tok = draw(st.integers(1, 40)), draw(st.integers(1, 6))
        r0 = draw(st.integers(0, rows))
        r1 = draw(st.integers(r0, rows))
        m = _random_bytes(draw, rows * k * (4 if mtype == 0 else 2))
        v = np.random.default_rng(1).standard_normal((n_tok, k)).astype(np.float32)
        out = np.zeros((n_tok, rows), np.float32)
        scratch = np.empty(max(lib.eora_lora_scratch(k, n_tok), 1), np.uint8)
        flags = draw(st.sampled_from((0, 2, 4)))
        mm = _native.matrix(ffi, mtype, ptr(m), m.nbytes, rows, k)
        vm = _native.matrix(ffi, 0, ptr(v), v.nbytes, n_tok, k)
        op = ffi.cast("float *", ffi.from_buffer(out))
        if draw(st.booleans()):
            status = lib.eora_lora_t(mm, vm, order, r0, r1, op, out.nbytes, ptr(scratch), scratch.nbytes, flags)
        else:
            status = lib.eora_lora_add(mm, vm, 0.5, order, r0, r1, op, out.nbytes, ptr(scratch), scratch.nbytes,
                                       flags)
    msg = ffi.string(lib.eora_last_error()).decode(errors="replace")
    assert status == 0, f"{fn} refused consistent arguments: status {status}: {msg}"


def target_native(data: Any) -> None:
    """One call of a public C entry point with random arguments and honest buffer lengths."""
    from eora_gguf import _native

    if data.draw(st.booleans(), label="consistent"):
        return target_native_valid(data)
    ffi, lib = _native.ffi_lib()
    fn = data.draw(st.sampled_from(("type_info", "dequantize", "dequantize_ref", "fused_matmul", "fused_matmul_ref",
                                    "lora_t", "lora_add", "lora_round_f16", "lora_scratch", "cuda")), label="entry")
    draw = data.draw
    keep = []

    def buf(label: str, **kw: Any) -> tuple[Any, int]:
        p, n, owner = _buffer(draw, ffi, label, **kw)
        keep.append(owner)
        return p, n

    if fn == "type_info":
        e, b = ffi.new("int64_t *"), ffi.new("int64_t *")
        null = draw(st.booleans())
        status = lib.eora_type_info(draw(st.sampled_from(_TYPES)), ffi.NULL if null else e, b)
    elif fn in ("dequantize", "dequantize_ref"):
        src, src_n = buf("src")
        dst, dst_n = buf("dst")
        call = lib.eora_dequantize if fn == "dequantize" else lib.eora_dequantize_ref
        status = call(draw(st.sampled_from(_TYPES)), src, src_n, _dim(draw), ffi.cast("float *", dst), dst_n)
    elif fn in ("fused_matmul", "fused_matmul_ref"):
        w, w_n = buf("w")
        x, x_n = buf("x")
        a, a_n = buf("a")
        b, b_n = buf("b")
        y, y_n = buf("y")
        d_out, d_in, n_tok, rank = _dim(draw), _dim(draw), _dim(draw), _dim(draw)
        args = (_matrix(draw, ffi, "w", w, w_n, draw(st.sampled_from(_TYPES)), d_out, d_in, keep),
                _matrix(draw, ffi, "x", x, x_n, 0, n_tok, d_in, keep),
                _matrix(draw, ffi, "a", a, a_n, draw(st.sampled_from(_TYPES)), rank, d_in, keep),
                _matrix(draw, ffi, "b", b, b_n, draw(st.sampled_from(_TYPES)), d_out, rank, keep),
                ffi.cast("float *", y), y_n)
        if fn == "fused_matmul":
            status = lib.eora_fused_matmul(*args, draw(st.sampled_from((0, 1, 2, -1))), draw(st.integers(0, 31)))
        else:
            status = lib.eora_fused_matmul_ref(*args)
    elif fn in ("lora_t", "lora_add"):
        m, m_n = buf("matrix")
        v, v_n = buf("input")
        out, out_n = buf("output")
        scratch, s_n = buf("scratch")
        rows, k, n_tok = _dim(draw), _dim(draw), _dim(draw)
        order = draw(st.integers(-1, 6))
        r0 = draw(st.one_of(st.sampled_from((0, 1, -1)), st.integers(-2, 600)))
        r1 = draw(st.one_of(st.sampled_from((0, 1, -1)), st.integers(-2, 600)))
        mtype, flags = draw(st.sampled_from((0, 1, 8, 30, 99))), draw(st.integers(0, 31))
        mm = _matrix(draw, ffi, "matrix", m, m_n, mtype, rows, k, keep)
        vm = _matrix(draw, ffi, "input", v, v_n, 0, n_tok, k, keep)
        if fn == "lora_t":
            status = lib.eora_lora_t(mm, vm, order, r0, r1, ffi.cast("float *", out), out_n, scratch, s_n, flags)
        else:
            scale = draw(st.floats(allow_nan=True, allow_infinity=True, width=32))
            status = lib.eora_lora_add(mm, vm, scale, order, r0, r1, ffi.cast("float *", out), out_n, scratch, s_n,
                                       flags)
    elif fn == "lora_round_f16":
        # this call takes an element count, not byte lengths: give it buffers that hold what it asks for
        n = draw(st.integers(-3, 600))
        src = np.frombuffer(draw(st.binary(min_size=4 * max(n, 0), max_size=4 * max(n, 0))), np.float32).copy()
        dst = np.zeros(max(n, 1), np.float32)
        status = lib.eora_lora_round_f16(ffi.cast("float *", ffi.from_buffer(src if n > 0 else dst)),
                                         ffi.cast("float *", ffi.from_buffer(dst)), n, draw(st.integers(0, 31)))
    elif fn == "lora_scratch":
        got = lib.eora_lora_scratch(_dim(draw), _dim(draw))
        assert got >= 0
        return
    else:
        p, n = buf("cuda")
        sz = ffi.new("size_t *")
        pure = data.draw(st.booleans())  # workspace_bytes is arithmetic: it needs no device in a CUDA build
        if pure:
            status = lib.eora_cuda_workspace_bytes(_dim(draw), _dim(draw), _dim(draw), sz)
        else:
            status = lib.eora_cuda_dequantize_host(draw(st.sampled_from(_TYPES)), p, n, _dim(draw),
                                                   ffi.cast("float *", p), n)
        if not lib.eora_cuda_available() and not pure:
            assert status == lib.EORA_ERR_CUDA
        fn = "cuda"
    _check_status(ffi, lib, status, fn)


def target_kernels(data: Any) -> None:
    """The Python wrappers (kernels.dequantize / fused_matmul / block_info) with odd arguments: typed errors only."""
    from eora_gguf import kernels
    from eora_gguf.errors import EoraError

    draw = data.draw
    qtype = draw(st.one_of(st.sampled_from(("Q4_0", "Q8_0", "Q4_K", "F16", "F32", "IQ4_XS", "Q6_K", "BF16")),
                           st.sampled_from(_TYPES), st.sampled_from(("nope", 2.5, None, "q4_k"))), label="qtype")
    shape = draw(st.one_of(st.tuples(st.integers(-2, 40), st.sampled_from((32, 64, 256, 33, 0))),
                           st.lists(st.sampled_from(_INTERESTING), max_size=3).map(tuple),
                           st.sampled_from(((2.5, 32), ("a", 32), None, 7))), label="shape")
    raw = np.frombuffer(draw(st.binary(max_size=4096), label="raw"), np.uint8).copy()
    try:
        if draw(st.booleans()):
            out = kernels.dequantize(raw, qtype, shape, reference=draw(st.booleans()))
            assert out.dtype == np.float32
            return
        d_in = draw(st.sampled_from((32, 64, 256, 8)))
        n_tok = draw(st.integers(0, 4))
        x = np.random.default_rng(0).standard_normal((n_tok, d_in)).astype(draw(st.sampled_from((np.float32,
                                                                                               np.float64))))
        a = b = None
        if draw(st.booleans()):
            ra, rb = draw(st.integers(0, 9)), draw(st.integers(0, 9))
            a = np.ones((ra, draw(st.sampled_from((d_in, d_in * 2, 16)))), np.float32)
            b = np.ones((draw(st.integers(0, 40)), rb), draw(st.sampled_from((np.float32, np.float16))))
        threads = draw(st.sampled_from((None, 1, 2, 0, -1, 2**40)))
        kernels.fused_matmul(raw, qtype, shape, x, a, b, threads=threads,
                             reference=draw(st.booleans()), f32_activations=draw(st.booleans()),
                             isa=draw(st.sampled_from((None, "scalar", "avx2", "bogus"))))
    except EoraError:
        pass


def replay_regressions() -> None:
    """Inputs that once made the sanitizer build fail; tools/fuzz.py replays them before fuzzing."""
    from eora_gguf import _native

    ffi, lib = _native.ffi_lib()
    buf = np.zeros(16, np.uint8)
    f = ffi.cast("float *", ffi.from_buffer(buf))
    # lora.c: the "matrix has N bytes, M needed" message computed rows * k in int64 (signed overflow, UBSan)
    p = ffi.from_buffer(buf)
    status = lib.eora_lora_add(_native.matrix(ffi, 1, p, 16, 494, 2**62), _native.matrix(ffi, 0, f, 16, 1, 2**62), 1.0,
                               1, 0, 0, f, 16, ffi.NULL, 0, 0)
    assert status == lib.EORA_ERR_BUFFER, status
    status = lib.eora_lora_t(_native.matrix(ffi, 1, p, 16, 3, 2**62), _native.matrix(ffi, 0, f, 16, 1, 2**62), 1, 0, 0,
                             f, 16, ffi.NULL, 0, 0)
    assert status == lib.EORA_ERR_BUFFER, status


TARGETS = ("gguf", "adapter", "native", "kernels")
