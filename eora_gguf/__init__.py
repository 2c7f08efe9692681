"""eora-gguf: EoRA low-rank compensation for llama.cpp GGUF quantization.

The package reads top-down as the data flows (README "Data flow" has the full module map):
  inputs         assets (demo model, data sets), calib_data (calibration text), hf_model (the HF folder on disk)
  layer walk     walker: the model one decoder layer at a time; processors hook -> accumulate -> process ->
                 finalize per layer (calibration statistics, the solve, pruning, validation)
  statistics     calibration (the covariance processor, `stream`), stats (the file), imatrix (llama-imatrix GGUF)
  GGUF + names   gguf_io (read, dequantize, checks), naming (HF <-> GGUF names, Q/K row order)
  solve          eora (pure math), fast_solve (randomized block Krylov), solver (per layer, against the GGUF)
  adapters       adapter (GGUF LoRA write/read/check), peft (PEFT folder), embedding (token_embd / output)
  compensation   compensate (end to end), budget + allocation + budgeted (byte budgets), importance, refine
  scale          devices, distributed (torchrun), checkpoint (resume)
  other passes   prune, finetune, reconstruct, validate
  llama.cpp      llamacpp (locate/build/patch), llama_tools (run convert/quantize/perplexity), llama_eval (our
                 libllama client), serve (llama-server)
  evaluation     evaluate, tasks, report, ladder + ladder_report, info
  workflows      pipeline (run / sweep), make
  cli/           main + checks (before any work) + verbs (one function each) + parser; __main__
  native         _native (cffi binding), kernels (typed wrappers of the fused kernels)
  support        errors (EoraError, atomic outputs), cache (cache folder, locks)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import EoraError

__all__ = ["EoraError", "__version__"]
