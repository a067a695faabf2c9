"""Fused ST-Adapter backward in Triton, with recompute: only x and the parameters are saved.

Given dO (B*T, L, C) (docs/design.md §2):
1. recompute g and h with the forward's down-conv kernel (STORE_H): h and g never saved.
2. adapter_conv_bwd_kernel: dg = dy Wu per frame (dy = dO's spatial rows), the transposed
   temporal conv in the same register window as the forward (dh never needs dg in memory),
   and per-program fp32 partial sums of dwc = sum dg * shifted h and dbc = sum dg.
3. dx = dO + dh Wd: the forward's up-residual kernel with Wd^T as its weight (prefix rows of dx
   are dO's, no extra launch).
4. adapter_wgrad_kernel twice: dWu = dy^T g (+ dbu) and dWd = dh^T x_s (+ dbd), split over
   tokens into fp32 partials summed in a fixed order: deterministic, no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import (
    TL_DTYPE,
    TileConfig,
    _cast,
    _conv_window_step,
    _gemm_rows_tile,
    _clip_run,
    _load_taps,
    _mma,
    _row_offsets,
    arch_of,
    dot_flags,
    sm_count,
)
from .adapter_fwd import down_conv_forward, up_residual_forward, window_grid


@triton.jit
def adapter_conv_bwd_kernel(
    dout_ptr, wu_ptr, wc_ptr, h_ptr, dh_ptr, dwc_part_ptr, dbc_part_ptr,
    T, S, P, C, CA,
    frames_per_prog, n_tchunks,
    stride_df, stride_dl, stride_dc,  # dO viewed as (B*T, L, C)
    stride_wu_o, stride_wu_i,  # fc2.weight (C, Ca)
    KT: tl.constexpr, KT_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dh (N, Ca) and partial (dwc, dbc) sums of one (clip run, spatial block) per program.

    dwc_part: (n_bs_programs, KT, Ca) fp32, dbc_part: (n_bs_programs, Ca) fp32.
    """
    PAD: tl.constexpr = KT // 2
    pid_ca = tl.program_id(0)
    pid_s = tl.program_id(1)
    b, t0, t1 = _clip_run(n_tchunks, frames_per_prog, T)

    offs_s = pid_s * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ca = pid_ca * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_s = offs_s < S
    mask_ca = offs_ca < CA
    mask_tile = mask_s[:, None] & mask_ca[None, :]
    buf_rows = offs_s.to(tl.int64)[:, None] * CA + offs_ca[None, :]

    # transposed conv: taps in natural order (see _conv_window_step)
    r0, r1, r2, r3, r4, r5, r6, r7, r8 = _load_taps(wc_ptr, offs_ca, mask_ca, KT, False)

    q0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q1 = q0
    q2 = q0
    q3 = q0
    q4 = q0
    q5 = q0
    q6 = q0
    q7 = q0
    taps = tl.arange(0, KT_POW2)
    dwc_acc = tl.zeros([KT_POW2, BLOCK_N], dtype=tl.float32)
    dbc_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for t_in in range(t0 - PAD, t1 + PAD):
        dg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if (t_in >= 0) & (t_in < T):
            frame = b * T + t_in
            d_rows = frame.to(tl.int64) * stride_df + (offs_s + P).to(tl.int64) * stride_dl
            # dg = dy @ Wu: Wu^T (Ca, C) is Wu with its strides swapped
            dg = _gemm_rows_tile(
                dout_ptr, d_rows, mask_s, stride_dc, wu_ptr, stride_wu_i, stride_wu_o,
                offs_ca, mask_ca, C, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
            )
            # conv-parameter gradients from the frames this program owns (halo frames belong
            # to the neighbouring run): dwc[c, j] += sum_s dg_t[s, c] * h_{t+j-PAD}[s, c]
            if (t_in >= t0) & (t_in < t1):
                dbc_acc += tl.sum(dg, axis=0)
                for j in tl.static_range(KT):
                    t_h = t_in + j - PAD
                    if (t_h >= 0) & (t_h < T):
                        h_frame = (b * T + t_h).to(tl.int64) * S * CA
                        h = tl.load(h_ptr + h_frame + buf_rows, mask=mask_tile, other=0.0).to(tl.float32)
                        contrib = tl.sum(dg * h, axis=0)
                        dwc_acc += tl.where(taps[:, None] == j, contrib[None, :], 0.0)
        dh, q0, q1, q2, q3, q4, q5, q6, q7 = _conv_window_step(
            dg, q0, q1, q2, q3, q4, q5, q6, q7, r0, r1, r2, r3, r4, r5, r6, r7, r8, KT
        )
        t_out = t_in - PAD
        if t_out >= t0:
            frame_out = (b * T + t_out).to(tl.int64)
            tl.store(dh_ptr + frame_out * S * CA + buf_rows, _cast(dh, dh_ptr.dtype.element_ty), mask=mask_tile)

    part = (tl.program_id(2) * tl.num_programs(1) + pid_s).to(tl.int64)
    tl.store(
        dwc_part_ptr + part * KT * CA + taps[:, None] * CA + offs_ca[None, :],
        dwc_acc,
        mask=(taps[:, None] < KT) & mask_ca[None, :],
    )
    tl.store(dbc_part_ptr + part * CA + offs_ca, dbc_acc, mask=mask_ca)


@triton.jit
def adapter_wgrad_kernel(
    a_ptr, b_ptr, dw_part_ptr, db_part_ptr,
    N, I, J, tokens_per_split,
    S_a, P_a, stride_af, stride_al, stride_ac,  # A token n at (n // S_a, P_a + n % S_a); I columns
    S_b, P_b, stride_bf, stride_bl, stride_bc,  # B likewise; J columns
    HAS_BIAS: tl.constexpr,  # also sum A over tokens (the bias gradient of the layer A feeds)
    COMPUTE_DTYPE: tl.constexpr,  # the weights' dtype: under autocast x / dO may be fp32
    BLOCK_M: tl.constexpr,  # I per tile
    BLOCK_N: tl.constexpr,  # J per tile
    BLOCK_K: tl.constexpr,  # tokens per step
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dw_part[split] = sum over the split's tokens of A[n]^T B[n]: (I, J) fp32 per split;
    db_part[split] = sum of A[n]: (I,) fp32 (written by the pid_j == 0 programs)."""
    pid_j = tl.program_id(0)
    pid_i = tl.program_id(1)
    split = tl.program_id(2)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_i = offs_i < I
    mask_j = offs_j < J
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_start = split * tokens_per_split
    n_end = tl.minimum(n_start + tokens_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_K):
        n = n0 + tl.arange(0, BLOCK_K)
        mask_n = n < n_end
        a_rows = _row_offsets(n, S_a, P_a, stride_af, stride_al)
        b_rows = _row_offsets(n, S_b, P_b, stride_bf, stride_bl)
        a = tl.load(
            a_ptr + a_rows[None, :] + offs_i[:, None].to(tl.int64) * stride_ac,
            mask=mask_i[:, None] & mask_n[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K) = A^T tile
        bt = tl.load(
            b_ptr + b_rows[:, None] + offs_j[None, :].to(tl.int64) * stride_bc,
            mask=mask_n[:, None] & mask_j[None, :],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        if HAS_BIAS:
            if pid_j == 0:
                bias_acc += tl.sum(a.to(tl.float32), axis=1)
        acc = _mma(_cast(a, COMPUTE_DTYPE), _cast(bt, COMPUTE_DTYPE), acc, DOT_FP32, INPUT_PRECISION)
    split64 = split.to(tl.int64)
    tl.store(
        dw_part_ptr + split64 * I * J + offs_i[:, None] * J + offs_j[None, :],
        acc,
        mask=mask_i[:, None] & mask_j[None, :],
    )
    if HAS_BIAS:
        if pid_j == 0:
            tl.store(db_part_ptr + split64 * I + offs_i, bias_acc, mask=mask_i)


# --------------------------------------------------------------------------------------------

def conv_bwd_config(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    """The forward's down-conv budget plus the dwc/dbc accumulators and h loads: on sm_80 the
    64x64 KT=3 tile spilled 24 B, so Ampere takes the half-width tile there."""
    from .adapter_fwd import down_conv_config

    cfg = down_conv_config(kt, compute_dtype, arch)
    if compute_dtype != torch.float32 and arch < 90:
        return TileConfig(cfg.BLOCK_M, 32, cfg.BLOCK_K, cfg.num_warps, cfg.num_stages)
    return cfg


def wgrad_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # 128x128x64 spilled up to 21 KB on sm_80, 128x64 still 32 B on sm_90 for unaligned shapes
    # (both operands are gathered token by token: 64-bit addresses per element)
    if compute_dtype == torch.float32:
        return TileConfig(64, 64, 16, num_warps=8, num_stages=2)
    return TileConfig(64, 64, 32, num_warps=8, num_stages=3)


def _token_view(t: torch.Tensor, num_prefix_tokens: int, spatial: int) -> tuple:
    """(S, P, stride_f, stride_l, stride_c) addressing of a (B*T, L, C) tensor's spatial tokens
    or of a flat (N, K) buffer (viewed as (N // S, S, K) with P = 0)."""
    if t.dim() == 3:
        return (spatial, num_prefix_tokens, t.stride(0), t.stride(1), t.stride(2))
    return (spatial, 0, spatial * t.stride(0), t.stride(0), t.stride(1))


def weight_grad(
    a: torch.Tensor,
    b: torch.Tensor,
    compute_dtype: torch.dtype,
    num_tokens: int,
    spatial: int,
    num_prefix_tokens: int,
    with_bias: bool,
    *,
    splits: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(sum_n A[n]^T B[n], sum_n A[n]) in fp32 over the N spatial tokens; A, B are token tensors
    (B*T, L, *) or flat (N, *) buffers. Deterministic: per-split partials, fixed-order sum."""
    i_dim = a.shape[-1]
    j_dim = b.shape[-1]
    cfg = tuning.config_for("wgrad", kt=1, compute_dtype=compute_dtype, arch=arch_of(a))
    tiles = triton.cdiv(i_dim, cfg.BLOCK_M) * triton.cdiv(j_dim, cfg.BLOCK_N)
    if splits is None:
        # enough programs for two waves, but every split keeps >= 8 token blocks of work
        splits = max(1, min(triton.cdiv(2 * sm_count(a), tiles), triton.cdiv(num_tokens, 8 * cfg.BLOCK_K)))
    tokens_per_split = triton.cdiv(max(num_tokens, 1), splits)
    tokens_per_split = triton.cdiv(tokens_per_split, cfg.BLOCK_K) * cfg.BLOCK_K
    splits = max(1, triton.cdiv(num_tokens, tokens_per_split))
    dw_part = torch.empty((splits, i_dim, j_dim), device=a.device, dtype=torch.float32)
    db_part = torch.empty((splits, i_dim), device=a.device, dtype=torch.float32)
    if num_tokens == 0:
        return dw_part.zero_().sum(0), (db_part.zero_().sum(0) if with_bias else None)
    # IEEE even when TF32 is allowed: both operands are token-major (the reduction dim is the
    # strided one), and TF32 wgmma cannot take them transposed -- ptxas serialised it (C7515).
    dot_fp32, _ = dot_flags(compute_dtype)
    precision = "ieee"
    grid = (triton.cdiv(j_dim, cfg.BLOCK_N), triton.cdiv(i_dim, cfg.BLOCK_M), splits)
    adapter_wgrad_kernel[grid](
        a, b, dw_part, db_part,
        num_tokens, i_dim, j_dim, tokens_per_split,
        *_token_view(a, num_prefix_tokens, spatial),
        *_token_view(b, num_prefix_tokens, spatial),
        HAS_BIAS=with_bias, COMPUTE_DTYPE=TL_DTYPE[compute_dtype],
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        **cfg.launch_kwargs(),
    )
    dw = dw_part.sum(0) if splits > 1 else dw_part[0]
    db = (db_part.sum(0) if splits > 1 else db_part[0]) if with_bias else None
    return dw, db


def conv_backward(
    dout: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc2_weight: torch.Tensor,
    conv_taps: torch.Tensor,
    h: torch.Tensor,
    *,
    frames_per_prog: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh (N, Ca) in the weights' dtype, dwc (Ca, KT) fp32, dbc (Ca,) fp32)."""
    bt, seq_len, c = dout.shape
    ca, kt = conv_taps.shape
    s = seq_len - num_prefix_tokens
    b = bt // num_frames
    dtype = fc2_weight.dtype
    dh = torch.empty((bt * s, ca), device=dout.device, dtype=dtype)
    cfg = tuning.config_for("conv_bwd", kt=kt, compute_dtype=dtype, arch=arch_of(dout))
    fpp, n_tchunks, grid = window_grid(cfg, b, num_frames, kt, s, ca, dout, frames_per_prog)
    n_parts = grid[1] * grid[2]
    dwc_part = torch.empty((n_parts, kt, ca), device=dout.device, dtype=torch.float32)
    dbc_part = torch.empty((n_parts, ca), device=dout.device, dtype=torch.float32)
    if dh.numel() == 0:
        return dh, dwc_part.zero_().sum(0).t(), dbc_part.zero_().sum(0)
    dot_fp32, precision = dot_flags(dtype)
    adapter_conv_bwd_kernel[grid](
        dout, fc2_weight, conv_taps, h, dh, dwc_part, dbc_part,
        num_frames, s, num_prefix_tokens, c, ca, fpp, n_tchunks,
        dout.stride(0), dout.stride(1), dout.stride(2),
        fc2_weight.stride(0), fc2_weight.stride(1),
        KT=kt, KT_POW2=triton.next_power_of_2(kt),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision,
        **cfg.launch_kwargs(),
    )
    return dh, dwc_part.sum(0).t(), dbc_part.sum(0)


def adapter_backward(
    dout: torch.Tensor,
    x: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    conv_taps: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    frames_per_prog: Optional[int] = None,
) -> tuple:
    """Gradients (dx, dWd, dbd, dwc (Ca, KT), dbc, dWu, dbu); parameter grads in fp32, dx in x's
    dtype (contiguous). Bias grads are None where the bias is None."""
    bt, seq_len, _ = x.shape
    s = seq_len - num_prefix_tokens
    n_tokens = bt * s
    g, h = down_conv_forward(
        x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
        store_h=True, frames_per_prog=frames_per_prog,
    )
    dh, dwc, dbc = conv_backward(
        dout, num_frames, num_prefix_tokens, fc2_weight, conv_taps, h, frames_per_prog=frames_per_prog
    )
    del h
    dx = up_residual_forward(dout, dh, fc1_weight.t(), None, num_prefix_tokens)
    dtype = fc1_weight.dtype
    dwu, dbu = weight_grad(dout, g, dtype, n_tokens, s, num_prefix_tokens, fc2_bias is not None)
    dwd, dbd = weight_grad(dh, x, dtype, n_tokens, s, num_prefix_tokens, fc1_bias is not None)
    return dx, dwd, dbd, dwc, (dbc if conv_bias is not None else None), dwu, dbu
