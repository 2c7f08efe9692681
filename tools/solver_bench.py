"""Benchmark the fast (certified block Krylov) EoRA solver against the exact one on Llama-3-8B weight shapes.

    nice -n 15 python tools/solver_bench.py --json docs/solver_bench.json
    python tools/solver_bench.py --json docs/solver_bench.json --table     # the README table

Per shape and covariance spectrum, one synthetic problem (seeded): ΔW uniform rounding noise (what a quantizer
leaves), and C either "decay" — diag(s)(I + L Lᵀ)diag(s) with log-normal channel scales s (outlier channels) and a
rank-64 factor L with decaying columns, a full-rank covariance with a steep top like real activations — or
"flat" — C = I, so G = ΔW ΔWᵀ has the Marchenko–Pastur spectrum of a random matrix: the fast solver's worst case
(no gap anywhere). The exact solver runs once per problem at the largest rank: its rank-r solution is the first r
components of that one solve (eora.py), so every rank's exact objective comes from one eigendecomposition; its time
is the time of any rank. The fast solver runs once per rank. Times are the process's CPU seconds (one thread), which
a machine shared with other jobs inflates far less than wall time (the wall time is kept beside them). Objectives
are exact for both, tr(G) - Σ gains with gain_i = a_i C a_iᵀ (eora.component_gains), against the true C. One
thread (as the exact solver runs its eigh).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from eora_gguf import eora, fast_solve  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
RANKS = [16, 64, 128, 256]


def problem(shape: tuple[int, int], spectrum: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    d_out, d_in = shape
    g = torch.Generator().manual_seed(seed)
    dw = (torch.rand(d_out, d_in, generator=g, dtype=torch.float64) - 0.5) * 0.01
    if spectrum == "flat":
        return dw, torch.eye(d_in, dtype=torch.float64)
    s = torch.exp(0.5 * torch.randn(d_in, generator=g, dtype=torch.float64))
    low = torch.randn(d_in, 64, generator=g, dtype=torch.float64) * torch.logspace(0.5, -1.0, 64, dtype=torch.float64)
    c = low @ low.T
    c.diagonal().add_(1.0)
    return dw, c * s[:, None] * s[None, :]


def trace_g(dw: torch.Tensor, c: torch.Tensor, chunk: int = 2048) -> float:
    """tr(ΔW C ΔWᵀ) by row chunks (memory)."""
    return float(sum(float(((part @ c) * part).sum()) for part in dw.split(chunk)))


def captured(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(eora.component_gains(a, c), 0)


def run(shapes, ranks, spectra, eps: float, save) -> list[dict]:
    rows: list[dict] = []
    for spectrum in spectra:  # every shape on the realistic spectrum first, then the worst case
        for shape in shapes:
            dw, c = problem(shape, spectrum)
            tr = trace_g(dw, c)
            top = max(r for r in ranks if r <= min(shape))
            t0, c0 = time.perf_counter(), time.process_time()
            _, a = eora.eora(dw, c, top)
            t_exact, cpu_exact = time.perf_counter() - t0, time.process_time() - c0
            cap_exact = captured(a, c)
            logging.info("%s %s: exact %.1f s CPU", shape, spectrum, cpu_exact)
            for r in ranks:
                if r > min(shape):
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                _, af, cert = fast_solve.fast_eora(dw, c, r, eps=eps)
                t_fast, cpu_fast = time.perf_counter() - t0, time.process_time() - c0
                e_exact = tr - float(cap_exact[r - 1])
                e_fast = tr - float(captured(af, c)[-1])
                row = {"shape": list(shape), "spectrum": spectrum, "rank": r,
                       "exact_cpu_s": round(cpu_exact, 2), "fast_cpu_s": round(cpu_fast, 2),
                       "speedup": round(cpu_exact / cpu_fast, 1),
                       "exact_wall_s": round(t_exact, 2), "fast_wall_s": round(t_fast, 2),
                       "objective_exact": e_exact, "objective_fast": e_fast,
                       "rel_excess": e_fast / e_exact - 1.0, "certified_bound": cert.rel_excess_bound,
                       "certified": cert.certified, "krylov_columns": cert.columns,
                       "auto_picks_fast": fast_solve.use_fast("auto", shape, r)}
                logging.info("%s", row)
                rows.append(row)
            save(rows)  # after every problem: a long run that is stopped keeps what it measured
    return rows


def table(path: str) -> str:
    """The README table (Markdown) of a result file."""
    data = json.loads(Path(path).read_text())
    lines = ["| weight (d_out × d_in) | C spectrum | rank | exact CPU s | fast CPU s | speed-up | objective vs exact | "
             "certified bound | Krylov columns |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['shape'][0]} × {r['shape'][1]} | {r['spectrum']} | {r['rank']} | {r['exact_cpu_s']:.1f} | "
                     f"{r['fast_cpu_s']:.1f} | {r['speedup']:.1f}× | {100 * r['rel_excess']:+.3f}% | "
                     f"{'≤ %.2f%%' % (100 * r['certified_bound']) if r['certified'] else 'none: exact fallback'} | "
                     f"{r['krylov_columns']} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--table", action="store_true", help="print the Markdown table of an existing --json file")
    ap.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES))
    ap.add_argument("--ranks", default=",".join(map(str, RANKS)))
    ap.add_argument("--spectra", default="decay,flat")
    ap.add_argument("--eps", type=float, default=fast_solve.EPS)
    args = ap.parse_args()
    if args.table:
        print(table(args.json))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    t0 = time.perf_counter()

    def save(rows: list[dict]) -> None:
        out = {"tool": "tools/solver_bench.py", "eps": args.eps, "threads": 1, "machine": platform.machine(),
               "torch": torch.__version__, "wall_s": round(time.perf_counter() - t0, 1),
               "load_average_1min": os.getloadavg()[0], "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")

    run(shapes, ranks, args.spectra.split(","), args.eps, save)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
