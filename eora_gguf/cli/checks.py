"""Argument checks: everything a verb can check is checked before its work starts (one-line EoraErrors)."""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import EoraError

# option -> (smallest, largest) accepted value; None values (option not given) are not checked
_LIMITS = {"ctx": (16, 1 << 20), "chunks": (0, 1 << 24), "threads": (1, 1024), "samples": (1, 1 << 24),
           "seqlen": (2, 1 << 20), "rows": (1, 1 << 24), "limit": (1, 1 << 31), "max_new": (1, 1 << 16)}


def check_numbers(args: argparse.Namespace) -> None:
    for name, (lo, hi) in _LIMITS.items():
        value = getattr(args, name, None)
        if value is not None and not lo <= value <= hi:
            raise EoraError(f"--{name.replace('_', '-')} must lie in [{lo}, {hi}], got {value}")
    floor = getattr(args, "eig_floor", None)
    if floor is not None and not (math.isfinite(floor) and 0.0 <= floor < 1.0):
        raise EoraError(f"--eig-floor must lie in [0, 1), got {floor}")


def check_text(spec: str | None, what: str) -> None:
    """A user's text file must be non-empty UTF-8 (llama-perplexity aborts on other bytes)."""
    if spec is None or spec in ("eval", "demo") and not Path(spec).is_file():
        return
    p = Path(spec)
    if not p.is_file():
        raise EoraError(f"{what} {spec} does not exist (built-in names: eval, demo)")
    data = p.read_bytes()
    if not data.strip():
        raise EoraError(f"{what} {spec} is empty: give a text of at least --ctx tokens")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EoraError(f"{what} {spec} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): "
                        "convert it, e.g. `iconv -t UTF-8`") from None


def check_memory(hf: str | os.PathLike[str] | None, samples: int, seqlen: int) -> None:
    """Refuse a calibration whose activations cannot fit in memory (instead of failing after the model load)."""
    from ..hf_model import read_config_json

    if hf is None or not Path(hf).is_dir():
        return
    cfg = read_config_json(Path(hf))
    hidden = cfg.get("text_config", cfg).get("hidden_size") if isinstance(cfg.get("text_config", cfg), dict) else None
    if not isinstance(hidden, int) or hidden <= 0:
        return
    need = 4 * samples * seqlen * hidden * 4  # float32 activations of all samples: input, output, two buffers
    avail = _available_memory()
    if avail and need > avail:
        raise EoraError(f"--samples {samples} x --seqlen {seqlen} needs about {need / 2**30:.1f} GiB for the "
                        f"activations, {avail / 2**30:.1f} GiB is available: lower --samples or --seqlen")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_hf(hf: str, *, tokenizer: bool = True) -> None:
    """The HF folder's files, then that we support its architecture, then its tokenizer: one line each."""
    from ..hf_model import check_model_folder, check_tokenizer_files, load_config
    from ..naming import NameMap

    check_model_folder(hf, tokenizer=False)
    NameMap.from_config(load_config(hf))
    if tokenizer:
        check_tokenizer_files(hf)


def output_sizes(hf: str, rank: int = 0) -> tuple[int, int, int]:
    """Expected bytes of (calibration statistics, GGUF adapter at F16 / F32, PEFT folder) for this model."""
    from ..hf_model import load_config
    from ..naming import LINEAR_MODULES, NameMap

    dims = NameMap.from_config(load_config(hf)).dims
    shapes = [dims.linear_shape(m) for m in LINEAR_MODULES]
    # one covariance (float64) per input site: q/k/v share one, gate/up share one
    stats = 8 * dims.n_layers * (2 * dims.hidden ** 2 + (dims.n_head * dims.head_dim) ** 2 + dims.ffn ** 2)
    factors = dims.n_layers * sum(rank * (d_out + d_in) for d_out, d_in in shapes)
    return stats, 4 * factors, 4 * factors


def check_gguf_inputs(model: str, loras: Sequence[str] = ()) -> None:
    """Open the model GGUF and check each adapter against it with our reader: one line naming the file."""
    from ..adapter import check_gguf_lora
    from ..gguf_io import open_gguf

    with open_gguf(model) as base:
        for lora in loras:
            check_gguf_lora(lora, base, require_unit_scale=False)
