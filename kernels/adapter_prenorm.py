"""norm="layernorm" (docs/design.md §9): a LayerNorm over C before fc1, fused into the adapter.

z = LN(x) = xhat * gamma + beta, xhat = (x - mu) * rstd, feeds fc1. Forward, the LayerNorm
folds into the down-projection's K loop (adapter_fwd.adapter_down_conv_fwd_kernel, NORM):
    h_pre = rstd * ((x - sh) Wd'^T - (mu - sh) u) + b',   Wd' = Wd diag(gamma) (compute dtype),
    u = rowsum of the ROUNDED Wd' (fp32; so the mean term cancels what the GEMM added),
    b' = Wd beta + bd (fp32),
with sum (x - sh) and sum (x - sh)^2 accumulated in the same loop: one pass over x. sh is a
per-row shift, the mean of the row's first K block rounded to x's dtype: the statistics are the
"shifted data" variance (no E[x^2] - E[x]^2 cancellation: a row of mean 50, std 1 keeps fp32's
precision), and the GEMM's A operand x - sh is exact for 16-bit x within a factor of two of sh
(Sterbenz: the bulk of a large-mean row) and, for fp32 x under autocast, rounds to bf16 relative
to |x - sh| ~ std, not to |x| ~ 50.
The parameter prep (Wd', u, b') is one launch (adapter_norm_fold_kernel), O(Ca*C).

Backward (recompute, saved: x and the parameters): the recompute launch also stores the per-row
fp32 mean and rstd; the conv backward gives dh; then adapter_prenorm_dgrad_kernel, one launch:
a program owns BLOCK_M of the B*T*L rows and walks C twice --
  walk 1: dz = dh Wd (GEMM over K = Ca) parked in the dx buffer (it is written there anyway,
          and the program's rows, 64 x C x 2 B = 96 KB on shape A, are still in L2 when walk 2
          reads them back: recomputing instead would add 2 N C Ca = 14.8 GFLOP on shape A B8,
          ~19 us at 800 TFLOP/s), the row sums c1 = sum gamma dz, c2 = sum gamma dz xhat and
          this program's fp32 partials of dgamma = sum dz xhat, dbeta = sum dz;
  walk 2: dx = dO + rstd (gamma dz - c1 / C - xhat c2 / C) on spatial rows, dO on prefix rows.
  walk 2 also writes z = xhat gamma + beta (N, C) in the compute dtype, for dWd = dh^T z in the
  existing wgrad launch (z in place of x_s: the same bytes read there). The alternative, the
  LayerNorm applied to the wgrad kernel's x tiles in its load prologue, saves that write (N C
  bytes: 19.3 MB in bf16 on shape A B8, ~4.5 us at 4.3 TB/s) but ptxas serialised the sm_90
  wgmma of every such variant (128x128 bf16/fp16: an MMA operand changed in registers, as the
  DropPath factor on A did before it moved to B).
dgamma and dbeta ride in the backward's one finalize launch (two more segments).

Shapes: x (B*T, L, C); dh (B*T*S, Ca); mean, rstd (B*T*S,) fp32; Wd (Ca, C); gamma, beta (C,).
With prefix_mode="mlp" every row is a branch row: the kernels run with P = 0 and S = L.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import TileConfig, _cast, _gemm_rows_tile, _mma, _weight_desc, aligned, arch_of, dot_flags, weight_tma


# ------------------------------------------------------------------------------ forward
@triton.jit
def adapter_norm_fold_kernel(
    wd_ptr, bd_ptr, lnw_ptr, lnb_ptr, wf_ptr, u_ptr, bf_ptr,
    CA, C,
    stride_wo, stride_wi,  # fc1.weight (Ca, C)
    HAS_BD: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows of Wd per program
    BLOCK_N: tl.constexpr,  # columns per step
):
    """wf (Ca, C) contiguous = Wd diag(gamma) in wf's dtype (HAS_LNW; else Wd is the GEMM's
    weight itself), u (Ca,) fp32 = rowsum of the rounded wf, bf (Ca,) fp32 = Wd beta + bd."""
    offs_o = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_o = offs_o < CA
    u = tl.zeros([BLOCK_M], dtype=tl.float32)
    b = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_N):
        offs_c = c0 + tl.arange(0, BLOCK_N)
        mask_c = offs_c < C
        mask = mask_o[:, None] & mask_c[None, :]
        w = tl.load(wd_ptr + offs_o[:, None] * stride_wo + offs_c[None, :] * stride_wi, mask=mask, other=0.0)
        w = w.to(tl.float32)
        wf = w
        if HAS_LNW:
            gamma = tl.load(lnw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            wf = _cast(w * gamma[None, :], wf_ptr.dtype.element_ty)
            tl.store(wf_ptr + offs_o[:, None] * C + offs_c[None, :], wf, mask=mask)
            wf = wf.to(tl.float32)
        u += tl.sum(wf, axis=1)
        if HAS_LNB:
            beta = tl.load(lnb_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            b += tl.sum(w * beta[None, :], axis=1)
    if HAS_BD:
        b += tl.load(bd_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
    tl.store(u_ptr + offs_o, u, mask=mask_o)
    tl.store(bf_ptr + offs_o, b, mask=mask_o)


@triton.jit
def _ln_gemm_rows_tile(
    a_ptr, a_row_off, mask_m, stride_ak,  # A rows: a_ptr + a_row_off[m] + k * stride_ak
    w_ptr, stride_wo, stride_wi, offs_o, mask_o, K, eps,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    w_desc, o0, USE_TMA: tl.constexpr, W_KMAJOR: tl.constexpr,
):
    """(acc, dmu, mean, rstd): acc (BLOCK_M, BLOCK_O) fp32 = (A - sh) @ W^T over K, with the
    row statistics of A from the same loads; dmu = mean - sh. The caller's h_pre is
    rstd * (acc - dmu * u) + b' (see the module doc). Masked rows come out with acc = 0."""
    offs_k = tl.arange(0, BLOCK_K)
    first = tl.load(a_ptr + a_row_off[:, None] + offs_k[None, :].to(tl.int64) * stride_ak,
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    # the shift: the first block's row mean, in A's dtype (x - sh is then exact for 16-bit x)
    sh = _cast(tl.sum(first.to(tl.float32), axis=1) / tl.minimum(K, BLOCK_K), a_ptr.dtype.element_ty)
    sh = sh.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        mask = mask_m[:, None] & mask_k[None, :]
        a = tl.load(a_ptr + a_row_off[:, None] + k[None, :].to(tl.int64) * stride_ak, mask=mask, other=0.0)
        d = tl.where(mask, a.to(tl.float32) - sh[:, None], 0.0)
        s1 += tl.sum(d, axis=1)
        s2 += tl.sum(d * d, axis=1)
        if USE_TMA:
            if W_KMAJOR:
                w = w_desc.load([k0, o0])
            else:
                w = tl.trans(w_desc.load([o0, k0]))
        else:
            w = tl.load(w_ptr + offs_o[None, :] * stride_wo + k[:, None] * stride_wi,
                        mask=mask_o[None, :] & mask_k[:, None], other=0.0)
        acc = _mma(d, w, acc, DOT_FP32, INPUT_PRECISION)
    dmu = s1 / K
    var = tl.maximum(s2 / K - dmu * dmu, 0.0)
    rstd = 1.0 / tl.sqrt(var + eps)
    return acc, dmu, sh + dmu, rstd


def fold_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # a streaming pass over Wd: 16 rows x 128 columns per step (8 fp32 per thread at 4 warps);
    # 24 programs on shape A's Ca = 384 -- latency-bound, ~1 MB moved
    return TileConfig(16, 128, 16, num_warps=4, num_stages=1)


def fold_norm(fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], norm_weight: Optional[torch.Tensor],
              norm_bias: Optional[torch.Tensor]) -> tuple:
    """(weight, u, b') of the folded down-projection, one launch: weight = Wd diag(gamma) (Ca, C)
    contiguous in fc1_weight's dtype (fc1_weight itself when gamma is None), u (Ca,) fp32 its row
    sums, b' (Ca,) fp32 = Wd beta + bd (zeros without beta and bd; the kernel skips it then)."""
    ca, c = fc1_weight.shape
    dev = fc1_weight.device
    wf = torch.empty((ca, c), device=dev, dtype=fc1_weight.dtype) if norm_weight is not None else fc1_weight
    u = torch.empty((ca,), device=dev, dtype=torch.float32)
    bf = torch.empty((ca,), device=dev, dtype=torch.float32)
    if ca == 0:
        return wf, u, bf
    cfg = tuning.config_for("norm_fold", kt=1, compute_dtype=fc1_weight.dtype, arch=arch_of(fc1_weight))
    adapter_norm_fold_kernel[(triton.cdiv(ca, cfg.BLOCK_M),)](
        fc1_weight, fc1_bias if fc1_bias is not None else u, norm_weight if norm_weight is not None else u,
        norm_bias if norm_bias is not None else u, wf, u, bf,
        ca, c, fc1_weight.stride(0), fc1_weight.stride(1),
        HAS_BD=fc1_bias is not None, HAS_LNW=norm_weight is not None, HAS_LNB=norm_bias is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return wf, u, bf


# ----------------------------------------------------------------------------- backward
@triton.jit
def _token_rows(rows, n_rows, L, P, S):
    """Row r of the B*T*L rows -> (in range, frame f, token index l, spatial, flat token f*S + l - P)."""
    mask_m = rows < n_rows
    rows64 = rows.to(tl.int64)
    f = rows64 // L
    l_idx = rows64 - f * L
    spatial = mask_m & (l_idx >= P)
    return mask_m, f, l_idx, spatial, f * S + (l_idx - P)


@triton.jit
def _xhat_block(x_ptr, x_off, offs_n, stride_xc, smask, mean, rstd):
    x = tl.load(x_ptr + x_off + offs_n[None, :].to(tl.int64) * stride_xc, mask=smask, other=0.0).to(tl.float32)
    return tl.where(smask, (x - mean[:, None]) * rstd[:, None], 0.0)


@triton.jit
def adapter_prenorm_dgrad_kernel(
    dout_ptr, x_ptr, dh_ptr, wd_ptr, lnw_ptr, lnb_ptr, mean_ptr, rstd_ptr, dx_ptr, part_ptr, z_ptr,
    n_rows, L, P, S, CA, C,
    stride_df, stride_dl, stride_dc,  # dO viewed as (B*T, L, C)
    stride_xf, stride_xl, stride_xc,  # x viewed as (B*T, L, C)
    stride_hn,  # dh (B*T*S, Ca) row stride, unit column stride
    stride_wo, stride_wi,  # the GEMM's W = Wd^T (C, Ca): fc1.weight's strides swapped
    HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = False,
):
    """dx (B*T*L, C) contiguous in dO's dtype: dO + the LayerNorm backward of dz = dh Wd on the
    spatial rows; part (2, programs, C) fp32: this program's sum dz xhat (part[0]) and sum dz
    (part[1]), each a contiguous finalize segment; z (B*T*S, C) contiguous in z's dtype: the
    LayerNorm's output xhat * gamma + beta on the spatial rows (dWd's operand)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m, f, l_idx, spatial, token = _token_rows(rows, n_rows, L, P, S)
    rows64 = rows.to(tl.int64)
    mean = tl.load(mean_ptr + token, mask=spatial, other=0.0)
    rstd = tl.load(rstd_ptr + token, mask=spatial, other=0.0)
    x_off = f[:, None] * stride_xf + l_idx[:, None] * stride_xl
    w_desc = _weight_desc(wd_ptr, C, CA, stride_wo, stride_wi, BLOCK_N, BLOCK_K, USE_TMA, W_KMAJOR)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_c gamma dz
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_c gamma dz xhat
    base = part_ptr + pid.to(tl.int64) * C
    beta_base = base + tl.num_programs(0).to(tl.int64) * C
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < C
        mask = mask_m[:, None] & mask_n[None, :]
        dz = _gemm_rows_tile(
            dh_ptr, token * stride_hn, spatial, 1, wd_ptr, stride_wo, stride_wi,
            offs_n, mask_n, CA, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
            w_desc, n0, USE_TMA, W_KMAJOR,
        )
        xhat = _xhat_block(x_ptr, x_off, offs_n, stride_xc, spatial[:, None] & mask_n[None, :], mean, rstd)
        gdz = dz
        if HAS_LNW:
            gdz = dz * tl.load(lnw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c1 += tl.sum(gdz, axis=1)
        c2 += tl.sum(gdz * xhat, axis=1)
        tl.store(base + offs_n, tl.sum(dz * xhat, axis=0), mask=mask_n)
        tl.store(beta_base + offs_n, tl.sum(dz, axis=0), mask=mask_n)
        # park dz in dx (walk 2 overwrites it). The sums above take the fp32 dz: rounding it
        # first (for walk 2's values) made ptxas serialise the fp16 wgmma on sm_90 (C7514)
        tl.store(dx_ptr + rows64[:, None] * C + offs_n[None, :], _cast(dz, dx_ptr.dtype.element_ty), mask=mask)
    c1 = c1 / C
    c2 = c2 / C
    tl.debug_barrier()  # walk 2 reads dz that other threads of this program parked
    d_off = f[:, None] * stride_df + l_idx[:, None] * stride_dl
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < C
        mask = mask_m[:, None] & mask_n[None, :]
        smask = spatial[:, None] & mask_n[None, :]
        ptrs = dx_ptr + rows64[:, None] * C + offs_n[None, :]
        gdz = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        xhat = _xhat_block(x_ptr, x_off, offs_n, stride_xc, smask, mean, rstd)
        z = xhat
        if HAS_LNW:
            gamma = tl.load(lnw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            gdz = gdz * gamma[None, :]
            z = z * gamma[None, :]
        if HAS_LNB:
            z = z + tl.load(lnb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(z_ptr + token[:, None] * C + offs_n[None, :], _cast(z, z_ptr.dtype.element_ty), mask=smask)
        d = tl.load(dout_ptr + d_off + offs_n[None, :].to(tl.int64) * stride_dc, mask=mask, other=0.0)
        d = d.to(tl.float32) + tl.where(smask, rstd[:, None] * (gdz - c1[:, None] - xhat * c2[:, None]), 0.0)
        tl.store(ptrs, _cast(d, dx_ptr.dtype.element_ty), mask=mask)


# Tile configurations (tuning.KERNELS "prenorm_dgrad", "prenorm_dgrad_unaligned"): the shape of
# the adapter + LayerNorm pair's backward kernel (adapter_layernorm.up_ln_bwd_config), which
# also walks all of C twice with a GEMM in walk 1 and one row tile of stats: 64 rows give 197
# programs on shape A B8 (1.5 waves of 132 SMs), 128 rows would give 99 (0.75 of one wave).
def prenorm_dgrad_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # ptxas -v, 16-bit 64x128: 229-242 registers on sm_90 (wgmma, no spills); on sm_80 it spilled
    # 172 B at 255 with both affine tensors (walk 2's z store), so Ampere takes 64x64
    if compute_dtype == torch.float32:
        return TileConfig(32, 64, 16, num_warps=8, num_stages=2)
    if arch < 90:
        return TileConfig(64, 64, 32, num_warps=8, num_stages=3)
    return TileConfig(64, 128, 32, num_warps=8, num_stages=3)


def prenorm_dgrad_unaligned_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    """Unaligned operands (per-element 64-bit addresses for dO, x, dx): the pair's unaligned
    tiles (16-bit 64x128 spilled there, 64x32 did not)."""
    if compute_dtype == torch.float32:
        return TileConfig(32, 32, 16, num_warps=8, num_stages=2)
    return TileConfig(64, 32, 32, num_warps=8, num_stages=3)


def prenorm_dgrad(
    dout: torch.Tensor,
    x: torch.Tensor,
    dh: torch.Tensor,
    fc1_weight: torch.Tensor,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_prefix_tokens: int,
    z: Optional[torch.Tensor] = None,
) -> tuple:
    """(dx (B*T, L, C) contiguous in dout's dtype, affine partials (2, programs, 1, C) fp32: of
    dgamma, of dbeta, z = LayerNorm(x_s) (B*T*S, C) in fc1_weight's dtype; into ``z`` if given,
    contiguous): one launch. dout, x (B*T, L, C) any strides; dh (B*T*S, Ca) unit column stride; mean, rstd (N,)."""
    bt, seq_len, c = x.shape
    ca = dh.shape[1]
    n_rows = bt * seq_len
    dx = torch.empty((bt, seq_len, c), device=x.device, dtype=dout.dtype)
    weight = fc1_weight.t()  # the GEMM's W (C, Ca)
    is_aligned = aligned(c, ca, *x.stride(), *dout.stride(), dh.stride(0), *fc1_weight.stride())
    cfg = tuning.config_for(tuning.family("prenorm_dgrad", is_aligned), kt=1, compute_dtype=fc1_weight.dtype,
                            arch=arch_of(x))
    programs = triton.cdiv(n_rows, cfg.BLOCK_M)
    part = torch.empty((2, programs, 1, c), device=x.device, dtype=torch.float32)
    if z is None:
        z = torch.empty((bt * (seq_len - num_prefix_tokens), c), device=x.device, dtype=fc1_weight.dtype)
    assert z.is_contiguous() and z.shape == (bt * (seq_len - num_prefix_tokens), c)
    if n_rows == 0:
        return dx, part, z
    dot_fp32, precision = dot_flags(fc1_weight.dtype)
    use_tma, kmajor = weight_tma(cfg, weight, arch_of(x), is_aligned)
    adapter_prenorm_dgrad_kernel[(programs,)](
        dout, x, dh, weight, norm_weight if norm_weight is not None else mean,
        norm_bias if norm_bias is not None else mean, mean, rstd, dx, part, z,
        n_rows, seq_len, num_prefix_tokens, seq_len - num_prefix_tokens, ca, c,
        dout.stride(0), dout.stride(1), dout.stride(2), x.stride(0), x.stride(1), x.stride(2),
        dh.stride(0), weight.stride(0), weight.stride(1),
        HAS_LNW=norm_weight is not None, HAS_LNB=norm_bias is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=use_tma, W_KMAJOR=kmajor,
        **cfg.launch_kwargs(),
    )
    return dx, part, z
