"""The adapter and the LayerNorm after it, fused (docs/design.md §7): (out, normed = LN(out)).

In every block we adapt, the adapter's output goes straight into a LayerNorm (norm1 / ln_1
before attention, norm2 / ln_2 before the MLP) that computes in fp32 and so saves an fp32 copy
of its input: 2 x x per adapted position under the official recipe (bf16 backbone, autocast).
The pair saves x and the per-token (mean, rstd) instead and recomputes out in backward.

Forward, two launches (the adapter's own down-conv kernel, then):
  adapter_up_residual_ln_fwd_kernel: a program owns BLOCK_M rows of all B*T*L rows and walks
  every BLOCK_N block of C: out = x + [spatial] (g Wu^T + bu), stored in x's dtype, with the
  row statistics of the ROUNDED out (what the model's LayerNorm would see) merged block by
  block (Chan's parallel update: no E[x^2] - E[x]^2 cancellation); then a second walk over its
  own out rows (just written: L2-resident) writes normed = (out - mean) rstd w + b. One pass
  over the residual stream in HBM: read x, write out and normed.
Backward, six launches (seven with LayerNorm affine grads: they ride in the finalize launch):
  1. recompute g, h (down-conv, STORE_H), as the adapter's backward does;
  2. adapter_up_ln_bwd_kernel: recompute out (ONE more GEMM than the adapter's backward: the
     up-projection), xhat = (out - mean) rstd, and fold the LayerNorm backward into the
     residual gradient: dO = d_out + rstd (w dn - mean_c(w dn) - xhat mean_c(w dn xhat)),
     plus per-program fp32 partials of dw = sum dn xhat, db = sum dn;
  3-6. the adapter's backward from dO (kernels/adapter_bwd.backward_from_recompute); the
     LayerNorm partials join its fixed-order finalize. Deterministic, no atomics.

Shapes: x (B*T, L, C); g (B*T*S, Ca); mean, rstd (B*T*L,) fp32; d_out, d_normed (B*T, L, C).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import TileConfig, _cast, _gemm_rows_tile, _weight_desc, aligned, arch_of, dot_flags, weight_tma
from .adapter_fwd import down_conv_forward


@triton.jit
def _spatial_rows(rows, n_rows, L, P, S):
    """Row r of the (B*T*L) rows -> (frame f, token index l, is-spatial mask, flat g token)."""
    mask_m = rows < n_rows
    rows64 = rows.to(tl.int64)
    f = rows64 // L
    l_idx = rows64 - f * L
    spatial = mask_m & (l_idx >= P)
    return mask_m, f, l_idx, spatial, f * S + (l_idx - P)


@triton.jit
def _out_block(x_ptr, g_ptr, wu_ptr, bu_ptr, f, l_idx, spatial, token, mask_m, offs_n, mask_n, CA,
               stride_xf, stride_xl, stride_xc, stride_gn, stride_wo, stride_wi,
               HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
               w_desc, n0, USE_TMA: tl.constexpr, W_KMAJOR: tl.constexpr):
    """out[rows, offs_n] = x + [spatial] (g[token] Wu^T + bu), rounded to OUT_DTYPE (returned in
    OUT_DTYPE: the exact values the model's LayerNorm sees)."""
    acc = _gemm_rows_tile(
        g_ptr, token * stride_gn, spatial, 1, wu_ptr, stride_wo, stride_wi,
        offs_n, mask_n, CA, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
        w_desc, n0, USE_TMA, W_KMAJOR,
    )
    if HAS_BIAS:
        acc += tl.load(bu_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(spatial[:, None], acc, 0.0)
    mask = mask_m[:, None] & mask_n[None, :]
    res = tl.load(
        x_ptr + f[:, None] * stride_xf + l_idx[:, None] * stride_xl + offs_n[None, :].to(tl.int64) * stride_xc,
        mask=mask, other=0.0,
    ).to(tl.float32)
    return _cast(res + acc, OUT_DTYPE)


@triton.jit
def adapter_up_residual_ln_fwd_kernel(
    x_ptr, g_ptr, wu_ptr, bu_ptr, lnw_ptr, lnb_ptr, out_ptr, normed_ptr, mean_ptr, rstd_ptr,
    n_rows, L, P, S, CA, C, eps,
    stride_xf, stride_xl, stride_xc,  # x viewed as (B*T, L, C); may be strided
    stride_gn,  # g: (B*T*S, Ca), unit column stride
    stride_wo, stride_wi,  # fc2.weight (C, Ca)
    HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, HAS_LNB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = False,
):
    """out, normed (B*T*L, C) contiguous; mean, rstd (B*T*L,) fp32."""

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m, f, l_idx, spatial, token = _spatial_rows(rows, n_rows, L, P, S)
    rows64 = rows.to(tl.int64)
    w_desc = _weight_desc(wu_ptr, C, CA, stride_wo, stride_wi, BLOCK_N, BLOCK_K, USE_TMA, W_KMAJOR)
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    count = 0.0
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < C
        out = _out_block(
            x_ptr, g_ptr, wu_ptr, bu_ptr, f, l_idx, spatial, token, mask_m, offs_n, mask_n, CA,
            stride_xf, stride_xl, stride_xc, stride_gn, stride_wo, stride_wi,
            HAS_BIAS, out_ptr.dtype.element_ty, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
            w_desc, n0, USE_TMA, W_KMAJOR,
        )
        mask = mask_m[:, None] & mask_n[None, :]
        tl.store(out_ptr + rows64[:, None] * C + offs_n[None, :], out, mask=mask)
        # Chan's merge of this block's (mean, M2) into the running row statistics
        v = tl.where(mask, out.to(tl.float32), 0.0)
        nb = tl.minimum(C - n0, BLOCK_N).to(tl.float32)
        block_mean = tl.sum(v, axis=1) / nb
        d = tl.where(mask, v - block_mean[:, None], 0.0)
        total = count + nb
        delta = block_mean - mean
        mean += delta * (nb / total)
        m2 += tl.sum(d * d, axis=1) + delta * delta * (count * nb / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / C + eps)
    tl.store(mean_ptr + rows64, mean, mask=mask_m)
    tl.store(rstd_ptr + rows64, rstd, mask=mask_m)
    tl.debug_barrier()  # the second walk reads out rows other threads of this program wrote
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < C
        mask = mask_m[:, None] & mask_n[None, :]
        ptrs = rows64[:, None] * C + offs_n[None, :]
        v = tl.load(out_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
        y = (v - mean[:, None]) * rstd[:, None]
        if HAS_LNW:
            y = y * tl.load(lnw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if HAS_LNB:
            y = y + tl.load(lnb_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(normed_ptr + ptrs, _cast(y, normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_up_ln_bwd_kernel(
    x_ptr, g_ptr, wu_ptr, bu_ptr, lnw_ptr, mean_ptr, rstd_ptr, dout_ptr, dnormed_ptr, dres_ptr, part_ptr,
    n_rows, L, P, S, CA, C,
    stride_xf, stride_xl, stride_xc,
    stride_gn,
    stride_wo, stride_wi,
    stride_df, stride_dl, stride_dc,  # d_out viewed as (B*T, L, C)
    stride_nf, stride_nl, stride_nc,  # d_normed viewed as (B*T, L, C)
    HAS_BIAS: tl.constexpr, HAS_LNW: tl.constexpr, AFFINE_GRADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = False,
):
    """dres (B*T*L, C) contiguous in x's dtype: the residual stream's gradient with the LayerNorm
    backward folded in; part (programs, 2, C) fp32: this program's (sum dn xhat, sum dn)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m, f, l_idx, spatial, token = _spatial_rows(rows, n_rows, L, P, S)
    rows64 = rows.to(tl.int64)
    mean = tl.load(mean_ptr + rows64, mask=mask_m, other=0.0)
    rstd = tl.load(rstd_ptr + rows64, mask=mask_m, other=0.0)
    w_desc = _weight_desc(wu_ptr, C, CA, stride_wo, stride_wi, BLOCK_N, BLOCK_K, USE_TMA, W_KMAJOR)
    c1 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_c w dn
    c2 = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_c w dn xhat
    n_off = f[:, None] * stride_nf + l_idx[:, None] * stride_nl
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < C
        mask = mask_m[:, None] & mask_n[None, :]
        out = _out_block(
            x_ptr, g_ptr, wu_ptr, bu_ptr, f, l_idx, spatial, token, mask_m, offs_n, mask_n, CA,
            stride_xf, stride_xl, stride_xc, stride_gn, stride_wo, stride_wi,
            HAS_BIAS, dres_ptr.dtype.element_ty, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
            w_desc, n0, USE_TMA, W_KMAJOR,
        )
        # park the recomputed out in dres: the second walk overwrites it with the gradient
        tl.store(dres_ptr + rows64[:, None] * C + offs_n[None, :], out, mask=mask)
        xhat = tl.where(mask, (out.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        dn = tl.load(dnormed_ptr + n_off + offs_n[None, :].to(tl.int64) * stride_nc, mask=mask, other=0.0)
        dn = dn.to(tl.float32)
        wdn = dn
        if HAS_LNW:
            wdn = dn * tl.load(lnw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c1 += tl.sum(wdn, axis=1)
        c2 += tl.sum(wdn * xhat, axis=1)
        if AFFINE_GRADS:
            base = part_ptr + pid.to(tl.int64) * 2 * C
            tl.store(base + offs_n, tl.sum(dn * xhat, axis=0), mask=mask_n)
            tl.store(base + C + offs_n, tl.sum(dn, axis=0), mask=mask_n)
    c1 = c1 / C
    c2 = c2 / C
    tl.debug_barrier()  # the second walk reads out rows other threads of this program wrote
    d_off = f[:, None] * stride_df + l_idx[:, None] * stride_dl
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < C
        mask = mask_m[:, None] & mask_n[None, :]
        ptrs = dres_ptr + rows64[:, None] * C + offs_n[None, :]
        xhat = (tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
        dn = tl.load(dnormed_ptr + n_off + offs_n[None, :].to(tl.int64) * stride_nc, mask=mask, other=0.0)
        wdn = dn.to(tl.float32)
        if HAS_LNW:
            wdn = wdn * tl.load(lnw_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        d = tl.load(dout_ptr + d_off + offs_n[None, :].to(tl.int64) * stride_dc, mask=mask, other=0.0)
        d = d.to(tl.float32) + rstd[:, None] * (wdn - c1[:, None] - xhat * c2[:, None])
        tl.store(ptrs, _cast(d, dres_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Tile configurations (tuning.KERNELS "up_residual_ln" and "up_ln_bwd"). A program walks all of
# C, so its grid is row blocks only: 64 rows give 394 programs on shape A (3 waves of 132 SMs at
# one CTA each) where 128 rows would give 197 (1.5 waves, the last half empty).
# --------------------------------------------------------------------------------------------
def up_residual_ln_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    if compute_dtype == torch.float32:
        return TileConfig(32, 64, 16, num_warps=8, num_stages=2)
    return TileConfig(64, 128, 32, num_warps=8, num_stages=3)


def up_ln_bwd_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # the forward's tile plus d_normed / d_out loads and the two per-row sums: 203 registers on
    # sm_90 (bf16, shape A), 214 on sm_80, no spills
    return up_residual_ln_config(compute_dtype, arch)


def up_ln_unaligned_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    """Both pair kernels on unaligned operands (C or a stride not a multiple of 16: 64-bit
    addresses per element for x, out, normed, d_out, d_normed). ptxas -v on the odd shape
    (C=200, Ca=72): 16-bit 64x128 spilled 3-7 KB, 64x64 0.3-1.4 KB, 64x32 none (213 registers
    on sm_90, wgmma kept); fp32 32x64 spilled 40-144 B in backward, 32x32 none."""
    if compute_dtype == torch.float32:
        return TileConfig(32, 32, 16, num_warps=8, num_stages=2)
    return TileConfig(64, 32, 32, num_warps=8, num_stages=3)


def _tile(kernel: str, weight: torch.Tensor, like: torch.Tensor, is_aligned: bool) -> tuple:
    kernel = tuning.family(kernel, is_aligned)
    cfg = tuning.config_for(kernel, kt=1, compute_dtype=weight.dtype, arch=arch_of(like))
    use_tma, kmajor = weight_tma(cfg, weight, arch_of(like), is_aligned)
    return cfg, use_tma, kmajor


def up_residual_layernorm_forward(
    x: torch.Tensor,
    g: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float,
    num_prefix_tokens: int,
    normed_dtype: torch.dtype,
) -> tuple:
    """(out (B*T, L, C) x's dtype, normed (B*T, L, C) normed_dtype, mean, rstd (B*T, L) fp32)."""
    bt, seq_len, c = x.shape
    ca = g.shape[1]
    n_rows = bt * seq_len
    out = torch.empty((bt, seq_len, c), device=x.device, dtype=x.dtype)
    normed = torch.empty((bt, seq_len, c), device=x.device, dtype=normed_dtype)
    mean = torch.empty((bt, seq_len), device=x.device, dtype=torch.float32)
    rstd = torch.empty((bt, seq_len), device=x.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, normed, mean, rstd
    is_aligned = aligned(c, ca, *x.stride(), g.stride(0), *fc2_weight.stride())
    cfg, use_tma, kmajor = _tile("up_residual_ln", fc2_weight, x, is_aligned)
    dot_fp32, precision = dot_flags(fc2_weight.dtype)
    adapter_up_residual_ln_fwd_kernel[(triton.cdiv(n_rows, cfg.BLOCK_M),)](
        x, g, fc2_weight, fc2_bias if fc2_bias is not None else fc2_weight,
        ln_weight if ln_weight is not None else out, ln_bias if ln_bias is not None else out,
        out, normed, mean, rstd,
        n_rows, seq_len, num_prefix_tokens, seq_len - num_prefix_tokens, ca, c, float(eps),
        x.stride(0), x.stride(1), x.stride(2), g.stride(0), fc2_weight.stride(0), fc2_weight.stride(1),
        HAS_BIAS=fc2_bias is not None, HAS_LNW=ln_weight is not None, HAS_LNB=ln_bias is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=use_tma, W_KMAJOR=kmajor,
        **cfg.launch_kwargs(),
    )
    return out, normed, mean, rstd


def adapter_layernorm_forward(
    x: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    conv_taps: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    eps: float,
    normed_dtype: torch.dtype,
) -> tuple:
    """Fused forward of the pair, two launches: (out, normed, mean, rstd), see
    up_residual_layernorm_forward. x: (B*T, L, C) any strides; conv_taps (Ca, KT)."""
    g, _ = down_conv_forward(x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias)
    return up_residual_layernorm_forward(x, g, fc2_weight, fc2_bias, ln_weight, ln_bias, eps, num_prefix_tokens,
                                         normed_dtype)


def layernorm_residual_grad(
    d_out: torch.Tensor,
    d_normed: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_prefix_tokens: int,
    affine_grads: bool,
) -> tuple:
    """(dres (B*T, L, C) in x's dtype = d_out + the LayerNorm backward of d_normed, affine
    partials (programs, 2, C) fp32 or None). One launch; out is recomputed from x and g."""
    bt, seq_len, c = x.shape
    ca = g.shape[1]
    n_rows = bt * seq_len
    dres = torch.empty((bt, seq_len, c), device=x.device, dtype=x.dtype)
    is_aligned = aligned(c, ca, *x.stride(), g.stride(0), *fc2_weight.stride(), *d_out.stride(), *d_normed.stride())
    cfg, use_tma, kmajor = _tile("up_ln_bwd", fc2_weight, x, is_aligned)
    programs = triton.cdiv(n_rows, cfg.BLOCK_M)
    part = torch.empty((programs, 2, c), device=x.device, dtype=torch.float32) if affine_grads else None
    dot_fp32, precision = dot_flags(fc2_weight.dtype)
    adapter_up_ln_bwd_kernel[(programs,)](
        x, g, fc2_weight, fc2_bias if fc2_bias is not None else fc2_weight,
        ln_weight if ln_weight is not None else mean, mean, rstd, d_out, d_normed, dres,
        part if part is not None else mean,
        n_rows, seq_len, num_prefix_tokens, seq_len - num_prefix_tokens, ca, c,
        x.stride(0), x.stride(1), x.stride(2), g.stride(0), fc2_weight.stride(0), fc2_weight.stride(1),
        d_out.stride(0), d_out.stride(1), d_out.stride(2), d_normed.stride(0), d_normed.stride(1), d_normed.stride(2),
        HAS_BIAS=fc2_bias is not None, HAS_LNW=ln_weight is not None, AFFINE_GRADS=affine_grads,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=use_tma, W_KMAJOR=kmajor,
        **cfg.launch_kwargs(),
    )
    return dres, part


def adapter_layernorm_backward(
    d_out: torch.Tensor,
    d_normed: torch.Tensor,
    x: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    conv_taps: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    affine_grads: bool = True,
    frames_per_prog: Optional[int] = None,
) -> tuple:
    """(dx, dWd, dbd, dtaps (Ca, KT), dbc, dWu, dbu, dln_weight, dln_bias): the adapter's grads as
    kernels.adapter_bwd.adapter_backward returns them, plus the LayerNorm affine grads in their
    own dtypes (None where absent or affine_grads=False). Six launches (see the module doc)."""
    from .adapter_bwd import backward_from_recompute, parameter_grads

    bt, seq_len, c = x.shape
    grads = parameter_grads(x, fc1_weight, fc1_bias, conv_taps, conv_bias, fc2_weight, fc2_bias)
    rows = (ln_weight, ln_bias) if affine_grads else (None, None)
    live = [t for t in rows if t is not None]
    # both affine grads in one buffer (one finalize segment): rows [dw; db], the LayerNorm's dtype
    affine = torch.empty((2, c), device=x.device, dtype=live[0].dtype) if live else None
    g, h = down_conv_forward(
        x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
        store_h=True, frames_per_prog=frames_per_prog,
    )
    dres, part = layernorm_residual_grad(d_out, d_normed, x, g, fc2_weight, fc2_bias, ln_weight, mean, rstd,
                                         num_prefix_tokens, affine is not None)
    if bt * (seq_len - num_prefix_tokens) == 0:  # no spatial tokens: the adapter is the identity
        for t in grads.values():
            if t is not None:
                t.zero_()
        adapter = (dres, grads["dwd"], grads["dbd"], grads["dwc"], grads["dbc"], grads["dwu"], grads["dbu"])
        if affine is not None:
            affine.copy_(part.sum(0))
    else:
        adapter = backward_from_recompute(
            dres, x, g, h, num_frames, num_prefix_tokens, fc1_weight, fc2_weight, conv_taps, grads,
            extra_segment=(part, affine) if affine is not None else None, frames_per_prog=frames_per_prog,
        )
    dlnw = affine[0] if affine is not None and rows[0] is not None else None
    dlnb = affine[1] if affine is not None and rows[1] is not None else None
    return (*adapter, dlnw, dlnb)
