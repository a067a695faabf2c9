"""Weight gradients of the fused backward in two launches, deterministic (no float atomics):

1. adapter_wgrad_kernel: one launch for both weight GEMMs over the N spatial tokens, split over
   tokens into fp32 partials: problem 0 dWu = dy^T g (C, Ca) with dbu = sum dy, problem 1
   dWd^T = x_s^T dh (C, Ca) with dbd = sum dh. Both have the same (I, J) = (C, Ca) tile grid.
2. adapter_grad_finalize_kernel: one launch that sums every fp32 partial of the backward (the
   two weight GEMMs, their biases, the conv's dwc / dbc) in a fixed order and casts each to the
   parameters' dtype -- instead of a dozen torch sum / cast / transpose launches.

Token n = f*S + s of a (B*T, L, K) token tensor lives at row (f, P + s); a flat (N, K) buffer
is the same with P = 0, stride_f = S*K. The token loop steps (f, s) by BLOCK_K = wrap_f*S + wrap_s
with one conditional carry: no integer division in the K loop.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import (TL_DTYPE, TileConfig, _cast, _drop_factor, _mma, aligned, arch_of, dot_flags, sm_count,
                      token_splits)


@triton.jit
def _wgrad_tile(
    a_ptr, P_a, s_af, s_al, s_ac, b_ptr, P_b, s_bf, s_bl, s_bc,
    dw_part_ptr, dba_part_ptr, dbb_part_ptr, part, split,
    N, S, I, J, tokens_per_split, wrap_f, wrap_s,
    mask_ptr, drop_keep, T, bu_ptr, dscale_ptr,
    BIAS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    A_DROP: tl.constexpr, BU_DOT: tl.constexpr,
):
    """dw_part[part] = sum over the split's tokens of A[n]^T B[n] for one (I, J) tile; BIAS 1
    sums A's columns into dba_part[split] (pid_j == 0 programs), 2 sums B's into dbb_part.
    A_DROP: A's column sums (BIAS 1) weight token n by DropPath's factor mask[clip(n)] / drop_keep
    (clips of T frames); the GEMM does not (the factor in the MMA operand serialised sm_90's
    wgmma: the caller puts it on B instead). BU_DOT (with BIAS 1): those programs also write bu . (their column sums) to
    dscale_ptr[split * I blocks + pid_i] (the fc2 bias's share of d(scale))."""
    pid_j = tl.program_id(0)
    pid_i = tl.program_id(1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_i = offs_i < I
    mask_j = offs_j < J
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sum_a = tl.zeros([BLOCK_M], dtype=tl.float32)
    sum_b = tl.zeros([BLOCK_N], dtype=tl.float32)
    n_start = split * tokens_per_split
    n_end = tl.minimum(n_start + tokens_per_split, N)
    # (frame, position) of the split's first BLOCK_K tokens: the only divisions of the launch
    pos = n_start + tl.arange(0, BLOCK_K).to(tl.int64)
    f = pos // S
    s = pos - f * S
    col_a = offs_i[:, None].to(tl.int64) * s_ac
    col_b = offs_j[None, :].to(tl.int64) * s_bc
    for n0 in range(n_start, n_end, BLOCK_K):
        mask_n = (n0 + tl.arange(0, BLOCK_K)) < n_end
        a = tl.load(a_ptr + (f * s_af + (s + P_a) * s_al)[None, :] + col_a,
                    mask=mask_i[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_M, BLOCK_K) = A^T
        b = tl.load(b_ptr + (f * s_bf + (s + P_b) * s_bl)[:, None] + col_b,
                    mask=mask_n[:, None] & mask_j[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if BIAS == 1:
            if pid_j == 0:
                if A_DROP:
                    fac = _drop_factor(mask_ptr, f.to(tl.int32) // T, mask_n, drop_keep, A_DROP)
                    sum_a += tl.sum(a.to(tl.float32) * fac[None, :], axis=1)
                else:
                    sum_a += tl.sum(a.to(tl.float32), axis=1)
        if BIAS == 2:
            if pid_i == 0:
                sum_b += tl.sum(b.to(tl.float32), axis=0)
        acc = _mma(_cast(a, COMPUTE_DTYPE), _cast(b, COMPUTE_DTYPE), acc, DOT_FP32, INPUT_PRECISION)
        s += wrap_s
        f += wrap_f
        carry = s >= S
        s = tl.where(carry, s - S, s)
        f = tl.where(carry, f + 1, f)
    part64 = part.to(tl.int64)
    tl.store(dw_part_ptr + part64 * I * J + offs_i[:, None] * J + offs_j[None, :], acc,
             mask=mask_i[:, None] & mask_j[None, :])
    if BIAS == 1:
        if pid_j == 0:
            tl.store(dba_part_ptr + split.to(tl.int64) * I + offs_i, sum_a, mask=mask_i)
            if BU_DOT:
                bu = tl.load(bu_ptr + offs_i, mask=mask_i, other=0.0).to(tl.float32)
                tl.store(dscale_ptr + split * tl.num_programs(1) + pid_i, tl.sum(sum_a * bu, axis=0))
    if BIAS == 2:
        if pid_i == 0:
            tl.store(dbb_part_ptr + split.to(tl.int64) * J + offs_j, sum_b, mask=mask_j)


@triton.jit
def adapter_wgrad_kernel(
    a0_ptr, b0_ptr, a1_ptr, b1_ptr, dw_part_ptr, dba_part_ptr, dbb_part_ptr,
    N, S, I, J, tokens_per_split, n_splits, wrap_f, wrap_s,
    P_a0, s_a0f, s_a0l, s_a0c, P_b0, s_b0f, s_b0l, s_b0c,  # problem 0: A0 (I cols), B0 (J cols)
    P_a1, s_a1f, s_a1l, s_a1c, P_b1, s_b1f, s_b1l, s_b1c,  # problem 1 (grid axis 2 >= n_splits)
    mask_ptr, drop_keep, T, bu_ptr, dscale_ptr,  # problem 0's A_DROP / BU_DOT (see _wgrad_tile)
    BIAS0: tl.constexpr, BIAS1: tl.constexpr,  # 0: none, 1: also sum A's columns, 2: B's
    COMPUTE_DTYPE: tl.constexpr,  # the weights' dtype: under autocast x / dO may be fp32
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    A0_DROP: tl.constexpr = False, BU_DOT0: tl.constexpr = False,
):
    """Grid (J blocks, I blocks, problems * splits); dw_part (problems * splits, I, J) fp32."""
    z = tl.program_id(2)
    if z < n_splits:
        _wgrad_tile(a0_ptr, P_a0, s_a0f, s_a0l, s_a0c, b0_ptr, P_b0, s_b0f, s_b0l, s_b0c,
                    dw_part_ptr, dba_part_ptr, dbb_part_ptr, z, z,
                    N, S, I, J, tokens_per_split, wrap_f, wrap_s, mask_ptr, drop_keep, T, bu_ptr, dscale_ptr,
                    BIAS0, COMPUTE_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION, A0_DROP, BU_DOT0)
    else:
        _wgrad_tile(a1_ptr, P_a1, s_a1f, s_a1l, s_a1c, b1_ptr, P_b1, s_b1f, s_b1l, s_b1c,
                    dw_part_ptr, dba_part_ptr, dbb_part_ptr, z, z - n_splits,
                    N, S, I, J, tokens_per_split, wrap_f, wrap_s, mask_ptr, drop_keep, T, bu_ptr, dscale_ptr,
                    BIAS1, COMPUTE_DTYPE, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION, False, False)


@triton.jit
def _reduce_segment(part_ptr, n_parts, R, Q, out_ptr, so_r, so_q, blk, BLOCK: tl.constexpr,
                    mult_ptr, SCALED: tl.constexpr):
    """out[r, q] (strides so_r, so_q) = sum over p = 0, 1, ... of part[p, r, q], in that order;
    times *mult_ptr (fp32) if SCALED."""
    e = blk * BLOCK + tl.arange(0, BLOCK)
    mask = e < R * Q
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    ptrs = part_ptr + e
    for _ in range(n_parts):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += R * Q  # a pointer increment: 64-bit addressing whatever the partials' size
    if SCALED:
        acc = acc * tl.load(mult_ptr).to(tl.float32)
    r = e // Q
    q = e - r * Q
    tl.store(out_ptr + r * so_r + q * so_q, _cast(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_grad_finalize_kernel(
    p0, n0, r0, q0, o0, sr0, sq0, e0,
    p1, n1, r1, q1, o1, sr1, sq1, e1,
    p2, n2, r2, q2, o2, sr2, sq2, e2,
    p3, n3, r3, q3, o3, sr3, sq3, e3,
    p4, n4, r4, q4, o4, sr4, sq4, e4,
    p5, n5, r5, q5, o5, sr5, sq5, e5,
    p6, n6, r6, q6, o6, sr6, sq6, e6,
    p7, n7, r7, q7, o7, sr7, sq7, e7,
    p8, n8, r8, q8, o8, sr8, sq8, e8,
    mult_ptr,
    BLOCK: tl.constexpr,
    SCALED: tl.constexpr = 0,  # bit k: segment k is multiplied by *mult_ptr (the branch scale)
):
    """Nine (partials (n, R, Q) fp32 -> out) segments; program blocks [e_{k-1}, e_k) do segment k."""
    pid = tl.program_id(0)
    if pid < e0:
        _reduce_segment(p0, n0, r0, q0, o0, sr0, sq0, pid, BLOCK, mult_ptr, SCALED % 2 == 1)
    elif pid < e1:
        _reduce_segment(p1, n1, r1, q1, o1, sr1, sq1, pid - e0, BLOCK, mult_ptr, SCALED // 2 % 2 == 1)
    elif pid < e2:
        _reduce_segment(p2, n2, r2, q2, o2, sr2, sq2, pid - e1, BLOCK, mult_ptr, SCALED // 4 % 2 == 1)
    elif pid < e3:
        _reduce_segment(p3, n3, r3, q3, o3, sr3, sq3, pid - e2, BLOCK, mult_ptr, SCALED // 8 % 2 == 1)
    elif pid < e4:
        _reduce_segment(p4, n4, r4, q4, o4, sr4, sq4, pid - e3, BLOCK, mult_ptr, SCALED // 16 % 2 == 1)
    elif pid < e5:
        _reduce_segment(p5, n5, r5, q5, o5, sr5, sq5, pid - e4, BLOCK, mult_ptr, SCALED // 32 % 2 == 1)
    elif pid < e6:
        _reduce_segment(p6, n6, r6, q6, o6, sr6, sq6, pid - e5, BLOCK, mult_ptr, SCALED // 64 % 2 == 1)
    elif pid < e7:
        _reduce_segment(p7, n7, r7, q7, o7, sr7, sq7, pid - e6, BLOCK, mult_ptr, SCALED // 128 % 2 == 1)
    elif pid < e8:
        _reduce_segment(p8, n8, r8, q8, o8, sr8, sq8, pid - e7, BLOCK, mult_ptr, SCALED // 256 % 2 == 1)


FINALIZE_BLOCK = 1024
# the adapter backward uses six (dWu, dWd, dbu, dbd, dwc, dbc); the adapter + LayerNorm pair
# adds its affine grads as a seventh (kernels/adapter_layernorm.py), d(scale) takes one, and
# norm="layernorm"'s dgamma and dbeta one each (separate tensors: the op's outputs may not
# alias): with a scale that is nine
FINALIZE_SEGMENTS = 9


def finalize_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # a streaming sum: BLOCK_M is the elements per program (1024 = 4 per thread at 8 warps)
    return TileConfig(FINALIZE_BLOCK, 16, 16, num_warps=8, num_stages=1)


def weight_grad_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # both operands are gathered token by token (64-bit addresses per element): 128x128x64
    # spilled up to 21 KB on sm_80 and 128x64 32 B on sm_90 for unaligned shapes
    # sm_90 bf16/fp16: 128x128x32 compiles to 158 registers, 64 KB smem, no spills on A/B/C and
    # halves the L2 traffic of 64x64 (951 -> 479 MB on A); 1 CTA per SM. 64x64: 80 regs, 3 CTAs.
    if compute_dtype == torch.float32:
        return TileConfig(64, 64, 16, num_warps=8, num_stages=2, ctas_per_sm=2)
    if arch >= 90:
        return TileConfig(128, 128, 32, num_warps=8, num_stages=3, ctas_per_sm=1)
    return TileConfig(64, 64, 32, num_warps=8, num_stages=3, ctas_per_sm=3)


def _token_view(t: torch.Tensor, num_prefix_tokens: int, spatial: int) -> tuple:
    """(P, stride_f, stride_l, stride_c) addressing of a (B*T, L, C) tensor's spatial tokens or of
    a flat (N, K) buffer (viewed as (N // S, S, K) with P = 0)."""
    if t.dim() == 3:
        return (num_prefix_tokens, t.stride(0), t.stride(1), t.stride(2))
    return (0, spatial * t.stride(0), t.stride(0), t.stride(1))


def weight_grad_partials(
    problems: Sequence[Tuple[torch.Tensor, torch.Tensor, int]],
    compute_dtype: torch.dtype,
    num_tokens: int,
    spatial: int,
    num_prefix_tokens: int,
    *,
    splits: Optional[int] = None,
    a0_drop: Optional[Tuple[torch.Tensor, float, int]] = None,
    bu_dot: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """One launch for up to two problems (A, B, bias side) with equal (I, J): fp32 partials
    (dw_part (problems * splits, I, J), dba_part (splits, I), dbb_part (splits, J), splits).

    a0_drop = (draw (B,) fp32 0/1, 1 - p, T): problem 0's bias sums weight A's rows by
    DropPath's per-clip factor (its GEMM does not: B must carry the factor). bu_dot = (bias (I,),
    out (bu_dot_parts(...),) fp32): problem 0 (bias side 1) also writes bias . (its column
    sums) per (split, I block), d(scale)'s bias share."""
    a0 = problems[0][0]
    i_dim, j_dim = a0.shape[-1], problems[0][1].shape[-1]
    cfg, splits, tokens_per_split = wgrad_plan(problems, compute_dtype, num_tokens, splits)
    dev = a0.device
    dw_part = torch.empty((len(problems) * splits, i_dim, j_dim), device=dev, dtype=torch.float32)
    dba_part = torch.empty((splits, i_dim), device=dev, dtype=torch.float32)
    dbb_part = torch.empty((splits, j_dim), device=dev, dtype=torch.float32)
    # IEEE even when TF32 is allowed: both operands are token-major (the reduction dim is the
    # strided one), and TF32 wgmma cannot take them transposed -- ptxas serialised it (C7515).
    dot_fp32, _ = dot_flags(compute_dtype)
    (a0, b0, bias0), (a1, b1, bias1) = problems[0], problems[-1]
    grid = (triton.cdiv(j_dim, cfg.BLOCK_N), triton.cdiv(i_dim, cfg.BLOCK_M), len(problems) * splits)
    assert bu_dot is None or (bias0 == 1 and bu_dot[1].numel() == splits * grid[1])
    draw, keep, frames = a0_drop if a0_drop is not None else (dw_part, 1.0, 1)
    bu, dscale = bu_dot if bu_dot is not None else (dw_part, dw_part)
    adapter_wgrad_kernel[grid](
        a0, b0, a1, b1, dw_part, dba_part, dbb_part,
        num_tokens, spatial, i_dim, j_dim, tokens_per_split, splits,
        cfg.BLOCK_K // spatial, cfg.BLOCK_K % spatial,
        *_token_view(a0, num_prefix_tokens, spatial), *_token_view(b0, num_prefix_tokens, spatial),
        *_token_view(a1, num_prefix_tokens, spatial), *_token_view(b1, num_prefix_tokens, spatial),
        draw, keep, frames, bu, dscale,
        BIAS0=bias0, BIAS1=bias1, COMPUTE_DTYPE=TL_DTYPE[compute_dtype],
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION="ieee", A0_DROP=a0_drop is not None, BU_DOT0=bu_dot is not None,
        **cfg.launch_kwargs(),
    )
    return dw_part, dba_part, dbb_part, splits


def wgrad_plan(problems: Sequence[Tuple[torch.Tensor, torch.Tensor, int]], compute_dtype: torch.dtype,
               num_tokens: int, splits: Optional[int] = None) -> Tuple[TileConfig, int, int]:
    """(tile config, token splits, tokens per split) of weight_grad_partials' launch."""
    a0 = problems[0][0]
    i_dim, j_dim = a0.shape[-1], problems[0][1].shape[-1]
    fam = tuning.family("wgrad", aligned(i_dim, j_dim, *(v for a, b, _ in problems for v in (*a.stride(), *b.stride()))))
    cfg = tuning.config_for(fam, kt=1, compute_dtype=compute_dtype, arch=arch_of(a0))
    tiles = triton.cdiv(i_dim, cfg.BLOCK_M) * triton.cdiv(j_dim, cfg.BLOCK_N) * len(problems)
    # a partial tile (BM x BN fp32, stored and read back) in units of one token step's loads
    partial_steps = 2 * cfg.BLOCK_M * cfg.BLOCK_N * 4 / ((cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_K * a0.element_size())
    splits = splits or token_splits(num_tokens, cfg.BLOCK_K, tiles, sm_count(a0) * cfg.ctas_per_sm, cfg.splits,
                                    partial_steps)
    tokens_per_split = triton.cdiv(triton.cdiv(max(num_tokens, 1), splits), cfg.BLOCK_K) * cfg.BLOCK_K
    return cfg, max(1, triton.cdiv(num_tokens, tokens_per_split)), tokens_per_split


def bu_dot_parts(problems, compute_dtype: torch.dtype, num_tokens: int) -> int:
    """Length of weight_grad_partials' bu_dot output: splits x I blocks of problem 0."""
    cfg, splits, _ = wgrad_plan(problems, compute_dtype, num_tokens)
    return splits * triton.cdiv(problems[0][0].shape[-1], cfg.BLOCK_M)


def finalize(segments: List[Optional[tuple]], multiplier: Optional[torch.Tensor] = None) -> None:
    """One launch: for each (partials (n, R, Q) fp32 contiguous, out of R*Q elements with strides
    (so_r, so_q) given as out.stride() of an (R, Q) view) out = sum over n, cast to out's dtype.
    A segment (part, out, True) is also multiplied by the 0-dim ``multiplier`` (the branch scale)."""
    args: list = []
    end = 0
    live = [seg for seg in segments if seg is not None and seg[1].numel() > 0]
    assert len(live) <= FINALIZE_SEGMENTS
    scaled = sum(1 << k for k, seg in enumerate(live) if len(seg) > 2 and seg[2])
    assert not scaled or multiplier is not None
    for part, out, *_ in live:
        n_parts, rows, cols = part.shape
        view = out.view(rows, cols) if out.dim() != 2 else out
        end += triton.cdiv(rows * cols, FINALIZE_BLOCK)
        args += [part, n_parts, rows, cols, out, view.stride(0), view.stride(1), end]
    if end == 0:
        return
    dummy = args[:8]
    while len(args) < 8 * FINALIZE_SEGMENTS:
        args += dummy[:7] + [end]
    cfg = tuning.config_for("finalize", kt=1, compute_dtype=live[0][1].dtype, arch=arch_of(live[0][0]))
    adapter_grad_finalize_kernel[(end,)](*args, multiplier if scaled else live[0][0], BLOCK=cfg.BLOCK_M,
                                         SCALED=scaled, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


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
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(sum_n A[n]^T B[n], sum_n A[n]) in fp32 over the N spatial tokens; A, B are token tensors
    (B*T, L, *) or flat (N, *) buffers. Deterministic: per-split partials, fixed-order sum."""
    dw = torch.empty((a.shape[-1], b.shape[-1]), device=a.device, dtype=torch.float32)
    db = torch.empty((a.shape[-1],), device=a.device, dtype=torch.float32) if with_bias else None
    if num_tokens == 0:
        return dw.zero_(), (db.zero_() if db is not None else None)
    dw_part, dba_part, _, _ = weight_grad_partials(
        [(a, b, 1 if with_bias else 0)], compute_dtype, num_tokens, spatial, num_prefix_tokens, splits=splits)
    finalize([(dw_part, dw), (dba_part[:, None, :], db) if with_bias else None])
    return dw, db
