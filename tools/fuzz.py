#!/usr/bin/env python3
"""Fuzz the GGUF reader, the adapter reader and every public native entry point under ASan + UBSan.

    python tools/fuzz.py --seconds 60                 # CI's short run (.ci/run)
    nice -n 19 python tools/fuzz.py --seconds 3600 --coverage --json fuzz.json   # the long run

Builds libeora_native with -fsanitize=address,undefined (EORA_SANITIZE; with --coverage also gcov
instrumentation) into build/fuzz-asan[-cov], then runs the hypothesis targets of tests/fuzz_targets.py in a child
Python with the sanitizer runtime preloaded (LD_PRELOAD=libasan.so, which must come first in the process). Targets
take turns in rounds of a few hundred examples until the time is up. A sanitizer report or a non-typed exception
stops the run with the falsifying example; the exit status is then non-zero. The JSON summary gives executions
and executions per second per target, and with --coverage the line coverage of native/src reached (gcov).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(coverage: bool) -> Path:
    build_dir = ROOT / "build" / ("fuzz-asan-cov" if coverage else "fuzz-asan")
    flags = ["-DEORA_SANITIZE=address,undefined", "-DCMAKE_BUILD_TYPE=Debug", "-DEORA_CUDA=OFF"]
    if coverage:
        flags += ["-DCMAKE_C_FLAGS=--coverage", "-DCMAKE_SHARED_LINKER_FLAGS=--coverage"]
    cmake = shutil.which("cmake") or "cmake"
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *flags], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build_dir), "-j", "2"], check=True, stdout=subprocess.DEVNULL)
    if coverage:  # start from zero counters
        for f in build_dir.rglob("*.gcda"):
            f.unlink()
    return build_dir / "native" / "libeora_native.so"


def sanitizer_runtime() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or "cc"
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not path or not Path(path).exists():
        sys.exit(f"fuzz: {cc} has no libasan.so (install the compiler's sanitizer runtime, e.g. libasan8)")
    return str(Path(path).resolve())


def gcov_coverage(build_dir: Path) -> dict:
    """Lines executed / executable lines over native/src/*.c (all ISA variants of a kernel file merged)."""
    gcov = shutil.which("gcov")
    if not gcov:
        return {}
    per_file: dict[str, tuple[set[int], set[int]]] = {}
    for gcda in build_dir.rglob("*.gcda"):
        res = subprocess.run([gcov, "--json-format", "--stdout", str(gcda)], capture_output=True, text=True,
                             cwd=gcda.parent)
        for line in res.stdout.splitlines():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            for f in doc.get("files", []):
                name = Path(f["file"]).name
                if "native/src" not in f["file"] and not (ROOT / "native" / "src" / name).exists():
                    continue
                lines, hit = per_file.setdefault(name, (set(), set()))
                for ln in f.get("lines", []):
                    lines.add(ln["line_number"])
                    if ln["count"] > 0:
                        hit.add(ln["line_number"])
    total = sum(len(v[0]) for v in per_file.values())
    covered = sum(len(v[1]) for v in per_file.values())
    return {"native_lines": total, "native_lines_hit": covered,
            "native_line_coverage": round(covered / total, 4) if total else None,
            "per_file": {k: f"{len(v[1])}/{len(v[0])}" for k, v in sorted(per_file.items())}}


def _counted(fn, counts: dict[str, int], name: str):
    def body(data) -> None:
        counts[name] += 1
        fn(data)
    return body


def child(args: argparse.Namespace) -> int:
    """Run the targets round-robin until the deadline; print one JSON line per target at the end."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT))
    import warnings

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import fuzz_targets as ft

    warnings.simplefilter("ignore")  # numpy's overflow/invalid warnings on random floats
    ft.replay_regressions()  # earlier findings first: under the sanitizers they abort if they come back
    seeds = ft.Seeds()
    counts = {name: 0 for name in args.targets}
    spent = {name: 0.0 for name in args.targets}
    funcs = {"gguf": lambda d: ft.target_gguf(seeds, d), "adapter": lambda d: ft.target_adapter(seeds, d),
             "native": ft.target_native, "kernels": ft.target_kernels}
    deadline = time.monotonic() + args.seconds
    per_round = settings(max_examples=args.round, deadline=None, database=None, derandomize=False,
                         suppress_health_check=list(HealthCheck))
    while time.monotonic() < deadline:
        for name in args.targets:
            t0 = time.monotonic()
            given(st.data())(per_round(_counted(funcs[name], counts, name)))()
            spent[name] += time.monotonic() - t0
            if time.monotonic() >= deadline:
                break
    shutil.rmtree(seeds.dir, ignore_errors=True)
    print(json.dumps({"targets": {n: {"executions": counts[n], "seconds": round(spent[n], 1),
                                      "exec_per_s": round(counts[n] / max(spent[n], 1e-9), 1)}
                                  for n in args.targets}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="total fuzzing time (default 60)")
    p.add_argument("--targets", default="gguf,adapter,native,kernels", help="comma-separated: gguf, adapter, "
                   "native, kernels (default all)")
    p.add_argument("--round", type=int, default=200, help="examples per target per turn (default 200)")
    p.add_argument("--coverage", action="store_true", help="also build with gcov and report native line coverage")
    p.add_argument("--no-sanitizer", action="store_true", help="use EORA_GGUF_LIB / the installed library as is")
    p.add_argument("--json", metavar="FILE", help="also write the summary here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - {"gguf", "adapter", "native", "kernels"}
    if unknown or args.seconds <= 0 or args.round < 1:
        p.error(f"unknown targets {sorted(unknown)}" if unknown else "--seconds and --round must be positive")
    if args.child:
        return child(args)

    env = dict(os.environ)
    build_dir = None
    if not args.no_sanitizer:
        lib = build(args.coverage)
        build_dir = lib.parent.parent
        env.update(EORA_GGUF_LIB=str(lib), LD_PRELOAD=sanitizer_runtime(),
                   # Python itself leaks by design; stop at the first error with a stack trace
                   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:allocator_may_return_null=1",
                   UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--seconds", str(args.seconds),
           "--targets", ",".join(args.targets), "--round", str(args.round)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    summary: dict = {"seconds": round(wall, 1), "sanitizers": None if args.no_sanitizer else "address,undefined",
                     "exit": res.returncode}
    last = (res.stdout.strip().splitlines() or ["{}"])[-1]
    try:
        summary.update(json.loads(last))
    except json.JSONDecodeError:
        summary["output_tail"] = res.stdout[-2000:]
    if "targets" in summary:
        total = sum(t["executions"] for t in summary["targets"].values())
        summary["executions"] = total
        summary["exec_per_s"] = round(total / max(wall, 1e-9), 1)
    if args.coverage and build_dir is not None:
        summary["coverage"] = gcov_coverage(build_dir)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if res.returncode != 0:
        print(f"fuzz: the run stopped with exit {res.returncode}: a finding (see the output above)", file=sys.stderr)
    return 1 if res.returncode != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
