#!/usr/bin/env bash
# Perplexity of one model + adapter under stock llama.cpp (repacked and --no-repack weights) and the patched build
# (fused, and EORA_LLAMA_FUSE=0): how far the patched build is from stock against stock's own spread (issue #6).
#
#   bash tools/patched_vs_stock.sh MODEL.gguf ADAPTER.gguf [CHUNKS=32] [THREADS=1]
#
# Needs `eora-gguf setup-llama-cpp` and `eora-gguf setup-llama-cpp --patched`; text: the demo eval text.
set -euo pipefail
model=$1; adapter=$2; chunks=${3:-32}; threads=${4:-1}
read -r stock patched text < <(python3 - <<'PY'
from eora_gguf import assets, llamacpp
print(llamacpp.locate(progress=False).bin_dir, llamacpp.locate_patched(build=False).bin_dir,
      assets.demo_dir() / "data" / "eval.txt")
PY
)
run() {
  local name=$1; shift
  local out
  out=$("$@" -m "$model" --lora "$adapter" -f "$text" -c 512 --chunks "$chunks" -t "$threads" 2>&1 || true)
  # the pinned llama.cpp's log queue sometimes loses the final line: the running value after the last chunk is it
  echo "$name $(grep -ao '\[[0-9]*\][0-9.]*' <<<"$out" | tail -1)"
}
run stock "$stock/llama-perplexity"
run stock_no_repack "$stock/llama-perplexity" --no-repack
run patched "$patched/llama-perplexity"
EORA_LLAMA_FUSE=0 run patched_fuse0_no_repack "$patched/llama-perplexity" --no-repack
