#!/usr/bin/env bash
# Everything a GPU session must do for the CUDA kernels (issue #5), in one go:
#   1. build eora_native with CUDA for this GPU's architecture (EORA_CUDA=ON: fails loudly without nvcc),
#      unless EORA_GGUF_LIB already names a CUDA build (e.g. one built elsewhere with -DCMAKE_CUDA_ARCHITECTURES=90);
#   2. run the CUDA tests (marker `cuda`) and the CPU kernel tests against that library;
#   3. run the CUDA benchmark (quick acceptance row, then the full grid unless QUICK=1);
#   4. print the acceptance checks: batch-1 fused >= 1.4x unfused, Q4_K 4096x14336 r64 >= 70% of peak bandwidth.
# Needs: an NVIDIA GPU + driver, python with numpy/gguf/cffi/pytest and a CUDA build of torch; for step 1 also
# cmake >= 3.22, ninja (or make) and nvcc. Results go to $OUT (or ./gpu-check-out).
#
#   bash tools/gpu_check.sh                  # everything
#   QUICK=1 bash tools/gpu_check.sh          # acceptance row only
#   PROFILE=1 bash tools/gpu_check.sh        # plus an Nsight Compute profile of the acceptance kernel (needs ncu)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
fail=0
step() { echo; echo "== $*"; }

step "GPU"
if ! nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader; then
  echo "nvidia-smi failed: no GPU or driver here" >&2
  exit 2
fi
arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d ' .')"
python3 -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA'; print('torch', torch.__version__, torch.version.cuda)" \
  || { echo "install a CUDA build of torch first (README)" >&2; exit 2; }

step "build (sm_${arch})"
if [ -n "${EORA_GGUF_LIB:-}" ] && [ -f "$EORA_GGUF_LIB" ]; then
  echo "using EORA_GGUF_LIB=$EORA_GGUF_LIB (no build)"
else
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  start=$(date +%s)
  cmake -S . -B build/gpu "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DEORA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
    > "$out/build.log" 2>&1 && cmake --build build/gpu -j >> "$out/build.log" 2>&1 \
    || { tail -30 "$out/build.log"; echo "build failed (log: $out/build.log)" >&2; exit 2; }
  echo "built in $(( $(date +%s) - start )) s"
  export EORA_GGUF_LIB="$PWD/build/gpu/native/libeora_native.so"
fi
python3 -c "from eora_gguf import kernels; print(kernels.cuda_describe()); assert kernels.cuda_available()" \
  || { echo "eora_native sees no CUDA device" >&2; exit 2; }

step "tests: CUDA kernels (-m cuda), then the CPU kernels against the same library"
export EORA_GGUF_REQUIRE_NATIVE=1
python3 -m pytest tests/test_cuda.py -m cuda -q -rs --junitxml="$out/cuda-tests.xml" || fail=1
python3 -m pytest tests/test_cuda.py tests/test_kernels.py tests/test_native.py -q -m "not cuda" || fail=1

step "benchmark: acceptance row"
python3 tools/bench_fused.py --cuda --quick --json "$out/bench_cuda_quick.json" --markdown "$out/bench_cuda_quick.md" || fail=1
if [ "${QUICK:-0}" != 1 ]; then
  step "benchmark: full grid (Llama-3-8B shapes, batch 1/4/16, rank 32/64/128, all CUDA types)"
  python3 tools/bench_fused.py --cuda --json "$out/bench_cuda.json" --markdown "$out/bench_cuda.md" || fail=1
fi

if [ "${PROFILE:-0}" = 1 ]; then
  step "profile: fused_kernel, Q4_K 4096x14336 r64 batch 1 (ncu)"
  if command -v ncu >/dev/null; then
    ncu --kernel-name regex:fused_kernel --launch-skip 20 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy --section WarpStateStats \
        python3 tools/bench_fused.py --cuda --quick --iters 5 --rounds 1 --json "$out/profile_run.json" \
        > "$out/ncu_fused_q4k.txt" 2>&1 && tail -60 "$out/ncu_fused_q4k.txt" || echo "ncu failed (see $out/ncu_fused_q4k.txt)"
  else
    echo "ncu not installed: skipped"
  fi
fi

step "acceptance"
python3 - "$out" <<'EOF' || fail=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
full = out / "bench_cuda.json"
data = json.loads((full if full.exists() else out / "bench_cuda_quick.json").read_text())
acc = data["acceptance"]
print(f"device: {data['meta']['device']} ({data['meta']['describe']})")
print(f"peak {acc['peak_gbps']:.0f} GB/s theoretical, {data['meta']['copy_gbps']:.0f} GB/s measured copy")
checks = [  # (key that says it was measured, pass flag, the line)
    ("batch1_min_speedup", "speedup_ok", lambda: f"batch-1 fused vs unfused: worst {acc['batch1_min_speedup']:.2f}x "
     f"({acc['batch1_min_speedup_row']}), target >= {acc['speedup_target']}x"),
    ("q4k_bandwidth_fraction", "bandwidth_ok", lambda: f"Q4_K 4096x14336 r64 batch 1: "
     f"{acc['q4k_4096x14336_r64_gbps']:.0f} GB/s = {100 * acc['q4k_bandwidth_fraction']:.0f}% of peak, "
     f"target >= {100 * acc['bandwidth_target']:.0f}%"),
]
ok = True
for key, flag, line in checks:
    passed = key in acc and acc[flag]
    print(f"[{'PASS' if passed else 'FAIL'}] " + (line() if key in acc else f"{key}: not measured"))
    ok &= passed
sys.exit(0 if ok else 1)
EOF

step "done: results in $out (tests: cuda-tests.xml; tables: bench_cuda*.md)"
exit "$fail"
