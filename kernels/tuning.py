"""Tile configurations: the defaults, the candidates a GPU sweep times, and the tuned table.

Every choice only a GPU can settle (tile sizes, warps, stages) is selectable here, so one GPU
window can A/B it (benchmarks/gpu_verdict.sh, stage "sweep"):

    candidate_configs(kernel, kt=3, compute_dtype=torch.bfloat16, arch=90)  # default first
    with forced_config("down_conv", cfg): ...        # what the sweep times
    config_for("down_conv", kt=3, compute_dtype=torch.bfloat16, arch=90)    # what launchers use

``config_for`` picks, in order: a config forced by ``forced_config`` (the sweep), the tuned table
(tuned_configs.json, written by the sweep), the kernel's default. The table is read from the file
named by ST_ADAPTER_FAST_TUNED_CONFIGS, else from tuned_configs.json beside this module when it
exists. A table entry that fails validation (unknown field, tile not a power of two) is an error,
never a silent fallback: a sweep that wrote nonsense must not change what runs.

Table format (JSON):
    {"version": 1, "device": "...", "configs": {"down_conv|sm90|bf16|kt3": {"BLOCK_M": 64, ...}}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import threading
from typing import Callable, Dict, Iterator, List, Optional

import torch

from ._common import TileConfig

__all__ = ["KERNELS", "candidate_configs", "config_for", "default_config", "family", "forced_config", "override",
           "config_key", "load_tuned_table", "tuned_table_path", "TUNED_TABLE_VERSION"]

TUNED_TABLE_VERSION = 1
_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _default_down_conv(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_fwd import down_conv_config

    return down_conv_config(kt, compute_dtype, arch)


def _default_up_residual(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_fwd import up_residual_config

    return up_residual_config(compute_dtype, arch)


def _default_conv_bwd(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_bwd import conv_bwd_config

    return conv_bwd_config(kt, compute_dtype, arch)


def _default_wgrad(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .wgrad import weight_grad_config

    return weight_grad_config(compute_dtype, arch)


def _default_finalize(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .wgrad import finalize_config

    return finalize_config(compute_dtype, arch)


def _default_stencil_fwd(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_stencil import stencil_fwd_config

    return stencil_fwd_config(compute_dtype, arch)


def _default_stencil_bwd(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_stencil import stencil_bwd_config

    return stencil_bwd_config(compute_dtype, arch)


def _default_up_residual_ln(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_layernorm import up_residual_ln_config

    return up_residual_ln_config(compute_dtype, arch)


def _default_up_ln_bwd(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_layernorm import up_ln_bwd_config

    return up_ln_bwd_config(compute_dtype, arch)


def _default_up_ln_unaligned(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_layernorm import up_ln_unaligned_config

    return up_ln_unaligned_config(compute_dtype, arch)


def _default_norm_fold(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_prenorm import fold_config

    return fold_config(compute_dtype, arch)


def _default_prenorm_dgrad(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_prenorm import prenorm_dgrad_config

    return prenorm_dgrad_config(compute_dtype, arch)


def _default_prenorm_dgrad_unaligned(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    from .adapter_prenorm import prenorm_dgrad_unaligned_config

    return prenorm_dgrad_unaligned_config(compute_dtype, arch)


def _unaligned(default: Callable[[int, torch.dtype, int], TileConfig], **shrink) -> Callable:
    """The family's config for unaligned operands (a size or stride not a multiple of 16): no
    cp.async / vectorised loads, 64-bit addresses per element, so the register-hungriest case.
    On sm_90 it takes the tile that compiled without spills before the aligned tile grew."""
    def config(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
        cfg = default(kt, compute_dtype, arch)
        if compute_dtype == torch.float32 or arch < 90:
            return cfg
        return dataclasses.replace(cfg, **{k: v if k == "ctas_per_sm" else min(getattr(cfg, k), v)
                                           for k, v in shrink.items()})

    return config


def _default_up_residual_unaligned(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # 128x64 spilled 8 B on sm_80 under triton 3.6 (dgrad, odd shape); sm_90 keeps 128x64
    cfg = _default_up_residual(kt, compute_dtype, arch)
    if compute_dtype == torch.float32:
        # fp32 IEEE dgrad of the odd shape: 64x64 sat at 245 registers on sm_90 with P = 1 (a
        # constexpr) and spilled 104 B with P = 0 (prefix_mode="mlp", SigLIP-style backbones)
        return dataclasses.replace(cfg, BLOCK_N=32)
    return dataclasses.replace(cfg, BLOCK_N=64) if arch >= 90 else dataclasses.replace(cfg, BLOCK_M=64, BLOCK_N=64)


def _default_conv_bwd_unaligned(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # sm_90: 64x32 (64x64 spilled 44 B); sm_80 KT > 3: BLOCK_K 16 (64x32x32 spilled 12 B under
    # triton 3.6: the A tile's per-element 64-bit addresses halve with the K step)
    cfg = _default_conv_bwd(kt, compute_dtype, arch)
    if compute_dtype == torch.float32:
        return cfg
    if arch >= 90:
        return dataclasses.replace(cfg, BLOCK_N=min(cfg.BLOCK_N, 32))
    return dataclasses.replace(cfg, BLOCK_K=16) if kt > 3 else cfg


# kernel family -> default config function
KERNELS: Dict[str, Callable[[int, torch.dtype, int], TileConfig]] = {
    "down_conv": _default_down_conv,
    "up_residual": _default_up_residual,  # also the backward dgrad launch (dx = dO + dh Wd)
    "conv_bwd": _default_conv_bwd,
    "wgrad": _default_wgrad,  # dWu and dWd in one launch
    "finalize": _default_finalize,  # BLOCK_M = elements per program of the partials' sum
    # spatial kernels (kt, kh, kw) (kernels/adapter_stencil.py): the depthwise conv as a stencil
    # over a in memory, and its transpose with the dwc partials (no MMA: BLOCK_K unused)
    "stencil_fwd": _default_stencil_fwd,
    "stencil_bwd": _default_stencil_bwd,
    # the adapter + LayerNorm pair (kernels/adapter_layernorm.py): up-projection with the
    # LayerNorm in its epilogue, and its backward twin (recompute out, fold the LN backward)
    "up_residual_ln": _default_up_residual_ln,
    "up_ln_bwd": _default_up_ln_bwd,
    # unaligned operands (tests/kernels/test_aot_compile.py's "odd" shape C=200, Ca=72): the
    # aligned sm_90 tiles spilled there (up 128x128: 1.8 KB, wgrad 128x128: 2.1 KB, conv_bwd
    # 64x64: 44 B)
    "up_residual_unaligned": _default_up_residual_unaligned,
    "conv_bwd_unaligned": _default_conv_bwd_unaligned,
    "wgrad_unaligned": _unaligned(_default_wgrad, BLOCK_M=64, BLOCK_N=64, ctas_per_sm=3),
    "up_residual_ln_unaligned": _default_up_ln_unaligned,
    "up_ln_bwd_unaligned": _default_up_ln_unaligned,
    # norm="layernorm" (kernels/adapter_prenorm.py): the parameter fold (BLOCK_M x BLOCK_N of Wd
    # per step) and the dgrad with the LayerNorm backward folded in
    "norm_fold": _default_norm_fold,
    "prenorm_dgrad": _default_prenorm_dgrad,
    "prenorm_dgrad_unaligned": _default_prenorm_dgrad_unaligned,
}

# families only the docs/design.md §9 variant paths launch (spatial kernels, norm="layernorm"): the
# GPU verdict's tile sweep (st_adapter_fast/bench/verdict_sweep.py) times the official op's
# families within its 100 s, so these keep their defaults until a sweep on variant shapes
VARIANT_FAMILIES = frozenset({"stencil_fwd", "stencil_bwd", "norm_fold", "prenorm_dgrad", "prenorm_dgrad_unaligned"})
SWEPT_KERNELS = tuple(k for k in KERNELS if k not in VARIANT_FAMILIES)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {sorted(KERNELS)}")


def config_key(kernel: str, kt: int, compute_dtype: torch.dtype, arch: int) -> str:
    """The tuned table's key: 'down_conv|sm90|bf16|kt3'."""
    _check_kernel(kernel)
    return f"{kernel}|sm{arch}|{_DTYPE_NAME[compute_dtype]}|kt{kt}"


def default_config(kernel: str, *, kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    _check_kernel(kernel)
    return KERNELS[kernel](kt, compute_dtype, arch)


def candidate_configs(kernel: str, *, kt: int, compute_dtype: torch.dtype, arch: int) -> List[TileConfig]:
    """The configs the GPU sweep times for one kernel, the default first, no duplicates.

    Candidates vary one knob at a time around the default (tile width and height halved or
    doubled, warps 4/8, stages 2-4) so a sweep of ~8 configs per kernel fits a GPU window; the
    AOT check (kernels/aot.py) is what rules out configs that spill.
    """
    base = default_config(kernel, kt=kt, compute_dtype=compute_dtype, arch=arch)
    out: List[TileConfig] = [base]

    def add(**changes):
        cfg = dataclasses.replace(base, **changes)
        if cfg not in out and all(v >= 16 for v in (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K)):
            out.append(cfg)

    if kernel == "finalize":  # a streaming sum: only elements per program and warps matter
        for block in (base.BLOCK_M // 2, base.BLOCK_M * 2, base.BLOCK_M * 4):
            add(BLOCK_M=block)
        add(num_warps=4 if base.num_warps == 8 else 8)
        return out
    add(BLOCK_N=base.BLOCK_N * 2)
    add(BLOCK_N=base.BLOCK_N // 2)
    add(BLOCK_M=base.BLOCK_M * 2)
    add(BLOCK_M=base.BLOCK_M // 2)
    add(BLOCK_K=base.BLOCK_K * 2)
    add(num_warps=4 if base.num_warps == 8 else 8)
    for stages in (2, 3, 4):
        add(num_stages=stages)
    if kernel not in ("wgrad", "finalize") and not kernel.endswith("_unaligned") and arch >= 90:
        add(USE_TMA=not base.USE_TMA)  # the weight operand through a tensor descriptor
    return out


# ------------------------------------------------------------------------------ tuned table
_FORCED = threading.local()
_TABLE_CACHE: Dict[str, Dict[str, TileConfig]] = {}


def tuned_table_path() -> Optional[pathlib.Path]:
    """The tuned table in force: $ST_ADAPTER_FAST_TUNED_CONFIGS, else kernels/tuned_configs.json
    if it exists, else None (the defaults run)."""
    env = os.environ.get("ST_ADAPTER_FAST_TUNED_CONFIGS")
    if env:
        return pathlib.Path(env)
    here = pathlib.Path(__file__).resolve().parent / "tuned_configs.json"
    return here if here.is_file() else None


def _config_from_dict(key: str, entry: dict) -> TileConfig:
    fields = {f.name for f in dataclasses.fields(TileConfig)}
    unknown = set(entry) - fields
    if unknown:
        raise ValueError(f"tuned config {key!r} has unknown fields {sorted(unknown)}; expected {sorted(fields)}")
    cfg = TileConfig(**entry)
    for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"tuned config {key!r}: {name}={v} is not a power of two >= 16")
    if not isinstance(cfg.USE_TMA, bool):
        raise ValueError(f"tuned config {key!r}: USE_TMA={cfg.USE_TMA!r} must be true or false")
    for name, low in (("ctas_per_sm", 1), ("runs", 0), ("splits", 0), ("num_warps", 1), ("num_stages", 1)):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < low:
            raise ValueError(f"tuned config {key!r}: {name}={v!r} must be an integer >= {low}")
    return cfg


def load_tuned_table(path: Optional[os.PathLike] = None) -> Dict[str, TileConfig]:
    """{key: TileConfig} of a tuned_configs.json (cached per path); {} when there is none."""
    path = pathlib.Path(path) if path is not None else tuned_table_path()
    if path is None:
        return {}
    cache_key = str(path.resolve())
    if cache_key not in _TABLE_CACHE:
        data = json.loads(path.read_text())
        if data.get("version") != TUNED_TABLE_VERSION:
            raise ValueError(f"{path}: tuned table version {data.get('version')!r}, expected {TUNED_TABLE_VERSION}")
        _TABLE_CACHE[cache_key] = {k: _config_from_dict(k, v) for k, v in data.get("configs", {}).items()}
    return _TABLE_CACHE[cache_key]


def clear_cache() -> None:
    _TABLE_CACHE.clear()


@contextlib.contextmanager
def forced_config(kernel: str, cfg: TileConfig) -> Iterator[None]:
    """Run every launch of ``kernel`` in this thread with ``cfg`` (the sweep's A/B switch)."""
    _check_kernel(kernel)
    forced = getattr(_FORCED, "configs", None)
    if forced is None:
        forced = _FORCED.configs = {}
    previous = forced.get(kernel)
    forced[kernel] = cfg
    try:
        yield
    finally:
        if previous is None:
            forced.pop(kernel, None)
        else:
            forced[kernel] = previous


def family(kernel: str, aligned: bool) -> str:
    """The KERNELS key a launcher asks for: kernel, or kernel_unaligned where one exists."""
    return kernel if aligned or f"{kernel}_unaligned" not in KERNELS else f"{kernel}_unaligned"


@contextlib.contextmanager
def override(**changes) -> Iterator[None]:
    """Apply `changes` (TileConfig fields, e.g. USE_TMA=True) to every config this thread's
    launchers get, whatever its source: the AOT check compiles both load paths this way."""
    previous = getattr(_FORCED, "override", {})
    _FORCED.override = {**previous, **changes}
    try:
        yield
    finally:
        _FORCED.override = previous


def config_for(kernel: str, *, kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    """The config a launcher uses: forced (sweep) > tuned table > default, then override()."""
    changes = getattr(_FORCED, "override", None)
    cfg = _config_for(kernel, kt=kt, compute_dtype=compute_dtype, arch=arch)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _config_for(kernel: str, *, kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    forced = getattr(_FORCED, "configs", None)
    if forced and kernel in forced:
        return forced[kernel]
    tuned = load_tuned_table().get(config_key(kernel, kt, compute_dtype, arch))
    if tuned is not None:
        return tuned
    return default_config(kernel, kt=kt, compute_dtype=compute_dtype, arch=arch)
