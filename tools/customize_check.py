"""Does a task-calibrated EoRA adapter beat the general one on its own task? SmolLM2, one base, three adapters.

`eora-gguf make` builds one base (SmolLM2-135M-Instruct, --quant, importance matrix from the general text) and one
adapter per calibration spec: `general` (demo: SQuAD paragraphs), `arc` (ARC-Easy + ARC-Challenge validation
questions with their answers) and `gsm8k` (GSM8K problems with worked answers, items 400..end). Each adapter is
then judged on held-out text of every kind, disjoint from all calibration data — LAMBADA (`eval.txt`), the
ARC-Challenge test split and GSM8K items 4..399, each rendered as calibration renders records (question, newline,
answer) — by mean KL divergence to the F16 model, and on ARC-Challenge test accuracy (acc_norm, first --limit
questions). Noise: the standard error of a KLD difference (from the two means' standard errors, as if independent:
conservative, the two are measured on the same tokens), and with --draws 2 every adapter is made a second time from
a second, disjoint draw of calibration windows from the same sources (calib_data draw 1: no window of draw 0, none
of the held-out texts) against the same base: the spread between the two draws is the run-to-run noise. A
difference counts when it exceeds both.

    python tools/customize_check.py --json docs/customize.json [--quant Q2_K] [--rank 32] [--samples 32] [--draws 2]

Everything is cached under --workdir (default eora-customize/): a re-run measures only what is missing.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eora_gguf import assets, calib_data, compensate, llama_eval, llamacpp  # noqa: E402
from eora_gguf.errors import atomic_output  # noqa: E402
from eora_gguf.evaluate import evaluate  # noqa: E402
from eora_gguf.make import CalibSpec, make  # noqa: E402

log = logging.getLogger("customize_check")

GSM8K_HELD_OUT = (4, 400)  # items 0..3 are the evaluation's worked examples; 4..399 held out; 400.. calibration


def held_out_texts(work: Path) -> dict[str, Path]:
    """The evaluation texts, written once: general (LAMBADA), arc (ARC-Challenge test), gsm8k (items 4..399)."""
    rows = [json.loads(ln) for ln in assets.data_file("gsm8k").read_text().splitlines() if ln.strip()]
    calib = work / "gsm8k_calib.jsonl"
    if not calib.is_file():
        calib.write_text("".join(json.dumps(r) + "\n" for r in rows[GSM8K_HELD_OUT[1]:]))
    texts = {"general": assets.text_file("eval")}
    for name, records in (("arc", [json.loads(ln) for ln in assets.data_file("arc_challenge_test").read_text()
                                   .splitlines() if ln.strip()]),
                          ("gsm8k", rows[GSM8K_HELD_OUT[0]:GSM8K_HELD_OUT[1]])):
        path = work / f"heldout-{name}.txt"
        if not path.is_file():
            path.write_text("\n\n".join(t for t in map(calib_data.record_text, records) if t) + "\n")
        texts[name] = path
    return texts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hf", help="HF model folder (default: the SmolLM2 demo)")
    ap.add_argument("--workdir", default="eora-customize")
    ap.add_argument("--quant", default="Q2_K")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8, help="KLD chunks of 512 tokens per text (default 8)")
    ap.add_argument("--limit", type=int, default=200,
                    help="ARC-Challenge test questions scored (default 200; 0: no accuracy)")
    ap.add_argument("--draws", type=int, default=2, choices=(1, 2), help="calibration draws per adapter (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", required=True, help="output JSON (e.g. docs/customize.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    hf = Path(args.hf) if args.hf else assets.demo_model_dir()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    texts = held_out_texts(work)
    specs = [CalibSpec("general", "demo"), CalibSpec("arc", "arc_easy:1,arc_challenge:1"),
             CalibSpec("gsm8k", str((work / "gsm8k_calib.jsonl").resolve()))]
    out = work / "made"
    made = make(hf, out, quant=args.quant, calibs=specs, rank=args.rank, samples=args.samples, seqlen=args.seqlen,
                threads=args.threads)
    base = out / made["base"]["file"]
    adapters = {(a["name"], 0): out / a["file"] for a in made["adapters"]}
    for s in specs if args.draws > 1 else []:  # a second, disjoint draw of calibration windows, same base
        stats = work / f"calib-{s.name}-{args.samples}x{args.seqlen}-draw1.safetensors"
        if not stats.is_file():
            log.info("calibrating %s, draw 1", s.name)
            compensate.calibrate(hf, s.spec, samples=args.samples, seqlen=args.seqlen, draw=1).save(stats)
        path = work / f"{made['model_name']}-{args.quant}-{s.name}-r{args.rank}-{stats.stem}.gguf"
        if not path.is_file():
            compensate.compensate(hf, base, path, rank=args.rank, stats=stats, name=f"{s.name}-draw1")
        adapters[(s.name, 1)] = path

    llama = llamacpp.locate()
    f16 = out / made["f16"]["file"]
    cache_file = work / "measurements.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}

    def measured(key: str, fn) -> dict:
        if key not in cache:
            cache[key] = fn()
            with atomic_output(cache_file) as tmp:
                tmp.write_text(json.dumps(cache, indent=1))
        return cache[key]

    configs = [("base", None, None)] + [(name, draw, path) for (name, draw), path in adapters.items()]
    rows = [{"adapter": name, "draw": draw, "file": path.name if path else base.name, "lora": [path] if path else [],
             "kld": {}} for name, draw, path in configs]
    for text_name, text in texts.items():  # every KLD first (the verdicts need them), task accuracy after
        ref, _ = llama_eval.kld_base(llama, f16, text, ctx=512, chunks=args.chunks, threads=args.threads,
                                     cache=work / "kld")
        for row in rows:
            def kld(lora=row["lora"], ref=ref) -> dict:
                r = llama_eval.text_eval(llama, base, base=ref, lora=lora, threads=args.threads)
                return {"kld": r.kld, "kld_stderr": r.kld_stderr, "top1": r.top1, "ppl": r.ppl,
                        "ppl_stderr": r.ppl_stderr, "tokens": r.tokens}

            row["kld"][text_name] = measured(f"kld|{row['file']}|{text_name}|{args.chunks}", kld)
            log.info("%s draw %s on %s: KLD %.4f", row["adapter"], row["draw"], text_name,
                     row["kld"][text_name]["kld"])
    for row in rows:
        lora = row.pop("lora")
        if not args.limit:
            continue
        row["arc_challenge"] = measured(
            f"arc|{row['file']}|{args.limit}",
            lambda lora=lora: evaluate(base, lora=lora, task_names=["arc_challenge"], limit=args.limit,
                                              threads=args.threads, llama=llama)["tasks"]["arc_challenge"])

    result = {"model": hf.name, "quant": args.quant, "rank": args.rank, "calib_tokens": args.samples * args.seqlen,
              "draws": args.draws,
              "specs": {s.name: s.spec for s in specs}, "texts": {k: str(v) for k, v in texts.items()},
              "chunks": args.chunks, "arc_limit": args.limit, "base_bytes": base.stat().st_size,
              "rows": rows, "verdicts": verdicts(rows, list(texts)), "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.json) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 0


def verdicts(rows: list[dict], texts: list[str]) -> list[dict]:
    """Per text: its own adapter (same name: general, arc, gsm8k) against the best other one (means over the draws),
    with the noise: the standard error of the difference, and the run-to-run noise from the calibration draws — the
    largest spread between the two draws of one adapter on that text, and the margin measured in each draw alone.
    The own adapter wins when the mean margin exceeds both noises and every draw's margin is positive."""
    def res(name: str, draw: int, text: str) -> dict:
        return next(r["kld"][text] for r in rows if r["adapter"] == name and r["draw"] == draw)

    names = sorted({r["adapter"] for r in rows if r["draw"] is not None})
    draws = sorted({r["draw"] for r in rows if r["draw"] is not None})
    base = next(r["kld"] for r in rows if r["draw"] is None)
    out = []
    for text in texts:
        mean = {n: sum(res(n, d, text)["kld"] for d in draws) / len(draws) for n in names}
        se = {n: max(res(n, d, text)["kld_stderr"] for d in draws) for n in names}
        spreads = {n: abs(res(n, draws[0], text)["kld"] - res(n, draws[-1], text)["kld"]) for n in names}
        spread = max(spreads.values()) if len(draws) > 1 else None
        other = min((n for n in names if n != text), key=mean.get)
        margin = mean[other] - mean[text]
        by_draw = [res(other, d, text)["kld"] - res(text, d, text)["kld"] for d in draws]
        se_diff = (se[other] ** 2 + se[text] ** 2) ** 0.5
        out.append({"text": text, "base_kld": base[text]["kld"], "mean_kld": mean, "own": text,
                    "best_other": other, "margin": margin, "margin_by_draw": by_draw,
                    "stderr_of_difference": se_diff, "draw_spread": spread,
                    "draw_spread_by_adapter": spreads if len(draws) > 1 else None,
                    "wins_beyond_noise": margin > max(se_diff, spread or 0.0) and min(by_draw) > 0})
    return out


def table(result: dict) -> str:
    """Markdown: mean KLD (± stderr) of every adapter and draw on every text, ARC accuracy; then the verdicts."""
    texts = list(result["texts"])
    lines = ["| adapter | draw | " + " | ".join(f"KLD on {t} text" for t in texts) + " | ARC-Challenge acc_norm |",
             "|---|---|" + "---:|" * (len(texts) + 1)]
    for r in result["rows"]:
        cells = [f"{r['kld'][t]['kld']:.4g} ± {r['kld'][t]['kld_stderr']:.2g}" for t in texts]
        arc = r.get("arc_challenge")
        lines.append(f"| {r['adapter']} | {'–' if r['draw'] is None else r['draw']} | " + " | ".join(cells) +
                     (f" | {arc['acc_norm']:.1f} ± {arc['acc_norm_stderr']:.1f} |" if arc else " | – |"))
    lines += ["", "| text | base KLD | own adapter | best other adapter | other − own (KLD) | in each draw | "
              "stderr of difference | draw-to-draw spread | own adapter wins beyond noise |",
              "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for v in result["verdicts"]:
        spread = "–" if v["draw_spread"] is None else f"{v['draw_spread']:.3g}"
        lines.append(f"| {v['text']} | {v['base_kld']:.4g} | {v['own']} {v['mean_kld'][v['own']]:.4g} | "
                     f"{v['best_other']} {v['mean_kld'][v['best_other']]:.4g} | {v['margin']:+.3g} | "
                     + " / ".join(f"{m:+.3g}" for m in v["margin_by_draw"]) + f" | {v['stderr_of_difference']:.3g} | "
                     f"{spread} | {'**yes**' if v['wins_beyond_noise'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
