"""Wall time of a ladder run per step, read from its folder (a ladder resumed across code versions has no
complete `timings.json`; every step leaves files whose times and measured seconds add up to it).

    python tools/ladder_wall_time.py LADDER_DIR [--json docs/ladder/wall_time.json]

calibrate: the statistics file's time after the F16 conversion; quantize: from the F16 reference to the last stock
quantization; measurements: `measurements.json`'s own seconds per KLD run; solves: each pair row's
`adapter_seconds` (solve + Fisher importance + allocation on a base's first budget, allocation alone after).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ladder_dir", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    d = args.ladder_dir
    mt = lambda name: (d / name).stat().st_mtime  # noqa: E731
    meas = json.loads((d / "measurements.json").read_text())
    stock = [v["seconds"] for k, v in meas.items() if len(json.loads(k)) == 1]
    pairs = [v["seconds"] for k, v in meas.items() if len(json.loads(k)) > 1]
    quants = [p for p in d.glob("model-*.gguf") if "F16" not in p.name and "refine" not in p.name]
    lad = json.loads((d / "ladder.json").read_text())
    solves = [r["adapter_seconds"] for r in lad["rows"] if r["kind"] == "eora" and r.get("adapter_seconds", 0) > 60]

    def spread(xs: list[float]) -> dict:
        return {"n": len(xs), "sum": round(sum(xs), 1), "median": round(statistics.median(xs), 1),
                "min": round(min(xs), 1), "max": round(max(xs), 1)} if xs else {"n": 0}

    out = {"ladder_dir": str(d), "calibrate_seconds": round(mt("calibration.safetensors") - mt("model-F16.gguf"), 1),
           "calib_tokens": lad.get("calib_tokens"),
           "quantize_seconds": round(max(p.stat().st_mtime for p in quants) - mt("kld"), 1),
           "quantized_files": len(quants), "stock_measurement_seconds": spread(stock),
           "pair_measurement_seconds": spread(pairs), "solve_seconds_per_base": spread(solves),
           "reference_seconds": lad.get("reference_seconds"), "chunks": lad["chunks"], "ctx": lad["ctx"],
           "invocations_recorded": lad.get("invocations", [])}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
