"""Settings of the pytest-benchmark suites (see README.md here), read from the environment.

Selection through the environment, so the same files serve the GPU run and the CPU smoke:
  ST_ADAPTER_BENCH_SHAPES    A,B,C (default on a GPU) | tiny (default on CPU)
  ST_ADAPTER_BENCH_BACKENDS  subset of eager,eager-nocudnn,compile,compile-max-autotune,triton,cuda,
                             eager+ln,triton+ln (the adapter + LayerNorm pair: memory per adapted
                             position; e2e: fuse_layernorm) (default: all on a GPU, eager on CPU)
  ST_ADAPTER_BENCH_QUICK=1   shorter timing
  ST_ADAPTER_BENCH_E2E=0     skip the end-to-end model
  ST_ADAPTER_BENCH_E2E_MODEL library (default: clip_vit + inject_st_adapters + VideoClassifier;
                             "builtin" is an older name for the same model)
"""

import os

import torch

_HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if _HAS_CUDA else "cpu"
_BACKENDS_ENV = os.environ.get("ST_ADAPTER_BENCH_BACKENDS", "")
if not _HAS_CUDA and "triton" in _BACKENDS_ENV:
    # CPU tensors run Triton kernels only in the interpreter, fixed when triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from st_adapter_fast.bench import core  # noqa: E402

SHAPES = core.parse_shapes(os.environ.get("ST_ADAPTER_BENCH_SHAPES") or ("A,B,C" if _HAS_CUDA else "tiny"))
TINY = all(s.name == "tiny" for s in SHAPES) or not _HAS_CUDA
PROVIDERS = ([core.normalize_provider(b) for b in _BACKENDS_ENV.split(",") if b.strip()] if _BACKENDS_ENV
             else (list(core.PROVIDERS) if _HAS_CUDA else ["eager"]))
PLAIN_PROVIDERS = [p for p in PROVIDERS if p not in core.COMPILE_MODES]
QUICK = os.environ.get("ST_ADAPTER_BENCH_QUICK", "0") == "1"
E2E = os.environ.get("ST_ADAPTER_BENCH_E2E", "1") != "0"
E2E_MODEL = os.environ.get("ST_ADAPTER_BENCH_E2E_MODEL", "library")
DTYPE = core.dtype_for(DEVICE, os.environ.get("ST_ADAPTER_BENCH_DTYPE") or None)
