"""eora-gguf: EoRA low-rank compensation for llama.cpp GGUF quantization.

Data flow, one module per step:
  llamacpp   locate/build the pinned llama.cpp; convert, quantize, perplexity
  assets     the demo model and data sets (fetched once, cached)
  calibration, gguf_io, naming, eora, adapter   (compensation pipeline)
  kernels    the native fused dequant + low-rank kernels (cffi)
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import EoraError

__all__ = ["EoraError", "__version__"]
