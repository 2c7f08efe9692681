"""The CUDA kernels against the C reference (eora_fused_matmul_ref, eora_dequantize_ref) and gguf-py.

Three layers:
  - everywhere: the library built with or without CUDA loads, its CPU path works, and the CUDA entry points
    answer "unavailable" with EORA_ERR_CUDA when there is no device;
  - everywhere with a C++ compiler: the kernels' own per-lane code (native/src/cuda/quant.cuh, fused.cuh),
    compiled for the host by native/src/cuda/emu.cpp, against the reference over every type, rank and batch;
  - on a GPU (marker `cuda`, skipped with the reason when there is none): the real kernels, through the
    host-pointer entry points, the device-pointer entry points and torch CUDA tensors.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_kernels import make_adapter, make_weight, nmse, random_blocks

from eora_gguf import _native, kernels
from eora_gguf.errors import EoraError

ROOT = Path(__file__).resolve().parent.parent
QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
FUSED_TYPES = QUANT_TYPES + [T.F16, T.BF16, T.F32]
RANKS = (0, 1, 16, 64, 128)
BATCHES = (1, 4, 16, 64)
NMSE = 1e-6  # fp32 accumulation against the fp64 reference
pytestmark = pytest.mark.usefixtures("native")


@pytest.fixture(scope="module")
def gpu() -> None:
    if not kernels.cuda_available():
        pytest.skip(f"no CUDA GPU here: {kernels.cuda_describe()}")


def weight(qtype: T, d_out: int, d_in: int, rng: np.random.Generator) -> np.ndarray:
    if qtype == T.BF16:
        w = rng.standard_normal((d_out, d_in)).astype(np.float32)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(d_out, -1)
    return make_weight(qtype, d_out, d_in, rng)


def case(qtype: T, d_out: int, d_in: int, n: int, rank: int, kind: str, seed: int):
    """(raw W, x, a, b) with a/b None at rank 0."""
    rng = np.random.default_rng(seed)
    raw = weight(qtype, d_out, d_in, rng)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    if rank == 0:
        return raw, x, None, None
    a, _ = make_adapter(kind, rank, d_in, rng)
    b, _ = make_adapter(kind, d_out, rank, rng)
    return raw, x, a, b


def adapter_kind(rank: int, i: int) -> str:
    """F16 / F32 / Q8_0 in turn (Q8_0 needs the rank to be a multiple of 32)."""
    kinds = ["F16", "F32"] + (["Q8_0"] if rank % 32 == 0 else [])
    return kinds[i % len(kinds)]


def reference(raw, qtype, shape, x, a, b, kind):
    kw = dict(a_type=kind, b_type=kind) if a is not None else {}
    return kernels.fused_matmul(raw, qtype, shape, x, a, b, reference=True, **kw).astype(np.float64)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))))


# ---- everywhere ----

@pytest.mark.native
def test_library_loads_and_cpu_path_works_whatever_cuda_says() -> None:
    available = kernels.cuda_available()
    assert isinstance(available, bool)
    text = kernels.cuda_describe()
    assert text and ("without CUDA" in text or "CUDA runtime" in text)
    raw, x, a, b = case(T.Q4_K, 64, 256, 2, 16, "F16", 1)
    y = kernels.fused_matmul(raw, T.Q4_K, (64, 256), x, a, b, f32_activations=True)
    assert nmse(y, reference(raw, T.Q4_K, (64, 256), x, a, b, "F16")) <= NMSE


@pytest.mark.native
def test_cuda_entry_points_say_unavailable_without_a_gpu() -> None:
    if kernels.cuda_available():
        pytest.skip("a CUDA device is present")
    ffi, lib = _native.ffi_lib()
    raw, x, a, b = case(T.Q8_0, 8, 64, 1, 0, "F16", 2)
    assert lib.eora_cuda_available() == 0
    no_cuda = _native.const("EORA_ERR_CUDA")
    dst = ffi.cast("float *", ffi.from_buffer(np.zeros(512, np.float32)))
    assert lib.eora_cuda_dequantize_host(int(T.Q8_0), ffi.from_buffer(raw), raw.nbytes, 512, dst, 2048) == no_cuda
    assert "CPU" in ffi.string(lib.eora_last_error()).decode()
    assert lib.eora_cuda_fused_matmul(ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 0, ffi.NULL, 0,
                                      ffi.NULL) == no_cuda
    with pytest.raises(_native.NativeCudaError, match="cuda_fused_matmul"):
        kernels.fused_matmul(raw, T.Q8_0, (8, 64), x, cuda_host=True)
    with pytest.raises(_native.NativeCudaError, match="cuda_dequantize"):
        kernels.dequantize(raw, T.Q8_0, (8, 64), cuda_host=True)


@pytest.mark.native
def test_no_cuda_driver_or_shared_runtime_needed_at_load() -> None:
    readelf = shutil.which("readelf")
    if not readelf:
        pytest.skip("readelf not installed")
    out = subprocess.run([readelf, "-d", str(_native.library_path())], capture_output=True, text=True,
                         check=True).stdout
    needed = [ln.split("[")[-1].rstrip("]") for ln in out.splitlines() if "(NEEDED)" in ln]
    assert not [n for n in needed if n.startswith(("libcuda", "libcudart", "libnvidia"))], needed


@pytest.mark.native
def test_cuda_wrappers_reject_mixed_devices_and_flags() -> None:
    torch = pytest.importorskip("torch")
    raw, x, _, _ = case(T.Q4_0, 8, 64, 1, 0, "F16", 3)
    with pytest.raises(EoraError, match="pick one"):
        kernels.fused_matmul(raw, T.Q4_0, (8, 64), x, reference=True, cuda_host=True)
    if not torch.cuda.is_available():
        return
    with pytest.raises(EoraError, match="not a CUDA tensor"):
        kernels.fused_matmul(torch.from_numpy(raw), T.Q4_0, (8, 64), torch.from_numpy(x).cuda())


# ---- host emulation of the kernels' per-lane code ----

EMU_CDEF = """
int emu_dequantize(int type, const void *src, int64_t n_elems, float *dst);
int emu_fused_matmul(int w_type, const void *w, int64_t d_out, int64_t d_in, const float *x, int64_t n_tokens,
                     int a_type, const void *a, int b_type, const void *b, int64_t rank, float *y, int sm_count);
int emu_ax_split(int64_t d_in, int64_t n_tokens, int64_t rank, int sm_count, int64_t *slice);
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    import cffi

    if shutil.which("c++") is None and shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("no C++ compiler to build the CUDA host emulation")
    out = _native.build_helper("eora_cuda_emu", tmp_path_factory.mktemp("emu"))
    ffi = cffi.FFI()
    ffi.cdef(EMU_CDEF)
    return ffi, ffi.dlopen(str(out))


def emu_fused(emu, raw, qtype, shape, x, a, b, kind, sm_count=132) -> np.ndarray:
    ffi, lib = emu
    d_out, d_in = shape
    y = np.full((x.shape[0], d_out), np.nan, np.float32)
    rank = 0 if a is None else a.shape[0]
    t = int(T[kind])
    rc = lib.emu_fused_matmul(int(qtype), ffi.from_buffer(raw), d_out, d_in, ffi.cast("float *", ffi.from_buffer(x)),
                              x.shape[0], t, ffi.from_buffer(a) if rank else ffi.NULL, t,
                              ffi.from_buffer(b) if rank else ffi.NULL, rank, ffi.cast("float *", ffi.from_buffer(y)),
                              sm_count)
    assert rc == 0
    return y


@pytest.mark.native
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_emulated_dequantize_bit_exact(emu, qtype: T) -> None:
    ffi, lib = emu
    rng = np.random.default_rng(int(qtype))
    for extremes in (False, True):
        raw = random_blocks(qtype, 24, rng, extremes=extremes)
        n = 24 * gguf.GGML_QUANT_SIZES[qtype][0]
        out = np.zeros(n, np.float32)
        assert lib.emu_dequantize(int(qtype), ffi.from_buffer(raw), n, ffi.cast("float *", ffi.from_buffer(out))) == 0
        with np.errstate(all="ignore"):
            assert same_bits(out, gguf.quants.dequantize(raw, qtype).reshape(-1))
            assert same_bits(out, kernels.dequantize(raw, qtype, (n,), reference=True))


GRID_SHAPE = (131, 512)  # d_out = 131 leaves partial warps and blocks


def grid_cases(qtype: T, seed: int):
    """Every rank x batch (batches leave partial token groups): (rank, n, adapter kind, raw, x, a, b, reference)."""
    for i, (rank, n) in enumerate((r, n) for r in RANKS for n in BATCHES):
        kind = adapter_kind(rank, i)
        raw, x, a, b = case(qtype, *GRID_SHAPE, n, rank, kind, seed + i)
        yield rank, n, kind, raw, x, a, b, reference(raw, qtype, GRID_SHAPE, x, a, b, kind)


@pytest.mark.native
@pytest.mark.parametrize("qtype", FUSED_TYPES, ids=lambda t: t.name)
def test_emulated_fused_matches_reference(emu, qtype: T) -> None:
    for rank, n, kind, raw, x, a, b, ref in grid_cases(qtype, 1000 * int(qtype)):
        assert nmse(emu_fused(emu, raw, qtype, GRID_SHAPE, x, a, b, kind), ref) <= NMSE, (rank, n, kind)


@pytest.mark.native
def test_emulated_k_split_and_unstaged_t(emu) -> None:
    """A x split over many K slices (few SMs or many), and a rank too large to stage t in shared memory."""
    ffi, lib = emu
    slice_ = ffi.new("int64_t *")
    assert lib.emu_ax_split(4096, 1, 16, 132, slice_) == 16 and slice_[0] == 256
    assert lib.emu_ax_split(4096, 4, 3200, 132, slice_) == 1  # 4 x 3200 floats exceed 48 KiB: no split
    for sm in (1, 7, 132):
        raw, x, a, b = case(T.Q6_K, 70, 2304, 3, 64, "F16", sm)
        assert nmse(emu_fused(emu, raw, T.Q6_K, (70, 2304), x, a, b, "F16", sm),
                    reference(raw, T.Q6_K, (70, 2304), x, a, b, "F16")) <= NMSE
    raw, x, a, b = case(T.Q8_0, 3104, 3104, 2, 3104, "F16", 9)
    assert nmse(emu_fused(emu, raw, T.Q8_0, (3104, 3104), x, a, b, "F16"),
                reference(raw, T.Q8_0, (3104, 3104), x, a, b, "F16")) <= NMSE


# ---- on a GPU ----

@pytest.mark.cuda
@pytest.mark.parametrize("qtype", QUANT_TYPES + [T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_cuda_dequantize_bit_exact(gpu, qtype: T) -> None:
    rng = np.random.default_rng(50 + int(qtype))
    if qtype in QUANT_TYPES:
        raw = random_blocks(qtype, 40, rng, extremes=True).reshape(-1)
        n = 40 * gguf.GGML_QUANT_SIZES[qtype][0]
    else:
        raw, n = weight(qtype, 3, 333, rng).reshape(-1), 999
    with np.errstate(all="ignore"):
        expected = kernels.dequantize(raw, qtype, (n,), reference=True)
        assert same_bits(kernels.dequantize(raw, qtype, (n,), cuda_host=True), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", FUSED_TYPES, ids=lambda t: t.name)
def test_cuda_fused_host_matches_reference(gpu, qtype: T) -> None:
    for rank, n, kind, raw, x, a, b, ref in grid_cases(qtype, 2000 * int(qtype)):
        kw = dict(a_type=kind, b_type=kind) if a is not None else {}
        y = kernels.fused_matmul(raw, qtype, GRID_SHAPE, x, a, b, cuda_host=True, **kw)
        assert nmse(y, ref) <= NMSE, (rank, n, kind)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(1, 4096), (4097, 256), (33, 14336)], ids=str)
def test_cuda_fused_odd_and_large_shapes(gpu, shape) -> None:
    d_out, d_in = shape
    for qtype in (T.Q4_K, T.Q6_K, T.Q4_0):
        for n, rank in ((1, 1), (5, 16 if d_out > 1 else 1), (64, 1)):
            raw, x, a, b = case(qtype, d_out, d_in, n, rank, "F16", n + int(qtype))
            y = kernels.fused_matmul(raw, qtype, shape, x, a, b, cuda_host=True)
            assert nmse(y, reference(raw, qtype, shape, x, a, b, "F16")) <= NMSE, (qtype.name, n, rank)


@pytest.mark.cuda
def test_cuda_unstaged_t_large_rank(gpu) -> None:
    raw, x, a, b = case(T.Q8_0, 3104, 3104, 6, 3104, "F16", 11)
    y = kernels.fused_matmul(raw, T.Q8_0, (3104, 3104), x, a, b, cuda_host=True)
    assert nmse(y, reference(raw, T.Q8_0, (3104, 3104), x, a, b, "F16")) <= NMSE


@pytest.mark.cuda
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q2_K, T.IQ4_XS, T.Q3_K, T.Q8_0, T.F16], ids=lambda t: t.name)
def test_cuda_torch_tensors_and_alignment(gpu, qtype: T) -> None:
    """Device entry points through torch: default and side streams, and a weight starting 2 bytes past a
    16-byte boundary (the 2-byte-load variant) give the host path's result."""
    torch = pytest.importorskip("torch")
    d_out, d_in = 96, 1024
    for n, rank in ((1, 64), (7, 32), (16, 0)):
        raw, x, a, b = case(qtype, d_out, d_in, n, rank, "F16", 70 + n)
        expect = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, cuda_host=True)
        dev = torch.device("cuda")
        tw, tx = torch.from_numpy(raw).to(dev), torch.from_numpy(x).to(dev)
        ta = tb = None
        if rank:
            ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
        y = kernels.fused_matmul(tw, qtype, (d_out, d_in), tx, ta, tb)
        assert y.is_cuda and y.shape == (n, d_out)
        np.testing.assert_array_equal(y.cpu().numpy(), expect)
        padded = torch.zeros(raw.nbytes + 2, dtype=torch.uint8, device=dev)
        padded[2:] = tw.reshape(-1)
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            y2 = kernels.fused_matmul(padded[2:], qtype, (d_out, d_in), tx, ta, tb)
        side.synchronize()
        assert nmse(y2.cpu().numpy(), expect.astype(np.float64)) <= 1e-12
        one = kernels.fused_matmul(tw, qtype, (d_out, d_in), tx[0], ta, tb)
        assert one.shape == (d_out,)
        np.testing.assert_array_equal(one.cpu().numpy(), kernels.fused_matmul(raw, qtype, (d_out, d_in), x[0], a, b,
                                                                               cuda_host=True))
    deq = kernels.dequantize(torch.from_numpy(raw).to("cuda"), qtype, (d_out, d_in))
    assert deq.is_cuda and same_bits(deq.cpu().numpy(), kernels.dequantize(raw, qtype, (d_out, d_in), reference=True))


@pytest.mark.cuda
def test_cuda_with_and_without_programmatic_dependent_launch(gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    """On sm_90+ fused_kernel overlaps ax_kernel (PDL); EORA_CUDA_PDL=0 turns that off. Same bits either way."""
    torch = pytest.importorskip("torch")
    for n, rank in ((1, 64), (5, 16)):
        raw, x, a, b = case(T.Q4_K, 512, 4096, n, rank, "F16", 90 + n)
        tw, tx, ta, tb = (torch.from_numpy(v).cuda() for v in (raw, x, a, b))
        with_pdl = kernels.fused_matmul(tw, T.Q4_K, (512, 4096), tx, ta, tb).cpu().numpy()
        monkeypatch.setenv("EORA_CUDA_PDL", "0")
        without = kernels.fused_matmul(tw, T.Q4_K, (512, 4096), tx, ta, tb).cpu().numpy()
        monkeypatch.delenv("EORA_CUDA_PDL")
        np.testing.assert_array_equal(with_pdl, without)
        assert nmse(with_pdl, reference(raw, T.Q4_K, (512, 4096), x, a, b, "F16")) <= NMSE


@pytest.mark.cuda
def test_cuda_graph_capture(gpu) -> None:
    """The benchmark replays the kernels from a CUDA graph: capture must work and replay must agree."""
    torch = pytest.importorskip("torch")
    raw, x, a, b = case(T.Q4_K, 256, 1024, 1, 64, "F16", 5)
    tw, tx, ta, tb = (torch.from_numpy(v).cuda() for v in (raw, x, a, b))
    expect = kernels.fused_matmul(tw, T.Q4_K, (256, 1024), tx, ta, tb)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = kernels.fused_matmul(tw, T.Q4_K, (256, 1024), tx, ta, tb)
    graph.replay()
    torch.cuda.synchronize()
    np.testing.assert_array_equal(y.cpu().numpy(), expect.cpu().numpy())


@pytest.mark.cuda
def test_cuda_error_codes(gpu) -> None:
    torch = pytest.importorskip("torch")
    ffi, lib = _native.ffi_lib()
    d_out, d_in, n, r = 64, 256, 2, 16
    raw, x, a, b = case(T.Q4_K, d_out, d_in, n, r, "F16", 8)
    tw, tx, ta, tb = (torch.from_numpy(v).cuda() for v in (raw, x, a, b))
    ty = torch.empty((n, d_out), device="cuda")
    ws_n = ffi.new("size_t *")
    assert lib.eora_cuda_workspace_bytes(d_in, n, r, ws_n) == 0
    ws = torch.empty(int(ws_n[0]), dtype=torch.uint8, device="cuda")

    def ptr(t, kind="void *"):
        return ffi.cast(kind, t.data_ptr())

    def call(**kw):
        args = dict(wt=int(T.Q4_K), w=ptr(tw), wn=raw.nbytes, d_out=d_out, d_in=d_in, x=ptr(tx), xn=x.nbytes,
                    n=n, at=1, a=ptr(ta), an=a.nbytes, bt=1, b=ptr(tb), bn=b.nbytes, r=r, y=ptr(ty, "float *"),
                    yn=n * d_out * 4, ws=ptr(ws), wsn=int(ws_n[0]), stream=ffi.NULL)
        args.update(kw)
        g = args.get
        status = lib.eora_cuda_fused_matmul(
            _native.matrix(ffi, g("wt"), g("w"), g("wn"), g("d_out"), g("d_in")),
            _native.matrix(ffi, 0, g("x"), g("xn"), g("n"), g("d_in")),
            _native.matrix(ffi, g("at"), g("a"), g("an"), g("r"), g("d_in")),
            _native.matrix(ffi, g("bt"), g("b"), g("bn"), g("d_out"), g("r")),
            g("y"), g("yn"), g("ws"), g("wsn"), g("stream"))
        return status, ffi.string(lib.eora_last_error()).decode()

    assert call()[0] == 0
    host_x = np.zeros_like(x)
    cases = [
        (dict(wt=99), 2, "unsupported weight type"),
        (dict(r=300), 3, "exceeds"),
        (dict(d_in=200), 3, "not a multiple"),
        (dict(wn=raw.nbytes - 1), 4, "weight buffer"),
        (dict(wsn=4), 4, "workspace"),
        (dict(x=ffi.cast("void *", ffi.from_buffer(host_x))), 1, "not device memory"),
        (dict(x=ffi.cast("void *", tx.data_ptr() + 4)), 1, "16-byte aligned"),
        (dict(y=ffi.NULL), 1, "must not be NULL"),
    ]
    for kw, status, msg in cases:
        got, text = call(**kw)
        assert got == status and msg in text, (kw, got, text)
    assert call(ws=ffi.NULL, wsn=0)[0] == 0  # stream-ordered scratch
    torch.cuda.synchronize()
    np.testing.assert_allclose(ty.cpu().numpy(), kernels.fused_matmul(raw, T.Q4_K, (d_out, d_in), x, a, b,
                                                                       cuda_host=True), rtol=0, atol=0)
    with pytest.raises(_native.NativeShapeError, match="not a multiple"):
        kernels.dequantize(torch.zeros(18, dtype=torch.uint8, device="cuda"), T.Q4_0, (1, 31))
