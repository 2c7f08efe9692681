"""--device: the device-agnostic paths give the CPU results (checked here on CPU variants; the CUDA run of the same
code is a GPU-machine check), and a device this machine lacks is refused in one line."""
from __future__ import annotations

import pytest
import torch

from eora_gguf import calibration, devices
from eora_gguf import compensate as comp
from eora_gguf.errors import EoraError
from eora_gguf.hf_model import calibration_ids

from conftest import adapter_products


def test_resolve():
    assert devices.resolve(None) is None and devices.resolve("cpu") == "cpu" and devices.resolve("CPU") == "cpu"
    assert devices.resolve("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(EoraError, match="is not a device"):
        devices.resolve("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(EoraError, match="torch sees no CUDA GPU here"):
            devices.resolve("cuda:1")


@pytest.fixture(scope="module")
def ids(tiny_q4):
    return calibration_ids(tiny_q4["hf"], str(tiny_q4["calib"]), samples=4, seqlen=64)


def test_explicit_cpu_device_is_the_default_path(tiny_q4, ids):
    """device='cpu' moves every layer, activation and sum 'to the CPU': bit-identical statistics."""
    a = calibration.collect_stats(tiny_q4["hf"], ids, batch_size=2)
    b = calibration.collect_stats(tiny_q4["hf"], ids, batch_size=2, device="cpu")
    assert a.covariances.keys() == b.covariances.keys()
    assert all(torch.equal(a.covariances[k], b.covariances[k]) for k in a.covariances)


def test_float64_blocks_agree_with_float32_blocks(tiny_q4, ids):
    """The accumulation variant a GPU run may pick (float32 XᵀX blocks into float64 sums) against float64 blocks."""
    a = calibration.collect_stats(tiny_q4["hf"], ids, batch_size=2)
    b = calibration.collect_stats(tiny_q4["hf"], ids, batch_size=2, accumulate_dtype=torch.float64)
    for k, c in a.covariances.items():
        torch.testing.assert_close(b.covariances[k], c, rtol=1e-5, atol=1e-6 * float(c.abs().max()))


def test_compensate_on_an_explicit_device(tiny_q4, tmp_path):
    args = dict(rank=8, calib=str(tiny_q4["calib"]), samples=4, seqlen=64)
    comp.compensate(tiny_q4["hf"], tiny_q4["gguf"], tmp_path / "a.gguf", **args)
    comp.compensate(tiny_q4["hf"], tiny_q4["gguf"], tmp_path / "b.gguf", device="cpu", **args)
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    if torch.cuda.is_available():  # the same code with layers, sums and solves on the GPU
        comp.compensate(tiny_q4["hf"], tiny_q4["gguf"], tmp_path / "c.gguf", device="cuda", **args)
        a, c = adapter_products(tmp_path / "a.gguf"), adapter_products(tmp_path / "c.gguf")
        for name in a:
            assert abs(a[name] - c[name]).max() <= 2e-3 * abs(a[name]).max(), name
