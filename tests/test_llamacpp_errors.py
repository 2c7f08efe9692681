"""llama.cpp's own cause of a failure reaches the user (issue 16, item 4): its most specific line, not its last."""
from __future__ import annotations

import pytest

from eora_gguf import llamacpp
from eora_gguf.errors import EoraError


@pytest.fixture(scope="module")
def q5(tiny_gguf, llama, tmp_path_factory):
    return llamacpp.quantize(llama, tiny_gguf("llama"), tmp_path_factory.mktemp("q5") / "q5_0.gguf", "Q5_0")


def test_requantizing_names_the_cause(llama, q5, tmp_path):
    with pytest.raises(EoraError) as exc:
        llamacpp.quantize(llama, q5, tmp_path / "q4.gguf", "Q4_0")
    print(exc.value)
    assert "requantizing from type q5_0 is disabled" in str(exc.value)


def test_truncated_model_names_the_cause(llama, q5, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = q5.read_bytes()
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(EoraError) as exc:
        llamacpp.quantize(llama, cut, tmp_path / "q4.gguf", "Q4_0", extra_args=["--allow-requantize"])
    print(exc.value)
    assert "data is not within the file bounds" in str(exc.value)
