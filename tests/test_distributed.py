"""torchrun with the gloo backend, 2 CPU processes, on the tiny llama: the same adapter and statistics as one
process, up to summation order (the covariance sums are split across processes and all-reduced)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from eora_gguf import compensate as comp
from eora_gguf import distributed
from eora_gguf.stats import CalibrationStats

from conftest import adapter_products

# The script every torchrun process runs: the CLI's calibrate, then compensate, in one process group.
DRIVER = """
import sys
from eora_gguf.cli import main
hf, gguf, calib, out = sys.argv[1:5]
common = ["--calib", calib, "--samples", "4", "--seqlen", "64", "--device", "cpu"]
assert main(["calibrate", "--hf", hf, *common, "-o", f"{out}/stats.safetensors"]) == 0
assert main(["compensate", "--hf", hf, "--gguf", gguf, *common, "--rank", "8", "-o", f"{out}/a.gguf"]) == 0
"""


@pytest.fixture(scope="module")
def runs(tiny_q4, tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    one, two = d / "one", d / "two"
    one.mkdir()
    two.mkdir()
    comp.calibrate(tiny_q4["hf"], str(tiny_q4["calib"]), samples=4, seqlen=64).save(one / "stats.safetensors")
    comp.compensate(tiny_q4["hf"], tiny_q4["gguf"], one / "a.gguf", rank=8, calib=str(tiny_q4["calib"]), samples=4,
                    seqlen=64)
    (d / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(d / "driver.py"), str(tiny_q4["hf"]), str(tiny_q4["gguf"]), str(tiny_q4["calib"]),
                           str(two)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two, proc


def test_torchrun_gives_the_single_process_adapter(runs):
    one, two, _ = runs
    a, b = adapter_products(one / "a.gguf"), adapter_products(two / "a.gguf")
    assert a.keys() == b.keys() and len(a) == 14
    for name in a:
        scale = np.abs(a[name]).max()
        assert np.abs(a[name] - b[name]).max() <= 2e-3 * scale, name  # F16 factors, summation order
    assert sorted(p.name for p in two.iterdir()) == ["a.gguf", "stats.safetensors"]  # one file each, no leftovers


def test_torchrun_gives_the_single_process_statistics(runs):
    one, two, _ = runs
    s1, s2 = CalibrationStats.load(one / "stats.safetensors"), CalibrationStats.load(two / "stats.safetensors")
    assert s1.n_tokens == s2.n_tokens and s1.meta["tokens"] == s2.meta["tokens"] == 4 * 64
    for site, c in s1.covariances.items():
        np.testing.assert_allclose(s2.covariances[site].numpy(), c.numpy(), rtol=1e-5,
                                   atol=1e-6 * float(c.abs().max()))


def test_only_rank_zero_reports(runs):
    _, _, proc = runs
    assert proc.stdout.count("a.gguf") == 1  # the compensate result, printed once


def test_single_process_is_the_identity():
    assert not distributed.active() and distributed.world() == 1 and distributed.is_main()
    assert distributed.mine(0) and distributed.mine(5)
    assert distributed.gather({"x": 1}) == {"x": 1}
