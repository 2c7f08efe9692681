"""`eora-gguf make`: from a Hugging Face folder to a folder that is ready to run — one quantized base GGUF, one EoRA
adapter per calibration spec, their PEFT folders on request, and a model card with what was measured and the
llama.cpp commands to run it.

    OUT_DIR/<model>-<QUANT>.gguf              the base: llama-quantize with an importance matrix made from the first
                                              calibration spec's statistics (unless imatrix=False)
    OUT_DIR/<model>-<QUANT>-<name>.gguf       one GGUF LoRA adapter per calibration spec, all against that base
    OUT_DIR/peft-<name>/                      the same adapter as a PEFT folder (peft=True)
    OUT_DIR/README.md, OUT_DIR/make.json      the model card, and every number in it with how each file was made
    OUT_DIR/work/                             intermediates: F16 GGUF, calibration statistics, imatrix, KLD reference

Each step records a key of its inputs (file identities and settings) in `work/steps.json`; running again with the
same inputs reuses every finished step, and a changed input redoes the steps that depend on it. The building
blocks are the package's own: `llama_tools.convert/quantize`, `compensate.calibrate/compensate`,
`imatrix.write_imatrix`, `llama_eval.kld_base/text_eval`, `serve.card_commands`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__, compensate, imatrix, llama_eval, llama_tools, llamacpp, serve
from .budget import Budget
from .errors import EoraError, atomic_output, check_output
from .hf_model import load_config, model_identity
from .info import describe
from .naming import NameMap
from .solver import check_rank
from .stats import CalibrationStats

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class CalibSpec:
    """One `--calib [NAME=]SPEC`: the adapter's name and its calibration spec (calib_data syntax)."""

    name: str
    spec: str

    @classmethod
    def parse(cls, text: str) -> CalibSpec:
        name, sep, spec = text.partition("=")
        if not sep:
            name, spec = _default_name(text), text
        name, spec = name.strip(), spec.strip()
        if not spec:
            raise EoraError(f"--calib {text!r} names no calibration data: write NAME=SPEC, e.g. general=demo")
        if not _NAME.match(name):
            raise EoraError(f"--calib {text!r}: the adapter name {name!r} must be letters, digits, '_', '-' or '.' "
                            "(it becomes part of the file name)")
        return cls(name, spec)


def _default_name(spec: str) -> str:
    """A file-name-safe name for a spec given without NAME=: `arc_challenge:1,demo:1` -> `arc_challenge-demo`."""
    parts = [Path(p.split(":")[0].strip()).stem.removesuffix(".jsonl").removesuffix(".txt") for p in spec.split(",")]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(p for p in parts if p))[:64] or "adapter"


def parse_calibs(texts: Sequence[str]) -> list[CalibSpec]:
    specs = [CalibSpec.parse(t) for t in texts]
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise EoraError(f"two --calib specs are named {s.name!r}: give each its own NAME=")
        seen.add(s.name)
    return specs


class Steps:
    """Which outputs are up to date: `steps.json` maps each output to the key of the inputs it was made from."""

    def __init__(self, path: Path, force: bool = False) -> None:
        self.path, self.force = path, force
        self.keys: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, output: Path, key: str, make: Callable[[], object]) -> bool:
        """Make `output` unless it exists with this key; True when it was made now."""
        if not self.force and output.exists() and self.keys.get(output.name) == key:
            log.info("reusing %s", output.name)
            return False
        make()
        self.keys[output.name] = key
        with atomic_output(self.path) as tmp:
            tmp.write_text(json.dumps(self.keys, indent=1))
        return True


def file_key(*paths: Path) -> list:
    """A file's identity for reuse decisions: path, size and modification time."""
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make(hf_dir: Path, out_dir: Path, *, quant: str, calibs: Sequence[CalibSpec], rank: int | None = None,
         budget: str | None = None, method: str = "eora", adapter_type: str | None = None, samples: int = 32,
         seqlen: int = 512, use_imatrix: bool = True, peft: bool = False, text: Path | None = None, ctx: int = 512,
         chunks: int | None = 16, threads: int | None = None, port: int = 8080,
         prompt: str = "The capital of France is", force: bool = False, verbose: bool = False) -> dict:
    """Run every step (see the module docstring); returns the content of make.json plus `seconds` and `output`."""
    t0 = time.perf_counter()
    if not calibs:
        raise EoraError("give at least one --calib [NAME=]SPEC")
    quant = quant.upper()
    if quant not in llama_tools.QUANT_TYPES:
        raise EoraError(f"unknown --quant {quant!r}: choose one of {', '.join(llama_tools.QUANT_TYPES)}")
    if (rank is None) == (budget is None):
        raise EoraError("give --rank R (every tensor) or --budget SPEC (ranks chosen per tensor), not both")
    names = NameMap.from_config(load_config(hf_dir))
    if rank is not None:
        check_rank(names, rank)
    else:
        Budget.parse(budget)
    if not 1 <= port <= 65535:
        raise EoraError(f"--port must lie in [1, 65535], got {port}")
    dest, src = out_dir.resolve(), hf_dir.resolve()
    if dest == src or src in dest.parents:
        raise EoraError(f"-o {out_dir} lies inside the input folder {hf_dir}: write it elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise EoraError(f"-o {out_dir} is a file: give a folder")
    if not dest.parent.is_dir():
        raise EoraError(f"the folder {out_dir.parent} of -o {out_dir} does not exist: create it first")
    out_dir.mkdir(exist_ok=True)
    check_output(out_dir / "README.md", inputs=[hf_dir, text])
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    llama = llamacpp.locate(progress=not verbose)
    steps = Steps(work / "steps.json", force=force)
    stem = hf_dir.resolve().name

    f16 = work / "model-F16.gguf"
    hf_key = _key(model_identity(hf_dir))
    steps.run(f16, hf_key, lambda: llama_tools.convert(llama, hf_dir, f16, outtype="f16", verbose=verbose))

    stats: dict[str, Path] = {}
    for c in calibs:
        stats[c.name] = work / f"calib-{c.name}.safetensors"

        def calibrate(c: CalibSpec = c) -> None:
            log.info("calibrating %s on %s (%d x %d tokens)", c.name, c.spec, samples, seqlen)
            compensate.calibrate(hf_dir, c.spec, samples=samples, seqlen=seqlen).save(stats[c.name])

        steps.run(stats[c.name], _key(hf_key, c.spec, samples, seqlen), calibrate)

    imatrix_file = None
    if use_imatrix:
        imatrix_file = work / "imatrix.gguf"
        first = calibs[0]
        steps.run(imatrix_file, _key(file_key(stats[first.name])), lambda: imatrix.write_imatrix(
            CalibrationStats.load(stats[first.name]), names, imatrix_file, datasets=[first.spec]))

    base = out_dir / f"{stem}-{quant}.gguf"
    steps.run(base, _key(file_key(f16), quant, file_key(imatrix_file) if imatrix_file else None),
              lambda: llama_tools.quantize(llama, f16, base, quant, imatrix=imatrix_file, threads=threads,
                                        verbose=verbose))

    adapters: dict[str, Path] = {}
    for c in calibs:
        out = adapters[c.name] = out_dir / f"{stem}-{quant}-{c.name}.gguf"
        peft_dir = out_dir / f"peft-{c.name}" if peft else None

        def solve(c: CalibSpec = c, out: Path = out, peft_dir: Path | None = peft_dir) -> None:
            log.info("solving adapter %s (%s)", c.name, f"rank {rank}" if rank else f"budget {budget}")
            compensate.compensate(hf_dir, base, out, rank=rank, budget=budget, method=method, stats=stats[c.name],
                                  adapter_type=adapter_type, peft_dir=peft_dir, name=c.name)

        key = _key(file_key(base, stats[c.name]), rank, budget, method, adapter_type, peft, c.name)
        if not steps.run(out, key, solve) and peft_dir is not None and not peft_dir.is_dir():
            steps.keys.pop(out.name)
            steps.run(out, key, solve)

    measured = _measure(llama, f16, base, adapters, text, work, steps, ctx=ctx, chunks=chunks, threads=threads,
                        verbose=verbose) if text is not None else None
    result = {"eora_gguf": __version__, "hf_dir": str(hf_dir), "model_name": stem, "quant": quant,
              "imatrix": imatrix_file is not None, "imatrix_calib": calibs[0].spec if imatrix_file else None,
              "method": method, "rank": rank, "budget": budget, "samples": samples, "seqlen": seqlen,
              "base": {"file": base.name, "bytes": base.stat().st_size},
              "adapters": [_adapter_entry(c, adapters[c.name], peft) for c in calibs],
              "f16": {"file": str(f16.relative_to(out_dir)), "bytes": f16.stat().st_size},
              "measured": measured, "port": port, "prompt": prompt,
              "llama_cpp_bin": str(llama.bin_dir)}
    result["commands"] = serve.card_commands(base.name, [(c.name, adapters[c.name].name) for c in calibs],
                                             bin_dir=llama.bin_dir, port=port, prompt=prompt)
    readme = model_card(result)
    with atomic_output(out_dir / "make.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    with atomic_output(out_dir / "README.md") as tmp:
        tmp.write_text(readme)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    result["output"] = str(out_dir)
    return result


def _adapter_entry(c: CalibSpec, path: Path, peft: bool) -> dict:
    """What make.json says of one adapter: read back from the file (so a reused adapter is described alike)."""
    d = describe(path)
    return {"name": c.name, "calib": c.spec, "file": path.name, "bytes": d["bytes"], "pairs": d["pairs"],
            "rank_min": d["rank_min"], "rank_max": d["rank_max"], "rank_mean": d["rank_mean"],
            "storage_types": d["storage_types"], "recorded": d["eora"], "peft": f"peft-{c.name}" if peft else None}


def _measure(llama: llamacpp.LlamaCpp, f16: Path, base: Path, adapters: dict[str, Path], text: Path, work: Path,
             steps: Steps, *, ctx: int, chunks: int | None, threads: int | None, verbose: bool) -> dict:
    """KL divergence to the F16 model, top-1 agreement and perplexity over `text`: the base alone and with each
    adapter (llama_eval's libllama client, llama-perplexity's chunks), cached in work/measured.json."""
    ref_file, ref = llama_eval.kld_base(llama, f16, text, ctx=ctx, chunks=chunks, threads=threads,
                                        cache=work / "kld", verbose=verbose)
    cache_file = work / "measured.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    rows = [{"model": "F16", "adapter": None, "kld": 0.0, "kld_stderr": 0.0, "top1": 1.0, "ppl": ref.ppl,
             "ppl_stderr": ref.ppl_stderr}]
    for name, lora in [(None, None), *adapters.items()]:
        files = [base] + ([lora] if lora else [])
        key = _key(file_key(*files, ref_file))
        if key not in cache:
            log.info("measuring %s%s over %s", base.name, f" + {lora.name}" if lora else "", text.name)
            r = llama_eval.text_eval(llama, base, base=ref_file, lora=[lora] if lora else [], threads=threads,
                                     verbose=verbose)
            cache[key] = {"kld": r.kld, "kld_stderr": r.kld_stderr, "top1": r.top1, "ppl": r.ppl,
                          "ppl_stderr": r.ppl_stderr}
            with atomic_output(cache_file) as tmp:
                tmp.write_text(json.dumps(cache, indent=1))
        rows.append({"model": base.name, "adapter": name, **cache[key]})
    return {"text": str(text), "ctx": ref.ctx, "chunks": ref.chunks, "tokens_scored": ref.tokens, "rows": rows}


def model_card(r: dict) -> str:
    """README.md of the output folder; every number comes from `r` (the content of make.json)."""
    how = f"rank {r['rank']}" if r["rank"] else f"budget {r['budget']}"
    lines = [f"# {r['model_name']} — {r['quant']} + EoRA adapters", "",
             f"Made by `eora-gguf make` (eora-gguf {r['eora_gguf']}) from `{r['hf_dir']}`. The base is "
             f"llama-quantize's {r['quant']}" + (f" with an importance matrix from `{r['imatrix_calib']}`" if
                                                 r["imatrix"] else "") +
             f"; each adapter is an EoRA correction ({r['method']}, {how}) of that base's quantization error, "
             f"calibrated on its own data ({r['samples']} × {r['seqlen']} tokens). Stock llama.cpp loads them with "
             "`--lora`; scale 1 is built in.", "",
             "| file | what | MB |", "|---|---|---:|",
             f"| `{r['base']['file']}` | base GGUF | {r['base']['bytes'] / 1e6:.2f} |"]
    for a in r["adapters"]:
        rank = (str(a["rank_max"]) if a["rank_min"] == a["rank_max"]
                else f"{a['rank_min']}–{a['rank_max']} (mean {a['rank_mean']})")
        tokens = a["recorded"].get("eora.calibration_tokens")
        lines.append(f"| `{a['file']}` | adapter `{a['name']}`: calibration `{a['calib']}`"
                     + (f" ({tokens} tokens)" if tokens else "") + f", rank {rank}, "
                     + ", ".join(a["storage_types"]) + f" | {a['bytes'] / 1e6:.2f} |")
    if any(a["peft"] for a in r["adapters"]):
        lines += ["", "PEFT folders (HF row order, for transformers + peft): " +
                  ", ".join(f"`{a['peft']}/`" for a in r["adapters"] if a["peft"]) + "."]
    lines += ["", "`eora-gguf info FILE.gguf` prints what each adapter records (method, ranks, calibration, base "
              "sha256); `eora-gguf info ADAPTER.gguf --base BASE.gguf` checks that it fits a base.", ""]
    m = r["measured"]
    lines += ["## Measured", ""]
    if m is None:
        lines += ["Nothing was measured: run `eora-gguf make` with `--text FILE` to measure each adapter's KL "
                  "divergence to the F16 model on your evaluation text.", ""]
    else:
        lines += [f"On `{Path(m['text']).name}` ({m['chunks']} chunks × {m['ctx']} tokens, "
                  f"{m['tokens_scored']} scored, "
                  "as llama-perplexity scores them): mean KL divergence to the F16 model, top-1 agreement with it, "
                  "perplexity.", "", "| model | adapter | KLD to F16 | ± | top-1 % | perplexity | ± |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for row in m["rows"]:
            lines.append(f"| {row['model']} | {row['adapter'] or '–'} | {row['kld']:.4g} | {row['kld_stderr']:.2g} "
                         f"| {100 * row['top1']:.1f} | {row['ppl']:.3f} | {row['ppl_stderr']:.3f} |")
        lines.append("")
    c = r["commands"]
    lines += ["## Run it", "", "From this folder, with the llama.cpp these files were made with on the PATH:", "",
              "```sh", c["path"], "```", "", "One adapter, one prompt (`llama-cli` without `-p`/`-st` gives an "
              "interactive chat; `llama-completion` continues plain text):", "", "```sh", c["cli"],
              c["completion"], "```", "",
              "Every adapter in one server, each request choosing its adapter. The adapters are loaded at scale 0 "
              "(`--lora-scaled`); a request's `lora` list sets the scales for that request only (ids in the order "
              "loaded, listed by `/lora-adapters`). `--cache-ram 0` turns off the server's RAM prompt cache, which "
              "at this llama.cpp restores a saved prompt state by its tokens alone, whatever adapter computed it; "
              "always send an explicit `lora` list, for the base alone too (every scale 0): a request without one runs "
              "with the start-up scales but keeps the prompt state the previous request's adapter computed:", "",
              "```sh", c["server"], "```", "", "```sh", c["wait"], *c["requests"], c["list"], "```", ""]
    return "\n".join(lines)


__all__ = ["CalibSpec", "make", "model_card", "parse_calibs"]
