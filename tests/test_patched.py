"""The patched llama.cpp (native/llama.cpp/eora.patch): fused LoRA matmuls give the stock results.

Native part: eora_fused_rows / eora_adapter_rows (the entry points the patch calls from ggml's threads) against
the scalar reference and float64 numpy. llama.cpp part (skipped, with the reason, until `eora-gguf
setup-llama-cpp --patched` has built it): a tiny random llama with a random rank-32 adapter, patched against
stock llama.cpp — perplexity within 0.1 %, identical greedy generations — and EORA_LLAMA_STATS=1 counts proving
which path each adapted matmul took. Slow tests repeat the comparison on SmolLM2 with real EoRA adapters.
"""
from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from eora_gguf import _native, kernels, llamacpp
from eora_gguf.errors import EoraError

THREADS = 2
PPL_RTOL = 1e-3  # the issue's "within 0.1 %"


# --------------------------------------------------------------------------------------------------------------
# native entry points


@pytest.fixture(scope="module")
def native():
    try:
        return _native.ffi_lib()
    except _native.NativeUnavailable as exc:
        if os.environ.get("EORA_GGUF_REQUIRE_NATIVE") == "1":
            pytest.fail(str(exc))
        pytest.skip(f"native library not built: {exc}")


def _ptr(ffi, arr):
    return ffi.cast("void *", ffi.from_buffer(arr)), arr.nbytes


def _weight(qtype: T, d_out: int, d_in: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes: quantized by gguf-py where it can, else random blocks with sane fp16 scales."""
    if qtype in (T.Q4_0, T.Q8_0, T.Q5_0):
        return gguf.quants.quantize(rng.standard_normal((d_out, d_in)).astype(np.float32), qtype)
    from test_kernels import random_blocks  # tests/ is on sys.path (conftest.py)

    return random_blocks(qtype, d_out * d_in // 256, rng, scale=0.02).reshape(d_out, -1)


def _fused_rows(native, qtype, w, d_out, d_in, x, b, b_type, t, scale, r0, r1, y, *, ref=False, flags=0):
    ffi, lib = native
    n_tokens, rank = x.shape[0], (t.shape[1] if t is not None else 0)
    wp, wb = _ptr(ffi, w)
    xp, xb = _ptr(ffi, x)
    yp, yb = _ptr(ffi, y)
    bp, bb = _ptr(ffi, b) if b is not None else (ffi.NULL, 0)
    tp, tb = _ptr(ffi, t) if t is not None else (ffi.NULL, 0)
    if ref:
        st = lib.eora_fused_rows_ref(int(qtype), wp, wb, d_out, d_in, xp, xb, n_tokens, b_type, bp, bb,
                                     ffi.cast("float *", tp), tb, rank, scale, r0, r1, ffi.cast("float *", yp), yb)
    else:
        need = lib.eora_fused_rows_scratch(int(qtype), d_in, n_tokens, rank, flags)
        assert need > 0
        raw = np.zeros(need + 64, np.uint8)
        off = (-raw.ctypes.data) % 64
        sp = ffi.cast("void *", ffi.from_buffer(raw)) + off
        st = lib.eora_fused_rows(int(qtype), wp, wb, d_out, d_in, xp, xb, n_tokens, b_type, bp, bb,
                                 ffi.cast("float *", tp), tb, rank, scale, r0, r1, ffi.cast("float *", yp), yb,
                                 sp, need, flags)
    _native.check(st, "fused_rows")


@pytest.mark.native
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q2_K, T.Q3_K, T.Q6_K, T.Q4_0, T.Q8_0, T.Q5_0], ids=lambda t: t.name)
def test_fused_rows_match_reference_and_float64(native, qtype):
    rng = np.random.default_rng(600 + int(qtype))
    d_out, d_in, rank = 40, 512, 32
    w = _weight(qtype, d_out, d_in, rng)
    w64 = gguf.quants.dequantize(w, qtype).astype(np.float64).reshape(d_out, d_in)
    for n_tokens, b_kind, scale in ((1, "F16", 1.0), (6, "Q8_0", 0.5), (33, "F32", 2.0)):
        x = rng.standard_normal((n_tokens, d_in)).astype(np.float32)
        t = rng.standard_normal((n_tokens, rank)).astype(np.float32)
        b = (rng.standard_normal((d_out, rank)) * 0.1).astype(np.float32)
        b_raw = {"F16": b.astype(np.float16), "F32": b, "Q8_0": gguf.quants.quantize(b, T.Q8_0)}[b_kind]
        b64 = gguf.quants.dequantize(b_raw, T[b_kind]).astype(np.float64).reshape(d_out, rank)
        exact = x.astype(np.float64) @ w64.T + scale * (t.astype(np.float64) @ b64.T)
        ref = np.full((n_tokens, d_out), np.nan, np.float32)
        _fused_rows(native, qtype, w, d_out, d_in, x, b_raw, int(T[b_kind]), t, scale, 0, d_out, ref, ref=True)
        assert kernels_nmse(ref, exact) < 1e-10
        # any split into row ranges gives the same bits as one range (each row is computed the same way)
        whole = np.full_like(ref, np.nan)
        _fused_rows(native, qtype, w, d_out, d_in, x, b_raw, int(T[b_kind]), t, scale, 0, d_out, whole)
        parts = np.full_like(ref, np.nan)
        for r0, r1 in ((0, 7), (7, 7), (7, 30), (30, d_out)):
            _fused_rows(native, qtype, w, d_out, d_in, x, b_raw, int(T[b_kind]), t, scale, r0, r1, parts)
        np.testing.assert_array_equal(parts, whole)
        assert kernels_nmse(whole, exact) < kernels.QUANTIZED_ACT_NMSE
        f32 = np.full_like(ref, np.nan)
        _fused_rows(native, qtype, w, d_out, d_in, x, b_raw, int(T[b_kind]), t, scale, 0, d_out, f32,
                    flags=1)  # EORA_FLAG_F32_ACT
        assert kernels_nmse(f32, exact) < 1e-10
    # rank 0: the base product, the same bits as eora_fused_matmul's on one thread
    x = rng.standard_normal((5, d_in)).astype(np.float32)
    y = np.full((5, d_out), np.nan, np.float32)
    _fused_rows(native, qtype, w, d_out, d_in, x, None, 0, None, 1.0, 0, d_out, y)
    np.testing.assert_array_equal(y, kernels.fused_matmul(w, qtype, (d_out, d_in), x, threads=1))


def kernels_nmse(y: np.ndarray, exact: np.ndarray) -> float:
    return float(np.sum((y.astype(np.float64) - exact) ** 2) / np.sum(exact**2))


@pytest.mark.native
def test_fused_rows_rejects_bad_input(native):
    ffi, lib = native
    rng = np.random.default_rng(1)
    w = _weight(T.Q4_K, 8, 256, rng)
    x = np.zeros((2, 256), np.float32)
    y = np.zeros((2, 8), np.float32)
    b = np.zeros((8, 32), np.float16)
    t = np.zeros((2, 32), np.float32)
    with pytest.raises(_native.NativeShapeError, match="row range"):
        _fused_rows(native, T.Q4_K, w, 8, 256, x, b, int(T.F16), t, 1.0, 3, 9, y)
    with pytest.raises(_native.NativeBufferError, match="t has"):
        _fused_rows(native, T.Q4_K, w, 8, 256, x, b, int(T.F16), t[:1], 1.0, 0, 8, y)
    with pytest.raises(_native.NativeTypeError, match="b type"):
        _fused_rows(native, T.Q4_K, w, 8, 256, x, b.view(np.uint16), int(T.BF16), t, 1.0, 0, 8, y)
    assert lib.eora_fused_rows_scratch(99, 256, 1, 0, 0) == 0  # unknown type


@pytest.mark.native
@pytest.mark.parametrize("b_kind", ["F16", "F32", "Q8_0"])
def test_adapter_rows_adds_in_place(native, b_kind):
    ffi, lib = native
    rng = np.random.default_rng(7)
    d_out, rank, n_tokens, scale = 50, 64, 9, 0.75
    b = (rng.standard_normal((d_out, rank)) * 0.1).astype(np.float32)
    b_raw = {"F16": b.astype(np.float16), "F32": b, "Q8_0": gguf.quants.quantize(b, T.Q8_0)}[b_kind]
    b64 = gguf.quants.dequantize(b_raw, T[b_kind]).astype(np.float64).reshape(d_out, rank)
    t = rng.standard_normal((n_tokens, rank)).astype(np.float32)
    y0 = rng.standard_normal((n_tokens, d_out)).astype(np.float32)
    y = y0.copy()
    bp, bb = _ptr(ffi, b_raw)
    tp, tb = _ptr(ffi, t)
    yp, yb = _ptr(ffi, y)
    for r0, r1 in ((0, 20), (20, d_out)):
        _native.check(lib.eora_adapter_rows(int(T[b_kind]), bp, bb, d_out, rank, ffi.cast("float *", tp), tb,
                                            n_tokens, scale, r0, r1, ffi.cast("float *", yp), yb, 0))
    exact = y0.astype(np.float64) + scale * (t.astype(np.float64) @ b64.T)
    assert kernels_nmse(y, exact) < 1e-12
    with pytest.raises(_native.NativeShapeError):
        _native.check(lib.eora_adapter_rows(int(T[b_kind]), bp, bb, d_out, rank, ffi.cast("float *", tp), tb,
                                            n_tokens, scale, 0, d_out + 1, ffi.cast("float *", yp), yb, 0))


@pytest.mark.native
@pytest.mark.parametrize("a_kind", ["F16", "F32", "Q8_0"])
def test_adapter_t_matches_float64(native, a_kind):
    ffi, lib = native
    rng = np.random.default_rng(11)
    rank, d_in, n_tokens = 48, 320, 3
    a = (rng.standard_normal((rank, d_in)) * 0.1).astype(np.float32)
    a_raw = {"F16": a.astype(np.float16), "F32": a, "Q8_0": gguf.quants.quantize(a, T.Q8_0)}[a_kind]
    a64 = gguf.quants.dequantize(a_raw, T[a_kind]).astype(np.float64).reshape(rank, d_in)
    x = rng.standard_normal((n_tokens, d_in)).astype(np.float32)
    t = np.full((n_tokens, rank), np.nan, np.float32)
    ap, ab = _ptr(ffi, a_raw)
    xp, xb = _ptr(ffi, x)
    tp, tb = _ptr(ffi, t)
    _native.check(lib.eora_adapter_t(int(T[a_kind]), ap, ab, rank, d_in, ffi.cast("float *", xp), xb, n_tokens,
                                     ffi.cast("float *", tp), tb, 0))
    assert kernels_nmse(t, x.astype(np.float64) @ a64.T) < 1e-12
    with pytest.raises(_native.NativeBufferError, match="t has"):
        _native.check(lib.eora_adapter_t(int(T[a_kind]), ap, ab, rank, d_in, ffi.cast("float *", xp), xb,
                                         n_tokens, ffi.cast("float *", tp), tb - 4, 0))


def test_locate_patched_not_built_is_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("EORA_GGUF_CACHE", str(tmp_path))
    monkeypatch.delenv("EORA_GGUF_PATCHED_DIR", raising=False)
    with pytest.raises(EoraError, match="setup-llama-cpp --patched") as exc:
        llamacpp.locate(patched=True, build=False)
    assert "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)
    monkeypatch.setenv("EORA_GGUF_PATCHED_DIR", str(tmp_path))
    with pytest.raises(EoraError, match="EORA_GGUF_PATCHED_DIR"):
        llamacpp.locate(patched=True, build=False)


# --------------------------------------------------------------------------------------------------------------
# patched llama.cpp against stock


@pytest.mark.llama_cpp
def test_patch_applies_to_pinned_source_and_bad_patch_fails_cleanly(llama, tmp_path):
    import shutil

    src = llamacpp.fetch_source()
    tool = shutil.which("patch")
    if tool is None:
        pytest.skip("no `patch` program")
    res = subprocess.run([tool, "-p1", "--dry-run", "--batch", "--forward", "-d", str(src), "-i",
                          str(llamacpp.PATCH_FILE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAILED" not in res.stdout and "offset" not in res.stdout and "fuzz" not in res.stdout, res.stdout
    tree = tmp_path / "tree"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "llama-graph.cpp").write_text("something else entirely\n")
    before = (tree / "src" / "llama-graph.cpp").read_text()
    with pytest.raises(EoraError, match="does not apply"):
        llamacpp._apply_patch(llamacpp.PATCH_FILE, tree)
    assert (tree / "src" / "llama-graph.cpp").read_text() == before  # dry run first: nothing half-applied
    assert not (tree / "src" / "llama-eora.cpp").exists()


@pytest.fixture(scope="session")
def patched():
    try:
        return llamacpp.locate(patched=True, build=False)
    except EoraError as exc:
        pytest.skip(f"patched llama.cpp not built ({exc})")


STATS = re.compile(r"eora: LoRA matmuls built: fused (\d+), added (\d+), stock (\d+) \((.*)\); "
                   r"op runs: fused (\d+), added (\d+)")


def stats(stderr: str) -> dict[str, int]:
    m = STATS.search(stderr)
    assert m, f"no EORA_LLAMA_STATS line in the output: {stderr[-2000:]}"
    out = {"fused": int(m[1]), "added": int(m[2]), "stock": int(m[3]), "fused_runs": int(m[5]),
           "added_runs": int(m[6])}
    for part in m[4].split(", "):
        name, value = part.rsplit(" ", 1)
        out["stock_" + name] = int(value)
    return out


def run(llama: llamacpp.LlamaCpp, tool: str, args: list, env: dict[str, str] | None = None,
        timeout: int = 300) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "EORA_LLAMA_STATS": "1", **(env or {})}
    res = subprocess.run([str(llama.tool(tool)), *map(str, args)], capture_output=True, text=True, env=full,
                         stdin=subprocess.DEVNULL,
                         timeout=timeout, errors="replace")
    assert res.returncode == 0, f"{tool} failed: {res.stderr[-3000:]}"
    return res


def perplexity(llama, model, text, loras, env=None, ctx=128, chunks=4) -> tuple[float, subprocess.CompletedProcess]:
    args = ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", THREADS, "--no-warmup"]
    if loras:  # several adapters: one comma-separated --lora (a repeated --lora keeps only the last)
        args += ["--lora", ",".join(map(str, loras))]
    for _ in range(3):  # llama.cpp's log queue sometimes loses the last lines (see llamacpp.perplexity)
        res = run(llama, "llama-perplexity", args, env)
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", res.stdout + res.stderr)
        if m:
            return float(m[1]), res
        running = re.findall(r"\[(\d+)\]([0-9.]+)", res.stdout)  # the value after the last chunk is the final one
        if len(running) == chunks:
            return float(running[-1][1]), res
    raise AssertionError(f"no final perplexity: {res.stderr[-2000:]}")


def generate(llama, model, loras, prompt, env=None, n=64) -> tuple[str, subprocess.CompletedProcess]:
    args = ["-m", model, "-p", prompt, "-n", n, "--temp", 0, "--top-k", 1, "--seed", 7, "-t", THREADS,
            "-c", 256, "--no-warmup", "-no-cnv", "--ignore-eos"]
    if loras:
        args += ["--lora", ",".join(map(str, loras))]
    # llama-completion (stock too) sometimes loses the end of its output at exit (the last piece and the closing
    # blank line); a complete output ends with "\n\n", so run again until one does
    best = None
    for _ in range(4):
        res = run(llama, "llama-completion", args, env)
        if res.stdout.endswith("\n\n"):
            return res.stdout, res
        best = res if best is None or len(res.stdout) > len(best.stdout) else best
    return best.stdout, best


def same_generation(a: str, b: str) -> bool:
    """Equal greedy outputs, allowing for llama-completion's lost output at exit (stock too): the last token's
    piece and the closing blank line may be missing from one of them, nothing else."""
    a, b = a.rstrip("\n"), b.rstrip("\n")
    short, long_ = sorted((a, b), key=len)
    return long_.startswith(short) and len(long_) - len(short) <= 8 and len(short) > 40


def random_adapter(base: Path, out: Path, *, rank: int = 32, seed: int = 0, dtype: str = "f16") -> Path:
    """A random LoRA over every 2-D block weight, its B·A entries about the size of the weights' (0.05)."""
    from eora_gguf.adapter import write_gguf_lora

    reader = gguf.GGUFReader(base)
    arch = reader.get_field("general.architecture").contents()
    rng = np.random.default_rng(seed)
    factors = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2 and "norm" not in t.name:
            n_in, n_out = (int(s) for s in t.shape)
            factors[t.name.removesuffix(".weight") + ".weight"] = (
                rng.normal(0, 0.08, (n_out, rank)).astype(np.float32),
                rng.normal(0, 0.08, (rank, n_in)).astype(np.float32))
    return write_gguf_lora(out, factors, arch=arch, dtype=dtype)


@pytest.fixture(scope="module")
def tiny(tiny_gguf, llama, patched, tmp_path_factory):
    """Quantized tiny llamas, two random adapters and a text, made once."""
    from tiny_models import write_gguf_copy

    d = tmp_path_factory.mktemp("patched")
    # the random model's logits are nearly flat (perplexity ~ vocabulary size); a sharper output layer gives
    # greedy decoding clear winners, so equal generations test the arithmetic, not tie-breaking
    f16 = tiny_gguf("llama")
    out_w = next(t for t in gguf.GGUFReader(f16).tensors if t.name == "output.weight")
    f16 = write_gguf_copy(f16, d / "sharp-f16.gguf", {"output.weight": np.array(out_w.data, np.float32) * 40})
    models = {q: llamacpp.quantize(llama, f16, d / f"{q}.gguf", q) for q in ("Q4_K_M", "Q2_K", "Q5_0", "Q4_0")}
    rng = random.Random(3)
    from tiny_models import _WORDS

    text = d / "text.txt"
    text.write_text(" ".join(rng.choice(_WORDS) for _ in range(3000)))
    return {"models": models, "lora": random_adapter(f16, d / "lora.gguf", seed=1),
            "lora2": random_adapter(f16, d / "lora2.gguf", seed=2, rank=16), "text": text}


PROMPT = "the model reads a quantized weight and"


@pytest.mark.llama_cpp
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q2_K"])
def test_patched_matches_stock_and_fuses(quant, tiny, llama, patched):
    model, lora, text = tiny["models"][quant], tiny["lora"], tiny["text"]
    ppl_stock, _ = perplexity(llama, model, text, [lora])
    ppl_patched, res = perplexity(patched, model, text, [lora])
    s = stats(res.stderr)
    # every adapted weight of this model has a direct kernel: all 7 per layer fused, none stock
    assert s["fused"] > 0 and s["stock"] == 0 and s["added"] == 0 and s["fused_runs"] > 0, s
    assert abs(ppl_patched - ppl_stock) <= PPL_RTOL * ppl_stock, (ppl_patched, ppl_stock)

    gen_stock, _ = generate(llama, model, [lora], PROMPT)
    gen_patched, res = generate(patched, model, [lora], PROMPT)
    assert stats(res.stderr)["fused_runs"] >= 64
    assert same_generation(gen_patched, gen_stock)
    assert not same_generation(generate(llama, model, [], PROMPT)[0], gen_stock)  # the adapter really changes the model


@pytest.mark.llama_cpp
def test_types_without_direct_kernel_and_repacked_weights(tiny, llama, patched):
    """Q5_0 (no direct kernel) and repacked Q4_0 (EORA_LLAMA_REPACK=1) keep ggml's base product; only the
    adapter is fused ("added"), with stock results."""
    lora, text = tiny["lora"], tiny["text"]
    for quant, env in (("Q5_0", {}), ("Q4_0", {"EORA_LLAMA_REPACK": "1"})):
        model = tiny["models"][quant]
        ppl_stock, _ = perplexity(llama, model, text, [lora])
        ppl_patched, res = perplexity(patched, model, text, [lora], env)
        s = stats(res.stderr)
        assert s["added"] > 0 and s["added_runs"] > 0 and s["stock"] == 0, (quant, s)
        if quant == "Q5_0":
            assert s["fused"] == 0, s
        else:  # repacked: Q4_0's own weights cannot be read in place; only the Q6_K/Q8_0 ones that ggml
            assert "CPU_REPACK" in res.stderr  # does not repack could still fuse
        assert abs(ppl_patched - ppl_stock) <= PPL_RTOL * ppl_stock, (quant, ppl_patched, ppl_stock)
        gen_stock, _ = generate(llama, model, [lora], PROMPT, n=32)
        gen_patched, _ = generate(patched, model, [lora], PROMPT, env, n=32)
        assert same_generation(gen_patched, gen_stock), quant


@pytest.mark.llama_cpp
def test_disabled_is_exactly_stock(tiny, llama, patched):
    """EORA_LLAMA_FUSE=0: nothing fused, repacking as stock, the same bits as the stock build."""
    model, lora, text = tiny["models"]["Q4_K_M"], tiny["lora"], tiny["text"]
    ppl_stock, res_stock = perplexity(llama, model, text, [lora])
    ppl_off, res = perplexity(patched, model, text, [lora], {"EORA_LLAMA_FUSE": "0"})
    s = stats(res.stderr)
    assert s["fused"] == 0 and s["added"] == 0 and s["stock_disabled"] > 0, s
    assert ppl_off == ppl_stock
    assert re.findall(r"\[\d+\][0-9.]+", res.stdout) == re.findall(r"\[\d+\][0-9.]+", res_stock.stdout)


@pytest.mark.llama_cpp
def test_two_adapters(tiny, llama, patched):
    """The first adapter of a weight is fused with it, the second is added by the adapter-only op."""
    model, text = tiny["models"]["Q4_K_M"], tiny["text"]
    loras = [tiny["lora"], tiny["lora2"]]
    ppl_stock, _ = perplexity(llama, model, text, loras)
    ppl_patched, res = perplexity(patched, model, text, loras)
    s = stats(res.stderr)
    assert s["fused"] > 0 and s["added"] == s["fused"] and s["stock"] == 0, s
    assert abs(ppl_patched - ppl_stock) <= PPL_RTOL * ppl_stock
    assert same_generation(generate(patched, model, loras, PROMPT, n=32)[0], generate(llama, model, loras, PROMPT, n=32)[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_completion(llama, model, lora, prompt, env) -> str:
    port = _free_port()
    cmd = [str(llama.tool("llama-server")), "-m", str(model), "--lora", str(lora), "--host", "127.0.0.1",
           "--port", str(port), "-t", str(THREADS), "-c", "256", "-np", "1", "--no-warmup"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"llama-server did not start: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
        body = json.dumps({"prompt": prompt, "n_predict": 32, "temperature": 0, "top_k": 1, "seed": 7,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/completion", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["content"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.llama_cpp
def test_server_and_cli_with_lora(tiny, llama, patched):
    """llama-server (/completion, greedy) and llama-cli give the same text fused and unfused; the server's
    text is also the one llama-completion generates."""
    model, lora = tiny["models"]["Q4_K_M"], tiny["lora"]
    fused = _server_completion(patched, model, lora, PROMPT, {})
    stock = _server_completion(patched, model, lora, PROMPT, {"EORA_LLAMA_FUSE": "0"})
    assert fused == stock and len(fused) > 0
    gen, _ = generate(llama, model, [lora], PROMPT, n=32)
    lines = (lambda s: s.replace("\r\n", "\n").replace("\r", "\n"))  # stdout was read in text mode
    assert lines(fused) in lines(gen)

    # llama-cli here is the chat client: one turn (-st); its answer sits between the echoed prompt and the
    # "[ Prompt: … t/s ]" timing line
    args = ["-m", model, "--lora", lora, "-p", PROMPT, "-n", 24, "--temp", 0, "--top-k", 1, "--seed", 7,
            "-t", THREADS, "-c", 256, "--no-warmup", "-st", "--simple-io"]
    answer = re.compile(r"\n> [^\n]*\n(.*?)\n\[ Prompt:", re.S)
    m_stock = answer.search(run(llama, "llama-cli", args).stdout)
    res = run(patched, "llama-cli", args)
    m_patched = answer.search(res.stdout)
    assert m_stock and m_patched, res.stdout[-2000:]
    assert stats(res.stderr)["fused_runs"] > 0
    assert m_patched[1] == m_stock[1] and m_stock[1].strip()


# --------------------------------------------------------------------------------------------------------------
# SmolLM2 with real EoRA adapters (slow)


@pytest.fixture(scope="module")
def smol(llama, patched):
    """SmolLM2-135M Q2_K / Q4_K_M (made from the demo F16 if missing) and rank-64 EoRA adapters from
    `eora-gguf compensate` (16 x 256 calibration tokens), cached under the system temp folder."""
    import tempfile

    from eora_gguf import assets
    from eora_gguf.cli import main

    hf = assets.demo_model_dir()
    if not (hf / "config.json").is_file():
        pytest.skip(f"demo model not fetched ({hf}): run `eora-gguf fetch-demo`")
    work = Path(tempfile.gettempdir()) / "eora-gguf-test-patched"
    work.mkdir(exist_ok=True)
    f16 = work / "model-F16.gguf"
    if not f16.is_file():
        llamacpp.convert(llama, hf, f16)
    out = {}
    for quant in ("Q2_K", "Q4_K_M"):
        model = work / f"model-{quant}.gguf"
        if not model.is_file():
            llamacpp.quantize(llama, f16, model, quant)
        adapter = work / f"eora-{quant}-r64.gguf"
        if not adapter.is_file():
            assert main(["compensate", "--hf", str(hf), "--gguf", str(model), "--rank", "64", "--samples", "16",
                         "--seqlen", "256", "-o", str(adapter)]) == 0
        out[quant] = (model, adapter)
    text = Path(assets.demo_dir()) / "data" / "eval.txt"
    return out, text


@pytest.mark.slow
@pytest.mark.llama_cpp
@pytest.mark.parametrize("quant", ["Q2_K", "Q4_K_M"])
def test_smollm2_eora_patched_matches_stock(quant, smol, llama, patched):
    models, text = smol
    model, adapter = models[quant]
    ppl_stock, _ = perplexity(llama, model, text, [adapter], ctx=512, chunks=4)
    ppl_patched, res = perplexity(patched, model, text, [adapter], ctx=512, chunks=4)
    s = stats(res.stderr)
    assert s["fused"] > 0 and s["stock"] == 0, s  # Q4_K_M: Q5_0 weights are "added", Q4_K/Q6_K/Q8_0 fused
    assert abs(ppl_patched - ppl_stock) <= PPL_RTOL * ppl_stock, (ppl_patched, ppl_stock)
    prompt = "The capital of France is a city where"
    assert same_generation(generate(patched, model, [adapter], prompt)[0], generate(llama, model, [adapter], prompt)[0])
