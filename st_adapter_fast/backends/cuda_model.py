"""The CUDA backend's launches in the work model (kernels/work_model.py, docs/design.md §10).

binding.cpp's launch sequence, restated from the kernels' plan (backends/cuda.py: the GEMM config
table, conv_plan over the B*S flattened rows; tests/cuda checks both against the C++):
  fwd: down_conv_fwd_kernel, up_residual_kernel                                   (2 launches)
  bwd: down_conv_fwd_kernel (h stored), conv_bwd_kernel, up_residual_kernel (dgrad),
       wgrad dWu, wgrad dWd, sum_partials_kernel (every fp32 partial, cast)        (6 launches)
Each launch's FLOPs and bytes come from the same formulas as the Triton rows (the work functions
of kernels/work_model.py, fed the CUDA grid and tiles), registers and spills from
``nvcc -Xptxas -v`` of exactly the instantiation the launch dispatches to: each .cu compiled with
the dispatch table cut down to that one entry (-DSTA_ONLY_*; st_adapter_dispatch.h).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import cuda

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# kernel entry of each source file the launches use (fragments of the mangled names)
KERNEL_OF = {"down_conv": ("down_conv_fwd.cu", "down_conv_fwd_kernel"),
             "conv_bwd": ("conv_bwd.cu", "conv_bwd_kernel"),
             "up_residual": ("up_residual.cu", "up_residual_kernel"),
             "wgrad": ("wgrad.cu", "wgrad_"),
             "sum_partials": ("wgrad.cu", "sum_partials_kernel")}

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> Dict[str, dict]:
    """{mangled kernel: {regs, smem, stack, spill_st, spill_ld}} from ``ptxas -v`` output."""
    kernels: Dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = kernels.setdefault(m.group(1), {"smem": 0})
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return kernels


def find_nvcc() -> Optional[str]:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


def _compile_one(src: str, arch: int, dtype_code: int, kt: int, config: int) -> Tuple[str, Dict[str, dict]]:
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-c", "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
               f"-DSTA_ONLY_DTYPE={dtype_code}", f"-DSTA_ONLY_KT={kt}", f"-DSTA_ONLY_CONFIG={config}",
               "-I", str(cuda.CSRC_DIR), str(cuda.CSRC_DIR / src), "-o", str(Path(tmp) / "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"nvcc failed for {src} sm_{arch}:\n{(res.stdout + res.stderr)[-3000:]}")
    return src, parse_ptxas(res.stdout + res.stderr)


@functools.lru_cache(maxsize=None)
def compiled_kernels(arch: int, dtype: torch.dtype, kt: int, config: int) -> Optional[Dict[str, Dict[str, dict]]]:
    """{source file: ptxas report} of the one-entry compile, or None without nvcc. Two at a time."""
    if find_nvcc() is None:
        return None
    files = sorted({f for f, _ in KERNEL_OF.values()})
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda f: _compile_one(f, arch, DTYPE_CODE[dtype], kt, config), files)
        return dict(done)


# ------------------------------------------------------------------------------ launches
@dataclasses.dataclass
class CudaLaunch:
    family: str  # key of KERNEL_OF
    blocks: int
    work: Tuple[int, int, int, int]  # flops_executed, flops_required, hbm_bytes_min, l2_bytes_est
    label: str


def _meta(dtype, *shape):
    return torch.empty(shape or (0,), dtype=dtype, device="meta")


def _window_work(family, b, t, seq, c, ca, kt, prefix, dtype, cfg, plan):
    """The Triton window kernels' work functions, fed this grid: the CUDA decode is _window_program's."""
    s = seq - prefix
    bm, bk = cfg.conv_rows(kt), (cfg.block_k if dtype != torch.float32 else 32)
    fpr, n_whole = plan
    runs = -(-t // fpr)
    g_ca, g_r = -(-ca // cuda.CONV_BLOCK_N), -(-(b * s) // bm)
    n_whole = g_r if runs == 1 else n_whole
    programs = g_ca * (n_whole + (g_r - n_whole) * runs)
    act = _meta(dtype)
    args = dict(T=t, S=s, C=c, CA=ca, KT=kt, BLOCK_M=bm, BLOCK_N=cuda.CONV_BLOCK_N, BLOCK_K=bk, G_CA=g_ca,
                n_rows=b * s, n_whole_rows=n_whole, runs=runs, frames_per_prog=fpr)
    if family == "down_conv":
        launch = types.SimpleNamespace(grid=(programs,), args=dict(x_ptr=act, wd_ptr=act, g_ptr=act, **args))
        launch.args["STORE_H"] = False
        return programs, launch
    launch = types.SimpleNamespace(grid=(programs,), args=dict(dout_ptr=act, wu_ptr=act, h_ptr=act, **args))
    return programs, launch


def cuda_launches(shape: tuple, dtype: torch.dtype, arch: int, kt: int = 3, prefix: int = 1,
                  config: int = 0, sms: Optional[int] = None) -> Dict[str, List[CudaLaunch]]:
    """{"fwd": [...], "bwd": [...]} of the CUDA backend's launches for (B, T, L, C, Ca)."""
    from st_adapter_fast.kernels import work_model as wm

    b, t, seq, c, ca = shape
    s = seq - prefix
    n = b * t * s
    cfg = cuda.gemm_configs()[config]
    sms = sms or wm.SM_COUNT[arch]
    half = dtype != torch.float32
    bk = cfg.block_k if half else 32
    tag = f"{str(dtype).replace('torch.', '')} KT={kt} {cfg.describe()}"
    plan = cuda.window_plan(kt, b, t, s, ca, cfg.conv_rows(kt), sms)  # what call_plan hands the binding
    act = _meta(dtype)

    def down_conv(store_h):
        blocks, launch = _window_work("down_conv", b, t, seq, c, ca, kt, prefix, dtype, cfg, plan)
        launch.args["STORE_H"] = store_h
        return CudaLaunch("down_conv", blocks, wm._work_down_conv(launch),
                          f"down_conv_fwd_kernel[{tag} BM={cfg.conv_rows(kt)} fpr={plan[0]}{' h' if store_h else ''}]")

    def up_residual(k, nout):
        g_n, g_m = -(-nout // cuda.UP_BLOCK_N), -(-(b * t * seq) // cfg.up_block_m)
        launch = types.SimpleNamespace(grid=(g_n, g_m), args=dict(
            n_rows=b * t * seq, L=seq, S=s, K=k, NOUT=nout, BLOCK_M=cfg.up_block_m, BLOCK_N=cuda.UP_BLOCK_N,
            BLOCK_K=bk, res_ptr=act, a_ptr=act, w_ptr=act, out_ptr=act))
        return CudaLaunch("up_residual", g_n * g_m, wm._work_up_residual(launch),
                          f"up_residual_kernel[{tag} BM={cfg.up_block_m} K={k}]")

    def wgrad(i_dim, j_dim):
        split = wgrad_split(n, i_dim, j_dim, sms)
        bm_w, bn_w, _ = cuda.WGRAD_BLOCK
        g_j, g_i = -(-j_dim // bn_w), -(-i_dim // bm_w)
        launch = types.SimpleNamespace(grid=(g_j, g_i, split[0]), args=dict(
            N=n, I=i_dim, J=j_dim, tokens_per_split=split[1], n_splits=split[0], BLOCK_M=bm_w, BLOCK_N=bn_w,
            BLOCK_K=bk, a0_ptr=act, b0_ptr=act))
        return CudaLaunch("wgrad", g_j * g_i * split[0], wm._work_wgrad(launch),
                          f"wgrad[{tag} I={i_dim} J={j_dim} splits={split[0]}]"), split[0]

    conv_blocks, conv_launch = _window_work("conv_bwd", b, t, seq, c, ca, kt, prefix, dtype, cfg, plan)
    conv = CudaLaunch("conv_bwd", conv_blocks, wm._work_conv_bwd(conv_launch),
                      f"conv_bwd_kernel[{tag} BM={cfg.conv_rows(kt)} fpr={plan[0]}]")
    conv_parts = conv_blocks // -(-ca // cuda.CONV_BLOCK_N)
    wu, wu_splits = wgrad(c, ca)
    wd, wd_splits = wgrad(ca, c)
    # the finalize: every partial read once (fp32), every gradient written once (weights' dtype)
    segments = [(conv_parts, ca * kt), (conv_parts, ca), (wu_splits, c * ca), (wu_splits, c), (wd_splits, ca * c),
                (wd_splits, ca)]
    moved = sum(parts * numel * 4 + numel * act.element_size() for parts, numel in segments)
    numel = sum(numel for _, numel in segments)
    finalize = CudaLaunch("sum_partials", -(-numel // 256), (0, 0, moved, moved),
                          f"sum_partials_kernel[{tag} {len(segments)} segments]")
    return {"fwd": [down_conv(False), up_residual(ca, c)],
            "bwd": [down_conv(True), conv, up_residual(ca, c), wu, wd, finalize]}


# resident wgrad blocks per SM the C++ policy assumes (csrc/st_adapter_index.cuh kWgradCtasPerSm)
WGRAD_CTAS_PER_SM = 2


def wgrad_split(num_tokens: int, i_dim: int, j_dim: int, sms: int) -> Tuple[int, int]:
    """(splits, tokens_per_split) of a weight-gradient launch: csrc/st_adapter_index.cuh wgrad_split,
    i.e. kernels/_common.py token_splits (tests/cuda/test_cuda_host_index.py checks the C++ against it)."""
    from st_adapter_fast.kernels._common import token_splits

    bm, bn, bk = cuda.WGRAD_BLOCK
    tiles = -(-i_dim // bm) * -(-j_dim // bn)
    splits = token_splits(num_tokens, bk, tiles, max(sms, 1) * WGRAD_CTAS_PER_SM)
    tps = -(-(-(-max(num_tokens, 1) // splits)) // bk) * bk
    return max(1, -(-num_tokens // tps)), tps


def model_rows(shapes: Dict[str, tuple], dtype: torch.dtype, arch: int, kt: int = 3, compile_kernels: bool = True,
               sms: Optional[int] = None, config: Optional[int] = None) -> list:
    """kernels/work_model.py Rows (backend "cuda") of every CUDA launch of fwd and bwd per shape."""
    from st_adapter_fast.kernels import work_model as wm

    config = cuda.gemm_config() if config is None else config
    reports = compiled_kernels(arch, dtype, kt, config) if compile_kernels else None
    rows = []
    for name, shape in shapes.items():
        for pass_name, launches in cuda_launches(shape, dtype, arch, kt, config=config, sms=sms).items():
            for ln in launches:
                executed, required, hbm, l2 = ln.work
                kernel = KERNEL_OF[ln.family][1]
                if ln.family == "wgrad":
                    kernel = "wgrad_simt_kernel" if dtype == torch.float32 else "wgrad_mma_kernel"
                row = wm.Row(name, "cuda", pass_name, kernel, (ln.blocks,), ln.blocks,
                             executed, required, hbm, l2, variant=ln.label)
                if reports is not None:
                    _fill_compile(row, reports, ln.family, arch, sms or wm.SM_COUNT[arch], wm)
                rows.append(row)
    return rows


def _fill_compile(row, reports, family, arch, sms, wm):
    src, fragment = KERNEL_OF[family]
    # the kernel's own name, not its file's ("_wgrad_cu_" is in every wgrad.cu entry)
    hits = [k for name, k in reports[src].items() if fragment in name.split("_cu_")[-1]
            and (family == "sum_partials") == ("sum_partials" in name)]
    if len(hits) != 1:
        raise RuntimeError(f"{src}: expected one {fragment} instantiation in the one-entry compile, got {len(hits)}")
    k = hits[0]
    row.registers, row.spill_bytes = k["regs"], k["spill_st"] + k["spill_ld"] + k["stack"]
    row.shared_bytes, row.uses_wgmma = k["smem"], False  # mma.sync (sm_80 path) on every arch
    row.ctas_per_sm = wm.ctas_per_sm(k["regs"], 8, k["smem"], arch)  # every kernel runs 8 warps
    slots = sms * max(row.ctas_per_sm, 1)
    row.waves = row.programs / slots
    row.utilisation = row.programs / (math.ceil(row.waves) * slots)
