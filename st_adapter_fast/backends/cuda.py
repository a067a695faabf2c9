"""The CUDA backend: hand-written kernels in csrc/ behind the same fused op as the Triton backend.

Same decomposition as kernels/adapter_fwd.py and kernels/adapter_bwd.py (docs/design.md §3):
down-conv kernel with a register sliding window over frames, up-residual kernel over all B*T*L
rows, conv-backward kernel, split-token weight gradients with fp32 partials summed in a fixed
order (deterministic, no float atomics). fp16/bf16 run on tensor cores (mma.sync m16n8k16 fed by
ldmatrix, a multi-stage cp.async pipeline; tiles per ST_ADAPTER_CUDA_GEMM_CONFIG), fp32 on an IEEE
fp32 SIMT path.
Needs sm_80 or newer.

The compiled module is ``st_adapter_fast._cuda`` when setup.py built it ahead of time; otherwise
the first call on a GPU machine JIT-builds csrc/ with torch.utils.cpp_extension.load (ninja,
cached under TORCH_EXTENSIONS_DIR). Importing this module is cheap and never fails: nothing is
imported or built until a CUDA tensor asks for this backend.

Backend functions (see backends/__init__.py):
  forward(x, T, P, Wd, bd, taps, bc, Wu, bu) -> out (B*T, L, C), x's dtype, contiguous
  backward(dO, x, T, P, Wd, bd, taps, bc, Wu, bu) -> (dx, dWd, dbd, dtaps (Ca, KT), dbc, dWu, dbu)
with parameter gradients in the weights' dtype (summed in fp32 and cast by the backward's last
launch, so ops adds no cast), None for absent biases.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import threading
from typing import Optional, Sequence

import torch

from . import FUSED_DTYPES, Backend

__all__ = ["BACKEND", "MAX_KT", "SOURCES", "CSRC_DIR", "GemmConfig", "gemm_configs", "load_extension",
           "extension_error"]

# Widest temporal kernel the register window holds (csrc/st_adapter_index.cuh kMaxKT).
MAX_KT = 9
# sm_80: bf16 tensor-core MMA and the shared-memory budget the tiles assume.
MIN_CAPABILITY = (8, 0)

CSRC_DIR = pathlib.Path(__file__).resolve().parents[2] / "csrc"
KERNEL_SOURCES = ("down_conv_fwd.cu", "conv_bwd.cu", "up_residual.cu", "wgrad.cu")
SOURCES = ("binding.cpp",) + KERNEL_SOURCES
JIT_NAME = "st_adapter_fast_cuda"

_LOCK = threading.Lock()
_EXT = None
_EXT_ERROR: Optional[str] = None


def _jit_unavailable_reason() -> Optional[str]:
    """Why csrc/ cannot be JIT-built here, or None."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (install a CUDA build of torch)"
    missing = [s for s in SOURCES if not (CSRC_DIR / s).is_file()]
    if missing:
        return f"the CUDA sources are not installed ({CSRC_DIR} lacks {', '.join(missing)}); install from a source checkout"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def wheel_cuda_includes() -> list:
    """Header dirs of pip's nvidia-* CUDA wheels, needed when the toolkit at CUDA_HOME is a
    bare nvcc install without the libraries' headers that torch's headers include
    (cusparse.h, cublas_v2.h): the usual case for a pip-installed CUDA torch."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is not None and (pathlib.Path(CUDA_HOME) / "include" / "cusparse.h").is_file():
        return []
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    dirs = []
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        for inc in sorted(pathlib.Path(root).glob("cu*/include")):
            if (inc / "cusparse.h").is_file():
                dirs.append(str(inc))
    return dirs


def _jit_build():
    from torch.utils.cpp_extension import load

    flags = ["-O3"]  # the C++ standard is torch's choice (2.14 needs C++20, older torch C++17)
    return load(
        name=JIT_NAME,
        sources=[str(CSRC_DIR / s) for s in SOURCES],
        extra_include_paths=[str(CSRC_DIR)] + wheel_cuda_includes(),
        extra_cflags=flags,
        extra_cuda_cflags=flags + ["-lineinfo"],
        verbose=os.environ.get("ST_ADAPTER_FAST_VERBOSE_BUILD", "0") == "1",
    )


def load_extension():
    """The compiled module (prebuilt, else JIT-built once per process), or None; see extension_error()."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    with _LOCK:
        if _EXT is not None or _EXT_ERROR is not None:
            return _EXT
        try:
            from .. import _cuda  # built by setup.py when a CUDA torch and nvcc were present

            _EXT = _cuda
            return _EXT
        except ImportError as err:
            prebuilt = f"st_adapter_fast._cuda is not built ({err})"
        reason = _jit_unavailable_reason()
        if reason is not None:
            _EXT_ERROR = f"{prebuilt} and cannot be JIT-built: {reason}"
            return None
        try:
            _EXT = _jit_build()
        except Exception as err:  # compiler errors, a CUDA toolkit torch was not built with, ...
            _EXT_ERROR = f"{prebuilt} and the JIT build failed: {type(err).__name__}: {err}"
    return _EXT


def extension_error() -> Optional[str]:
    return _EXT_ERROR


def unavailable_reason(x: torch.Tensor, kernel_size: Sequence[int], dtype: torch.dtype,
                       variant=None) -> Optional[str]:
    """None if the CUDA kernels can run this call, else why not. Checks the cheap things first, so
    CPU tensors and unsupported cases never trigger a build. variant: the call's docs/design.md §9
    switches (None: official); only the official ones are fused. Meta tensors skip the device
    checks (the op's registered fake gives the shape)."""
    if dtype not in FUSED_DTYPES or x.dtype not in FUSED_DTYPES:
        return (f"the CUDA backend supports float32/float16/bfloat16, got {x.dtype} activations and "
                f"{dtype} weights")
    if x.dtype != dtype and x.dtype != torch.float32:
        return (f"x is {x.dtype} but the weights are {dtype}: the CUDA kernels cast only float32 "
                f"activations (autocast) to the weights' dtype")
    kt, kh, kw = kernel_size
    if kh != 1 or kw != 1:
        return f"kernel_size {tuple(kernel_size)}: only temporal kernels (kt, 1, 1) are fused"
    if kt > MAX_KT:
        return f"kernel_size {tuple(kernel_size)}: temporal kernels up to {MAX_KT} are fused"
    if variant is not None and not variant.official:
        return f"the CUDA backend fuses only the official switches, not {variant.describe()}"
    if x.device.type == "meta":
        return None  # shapes only: no device, capability or build to check
    if x.device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors, got device {x.device}"
    capability = torch.cuda.get_device_capability(x.device)
    if capability < MIN_CAPABILITY:
        return (f"the CUDA kernels need compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, "
                f"{torch.cuda.get_device_name(x.device)} is {capability[0]}.{capability[1]}")
    if load_extension() is None:
        return _EXT_ERROR
    return None


def _require():
    ext = load_extension()
    if ext is None:
        raise RuntimeError(f"the CUDA backend is unavailable: {_EXT_ERROR}")
    return ext


# ------------------------------------------------------------------ the kernels' grid plan
# The down-conv / conv-backward tiles and frame-run policy of csrc/st_adapter_index.cuh, restated
# for the work model (kernels/work_model.py cuda rows); tests/cuda/test_cuda_host_index.py checks
# this copy against the C++ one. The Triton launchers plan from compiled occupancy instead
# (kernels/_common.py window_plan).
CONV_BLOCK_N = 64
UP_BLOCK_N = 64
WGRAD_BLOCK = (64, 64, 32)  # (I, J) tile, token step of the fp32 kernel and of the token splits


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One entry of csrc/st_adapter_dispatch.h's GemmConfigs (tests/cuda checks this copy against
    the compiled table): 16-bit K depth and cp.async stages, window-kernel rows per block (0: 64
    for kt <= 3, 32 above) and up-residual rows per block. fp32 kernels take the rows, K depth 32."""

    index: int
    block_k: int
    stages: int
    conv_block_m: int
    up_block_m: int

    def conv_rows(self, kt: int) -> int:
        return self.conv_block_m or conv_block_m(kt)

    def describe(self) -> str:
        conv = f"conv{self.conv_block_m}" if self.conv_block_m else "conv64|32"
        return f"cuda{self.index}:k{self.block_k}x{self.stages}:{conv}:up{self.up_block_m}"


_GEMM_CONFIGS = (GemmConfig(0, 32, 3, 0, 128), GemmConfig(1, 16, 4, 0, 128), GemmConfig(2, 32, 3, 32, 64))


def gemm_configs() -> tuple:
    """The compiled tile configurations, selectable with ST_ADAPTER_CUDA_GEMM_CONFIG=<index>."""
    return _GEMM_CONFIGS


def conv_block_m(kt: int) -> int:
    """Default flattened (clip, spatial) rows per down-conv / conv-backward block: 64 for kt <= 3,
    32 above (kt = 5 at 64x64 spilled 44-140 bytes on sm_90)."""
    return 64 if kt <= 3 else 32


def frames_per_run(num_frames: int, kt: int, blocks_per_frame_run: int, sms: int) -> int:
    """Frames one down-conv / conv-backward block walks: whole clips when the grid (blocks with
    one run per clip) fills the GPU, shorter runs (each recomputing a KT//2 halo on both sides) when
    the batch is small, e.g. B=4, T=32. A run stays >= 2*KT frames so the halo costs at most half
    of the useful work."""
    want_runs = max(1, -(-2 * sms // max(blocks_per_frame_run, 1)))
    runs = min(want_runs, max(1, num_frames // (2 * kt)))
    return -(-num_frames // runs)


# Resident CTAs per SM of the window kernels: 164-216 registers x 256 threads (the work model's cuda
# rows, nvcc -Xptxas -v on sm_90) leave room for one.
CONV_CTAS_PER_SM = 1


def window_plan(kt: int, batch: int, num_frames: int, spatial: int, ca: int, block_m: int, sms: int) -> tuple:
    """(frames_per_run, n_whole_rows) of the window grid, planned like the Triton launchers'
    (kernels/_common.py window_plan: whole-clip row blocks, then row blocks split into frame runs
    where whole clips would leave SMs idle, by a simulated finish time) for sms * CONV_CTAS_PER_SM
    slots. Shape A (294 whole-clip blocks on 132 SMs: 2.23 waves) splits some row blocks in 2."""
    from st_adapter_fast.kernels._common import window_plan as plan

    g_ca, g_r = -(-ca // CONV_BLOCK_N), -(-(batch * spatial) // block_m)
    n_whole, runs, fpp = plan(num_frames, kt, g_ca, g_r, sms * CONV_CTAS_PER_SM)
    return fpp, (g_r if runs == 1 else n_whole)


def call_plan(x, num_frames: int, num_prefix_tokens: int, conv_taps, frames_per_prog: Optional[int]) -> tuple:
    """(frames_per_run, n_whole_rows) a call hands the binding: forced runs (frames_per_prog or
    ST_ADAPTER_FRAMES_PER_PROGRAM) split every row block alike, else window_plan for x's GPU."""
    forced = _frames_per_run(frames_per_prog)
    if forced:
        return forced, 0
    bt, seq_len, _ = x.shape
    ca, kt = conv_taps.shape[0], conv_taps.shape[-1]
    spatial = seq_len - num_prefix_tokens
    if bt == 0 or spatial <= 0 or ca == 0:
        return 0, 0  # nothing to launch: the binding's own plan
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    rows = gemm_configs()[gemm_config()].conv_rows(kt)
    return window_plan(kt, bt // num_frames, num_frames, spatial, ca, rows, sms)


def conv_plan(block_m: int, kt: int, batch: int, num_frames: int, spatial: int, ca: int, requested: int,
              sms: int) -> tuple:
    """(frames_per_run, n_whole_rows) of the window grid with block_m rows per block when the
    caller plans nothing: csrc/st_adapter_index.cuh conv_plan (the binding's fallback)."""
    if requested > 0:
        return min(requested, num_frames), 0
    blocks = -(-ca // CONV_BLOCK_N) * -(-(batch * spatial) // block_m)
    return frames_per_run(num_frames, kt, blocks, sms), 0


def _frames_per_run(frames_per_prog: Optional[int]) -> int:
    """0 = let the binding choose (frames_per_run in st_adapter_index.cuh); tests force short
    runs (halo recompute) with the same env variable as the Triton backend."""
    if frames_per_prog:
        return int(frames_per_prog)
    env = os.environ.get("ST_ADAPTER_FRAMES_PER_PROGRAM")
    return int(env) if env else 0


def gemm_config() -> int:
    """Tile configuration of the kernels: an index into csrc/st_adapter_dispatch.h's GemmConfigs
    (gemm_configs()) -- 0 (default): 32-deep K steps through a 3-stage cp.async ring; 1: 16-deep
    steps, 4 stages; 2: 32-row window tiles and 64-row up-residual tiles. The GPU sweep sets
    ST_ADAPTER_CUDA_GEMM_CONFIG; fp32 kernels (IEEE SIMT) take only the tile rows."""
    env = os.environ.get("ST_ADAPTER_CUDA_GEMM_CONFIG")
    if not env:
        return 0
    index = int(env)
    if not 0 <= index < len(_GEMM_CONFIGS):
        raise ValueError(f"ST_ADAPTER_CUDA_GEMM_CONFIG={env}: expected 0..{len(_GEMM_CONFIGS) - 1} "
                         f"({', '.join(c.describe() for c in _GEMM_CONFIGS)})")
    return index


def adapter_forward(x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
                    fc2_weight, fc2_bias, *, frames_per_prog: Optional[int] = None) -> torch.Tensor:
    """Fused forward: x (B*T, L, C) -> new (B*T, L, C) tensor of x's dtype."""
    ext = _require()
    fpr, n_whole = call_plan(x, int(num_frames), int(num_prefix_tokens), conv_taps, frames_per_prog)
    return ext.fwd(
        x, int(num_frames), int(num_prefix_tokens), fc1_weight, fc1_bias, conv_taps, conv_bias,
        fc2_weight, fc2_bias, fpr, gemm_config(), n_whole,
    )


def adapter_backward(dout, x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
                     fc2_weight, fc2_bias, *, frames_per_prog: Optional[int] = None) -> tuple:
    """(dx, dWd, dbd, dwc (Ca, KT), dbc, dWu, dbu): parameter grads in the weights' dtype, dx in dO's dtype;
    None for absent biases. Deterministic: bitwise-equal over runs on the same device."""
    ext = _require()
    fpr, n_whole = call_plan(x, int(num_frames), int(num_prefix_tokens), conv_taps, frames_per_prog)
    return tuple(ext.bwd(
        dout, x, int(num_frames), int(num_prefix_tokens), fc1_weight, fc1_bias, conv_taps, conv_bias,
        fc2_weight, fc2_bias, fpr, gemm_config(), n_whole,
    ))


BACKEND = Backend("cuda", unavailable_reason, adapter_forward, adapter_backward, variant_aware=True)
