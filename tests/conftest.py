"""Shared fixtures: the pinned llama.cpp (built once per machine, cached) and tiny random HF models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see eora_gguf/cli.py

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny_models.py is a helper module, not a package


@pytest.fixture(scope="session")
def llama():
    """The llama.cpp to test against: LLAMA_CPP_DIR if set, else the pinned build (built now if missing)."""
    from eora_gguf import llamacpp

    return llamacpp.locate(progress=False)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """tiny_hf(arch) -> folder of a tiny random HF model of that arch (built once per session)."""
    from tiny_models import build_tiny_model

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, llama, tmp_path_factory):
    """tiny_gguf(arch, outtype="f16") -> the tiny model converted by the pinned convert_hf_to_gguf.py."""
    from eora_gguf import llama_tools

    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, outtype: str = "f16") -> Path:
        key = (arch, outtype)
        if key not in made:
            out = tmp_path_factory.mktemp(f"gguf-{arch}") / f"{arch}-{outtype}.gguf"
            made[key] = llama_tools.convert(llama, tiny_hf(arch), out, outtype=outtype)
        return made[key]

    return get


@pytest.fixture(scope="session")
def smol_made(llama, tmp_path_factory):
    """`eora-gguf make` on the SmolLM2 demo model (fetched on first use): Q4_K_M base, a general and an ARC adapter
    (rank 32, 16 x 256 calibration tokens each), measured on 4 chunks of the demo eval text. (folder, make.json)"""
    import json

    from eora_gguf import assets, serve
    from eora_gguf.cli import main

    assets.fetch_demo()
    out = tmp_path_factory.mktemp("smol") / "made"
    argv = ["make", str(assets.demo_model_dir()), "-o", str(out), "--quant", "Q4_K_M", "--rank", "32",
            "--calib", "general=demo", "--calib", "arc=arc_easy:1,arc_challenge:1", "--samples", "16", "--seqlen",
            "256", "--text", "eval", "--chunks", "4", "--threads", "2", "--port", str(serve.free_port())]
    assert main(argv) == 0
    return out, json.loads((out / "make.json").read_text())


@pytest.fixture(scope="session")
def tiny_q4(tiny_hf, tmp_path_factory):
    """The tiny llama, its linears quantized to Q4_0 with gguf-py (no llama.cpp needed) and a calibration text:
    {"hf", "gguf", "calib"} — the inputs of a quick compensation run."""
    import json
    import random

    import gguf

    from tiny_models import _WORDS, write_synthetic_gguf

    d = tmp_path_factory.mktemp("tiny-q4")
    hf = tiny_hf("llama")
    write_synthetic_gguf(d / "q4.gguf", json.loads((hf / "config.json").read_text()), hf_dir=hf,
                         qtype=gguf.GGMLQuantizationType.Q4_0)
    rng = random.Random(7)
    (d / "calib.txt").write_text(" ".join(rng.choice(_WORDS) for _ in range(3000)))
    return {"hf": hf, "gguf": d / "q4.gguf", "calib": d / "calib.txt"}


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{arch: folder} of the six streaming models (tiny_models.STREAM_ARCHS), built once per session."""
    from tiny_models import STREAM_ARCHS, make_stream_model

    root = tmp_path_factory.mktemp("stream-models")
    out = {}
    for arch in STREAM_ARCHS:
        d = root / arch
        make_stream_model(arch).save_pretrained(d)
        out[arch] = d
    return out


@pytest.fixture(scope="session")
def ids():
    """(SAMPLES, SEQLEN) random token ids for the streaming models."""
    import torch

    from tiny_models import SAMPLES, SEQLEN, STREAM_VOCAB

    return torch.randint(0, STREAM_VOCAB, (SAMPLES, SEQLEN), generator=torch.Generator().manual_seed(1))



@pytest.fixture
def synth_base(tmp_path):
    """(path, {GGUF name: float32 weight}) of tiny_models.write_synthetic_gguf's small F32 model in tmp_path."""
    from tiny_models import write_synthetic_gguf

    path = tmp_path / "base.gguf"
    return path, write_synthetic_gguf(path)

def adapter_products(path) -> dict:
    """{tensor: B A (float64)} of a GGUF LoRA adapter: what it adds to each weight (factors' split is free)."""
    from eora_gguf.adapter import read_gguf_lora

    _, pairs = read_gguf_lora(path)
    return {n: b.astype("float64") @ a.astype("float64") for n, (b, a) in pairs.items()}


# ---- the native library (shared by the native test files: test_native*, test_kernels, test_cuda, test_lora,
# test_fuzz) ----

@pytest.fixture(scope="module")
def native():
    """(ffi, lib) of libeora_native. Skips when it is not built, fails instead with EORA_GGUF_REQUIRE_NATIVE=1."""
    from eora_gguf import _native

    try:
        return _native.ffi_lib()
    except _native.NativeUnavailable as exc:
        if os.environ.get("EORA_GGUF_REQUIRE_NATIVE") == "1":
            pytest.fail(str(exc))
        pytest.skip(f"native library not built: {exc}")
