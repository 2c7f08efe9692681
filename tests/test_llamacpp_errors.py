"""llama.cpp's own cause of a failure reaches the user (issue 16, item 4): its most specific line, not its last."""
from __future__ import annotations

import pytest

from eora_gguf import llama_tools, llamacpp
from eora_gguf.errors import EoraError


@pytest.fixture(scope="module")
def q5(tiny_gguf, llama, tmp_path_factory):
    return llama_tools.quantize(llama, tiny_gguf("llama"), tmp_path_factory.mktemp("q5") / "q5_0.gguf", "Q5_0")


def test_requantizing_names_the_cause(llama, q5, tmp_path):
    with pytest.raises(EoraError) as exc:
        llama_tools.quantize(llama, q5, tmp_path / "q4.gguf", "Q4_0")
    print(exc.value)
    assert "requantizing from type q5_0 is disabled" in str(exc.value)


def test_truncated_model_names_the_cause(llama, q5, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = q5.read_bytes()
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(EoraError) as exc:
        llama_tools.quantize(llama, cut, tmp_path / "q4.gguf", "Q4_0", extra_args=["--allow-requantize"])
    print(exc.value)
    assert "data is not within the file bounds" in str(exc.value)


def test_adapter_of_another_shape_names_the_cause(llama, tiny_gguf, tmp_path):
    """llama.cpp's loader says why it refuses the adapter; its callers then add generic lines."""
    import numpy as np

    from eora_gguf import adapter as adapter_io

    rng = np.random.default_rng(0)
    bad = adapter_io.write_gguf_lora(tmp_path / "bad.gguf", {
        "blk.0.attn_q.weight": (rng.standard_normal((256, 4)), rng.standard_normal((4, 128)))}, arch="llama")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 100))
    for _ in range(5):  # the pinned llama.cpp's asynchronous logger can lose everything it printed before exit(1)
        with pytest.raises(EoraError) as exc:
            llama_tools.run_tool([llama.tool("llama-perplexity"), "-m", tiny_gguf("llama"), "--lora", bad, "-f", text,
                               "-c", "128", "--chunks", "1", "-t", "1"], "llama-perplexity")
        if not str(exc.value).endswith("no output"):
            break
    print(exc.value)
    assert "incorrect shape (hint: maybe wrong base model?)" in str(exc.value)


def test_most_specific_line_wins_over_the_last():
    log = "\n".join([
        "llama_model_loader: loaded meta data with 26 key-value pairs",
        "llama_model_load: error loading model: tensor 'blk.1.ffn_up.weight' data is not within the file bounds, "
        "model is corrupted or incomplete",
        "llama_model_load_from_file_impl: failed to load model",
        "main: error: unable to load model",
    ])
    assert "data is not within the file bounds" in llamacpp.last_error_line(log)
    tb = "Traceback (most recent call last):\n  File \"x.py\", line 1\nerror: see below\nValueError: bad tensor"
    assert llamacpp.last_error_line(tb) == "ValueError: bad tensor"
    assert llamacpp.last_error_line("") == "no output"
