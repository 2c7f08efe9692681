"""eora_gguf.kernels against independent oracles: gguf-py's dequantizers and float64 numpy products."""
from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from eora_gguf import _native, kernels
from eora_gguf.errors import EoraError

pytestmark = [pytest.mark.native, pytest.mark.usefixtures("native")]

QUANT_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS]
PY_QUANTIZABLE = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
# Byte offsets of the fp16 scale fields in each block (from the block layouts).
F16_FIELDS = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,), T.IQ4_NL: (0,),
              T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_XS: (0,)}
EXTREME_F16 = np.array([65504.0, -65504.0, 6.104e-5, -6.104e-5, 6e-8, -6e-8, 0.0, -0.0, 1.0], dtype=np.float16)


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator, *, scale: float | None = None,
                  extremes: bool = False) -> np.ndarray:
    """Random block bytes whose fp16 scale fields are finite: random finite halves, `scale`-sized values,
    or (extremes) the largest, smallest normal, subnormal and signed-zero halves."""
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        if scale is not None:
            h = (rng.uniform(0.5, 1.0, n_blocks) * scale).astype(np.float16)
        elif extremes:
            h = EXTREME_F16[rng.integers(0, len(EXTREME_F16), n_blocks)]
        else:
            bits = rng.integers(0, 1 << 16, n_blocks, dtype=np.uint16)
            exp = (bits >> 10) & 0x1F
            bits = np.where(exp == 0x1F, bits & ~np.uint16(0x4000), bits).astype(np.uint16)  # no inf/nan
            h = bits.view(np.float16)
        raw[:, off:off + 2] = h.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return raw


def assert_same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    diff = a.view(np.uint32) != b.view(np.uint32)
    assert not diff.any(), f"{int(diff.sum())} of {diff.size} values differ; first at {np.argwhere(diff)[0]}"


def nmse(y: np.ndarray, exact: np.ndarray) -> float:
    return float(np.sum((y.astype(np.float64) - exact) ** 2) / np.sum(exact ** 2))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["random", "extreme"])
def test_dequantize_bit_exact_random_blocks(qtype: T, kind: str) -> None:
    rng = np.random.default_rng([int(qtype), len(kind)])
    block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
    raw = random_blocks(qtype, 96, rng, extremes=kind == "extreme").reshape(3, -1)
    shape = (3, 32 * block_elems)
    expected = gguf.quants.dequantize(raw, qtype)
    with np.errstate(all="ignore"):
        for reference in (True, False):
            got = kernels.dequantize(raw, qtype, shape, reference=reference)
            assert_same_bits(got, expected.reshape(shape))


@pytest.mark.parametrize("qtype", PY_QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_bit_exact_quantized_data(qtype: T) -> None:
    rng = np.random.default_rng(int(qtype))
    w = (rng.standard_normal((16, 512)) * rng.uniform(1e-3, 10.0, (16, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    assert_same_bits(kernels.dequantize(raw, qtype, w.shape), gguf.quants.dequantize(raw, qtype))


def test_dequantize_float_types_and_torch_input() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    half = w.astype(np.float16)
    assert_same_bits(kernels.dequantize(half.view(np.uint8), "F16", w.shape), half.astype(np.float32))
    assert_same_bits(kernels.dequantize(torch.from_numpy(w.view(np.uint8)), T.F32, w.shape), w)
    bf = torch.from_numpy(w).to(torch.bfloat16)
    assert_same_bits(kernels.dequantize(bf.view(torch.uint8), "BF16", w.shape), bf.float().numpy())


def test_dequantize_rejects_bad_input() -> None:
    raw = np.zeros(18 * 4, dtype=np.uint8)
    with pytest.raises(EoraError, match="not a multiple"):
        kernels.dequantize(raw, "Q4_0", (4, 33))
    with pytest.raises(EoraError, match="needs 72 bytes"):
        kernels.dequantize(raw[:-1], "Q4_0", (4, 32))
    with pytest.raises(EoraError, match="unknown tensor type"):
        kernels.dequantize(raw, "Q9_9", (4, 32))
    with pytest.raises(EoraError, match="not supported"):
        kernels.dequantize(raw, T.IQ2_XXS, (1, 256))


def weight_case(qtype: T, seed: int, d_out: int, d_in: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """(rng seeded by seed + the type, the weight's raw blocks, its float64 dequantization (d_out, d_in))."""
    rng = np.random.default_rng(seed + int(qtype))
    raw = make_weight(qtype, d_out, d_in, rng)
    return rng, raw, gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(d_out, d_in)


def make_weight(qtype: T, d_out: int, d_in: int, rng: np.random.Generator) -> np.ndarray:
    if qtype in PY_QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal((d_out, d_in)).astype(np.float32), qtype)
    if qtype == T.F16:
        return rng.standard_normal((d_out, d_in)).astype(np.float16).view(np.uint8)
    if qtype == T.F32:
        return rng.standard_normal((d_out, d_in)).astype(np.float32).view(np.uint8)
    elems = gguf.GGML_QUANT_SIZES[qtype][0]
    return random_blocks(qtype, d_out * d_in // elems, rng, scale=0.02).reshape(d_out, -1)


def make_adapter(kind: str, rows: int, cols: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(array to pass, float64 values it stands for)"""
    m = (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)
    if kind == "F32":
        return m, m.astype(np.float64)
    if kind == "F16":
        return m.astype(np.float16), m.astype(np.float16).astype(np.float64)
    raw = gguf.quants.quantize(m, T.Q8_0)
    return raw, gguf.quants.dequantize(raw, T.Q8_0).astype(np.float64)


def adapted_case(rng: np.random.Generator, w: np.ndarray, n_tokens: int, a_kind: str, b_kind: str,
                 rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (n_tokens, d_in), adapter factors a, b of the given kinds for W (float64, (d_out, d_in)), and the float64
    product W x + B (A x) they stand for."""
    d_out, d_in = w.shape
    x = rng.standard_normal((n_tokens, d_in)).astype(np.float32)
    a, a64 = make_adapter(a_kind, rank, d_in, rng)
    b, b64 = make_adapter(b_kind, d_out, rank, rng)
    x64 = x.astype(np.float64)
    return x, a, b, x64 @ w.T + (x64 @ a64.T) @ b64.T


FUSED_TYPES = QUANT_TYPES + [T.F16, T.F32]


@pytest.mark.parametrize("qtype", FUSED_TYPES, ids=lambda t: t.name)
def test_fused_matches_float64(qtype: T) -> None:
    rng, raw, w = weight_case(qtype, 100, 48, 512)
    d_out, d_in, rank = 48, 512, 32
    for n_tokens, a_kind, b_kind in ((1, "F16", "F16"), (5, "F32", "Q8_0"), (64, "Q8_0", "F32")):
        x, a, b, exact = adapted_case(rng, w, n_tokens, a_kind, b_kind, rank)
        base = x.astype(np.float64) @ w.T
        ref = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, reference=True)
        assert nmse(ref, exact) <= 1e-6
        assert nmse(kernels.fused_matmul(raw, qtype, (d_out, d_in), x, reference=True), base) <= 1e-6
        quantized = qtype not in (T.F16, T.F32)
        for isa in (None, "avx2", "scalar"):
            f32 = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, isa=isa, f32_activations=True, threads=2)
            assert nmse(f32, exact) <= 1e-6, isa
            q = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, isa=isa, threads=2)
            assert nmse(q, exact) <= (kernels.QUANTIZED_ACT_NMSE if quantized else 1e-6), isa
            assert nmse(q, ref.astype(np.float64)) <= (kernels.QUANTIZED_ACT_NMSE if quantized else 1e-6), isa


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q8_0, T.IQ4_NL], ids=lambda t: t.name)
def test_fused_paths_agree_across_threads_and_isas(qtype: T) -> None:
    rng = np.random.default_rng(5)
    d_out, d_in = 100, 768 if gguf.GGML_QUANT_SIZES[qtype][0] == 256 else 96
    raw = make_weight(qtype, d_out, d_in, rng)
    x = rng.standard_normal((7, d_in)).astype(np.float32)
    a, _ = make_adapter("F16", 16, d_in, rng)
    b, _ = make_adapter("F16", d_out, 16, rng)
    one = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, threads=1)
    for threads in (2, 3, 8):
        np.testing.assert_array_equal(kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, threads=threads), one)
    # AVX2 and AVX-512 compute the same integer sums (float summation order differs); the scalar build is the
    # AVX2 kernels' twin (test_scalar_twins_give_the_avx2_bits)
    avx2 = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, isa="avx2")
    assert nmse(avx2, one.astype(np.float64)) < 1e-10


DIRECT_TYPES = [T.Q4_K, T.Q2_K, T.Q3_K, T.Q5_K, T.Q6_K, T.Q8_0, T.Q4_0]


def quantized_activations(x: np.ndarray, block: int) -> np.ndarray:
    """The activations the int8 paths actually multiply: per block of `block` elements, d = max|x| / 127 and
    q = round-half-even(x * (127 / max|x|)), all in float32 as the C code computes them; returns d * q (float64)."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, block)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.rint(xb * inv)
    d = (amax / np.float32(127.0)).astype(np.float32)
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("qtype", DIRECT_TYPES, ids=lambda t: t.name)
def test_direct_kernels_exact_on_quantized_activations(qtype: T) -> None:
    """The integer dot products are exact: against float64 W times the int8-rounded x, only float32
    summation error remains. Every batch size 1..9 (token groups of 4 plus remainders), a zero block and an
    outlier in x, and each instruction set."""
    rng = np.random.default_rng(300 + int(qtype))
    block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
    d_out, d_in = 37, 1024 if block_elems == 256 else 1056  # 33 legacy blocks: an odd one at the end
    raw = make_weight(qtype, d_out, d_in, rng)
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64).reshape(d_out, d_in)
    x = rng.standard_normal((9, d_in)).astype(np.float32)
    x[1, :256] = 0.0
    x[2, 300] = 40.0
    x_block = 256 if block_elems == 256 else 32
    xq = quantized_activations(x, x_block)  # every instruction set blocks x alike (the scalar twins too)
    for isa in (None, "avx2", "scalar"):
        for n in range(1, 10):
            y = kernels.fused_matmul(raw, qtype, (d_out, d_in), x[:n], isa=isa, threads=2)
            exact = xq[:n] @ w.T
            assert nmse(y, exact) < 1e-10, (isa, n)
            plain = [i for i in range(n) if i != 2]  # the documented bound assumes no extreme outlier
            assert nmse(y[plain], x[plain].astype(np.float64) @ w.T) < kernels.QUANTIZED_ACT_NMSE, (isa, n)


@pytest.mark.parametrize("qtype", DIRECT_TYPES, ids=lambda t: t.name)
def test_direct_kernels_with_adapter_same_across_threads(qtype: T) -> None:
    rng, raw, w = weight_case(qtype, 400, 130, 512)
    d_out, d_in, rank = 130, 512, 64
    for n, kind in ((1, "F16"), (6, "Q8_0"), (1, "F32")):
        x, a, b, exact = adapted_case(rng, w, n, kind, kind, rank)
        one = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, threads=1)
        assert nmse(one, exact) < kernels.QUANTIZED_ACT_NMSE
        for threads in (2, 3, 5):
            got = kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, threads=threads)
            np.testing.assert_array_equal(got, one)


@pytest.mark.parametrize("qtype", FUSED_TYPES + [T.BF16], ids=lambda t: t.name)
def test_scalar_twins_give_the_avx2_bits(qtype: T) -> None:
    """isa="scalar" is the oracle of the fast path: the portable C twins block the activations as the AVX2 kernels
    do and sum in their order, so every output (direct and unpack kernels, quantized and fp32 activations, each
    adapter type, 1 to 6 tokens, float rows with a tail) has the AVX2 bits."""
    if _native.cpu_path() == "scalar":
        pytest.skip("this CPU has no AVX2 path to compare the scalar twins with")
    rng = np.random.default_rng(500 + int(qtype))
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    d_out, d_in = 40, {256: 768, 32: 544, 1: 520}[block]  # 520: a float row with an 8-element tail
    if qtype == T.BF16:
        raw = (rng.standard_normal((d_out, d_in)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        raw = raw.view(np.uint8).reshape(d_out, -1)
    else:
        raw = make_weight(qtype, d_out, d_in, rng)
    for n, kind in ((1, "F16"), (3, "F32"), (6, "Q8_0"), (4, None)):
        x = rng.standard_normal((n, d_in)).astype(np.float32)
        rank = 32 if kind == "Q8_0" else 16
        a, b = (None, None) if kind is None or (kind == "Q8_0" and d_in % 32) else (
            make_adapter(kind, rank, d_in, rng)[0], make_adapter(kind, d_out, rank, rng)[0])
        for f32 in (False, True):
            got = [kernels.fused_matmul(raw, qtype, (d_out, d_in), x, a, b, isa=isa, f32_activations=f32, threads=2)
                   for isa in ("scalar", "avx2")]
            assert_same_bits(*got)


def test_fused_rank_zero_single_token_and_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    raw = make_weight(T.Q4_0, 16, 64, rng)
    x = rng.standard_normal(64).astype(np.float32)
    w = gguf.quants.dequantize(raw, T.Q4_0).astype(np.float64)
    y = kernels.fused_matmul(raw, "Q4_0", (16, 64), x, f32_activations=True)
    assert y.shape == (16,) and nmse(y, w @ x) <= 1e-6
    yt = kernels.fused_matmul(torch.from_numpy(raw), "q4_0", (16, 64), torch.from_numpy(x), f32_activations=True)
    assert isinstance(yt, torch.Tensor)
    np.testing.assert_array_equal(yt.numpy(), y)


def test_fused_rejects_bad_input() -> None:
    rng = np.random.default_rng(3)
    raw = make_weight(T.Q8_0, 8, 64, rng)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    a = np.zeros((16, 64), np.float32)
    b = np.zeros((8, 16), np.float32)
    with pytest.raises(EoraError, match=r"expected \(n_tokens, 64\)"):
        kernels.fused_matmul(raw, "Q8_0", (8, 64), x[:, :32])
    with pytest.raises(_native.NativeShapeError, match="rank 16 exceeds"):
        kernels.fused_matmul(raw, "Q8_0", (8, 64), x, a, b)
    with pytest.raises(_native.NativeBufferError, match="weight buffer"):
        kernels.fused_matmul(raw[:7], "Q8_0", (8, 64), x)
    with pytest.raises(_native.NativeShapeError, match="not a multiple"):
        kernels.fused_matmul(raw, "Q8_0", (8, 48), x[:, :48])
    with pytest.raises(EoraError, match="both a and b"):
        kernels.fused_matmul(raw, "Q8_0", (8, 64), x, a)
    with pytest.raises(EoraError, match="dtype float64"):
        kernels.fused_matmul(raw, "Q8_0", (8, 64), x, a[:4].astype(np.float64), b[:, :4])
    with pytest.raises(_native.NativeShapeError, match="multiple of its block size 32"):
        q8a = gguf.quants.quantize(np.zeros((4, 64), np.float32), T.Q8_0)
        kernels.fused_matmul(raw, "Q8_0", (8, 64), x, q8a, np.zeros((8, 4 * 34 // 32), np.uint8), b_type="Q8_0")


@pytest.mark.slow
def test_real_gguf_dequantizes_bit_exact() -> None:
    path = os.environ.get("EORA_TEST_GGUF")
    if not path:
        pytest.skip("set EORA_TEST_GGUF to a quantized .gguf file to run this check")
    reader = gguf.GGUFReader(path)
    checked = 0
    for tensor in reader.tensors:
        qtype = T(tensor.tensor_type)
        if qtype not in QUANT_TYPES:
            continue
        raw = np.asarray(tensor.data)
        expected = gguf.quants.dequantize(raw, qtype)
        shape = tuple(int(s) for s in reversed(tensor.shape.tolist()))
        assert_same_bits(kernels.dequantize(raw, qtype, shape), expected.reshape(shape))
        checked += 1
    assert checked > 0, f"{path} has no quantized tensors of a supported type"
