"""The patched llama.cpp (native/llama.cpp/eora.patch): fused LoRA matmuls give the stock bits.

The patch reproduces stock llama.cpp's arithmetic exactly (tests/test_lora.py checks the native kernels against
ggml itself), so these tests ask for the same bits, not a tolerance: every perplexity chunk and every greedy token
equal to the stock build's, for tiny random llamas with random adapters across the weight types and paths
(fused at one token, added after ggml's product for batches and repacked weights, stock for what the patch does
not take), and EORA_LLAMA_STATS=1 counts proving which path each adapter took. They are skipped, with the reason,
until `eora-gguf setup-llama-cpp --patched` has built the patched tools. Slow tests repeat the comparison on
SmolLM2 with real EoRA adapters.
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

from eora_gguf import llama_tools, llamacpp
from eora_gguf.errors import EoraError

THREADS = 2


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


STATS = re.compile(r"eora: LoRA adapters built: fused (\d+), added (\d+) \(t in op (\d+)\), stock (\d+) \((.*)\); "
                   r"op runs: fused (\d+), t (\d+), add (\d+)")


def stats(stderr: str) -> dict[str, int]:
    m = STATS.search(stderr)
    assert m, f"no EORA_LLAMA_STATS line in the output: {stderr[-2000:]}"
    out = {"fused": int(m[1]), "added": int(m[2]), "t_built": int(m[3]), "stock": int(m[4]), "fused_runs": int(m[6]),
           "t_runs": int(m[7]), "added_runs": int(m[8])}
    for part in m[5].split(", "):
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


def logits(llama, model, text, loras, out: Path, env=None, ctx=128, chunks=4,
           batch=None) -> tuple[bytes, subprocess.CompletedProcess]:
    """llama-perplexity's --kl-divergence-base file: every evaluated token's log-probabilities, each row with its
    fp32 scale and minimum. Equal files from two builds mean equal logits to the last bit that survives llama.cpp's
    16-bit coding (and exactly equal row maxima). `batch`: tokens per llama_decode (default: a chunk; 1: one token
    at a time, as generation decodes)."""
    args = ["-m", model, "-f", text, "-c", ctx, "--chunks", chunks, "-t", THREADS, "--no-warmup",
            "--kl-divergence-base", out]
    if batch:
        args += ["-b", batch]
    if loras:  # several adapters: one comma-separated --lora (a repeated --lora keeps only the last)
        args += ["--lora", ",".join(map(str, loras))]
    res = run(llama, "llama-perplexity", args, env)
    data = out.read_bytes()
    assert data.startswith(b"_logits_") and len(data) > 1000, f"no logits written: {res.stderr[-2000:]}"
    return data, res


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
    """Quantized tiny llamas, random adapters and a text, made once."""
    from tiny_models import write_gguf_copy

    d = tmp_path_factory.mktemp("patched")
    # the random model's logits are nearly flat (perplexity ~ vocabulary size); a sharper output layer gives
    # greedy decoding clear winners, so equal generations test the arithmetic, not tie-breaking
    f16 = tiny_gguf("llama")
    out_w = next(t for t in gguf.GGUFReader(f16).tensors if t.name == "output.weight")
    f16 = write_gguf_copy(f16, d / "sharp-f16.gguf", {"output.weight": np.array(out_w.data, np.float32) * 40})
    models = {q: llama_tools.quantize(llama, f16, d / f"{q}.gguf", q)
              for q in ("Q4_K_M", "Q2_K", "Q5_0", "Q4_0", "Q8_0")}
    rng = random.Random(3)
    from tiny_models import _WORDS

    text = d / "text.txt"
    text.write_text(" ".join(rng.choice(_WORDS) for _ in range(3000)))
    return {"models": models, "dir": d, "text": text, "f16": f16,
            "lora": random_adapter(f16, d / "lora.gguf", seed=1),
            "lora2": random_adapter(f16, d / "lora2.gguf", seed=2, rank=16),
            "lora_r6": random_adapter(f16, d / "lora-r6.gguf", seed=3, rank=6),
            "lora_f32": random_adapter(f16, d / "lora-f32.gguf", seed=4, dtype="f32"),
            "lora_q8": random_adapter(f16, d / "lora-q8.gguf", seed=5, dtype="q8_0")}


PROMPT = "the model reads a quantized weight and"


def assert_stock_bits(tiny, llama, patched, quant, loras, env=None, n=64) -> tuple[dict, dict, dict]:
    """Patched and stock llama.cpp give the same logits over the text, as batches and one token at a time, and the
    same greedy text; returns the EORA_LLAMA_STATS counts of the patched perplexity in batches, the one at a time,
    and the generation (prompt + one-token decode)."""
    model, d = tiny["models"][quant], tiny["dir"]
    tag = f"{quant}-{len(loras)}-{Path(loras[0]).stem if loras else 'none'}"
    want, _ = logits(llama, model, tiny["text"], loras, d / f"stock-{tag}.bin")
    got, res = logits(patched, model, tiny["text"], loras, d / f"patched-{tag}.bin", env)
    assert got == want, f"{quant}: patched logits differ from stock"
    batch = stats(res.stderr)
    want, _ = logits(llama, model, tiny["text"], loras, d / f"stock-{tag}-b1.bin", chunks=2, batch=1)
    got, res = logits(patched, model, tiny["text"], loras, d / f"patched-{tag}-b1.bin", env, chunks=2, batch=1)
    assert got == want, f"{quant}: patched logits differ from stock, one token at a time"
    decode = stats(res.stderr)
    gen_stock, _ = generate(llama, model, loras, PROMPT, n=n)
    gen_patched, res = generate(patched, model, loras, PROMPT, env, n=n)
    assert same_generation(gen_patched, gen_stock), (quant, gen_patched, gen_stock)
    return batch, decode, stats(res.stderr)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q2_K", "Q5_0", "Q4_0", "Q8_0"])
def test_patched_gives_stock_bits(quant, tiny, llama, patched):
    """Every weight type, repacked by stock llama.cpp (Q4_0, Q4_K on x86) or not: the stock bits, no adapter left
    to the stock ops, and the one-token path fused wherever ggml multiplies W with vec_dot."""
    batch, dec, gen = assert_stock_bits(tiny, llama, patched, quant, [tiny["lora"]])
    # perplexity: batches of 128 tokens, every adapter added after ggml's own product (t from ggml's GEMM)
    assert batch["added"] > 0 and batch["stock"] == 0 and batch["fused"] == 0 and batch["added_runs"] > 0, batch
    assert gen["stock"] == 0 and gen["t_built"] > 0, gen  # the prompt (a few tokens): t in our op
    if quant in ("Q5_0", "Q8_0"):  # never repacked on the CPU: decode fuses W and its adapter
        assert gen["fused"] > 0 and gen["fused_runs"] >= 7 * 2 * 60, gen
        assert dec["fused_runs"] > 2 * 128 and dec["stock"] == 0, dec  # fused products on every token of 2 chunks
    if quant == "Q4_0":  # repacked where ggml has the kernels (x86 AVX2): the adapter is added after ggml's product
        assert gen["added_runs"] > gen["t_runs"] / 2, gen
    assert not same_generation(generate(llama, tiny["models"][quant], [], PROMPT)[0],
                               generate(llama, tiny["models"][quant], [tiny["lora"]], PROMPT)[0])  # adapter matters


@pytest.mark.llama_cpp
def test_odd_rank_and_f32_adapters(tiny, llama, patched):
    """Rank 6 (ggml's vec_dot path for every batch size: rows not in fours; dots shorter than a block) and F32
    adapters: the stock bits through the patched ops."""
    for lora in (tiny["lora_r6"], tiny["lora_f32"]):
        batch, dec, gen = assert_stock_bits(tiny, llama, patched, "Q5_0", [lora], n=32)
        assert batch["stock"] == 0, (lora.name, batch)
        if lora == tiny["lora_f32"] and gen["stock_numerics"]:
            # the patch's first-use probe found that ggml's F32 dot on this CPU sums in an order it does not
            # reproduce (seen on AMD EPYC with AVX-512): every F32 adapter keeps the stock ops, with the stock bits
            assert gen["stock"] == gen["stock_numerics"] and gen["fused"] == 0, (lora.name, gen)
        else:
            assert gen["stock"] == 0 and gen["fused"] > 0, (lora.name, batch, gen)


@pytest.mark.llama_cpp
@pytest.mark.parametrize("dtype", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_unsupported_adapter_type_keeps_the_stock_ops(tiny, llama, patched, dtype):
    """Quantized adapters (Q8_0 and the lower-bit types the byte budget chooses): ggml quantizes the input of
    their products, which the patch does not reproduce, so they keep the stock ops (and their bits)."""
    lora = tiny["lora_q8"] if dtype == "q8_0" else random_adapter(tiny["f16"], tiny["dir"] / f"lora-{dtype}.gguf",
                                                                   seed=6, dtype=dtype)
    batch, dec, gen = assert_stock_bits(tiny, llama, patched, "Q5_0", [lora], n=32)
    assert batch["stock"] == batch["stock_type"] > 0 and batch["fused"] == batch["added"] == 0, batch
    assert gen["fused_runs"] == gen["added_runs"] == 0, gen


@pytest.mark.llama_cpp
def test_disabled_is_exactly_stock(tiny, llama, patched):
    """EORA_LLAMA_FUSE=0: nothing fused, the stock graph (and bits)."""
    batch, dec, gen = assert_stock_bits(tiny, llama, patched, "Q4_K_M", [tiny["lora"]], {"EORA_LLAMA_FUSE": "0"}, n=32)
    for s in (batch, gen):
        assert s["fused"] == s["added"] == 0 and s["stock_disabled"] > 0 and s["stock"] == s["stock_disabled"], s


@pytest.mark.llama_cpp
def test_adapter_only_mode(tiny, llama, patched):
    """EORA_LLAMA_FUSE=adapter: W x stays ggml's node at every batch size, only the adapter ops are ours."""
    batch, dec, gen = assert_stock_bits(tiny, llama, patched, "Q5_0", [tiny["lora"]], {"EORA_LLAMA_FUSE": "adapter"},
                                        n=32)
    assert gen["fused"] == 0 and gen["added"] > 0 and gen["stock"] == 0, gen


@pytest.mark.llama_cpp
def test_fused_without_prefetch(tiny, llama, patched):
    """EORA_LLAMA_PREFETCH=0: the fused ops split W's rows half and half instead of by prefetched bytes, and
    prefetch nothing: still fused, still the stock bits."""
    batch, dec, gen = assert_stock_bits(tiny, llama, patched, "Q8_0", [tiny["lora"]], {"EORA_LLAMA_PREFETCH": "0"},
                                        n=32)
    assert gen["fused"] > 0 and gen["fused_runs"] > 0 and gen["stock"] == 0, gen
    assert dec["fused_runs"] > 0, dec


@pytest.mark.llama_cpp
def test_two_adapters(tiny, llama, patched):
    """The first adapter of a weight is fused with it at one token, the second is added by the adapter ops."""
    batch, dec, gen = assert_stock_bits(tiny, llama, patched, "Q5_0", [tiny["lora"], tiny["lora2"]], n=32)
    assert batch["stock"] == gen["stock"] == 0 and gen["fused"] > 0 and gen["added"] >= gen["fused"], gen


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
    """llama-server (/completion, greedy) and llama-cli give the same text fused and unfused (the stock build has
    no llama-server: EORA_LLAMA_FUSE=0 gives the stock graph); the server's text is also the one stock
    llama-completion generates."""
    model, lora = tiny["models"]["Q5_0"], tiny["lora"]
    fused = _server_completion(patched, model, lora, PROMPT, {})
    stock = _server_completion(patched, model, lora, PROMPT, {"EORA_LLAMA_FUSE": "0"})
    assert fused == stock and len(fused) > 0
    gen, _ = generate(llama, model, [lora], PROMPT, n=32)
    def lines(s: str) -> str:  # stdout was read in text mode
        return s.replace("\r\n", "\n").replace("\r", "\n")
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
        llama_tools.convert(llama, hf, f16)
    out = {}
    for quant in ("Q2_K", "Q4_K_M"):
        model = work / f"model-{quant}.gguf"
        if not model.is_file():
            llama_tools.quantize(llama, f16, model, quant)
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
def test_smollm2_eora_patched_matches_stock(quant, smol, llama, patched, tmp_path):
    """SmolLM2 with a real rank-64 EoRA adapter: the same logits over 4 x 512 tokens of the eval text (as batches,
    and 512 of them one token at a time) and the same 64-token greedy generation as stock llama.cpp."""
    models, text = smol
    model, adapter = models[quant]
    want, _ = logits(llama, model, text, [adapter], tmp_path / "stock.bin", ctx=512)
    got, res = logits(patched, model, text, [adapter], tmp_path / "patched.bin", ctx=512)
    s = stats(res.stderr)
    assert s["added"] > 0 and s["stock"] == 0, s
    assert got == want
    want, _ = logits(llama, model, text, [adapter], tmp_path / "stock-b1.bin", ctx=512, chunks=1, batch=1)
    got, res = logits(patched, model, text, [adapter], tmp_path / "patched-b1.bin", ctx=512, chunks=1, batch=1)
    s = stats(res.stderr)
    assert s["fused_runs"] > 512 and s["stock"] == 0, s
    assert got == want, "one token at a time: patched logits differ from stock"
    prompt = "The capital of France is a city where"
    gen_stock, _ = generate(llama, model, [adapter], prompt)
    gen_patched, res = generate(patched, model, [adapter], prompt)
    assert stats(res.stderr)["stock"] == 0
    assert same_generation(gen_patched, gen_stock), (gen_patched, gen_stock)
