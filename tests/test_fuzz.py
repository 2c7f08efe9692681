"""Short property-based fuzz runs (hypothesis) of tests/fuzz_targets.py, and the regressions they found.

The long run with the sanitizer build is tools/fuzz.py (README: "Fuzzing").
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft

FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seeds():
    import shutil

    made = ft.Seeds()
    yield made
    shutil.rmtree(made.dir, ignore_errors=True)


def test_fuzz_gguf_reader(seeds):
    given(st.data())(FUZZ(lambda data: ft.target_gguf(seeds, data)))()


def test_fuzz_adapter_reader(seeds):
    given(st.data())(FUZZ(lambda data: ft.target_adapter(seeds, data)))()


@pytest.mark.usefixtures("native")
def test_fuzz_native_entry_points():
    given(st.data())(FUZZ(ft.target_native))()


@pytest.mark.usefixtures("native")
def test_fuzz_kernel_wrappers():
    given(st.data())(FUZZ(ft.target_kernels))()


# ---------------------------------------------------------------------------------- regressions the fuzzer found

def _patch_dims(buf: bytes, tensor: str, ne: list[int]) -> bytes:
    """`buf` with the directory entry of `tensor` given dimensions `ne` (same count of dimensions)."""
    key = len(tensor).to_bytes(8, "little") + tensor.encode()
    at = buf.index(key) + len(key)
    n_dims = int.from_bytes(buf[at:at + 4], "little")
    assert n_dims == len(ne)
    dims = b"".join(int(n).to_bytes(8, "little") for n in ne)
    return buf[:at + 4] + dims + buf[at + 4 + 8 * n_dims:]


def test_regression_tensor_with_a_zero_dimension(seeds, tmp_path):
    """gguf-py's reshape raised a bare ValueError for ne [0, 64]."""
    from eora_gguf.errors import EoraError
    from eora_gguf.gguf_io import open_gguf

    path = tmp_path / "m.gguf"
    path.write_bytes(_patch_dims(seeds.model, "blk.0.attn_q.weight", [0, 64]))
    with pytest.raises(EoraError, match="has shape \\[0, 64\\]"):
        open_gguf(path)


def test_regression_tensor_data_beyond_the_file(seeds, tmp_path):
    from eora_gguf.errors import EoraError
    from eora_gguf.gguf_io import open_gguf

    path = tmp_path / "m.gguf"
    path.write_bytes(_patch_dims(seeds.model, "blk.0.attn_norm.weight", [64 * 1024]))
    with pytest.raises(EoraError, match="truncated"):
        open_gguf(path)


def test_regression_metadata_string_not_utf8(seeds, tmp_path):
    """gguf-py decodes strings lazily: general.type = b'\\x80odel' raised UnicodeDecodeError."""
    from eora_gguf.errors import EoraError
    from eora_gguf.gguf_io import open_gguf

    path = tmp_path / "m.gguf"
    buf = seeds.model
    at = buf.index(b"general.type") + len(b"general.type") + 4 + 8
    assert buf[at:at + 5] == b"model"
    path.write_bytes(buf[:at] + b"\x80" + buf[at + 1:])
    with pytest.raises(EoraError, match="general.type cannot be read"):
        open_gguf(path)


def test_regression_adapter_pair_of_two_ranks(seeds, tmp_path):
    """lora_a ne [64, 2] -> [128, 1] keeps the byte count: read_gguf_lora returned A rank 1 with B rank 2."""
    from eora_gguf import adapter as adapter_io
    from eora_gguf.errors import EoraError

    path = tmp_path / "a.gguf"
    path.write_bytes(_patch_dims(seeds.adapter, "blk.0.attn_q.weight.lora_a", [128, 1]))
    with pytest.raises(EoraError, match="not a LoRA pair of one rank"):
        adapter_io.read_gguf_lora(path)


@pytest.mark.usefixtures("native")
def test_regression_replays():
    """The native findings (tools/fuzz.py replays them under the sanitizers, where they would abort)."""
    ft.replay_regressions()
