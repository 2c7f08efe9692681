"""Resume: a run interrupted after a finished layer continues from its checkpoint and writes the adapter an
uninterrupted run writes (bit for bit); a rerun with other inputs refuses the stale checkpoint in one line."""
from __future__ import annotations

import pytest

from eora_gguf import checkpoint
from eora_gguf import compensate as comp
from eora_gguf.cli import main
from eora_gguf.errors import EoraError
from eora_gguf.solver import LayerSolver


class Interrupted(Exception):
    pass


def _run(tiny_q4, out, **kw):
    args = dict(rank=8, calib=str(tiny_q4["calib"]), samples=4, seqlen=64, resume=True)
    return comp.compensate(tiny_q4["hf"], tiny_q4["gguf"], out, **{**args, **kw})


def _interrupt_after_layer(monkeypatch, layer: int):
    """Make the run stop (as a kill would) right after decoder layer `layer` is recorded."""
    save = checkpoint.Checkpoint.save_layer

    def save_then_stop(self, i, *args, **kwargs):
        save(self, i, *args, **kwargs)
        if i == layer:
            raise Interrupted

    monkeypatch.setattr(checkpoint.Checkpoint, "save_layer", save_then_stop)


@pytest.mark.parametrize("propagate", ["original", "compensated"])
def test_resumed_run_writes_the_uninterrupted_adapter(tiny_q4, tmp_path, monkeypatch, propagate):
    whole = tmp_path / "whole.gguf"
    _run(tiny_q4, whole, propagate=propagate)
    out = tmp_path / "a.gguf"
    with monkeypatch.context() as m:
        _interrupt_after_layer(m, 0)
        with pytest.raises(Interrupted):
            _run(tiny_q4, out, propagate=propagate)
    assert not out.exists() and checkpoint.folder_for(out).is_dir()
    solved: list[str] = []
    one = LayerSolver._solve_one
    monkeypatch.setattr(LayerSolver, "_solve_one", lambda self, st, mod: solved.append(mod) or one(self, st, mod))
    _run(tiny_q4, out, propagate=propagate)
    assert solved and all(".layers.1." in m for m in solved)  # layer 0 came from the checkpoint
    assert out.read_bytes() == whole.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "whole.gguf"]  # checkpoint removed


def test_stale_checkpoint_is_refused(tiny_q4, tmp_path, monkeypatch, capsys):
    out = tmp_path / "a.gguf"
    with monkeypatch.context() as m:
        _interrupt_after_layer(m, 0)
        with pytest.raises(Interrupted):
            _run(tiny_q4, out)
    with pytest.raises(EoraError, match=r"unfinished run with other inputs \(rank differs\)"):
        _run(tiny_q4, out, rank=4)
    capsys.readouterr()
    rc = main(["compensate", "--hf", str(tiny_q4["hf"]), "--gguf", str(tiny_q4["gguf"]), "--calib",
               str(tiny_q4["calib"]), "--samples", "5", "--seqlen", "64", "--rank", "8", "--resume", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("eora-gguf: error: ") and "(calibration differs)" in err[-1]
    assert "delete the folder" in err[-1] and not any("Traceback" in line for line in err)
    assert not out.exists()
    _run(tiny_q4, out)  # the same inputs resume it, and clean up
    assert not checkpoint.folder_for(out).exists()


def test_failure_before_the_first_layer_leaves_nothing(tiny_q4, tmp_path, monkeypatch):
    def fail(self, stats, module):
        raise EoraError("boom")

    monkeypatch.setattr(LayerSolver, "_solve_one", fail)
    with pytest.raises(EoraError, match="boom"):
        _run(tiny_q4, tmp_path / "a.gguf")
    assert list(tmp_path.iterdir()) == []
