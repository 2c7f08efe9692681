"""Typed wrappers over the native kernels: GGUF dequantization and the fused EoRA product.

    y = dequant(Wq) x + B (A x)                      x: (n_tokens, d_in) -> y: (n_tokens, d_out)

Inputs may be numpy arrays or CPU torch tensors; quantized data is the raw GGUF bytes (uint8) of the tensor.
Tensor types are `gguf.GGMLQuantizationType` members or their names ("Q4_K").

Accuracy of the default (optimized) fused path: each token of x is quantized to int8 with scale
max|x_block|/127, as llama.cpp's CPU backend does (Q8_K / Q8_0): blocks of 256 for Q2_K..Q6_K weights (the
direct kernels, on every instruction set), blocks of 32 otherwise. Each x element carries an error of at most
half a step (max|x_block|/254). The weight side stays exact (integer codes times their fp32 scales: the integer sums are
exact, tested), and the adapter (A x, then B t) is computed in fp32. For random-like data this gives a
normalized squared error nmse = sum((y - y_exact)^2) / sum(y_exact^2) of about
(1/254)^2 / 3 * E[max|x_block|^2] / E[x^2] -- measured ~3e-5 (32-blocks) and ~5e-5 to 6e-5 (256-blocks) for
Gaussian x; QUANTIZED_ACT_NMSE is the bound the tests enforce. One large outlier in a block coarsens that
whole block, more so with 256-blocks. `f32_activations=True` (or `reference=True`) keeps x in fp32: nmse
~1e-12 relative to a float64 product.

CUDA: when the inputs are torch CUDA tensors, `dequantize` and `fused_matmul` run the library's CUDA kernels
on the tensors' device and its current stream and return CUDA tensors (fp32 throughout, x not quantized).
`cuda_host=True` runs numpy/CPU inputs through the CUDA host-pointer entry points (copy in, run, copy out),
for validation. `cuda_available()` says whether that can work here.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType

from . import _native
from ._native import (
    NativeArgumentError,
    NativeError,
    NativeMemoryError,
    NativeShapeError,
    NativeUnavailable,
    available,
    cuda_available,
    cuda_describe,
)
from .errors import EoraError

log = logging.getLogger(__name__)

__all__ = ["dequantize", "fused_matmul", "available", "cuda_available", "cuda_describe", "NativeError",
           "NativeUnavailable", "supported_types", "ADAPTER_TYPES", "QUANTIZED_ACT_NMSE", "block_info"]

T = GGMLQuantizationType
ADAPTER_TYPES = (T.F32, T.F16, T.Q8_0)
QUANTIZED_ACT_NMSE = 2e-4
# isa= -> the header's flag that caps the instruction set (None: the best this CPU has)
_ISA_FLAGS = {None: None, "native": None, "avx2": "EORA_FLAG_ISA_AVX2", "scalar": "EORA_FLAG_ISA_SCALAR"}


@functools.lru_cache(maxsize=1)
def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """The weight types the library supports: the members of the header's eora_type (ggml's numbers)."""
    ffi, _ = _native.ffi_lib()
    return tuple(T(v) for v in sorted(ffi.typeof("eora_type").elements))


def _qtype(qtype: GGMLQuantizationType | str | int, allowed: Sequence[GGMLQuantizationType] | None = None,
           what: str = "tensor") -> GGMLQuantizationType:
    allowed = supported_types() if allowed is None else allowed
    try:
        if isinstance(qtype, str):
            t = GGMLQuantizationType[qtype.upper()]
        else:
            t = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError, TypeError, OverflowError):
        raise EoraError(f"unknown {what} type {qtype!r}: use one of {', '.join(x.name for x in allowed)}") from None
    if t not in allowed:
        raise EoraError(f"{what} type {t.name} is not supported here: use one of {', '.join(x.name for x in allowed)}")
    return t


def block_info(qtype: GGMLQuantizationType | str) -> tuple[int, int]:
    """(elements, bytes) of one block of `qtype`, from the native library's own table."""
    ffi, lib = _native.ffi_lib()
    elems, nbytes = ffi.new("int64_t *"), ffi.new("int64_t *")
    _native.check(lib.eora_type_info(int(_qtype(qtype)), elems, nbytes), "type_info")
    return int(elems[0]), int(nbytes[0])


# Sizes beyond this cannot be real tensors and would overflow the C side's int64 byte counts.
_MAX_DIM = 1 << 40


def _dims(shape: Any, what: str) -> tuple[int, ...]:
    """`shape` as a tuple of positive Python ints, each and their product small enough for int64 byte counts."""
    try:
        dims = tuple(int(s) for s in shape)
        if any(d != s for d, s in zip(dims, shape)):  # 2.5 -> 2 would silently change the shape
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise NativeShapeError(f"{what} {shape!r} must be a sequence of integers") from None
    if not dims or any(d <= 0 for d in dims):
        raise NativeShapeError(f"{what} {dims} must have positive sizes")
    if any(d > _MAX_DIM for d in dims) or int(np.prod(dims, dtype=object)) > _MAX_DIM:
        raise NativeShapeError(f"{what} {dims} is too large for a tensor")
    return dims


def _empty(shape: tuple[int, ...], what: str) -> np.ndarray:
    try:
        return np.empty(shape, dtype=np.float32)
    except (MemoryError, ValueError):
        raise NativeMemoryError(f"cannot allocate the {what} of shape {shape} (float32): out of memory") from None


def _as_numpy(a: Any, what: str) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "device"):  # torch tensor, without importing torch
        if a.device.type != "cpu":
            raise EoraError(f"{what} is on {a.device}: move it to the CPU (.cpu()) first")
        a = a.detach().contiguous().numpy()
    if not isinstance(a, np.ndarray):
        raise EoraError(f"{what} must be a numpy array or a CPU torch tensor, got {type(a).__name__}")
    return np.ascontiguousarray(a)


def _buffer(ffi: Any, arr: np.ndarray | None) -> tuple[Any, int]:
    if arr is None:
        return ffi.NULL, 0
    return ffi.cast("void *", ffi.from_buffer(arr)), arr.nbytes


def dequantize(raw: Any, qtype: GGMLQuantizationType | str, shape: Sequence[int], *, reference: bool = False,
               cuda_host: bool = False) -> Any:
    """Dequantize raw GGUF bytes of a tensor with numpy shape `shape` (last axis = row) to float32.

    Bit-exact with `gguf.quants.dequantize`. `reference=True` runs the scalar C reference. A CUDA tensor `raw`
    is dequantized on its device (returns a CUDA tensor); `cuda_host=True` sends numpy input through the CUDA
    host entry point.
    """
    t = _qtype(qtype)
    if _is_cuda(raw):
        if reference or cuda_host:
            raise EoraError("reference/cuda_host take CPU input; raw is a CUDA tensor (already on the GPU path)")
        return _cuda_dequantize(raw, t, shape)
    arr = _as_numpy(raw, "raw")
    shape = _dims(shape, "shape")
    n = int(np.prod(shape, dtype=object))
    elems, nbytes = block_info(t)
    if shape[-1] % elems:
        raise EoraError(f"row length {shape[-1]} of a {t.name} tensor is not a multiple of its block size {elems}")
    need = n // elems * nbytes
    if arr.nbytes != need:
        raise EoraError(f"{t.name} tensor of shape {shape} needs {need} bytes, got {arr.nbytes}")
    ffi, lib = _native.ffi_lib()
    out = _empty(shape, "output")
    if reference and cuda_host:
        raise EoraError("pick one of reference and cuda_host")
    fn = lib.eora_dequantize_ref if reference else lib.eora_cuda_dequantize_host if cuda_host else lib.eora_dequantize
    src, src_bytes = _buffer(ffi, arr)
    _native.check(fn(int(t), src, src_bytes, n, ffi.cast("float *", ffi.from_buffer(out)), out.nbytes),
                  "cuda_dequantize" if cuda_host else "dequantize")
    return out


def _adapter_part(m: Any, given: GGMLQuantizationType | str | None,
                  what: str) -> tuple[np.ndarray, GGMLQuantizationType]:
    arr = _as_numpy(m, what)
    if given is not None:
        t = _qtype(given, ADAPTER_TYPES, what)
    elif arr.dtype == np.float32:
        t = T.F32
    elif arr.dtype == np.float16:
        t = T.F16
    elif arr.dtype == np.uint8:
        t = T.Q8_0
    else:
        raise EoraError(f"{what} has dtype {arr.dtype}: pass float32, float16 or Q8_0 bytes (uint8)")
    want = {T.F32: np.float32, T.F16: np.float16, T.Q8_0: np.uint8}[t]
    if arr.dtype != want:
        raise EoraError(f"{what} is {arr.dtype} but its type is {t.name}: pass {np.dtype(want).name} data")
    if arr.ndim != 2:
        raise EoraError(f"{what} must be 2-D, got shape {arr.shape}")
    return arr, t


def fused_matmul(w_raw: Any, qtype: GGMLQuantizationType | str, shape: Sequence[int], x: Any, a: Any = None,
                 b: Any = None, *, threads: int | None = None, reference: bool = False,
                 a_type: GGMLQuantizationType | str | None = None, b_type: GGMLQuantizationType | str | None = None,
                 f32_activations: bool = False, isa: str | None = None, cuda_host: bool = False) -> Any:
    """y = dequant(W) x + B (A x) for every token (row) of x.

    w_raw: raw GGUF bytes of W, numpy shape `shape` = (d_out, d_in).   x: (n_tokens, d_in) or (d_in,).
    a: (r, d_in), b: (d_out, r) -- float32, float16, or Q8_0 bytes (uint8, rows of d/32*34 bytes); both None
    for no adapter. Returns float32 (n_tokens, d_out) (or (d_out,)), a torch tensor if x was one.
    threads: None = all cores. reference: scalar C reference (fp64 accumulation). isa: "avx2"/"scalar" caps
    the instruction set (testing). f32_activations: skip the int8 activation quantization.
    CUDA tensors (w_raw, x, a, b all on one device) run the CUDA kernels on the current stream of that device
    and return a CUDA tensor (threads does not apply; fp32 throughout). cuda_host: run CPU input through the
    CUDA host entry point (validation).
    """
    t = _qtype(qtype)
    if not hasattr(shape, "__len__") or len(shape) != 2:
        raise NativeShapeError(f"weight shape must be (d_out, d_in), got {shape!r}")
    d_out, d_in = _dims(shape, "weight shape")
    if any(_is_cuda(v) for v in (w_raw, x, a, b)):
        if reference or cuda_host or isa is not None:
            raise EoraError("reference, cuda_host and isa apply to CPU input; these tensors are on a CUDA device")
        return _cuda_fused(w_raw, t, d_out, d_in, x, a, b, a_type, b_type)
    is_torch = hasattr(x, "detach")
    xs = _as_numpy(x, "x")
    squeeze = xs.ndim == 1
    if xs.ndim != 2 and not squeeze or xs.size == 0:
        raise NativeShapeError(f"x has shape {tuple(xs.shape)}, expected (n_tokens, {d_in})")
    if xs.dtype.kind not in "fiu":  # complex would lose its imaginary part silently
        raise NativeArgumentError(f"x has dtype {xs.dtype}: pass real numbers (float32 preferred)")
    try:
        xs = np.ascontiguousarray(xs.reshape(1, -1) if squeeze else xs, dtype=np.float32)
    except (TypeError, ValueError):
        raise NativeArgumentError(f"x of dtype {xs.dtype} cannot be converted to float32") from None
    if xs.shape[1] != d_in:
        raise NativeShapeError(f"x has shape {tuple(xs.shape)}, expected (n_tokens, {d_in})")
    w = _as_numpy(w_raw, "w_raw")
    if (a is None) != (b is None):
        raise EoraError("pass both a and b for an adapter, or neither")
    rank = 0
    an = bn = None
    at = bt = T.F32
    if a is not None:
        an, at = _adapter_part(a, a_type, "a")
        bn, bt = _adapter_part(b, b_type, "b")
        rank = an.shape[0]
        # A (rank, d_in) and B (d_out, rank); Q8_0 widths are in bytes and are checked exactly by the library
        if bn.shape[0] != d_out or (bt != T.Q8_0 and bn.shape[1] != rank) or (at != T.Q8_0 and an.shape[1] != d_in):
            raise NativeShapeError(f"adapter shapes a {an.shape} and b {bn.shape} do not fit W ({d_out}, {d_in}): "
                                   f"a must be (rank, {d_in}) and b ({d_out}, rank) with one rank")
    if not isinstance(isa, (str, type(None))) or isa not in _ISA_FLAGS:
        raise EoraError(f"isa must be one of {', '.join(k for k in _ISA_FLAGS if k)}, got {isa!r}")
    if threads is not None and (not isinstance(threads, (int, np.integer)) or not 1 <= threads <= 4096):
        raise NativeArgumentError(f"threads must be an integer in [1, 4096], got {threads!r}")
    ffi, lib = _native.ffi_lib()
    y = _empty((xs.shape[0], d_out), "output y")
    n = xs.shape[0]
    wm = _native.matrix(ffi, t, *_buffer(ffi, w), d_out, d_in)
    xm = _native.matrix(ffi, T.F32, *_buffer(ffi, xs), n, d_in)
    am = _native.matrix(ffi, at, *_buffer(ffi, an), rank, d_in) if rank else ffi.NULL
    bm = _native.matrix(ffi, bt, *_buffer(ffi, bn), d_out, rank) if rank else ffi.NULL
    args = (wm, xm, am, bm, ffi.cast("float *", ffi.from_buffer(y)), y.nbytes)
    if reference and cuda_host:
        raise EoraError("pick one of reference and cuda_host")
    if reference:
        _native.check(lib.eora_fused_matmul_ref(*args), "fused_matmul_ref")
    elif cuda_host:
        _native.check(lib.eora_cuda_fused_matmul_host(*args), "cuda_fused_matmul")
    else:
        flags = (_native.const(_ISA_FLAGS[isa]) if _ISA_FLAGS[isa] else 0) | (
            _native.const("EORA_FLAG_F32_ACT") if f32_activations else 0)
        _native.check(lib.eora_fused_matmul(*args, threads or 0, flags), "fused_matmul")
    out = y[0] if squeeze else y
    if is_torch:
        import torch

        return torch.from_numpy(out)
    return out


# ---- CUDA tensors ----

def _is_cuda(v: Any) -> bool:
    return bool(getattr(v, "is_cuda", False))


def _cuda_input(v: Any, what: str, device: Any) -> Any:
    """v as a contiguous tensor on `device`; copied if its data pointer is not 16-byte aligned."""
    if not _is_cuda(v):
        raise EoraError(f"{what} is not a CUDA tensor: pass w_raw, x, a and b all on one CUDA device, "
                        "or all on the CPU")
    if v.device != device:
        raise EoraError(f"{what} is on {v.device} but x is on {device}: put every input on one device")
    v = v.detach().contiguous()
    return v if v.data_ptr() % 16 == 0 else v.clone()


def _cuda_buffer(ffi: Any, v: Any) -> tuple[Any, int]:
    """(device pointer, bytes) of a contiguous CUDA tensor."""
    return ffi.cast("void *", v.data_ptr()), v.numel() * v.element_size()


def _stream_ptr(ffi: Any, device: Any) -> Any:
    import torch

    return ffi.cast("void *", torch.cuda.current_stream(device).cuda_stream)


def _cuda_dequantize(raw: Any, t: GGMLQuantizationType, shape: Sequence[int]) -> Any:
    import torch

    shape = _dims(shape, "shape")
    raw = _cuda_input(raw, "raw", raw.device)
    n = int(np.prod(shape))
    ffi, lib = _native.ffi_lib()
    out = torch.empty(shape, dtype=torch.float32, device=raw.device)
    with torch.cuda.device(raw.device):
        _native.check(lib.eora_cuda_dequantize(int(t), *_cuda_buffer(ffi, raw), n,
                                               ffi.cast("float *", out.data_ptr()), out.numel() * 4,
                                               _stream_ptr(ffi, raw.device)), "cuda_dequantize")
    return out


def _cuda_adapter_type(m: Any, given: GGMLQuantizationType | str | None, what: str) -> GGMLQuantizationType:
    import torch

    by_dtype = {torch.float32: T.F32, torch.float16: T.F16, torch.uint8: T.Q8_0}
    if m.dim() != 2:
        raise EoraError(f"{what} must be 2-D, got shape {tuple(m.shape)}")
    if m.dtype not in by_dtype:
        raise EoraError(f"{what} has dtype {m.dtype}: pass float32, float16 or Q8_0 bytes (uint8)")
    t = _qtype(given, ADAPTER_TYPES, what) if given is not None else by_dtype[m.dtype]
    if by_dtype[m.dtype] != t:
        raise EoraError(f"{what} is {m.dtype} but its type is {t.name}")
    return t


def _cuda_fused(w_raw: Any, t: GGMLQuantizationType, d_out: int, d_in: int, x: Any, a: Any, b: Any,
                a_type: GGMLQuantizationType | str | None, b_type: GGMLQuantizationType | str | None) -> Any:
    import torch

    if not _is_cuda(x):
        raise EoraError("x is not a CUDA tensor: pass w_raw, x, a and b all on one CUDA device, or all on the CPU")
    device = x.device
    squeeze = x.dim() == 1
    xs = _cuda_input(x.reshape(1, -1) if squeeze else x, "x", device).to(torch.float32)
    if xs.dim() != 2 or xs.shape[1] != d_in:
        raise EoraError(f"x has shape {tuple(xs.shape)}, expected (n_tokens, {d_in})")
    w = _cuda_input(w_raw, "w_raw", device)
    if (a is None) != (b is None):
        raise EoraError("pass both a and b for an adapter, or neither")
    ffi, lib = _native.ffi_lib()
    rank, am, bm = 0, ffi.NULL, ffi.NULL
    if a is not None:
        a = _cuda_input(a, "a", device)
        b = _cuda_input(b, "b", device)
        at, bt = _cuda_adapter_type(a, a_type, "a"), _cuda_adapter_type(b, b_type, "b")
        rank = a.shape[0]
        am = _native.matrix(ffi, at, *_cuda_buffer(ffi, a), rank, d_in)
        bm = _native.matrix(ffi, bt, *_cuda_buffer(ffi, b), d_out, rank)
    n = xs.shape[0]
    y = torch.empty((n, d_out), dtype=torch.float32, device=device)
    ws_bytes = ffi.new("size_t *")
    _native.check(lib.eora_cuda_workspace_bytes(d_in, n, rank, ws_bytes), "cuda_fused_matmul")
    ws = torch.empty(max(int(ws_bytes[0]), 1), dtype=torch.uint8, device=device)
    wm = _native.matrix(ffi, t, *_cuda_buffer(ffi, w), d_out, d_in)
    xm = _native.matrix(ffi, T.F32, *_cuda_buffer(ffi, xs), n, d_in)
    with torch.cuda.device(device):
        _native.check(lib.eora_cuda_fused_matmul(
            wm, xm, am, bm, ffi.cast("float *", y.data_ptr()), y.numel() * 4, ffi.cast("void *", ws.data_ptr()),
            ws.numel(), _stream_ptr(ffi, device)), "cuda_fused_matmul")
    return y[0] if squeeze else y
