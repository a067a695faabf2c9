"""Fused ST-Adapter forward in Triton: two kernels instead of eager's five plus two permutes.

1. adapter_down_conv_fwd_kernel: g = conv_t(x_s Wd^T + bd) + bc. A program owns a block of the
   B*S flattened (clip, spatial position) rows -- no per-clip padding of S to the tile -- x a
   block of adapter channels, for the whole clip or a run of its frames (window_plan, from the
   compiled occupancy), walks the frames in order and keeps the temporal stencil in registers
   (_conv_window_step), so h never goes to memory and each h tile is computed once (plus a
   KT//2-frame halo per run). The weight tile comes through a tensor descriptor (TMA) when
   TileConfig.USE_TMA asks for it and the layout allows, else through pointers.
2. adapter_up_residual_fwd_kernel: out = x + g Wu^T + bu on the spatial rows, prefix rows
   copied, over all B*T*L rows so prefix passthrough needs no extra launch. Run with
   a = dh and W = Wd^T (strides swapped), no bias, it is also the backward's dgrad: dx = dO + dh Wd.

Spatial kernels (kt, kh, kw) couple grid neighbours in other row tiles: kernel 1 then runs with
no conv (KT = 0) as the down-projection a = act1(x_s Wd^T + bd), and
kernels/adapter_stencil.py's stencil makes g from a between kernels 1 and 2 (three launches).

Shapes: x (B*T, L, C); g, h (B*T*S, Ca) with S = L - P spatial tokens per frame.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import adapter_stencil, tuning
from .adapter_prenorm import _ln_gemm_rows_tile, fold_norm
from ._common import (
    TileConfig,
    _act,
    _cast,
    _conv_window_step,
    _drop_factor,
    _flat_rows,
    _window_program,
    _gemm_rows_tile,
    _load_taps,
    act_code,
    aligned,
    arch_of,
    dot_flags,
    _weight_desc,
    sm_count,
    weight_tma,
    window_plan,
)


@triton.jit
def adapter_down_conv_fwd_kernel(
    x_ptr, wd_ptr, bd_ptr, wc_ptr, bc_ptr, g_ptr, h_ptr, gpre_ptr, mask_ptr,
    u_ptr, mean_ptr, rstd_ptr,  # NORM: u (Ca,) fp32; the recompute's (B*T*BUF_L,) fp32 row statistics
    T, S, P, C, CA,
    BUF_L, BUF_P,  # work buffers viewed as (B*T, BUF_L, Ca): token s of frame f at row f*BUF_L + BUF_P + s
    n_rows,  # B*S: the flattened (clip, spatial position) rows a tile covers
    G_CA, n_whole_rows, runs, frames_per_prog,  # 1-D grid: whole-clip rows, then split rows
    stride_xf, stride_xl, stride_xc,  # x viewed as (B*T, L, C)
    stride_wd_o, stride_wd_i,  # fc1.weight (Ca, C)
    drop_keep, clip_rows,  # 1 - p and the rows of one clip (row // clip_rows: its clip) (G_DROP)
    eps,  # NORM: the LayerNorm's epsilon
    KT: tl.constexpr,
    HAS_BD: tl.constexpr, HAS_BC: tl.constexpr,
    STORE_H: tl.constexpr,  # backward recompute also wants h (for the conv-weight gradient)
    BLOCK_M: tl.constexpr,  # (clip, spatial position) rows per tile
    BLOCK_N: tl.constexpr,  # adapter channels per tile
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = False,  # Wd through a descriptor
    # docs/design.md §9 activations (_common.ACT_CODES): ACT1 on h after fc1's bias, ACT2 on g
    # after the conv's bias. STORE_H stores h before ACT1; STORE_GPRE (recompute with ACT2) also
    # stores g before ACT2 to gpre_ptr, for the derivatives the backward needs.
    ACT1: tl.constexpr = 0, ACT2: tl.constexpr = 0, STORE_GPRE: tl.constexpr = False,
    # recompute with DropPath: g is stored times the per-clip factor m, the backward's dWu = dO^T (m g)
    # (the factor on the wgrad's dO operand instead serialised its wgmma on sm_90)
    G_DROP: tl.constexpr = False,
    # norm="layernorm" folded into the K loop (kernels/adapter_prenorm.py): wd_ptr holds
    # Wd diag(gamma), bd_ptr b' = Wd beta + bd (fp32), u_ptr the row sums of the folded weight;
    # with STORE_H the programs of the first Ca block store each owned row's mean and rstd
    # (laid out as the work buffers' rows)
    NORM: tl.constexpr = False,
):
    PAD: tl.constexpr = KT // 2
    pid_ca, pid_r, t0, t1, part = _window_program(G_CA, n_whole_rows, runs, frames_per_prog, T)

    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ca = pid_ca * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < n_rows
    mask_ca = offs_ca < CA
    mask_out = mask_r[:, None] & mask_ca[None, :]
    # rows span clips: B*S rows tile without per-clip padding (196 -> 256 cost 1.31x the FLOPs)
    x_rows, _ = _flat_rows(offs_r, S, T, P, stride_xf, stride_xl)
    buf_rows, _ = _flat_rows(offs_r, S, T, BUF_P, BUF_L * CA, CA)
    buf = buf_rows[:, None] + offs_ca[None, :]  # the (B*T*BUF_L, Ca) buffers at frame 0

    if G_DROP:
        m_row = _drop_factor(mask_ptr, offs_r // clip_rows, mask_r, drop_keep, G_DROP)
    # forward conv: the window wants taps reversed (see _conv_window_step)
    r0, r1, r2, r3, r4, r5, r6, r7, r8 = _load_taps(wc_ptr, offs_ca, mask_ca, KT, True)
    if HAS_BD:
        bd = tl.load(bd_ptr + offs_ca, mask=mask_ca, other=0.0).to(tl.float32)
    if HAS_BC:
        bc = tl.load(bc_ptr + offs_ca, mask=mask_ca, other=0.0).to(tl.float32)
    if NORM:
        u = tl.load(u_ptr + offs_ca, mask=mask_ca, other=0.0)
        if STORE_H:  # (the forward without these 64-bit row offsets: 24 B fewer spilled on sm_90)
            stat_rows, _ = _flat_rows(offs_r, S, T, BUF_P, BUF_L, 1)

    q0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    q1 = q0
    q2 = q0
    q3 = q0
    q4 = q0
    q5 = q0
    q6 = q0
    q7 = q0
    frame_elems = CA.to(tl.int64) * BUF_L
    wd_desc = _weight_desc(wd_ptr, CA, C, stride_wd_o, stride_wd_i, BLOCK_N, BLOCK_K, USE_TMA, W_KMAJOR)
    for t_in in range(t0 - PAD, t1 + PAD):
        h = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        # frames outside the clip are the conv's zero padding: h = 0 there, bias included
        if (t_in >= 0) & (t_in < T):
            if NORM:
                h, dmu, mu, rstd = _ln_gemm_rows_tile(
                    x_ptr, x_rows + t_in * stride_xf, mask_r, stride_xc, wd_ptr, stride_wd_o, stride_wd_i,
                    offs_ca, mask_ca, C, eps, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
                    wd_desc, pid_ca * BLOCK_N, USE_TMA, W_KMAJOR,
                )
                h = rstd[:, None] * (h - dmu[:, None] * u[None, :])
                if STORE_H:
                    if (pid_ca == 0) & (t_in >= t0) & (t_in < t1):
                        tl.store(mean_ptr + stat_rows + t_in * BUF_L, mu, mask=mask_r)
                        tl.store(rstd_ptr + stat_rows + t_in * BUF_L, rstd, mask=mask_r)
            else:
                h = _gemm_rows_tile(
                    x_ptr, x_rows + t_in * stride_xf, mask_r, stride_xc, wd_ptr, stride_wd_o, stride_wd_i,
                    offs_ca, mask_ca, C, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
                    wd_desc, pid_ca * BLOCK_N, USE_TMA, W_KMAJOR,
                )
            if HAS_BD:
                h += bd[None, :]
            if STORE_H:
                if (t_in >= t0) & (t_in < t1):
                    tl.store(h_ptr + t_in * frame_elems + buf, _cast(h, h_ptr.dtype.element_ty), mask=mask_out)
            # inside the clip only: the conv zero-pads act1(h)
            h = _act(h, ACT1)
        g, q0, q1, q2, q3, q4, q5, q6, q7 = _conv_window_step(
            h, q0, q1, q2, q3, q4, q5, q6, q7, r0, r1, r2, r3, r4, r5, r6, r7, r8, KT
        )
        t_out = t_in - PAD
        if t_out >= t0:
            if HAS_BC:
                g += bc[None, :]
            if STORE_GPRE:
                tl.store(gpre_ptr + t_out * frame_elems + buf, _cast(g, gpre_ptr.dtype.element_ty), mask=mask_out)
            g = _act(g, ACT2)
            if G_DROP:
                g = g * m_row[:, None]
            tl.store(g_ptr + t_out * frame_elems + buf, _cast(g, g_ptr.dtype.element_ty), mask=mask_out)


@triton.jit
def adapter_up_residual_fwd_kernel(
    res_ptr, a_ptr, w_ptr, bias_ptr, out_ptr, scale_ptr, mask_ptr,
    n_rows, L, P, S, K, NOUT,
    T, drop_keep,  # frames per clip and 1 - p: DropPath's per-clip factor (HAS_DROP)
    stride_rf, stride_rl, stride_rc,  # residual viewed as (B*T, L, NOUT); may be strided
    stride_an,  # a: (B*T*S, K), row stride; unit column stride
    stride_wo, stride_wi,  # W (NOUT, K); pass Wd's strides swapped to multiply by Wd
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = False,  # W through a descriptor
    HAS_SCALE: tl.constexpr = False, HAS_DROP: tl.constexpr = False,
):
    """out (B*T*L, NOUT), contiguous: res + [row is spatial] * s * m[clip] * (a[token] @ W^T + bias),
    s = *scale_ptr (HAS_SCALE, a 0-dim tensor) and m the DropPath factor (HAS_DROP; both 1 if not)."""
    pid_n = tl.program_id(0)  # fastest: programs sharing an `a` tile run together
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = rows < n_rows
    rows64 = rows.to(tl.int64)
    f = rows64 // L
    l_idx = rows64 - f * L
    spatial = mask_m & (l_idx >= P)
    token = f * S + (l_idx - P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < NOUT

    w_desc = _weight_desc(w_ptr, NOUT, K, stride_wo, stride_wi, BLOCK_N, BLOCK_K, USE_TMA, W_KMAJOR)
    acc = _gemm_rows_tile(
        a_ptr, token * stride_an, spatial, 1, w_ptr, stride_wo, stride_wi,
        offs_n, mask_n, K, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
        w_desc, pid_n * BLOCK_N, USE_TMA, W_KMAJOR,
    )
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE | HAS_DROP:
        # one per-row factor s * m[clip], 0 on prefix rows (frame indices fit in int32: clip is a
        # 32-bit division; with a 64-bit one the 128x64 unaligned tile spilled 8 B on sm_90)
        fac = _drop_factor(mask_ptr, f.to(tl.int32) // T, mask_m, drop_keep, HAS_DROP)
        if HAS_SCALE:
            fac = fac * tl.load(scale_ptr).to(tl.float32)
        acc = acc * tl.where(spatial, fac, 0.0)[:, None]
    else:
        acc = tl.where(spatial[:, None], acc, 0.0)
    mask = mask_m[:, None] & mask_n[None, :]
    res = tl.load(
        res_ptr + f[:, None] * stride_rf + l_idx[:, None] * stride_rl + offs_n[None, :].to(tl.int64) * stride_rc,
        mask=mask,
        other=0.0,
    ).to(tl.float32)
    out = res + acc
    tl.store(out_ptr + rows64[:, None] * NOUT + offs_n[None, :], _cast(out, out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Tile configurations. Chosen to compile without register spills on sm_80 and sm_90 (checked by
# tests/test_aot_compile.py with ptxas -v); every (kernel, arch, dtype class, KT) the launchers
# can pick is listed by `all_configs()` so the AOT test covers exactly what the dispatch uses.
# --------------------------------------------------------------------------------------------

# Why these sizes (ptxas -v, triton 3.9, pointer-based loads): the unaligned case (C, L*C not
# multiples of 16) is the register-hungriest, because loads cannot go through cp.async and every
# tile's 64-bit addresses live in registers. At 4 warps a 64x64 window tile spills (0.4-1 KB);
# 8 warps halve the per-thread share. fp32 with IEEE dots runs on FMAs (no MMA), so its tiles
# are half as wide. KT > 3 adds KT-1 fp32 partials: half-width tiles again.
def down_conv_config(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    """Kernel 1 holds h plus KT-1 fp32 partials of BLOCK_M x BLOCK_N (64-bit pointers too)."""
    # ctas_per_sm=1: the STORE_H recompute variant of bf16 64x64 compiles to 146 registers on
    # sm_90 (the forward's to 128, 2 CTAs): the run count must not over-promise either.
    if compute_dtype == torch.float32:
        return TileConfig(64, 32, 16, num_warps=8, num_stages=2) if kt <= 3 else TileConfig(32, 32, 16, 8, 2)
    return TileConfig(64, 64 if kt <= 3 else 32, 32, num_warps=8, num_stages=3)


def up_residual_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    # sm_90: 128x128 compiles to 168 registers, no spills, wgmma, on shapes A/B/C; it halves the
    # L2 traffic of 128x64 (426 -> 310 MB on A). sm_80 keeps 128x64 (<= 106 regs when aligned).
    if compute_dtype == torch.float32:
        return TileConfig(64, 64, 16, num_warps=8, num_stages=2)
    if arch >= 90:
        return TileConfig(128, 128, 32, num_warps=8, num_stages=3)
    return TileConfig(128, 64, 32, num_warps=8, num_stages=3)


def window_grid(cfg: TileConfig, batch: int, num_frames: int, kt: int, spatial: int, ca: int,
                like: torch.Tensor, frames_per_prog: Optional[int]) -> tuple:
    """((Ca blocks, whole-clip row blocks, runs of the split row blocks, frames per run), 1-D
    launch grid) of the two window kernels over the B*S flattened rows (_window_program). The plan
    comes from the config's occupancy (window_plan) unless forced: frames_per_prog,
    ST_ADAPTER_FRAMES_PER_PROGRAM or cfg.runs split every row block alike."""
    grid_ca = triton.cdiv(ca, cfg.BLOCK_N)
    grid_r = triton.cdiv(batch * spatial, cfg.BLOCK_M)
    fpp = frames_per_prog or _frames_per_program_override()
    if fpp:
        fpp = max(1, min(fpp, num_frames))
        runs = triton.cdiv(num_frames, fpp)
        n_whole = grid_r if runs == 1 else 0
    else:
        n_whole, runs, fpp = window_plan(num_frames, kt, grid_ca, grid_r, sm_count(like) * cfg.ctas_per_sm, cfg.runs)
    programs = grid_ca * (n_whole + (grid_r - n_whole) * runs)
    return (grid_ca, n_whole, runs, fpp), (programs,)


def _frames_per_program_override() -> Optional[int]:
    """ST_ADAPTER_FRAMES_PER_PROGRAM forces the run length (tests use it to exercise halos)."""
    env = os.environ.get("ST_ADAPTER_FRAMES_PER_PROGRAM")
    return int(env) if env else None


def down_conv_forward(
    x: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    conv_taps: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    *,
    store_h: bool = False,
    frames_per_prog: Optional[int] = None,
    act1: int = 0,
    act2: int = 0,
    g_pre: Optional[torch.Tensor] = None,
    g_drop: Optional[tuple] = None,
    out: Optional[tuple] = None,
    layout: Optional[tuple] = None,
    clip_rows: Optional[int] = None,
    norm: Optional[tuple] = None,
    norm_stats: Optional[tuple] = None,
    folded: Optional[tuple] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """g (and h if store_h) as (B*T*S, Ca) buffers in the weights' dtype.

    out = (g, h or None), layout = (rows per frame BUF_L, prefix offset BUF_P): write into the
    caller's (B*T*BUF_L, Ca) buffers instead, token s of frame f at row f*BUF_L + BUF_P + s
    (prefix_mode="mlp" keeps every row of a frame in one buffer; g_pre alike). Default: new
    buffers, BUF_L = S, BUF_P = 0. clip_rows: rows of one DropPath clip in the launch's (clip,
    position) row space (default S; prefix rows launched as 1-frame clips pass P * T).

    x: (B*T, L, C) any strides; fc1_weight (Ca, C); conv_taps (Ca, KT) contiguous, or None: no
    conv (KT = 0, the identity; conv_bias must be None), g = act2(act1(x_s Wd^T + bd)).
    act1, act2: docs/design.md §9 activations as _common.ACT_CODES (after fc1, after the conv);
    h is stored before act1 (the backward's pre-activation), g after act2. g_pre: a (B*T*S, Ca)
    buffer that also receives g before act2 (the recompute with act2). g_drop = (draw (B,) fp32
    0/1, p): g is stored times DropPath's per-clip factor draw / (1 - p) (the recompute).
    norm = (norm_weight or None, norm_bias or None, eps): z = LayerNorm(x) feeds fc1, folded into
    the K loop (kernels/adapter_prenorm.py; one more launch, the parameter fold, unless the
    caller passes its result as folded = adapter_prenorm.fold_norm(...)); h is then fc1's output
    on z. norm_stats = (mean, rstd): (B*T*BUF_L,) fp32 buffers the recompute (store_h) fills,
    row for row with h.
    """
    bt, seq_len, c = x.shape
    ca = fc1_weight.shape[0]
    kt = conv_taps.shape[1] if conv_taps is not None else 0
    assert conv_taps is not None or conv_bias is None
    s = seq_len - num_prefix_tokens
    b = bt // num_frames
    dtype = fc1_weight.dtype
    if out is not None:
        g, h = out
        buf_l, buf_p = layout
    else:
        g = torch.empty((bt * s, ca), device=x.device, dtype=dtype)
        h = torch.empty((bt * s, ca), device=x.device, dtype=dtype) if store_h else None
        buf_l, buf_p = s, 0
    assert not store_h or h is not None
    if bt * s * ca == 0:
        return g, h
    assert norm_stats is None or (norm is not None and store_h)
    eps = 0.0
    if norm is not None:
        norm_weight, norm_bias, eps = norm
        has_bias = fc1_bias is not None or norm_bias is not None
        fc1_weight, u, fc1_bias = folded or fold_norm(fc1_weight, fc1_bias, norm_weight, norm_bias)
        fc1_bias = fc1_bias if has_bias else None
    cfg = tuning.config_for("down_conv", kt=kt, compute_dtype=dtype, arch=arch_of(x))
    is_aligned = aligned(c, ca, *x.stride(), *fc1_weight.stride())
    if store_h and (act1 or act2 or g_drop is not None or norm is not None):
        # the §9 recompute stores h, g_pre and g with per-element 64-bit addresses: the bf16
        # KT=9 64x32 tile spilled ~0.5 KB (sm_80 and sm_90) at 255 registers, and unaligned the
        # KT=3 64x64 one 16 B (sm_80) / 128 B (sm_90); 64x16 and 64x32 do not (64 rows keep wgmma).
        # With the norm's row statistics the bf16 KT=9 64x32 recompute spilled 16 B unaligned
        # (triton 3.6, sm_90) and sat at 253-255 registers aligned
        if kt > 3 and cfg.BLOCK_N > 16:
            cfg = dataclasses.replace(cfg, BLOCK_N=16)
        elif not is_aligned and cfg.BLOCK_N > 32:
            cfg = dataclasses.replace(cfg, BLOCK_N=32)
    if norm is not None and not is_aligned and cfg.BLOCK_N > 32:
        # the LayerNorm K loop (shift, two row sums) on unaligned x: the 16-bit KT=3 64x64 tile
        # spilled 24 B at 255 registers on sm_90 (odd shape, forward); 64x32 does not
        cfg = dataclasses.replace(cfg, BLOCK_N=32)
    plan, grid = window_grid(cfg, b, num_frames, kt, s, ca, x, frames_per_prog)
    dot_fp32, precision = dot_flags(dtype)
    use_tma, kmajor = weight_tma(cfg, fc1_weight, arch_of(x), is_aligned)
    draw, p_drop = g_drop if g_drop is not None else (fc1_weight, 0.0)
    adapter_down_conv_fwd_kernel[grid](
        x, fc1_weight, fc1_bias if fc1_bias is not None else fc1_weight,
        conv_taps if conv_taps is not None else fc1_weight, conv_bias if conv_bias is not None else fc1_weight,
        g, h if h is not None else g, g_pre if g_pre is not None else g, draw,
        u if norm is not None else g, *(norm_stats if norm_stats is not None else (g, g)),
        num_frames, s, num_prefix_tokens, c, ca, buf_l, buf_p, b * s, *plan,
        x.stride(0), x.stride(1), x.stride(2),
        fc1_weight.stride(0), fc1_weight.stride(1), 1.0 - p_drop, clip_rows or s, float(eps),
        KT=kt, HAS_BD=fc1_bias is not None, HAS_BC=conv_bias is not None, STORE_H=store_h,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=use_tma, W_KMAJOR=kmajor,
        ACT1=act1, ACT2=act2, STORE_GPRE=g_pre is not None, G_DROP=g_drop is not None, NORM=norm is not None,
        **cfg.launch_kwargs(),
    )
    return g, h


def up_residual_forward(
    res: torch.Tensor,
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    num_prefix_tokens: int,
    *,
    num_frames: int = 1,
    scale: Optional[torch.Tensor] = None,
    drop_draw: Optional[torch.Tensor] = None,
    drop_path: float = 0.0,
) -> torch.Tensor:
    """res (B*T, L, NOUT) + [spatial] s * m[clip] * (a @ weight^T + bias); a (B*T*S, K); weight
    (NOUT, K) with any strides (pass fc1.weight.t() to multiply by fc1.weight). s: scale (0-dim)
    or 1; m = drop_draw[clip] / (1 - drop_path) with drop_draw the (B,) 0/1 DropPath draw of the
    B = B*T / num_frames clips, or 1. Returns a new contiguous (B*T, L, NOUT) tensor of res's dtype."""
    bt, seq_len, nout = res.shape
    k = a.shape[1]
    s = seq_len - num_prefix_tokens
    out = torch.empty((bt, seq_len, nout), device=res.device, dtype=res.dtype)
    n_rows = bt * seq_len
    if out.numel() == 0:
        return out
    is_aligned = aligned(k, nout, *res.stride(), a.stride(0), *weight.stride())
    fam = tuning.family("up_residual", is_aligned)
    cfg = tuning.config_for(fam, kt=1, compute_dtype=weight.dtype, arch=arch_of(res))
    if (scale is not None or drop_draw is not None) and not is_aligned and arch_of(res) >= 90 and cfg.BLOCK_M > 64:
        # the unaligned 128x64 tile sits at 254 registers on sm_90 already; the branch factor
        # made it spill 16 B. 64x64 does not (sm_80's 128x64: 112 registers, kept)
        cfg = dataclasses.replace(cfg, BLOCK_M=64)
    dot_fp32, precision = dot_flags(weight.dtype)
    if precision == "tf32" and not is_aligned and cfg.BLOCK_N < 64:
        # the unaligned fp32 tile is 64x32 for IEEE dots (FMAs: 64x64 spilled 104 B with P = 0);
        # TF32 dots run on wgmma, where 64x32 came out "wgmma serialized" under triton 3.6 on
        # sm_90 (86 registers) and 64x64 compiles to 145-167 with wgmma kept
        cfg = dataclasses.replace(cfg, BLOCK_N=64)
    grid = (triton.cdiv(nout, cfg.BLOCK_N), triton.cdiv(n_rows, cfg.BLOCK_M))
    use_tma, kmajor = weight_tma(cfg, weight, arch_of(res), is_aligned)
    adapter_up_residual_fwd_kernel[grid](
        res, a, weight, bias if bias is not None else weight, out,
        scale if scale is not None else weight, drop_draw if drop_draw is not None else weight,
        n_rows, seq_len, num_prefix_tokens, s, k, nout, num_frames, 1.0 - drop_path,
        res.stride(0), res.stride(1), res.stride(2),
        a.stride(0),
        weight.stride(0), weight.stride(1),
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=use_tma, W_KMAJOR=kmajor,
        HAS_SCALE=scale is not None, HAS_DROP=drop_draw is not None,
        **cfg.launch_kwargs(),
    )
    return out


def spatial_layout(seq_len: int, num_prefix_tokens: int, prefix_mlp: bool) -> dict:
    """The stencils' buffer layout keywords: flat spatial rows, or with prefix_mode="mlp" every
    row of a frame (BUF_L = L, BUF_P = P) with the prefix rows passed through (no conv)."""
    return dict(buf_l=seq_len, buf_p=num_prefix_tokens, prefix=True) if prefix_mlp else {}


def spatial_grid(num_spatial: int, grid_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(H, W) of the spatial tokens: grid_size, or the square of num_spatial tokens."""
    if grid_size is None:
        side = math.isqrt(num_spatial)
        assert side * side == num_spatial, f"{num_spatial} spatial tokens are no square grid: pass grid_size"
        return side, side
    h, w = (int(v) for v in grid_size)
    assert h * w == num_spatial, (grid_size, num_spatial)
    return h, w


def adapter_forward(
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
    act_after_fc1: Optional[str] = None,
    act_after_conv: Optional[str] = None,
    scale: Optional[torch.Tensor] = None,
    drop_draw: Optional[torch.Tensor] = None,
    drop_path: float = 0.0,
    grid_size: Optional[tuple] = None,
    norm: Optional[tuple] = None,
    prefix_mlp: bool = False,
) -> torch.Tensor:
    """Fused forward: (B*T, L, C) -> new (B*T, L, C) tensor of x's dtype. Two launches for every
    docs/design.md §9 switch taken here: activations are epilogues of the down-conv kernel, the
    scale s (0-dim) and DropPath (drop_draw: the (B,) 0/1 per-clip draw, drop_path: p) one of
    the up-projection: out = x + s * draw[clip] / (1 - p) * (g Wu^T + bu) on spatial rows.
    norm = (norm_weight or None, norm_bias or None, eps): a LayerNorm over C before fc1, folded
    into the down-conv kernel; one launch more (the parameter fold first, kernels/adapter_prenorm.py).

    conv_taps (Ca, kt) is a temporal kernel; (Ca, kt, kh, kw) a spatial one on the (H, W) =
    grid_size grid of the L - P spatial tokens (None: square), in three launches: the
    down-projection a = act1(x_s Wd^T + bd), the stencil g = act2(conv3d(a) + bc)
    (kernels/adapter_stencil.py), the same up-projection."""
    acts = dict(act1=act_code(act_after_fc1), act2=act_code(act_after_conv), norm=norm)
    if conv_taps.dim() == 4:
        grid = spatial_grid(x.shape[1] - num_prefix_tokens, grid_size)
        mlp = prefix_mlp and num_prefix_tokens > 0
        # prefix_mode="mlp": the down-projection over every row (P = 0: a is (B*T*L, Ca)), and the
        # stencil's prefix rows get act2 alone (no conv); every row is then a branch row
        a, _ = down_conv_forward(x, num_frames, 0 if mlp else num_prefix_tokens, fc1_weight, fc1_bias, None, None,
                                 frames_per_prog=frames_per_prog, act1=acts["act1"], norm=norm)
        g = adapter_stencil.stencil_forward(a, num_frames, grid, conv_taps, conv_bias, act2=acts["act2"],
                                            **spatial_layout(x.shape[1], num_prefix_tokens, mlp))
        num_prefix_tokens = 0 if mlp else num_prefix_tokens
    elif prefix_mlp and num_prefix_tokens > 0:
        g, _, _ = mlp_down_conv_forward(x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps,
                                        conv_bias, frames_per_prog=frames_per_prog, **acts)
        num_prefix_tokens = 0  # every row of g is a branch row now
    else:
        g, _ = down_conv_forward(x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
                                 frames_per_prog=frames_per_prog, **acts)
    return up_residual_forward(x, g, fc2_weight, fc2_bias, num_prefix_tokens, num_frames=num_frames,
                               scale=scale, drop_draw=drop_draw, drop_path=drop_path)


def mlp_down_conv_forward(
    x: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    conv_taps: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    *,
    store_h: bool = False,
    with_g_pre: bool = False,
    frames_per_prog: Optional[int] = None,
    act1: int = 0,
    act2: int = 0,
    g_drop: Optional[tuple] = None,
    norm: Optional[tuple] = None,
    norm_stats: Optional[tuple] = None,
) -> tuple:
    """prefix_mode="mlp" (docs/design.md §9): (g, h or None, g_pre or None) as (B*T*L, Ca)
    buffers in x's row order, so the up-projection, dgrad and wgrad see every row as a branch
    row (P = 0) and need no prefix case. Two launches of the down-conv kernel: the spatial rows
    with the conv (rows f*L + P + s), the prefix rows with KT = 0 -- fc1 -> act1 -> act2, no
    conv, no conv bias (rows f*L + l, l < P). The prefix rows are B*T*P of B*T*L (0.5% on shape
    A): their own launch costs a launch, not bandwidth -- and runs them as 1-frame clips (KT = 0
    needs no frame order): B*T*P rows, 6 programs of one frame each on A instead of 24 walking 8
    frames, which the work model put at ~30% of the spatial launch's time. Switches as
    down_conv_forward's; with norm the prefix rows are normalised too (one fold for both
    launches), norm_stats (B*T*L,) in the buffers' row order."""
    bt, seq_len, _ = x.shape
    shape = (bt * seq_len, fc1_weight.shape[0])
    new = lambda: torch.empty(shape, device=x.device, dtype=fc1_weight.dtype)  # noqa: E731
    g, h, g_pre = new(), new() if store_h else None, new() if with_g_pre else None
    folded = fold_norm(fc1_weight, fc1_bias, norm[0], norm[1]) if norm is not None else None
    common = dict(store_h=store_h, frames_per_prog=frames_per_prog, act1=act1, act2=act2, g_pre=g_pre,
                  g_drop=g_drop, out=(g, h), norm=norm, norm_stats=norm_stats, folded=folded)
    down_conv_forward(x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
                      layout=(seq_len, num_prefix_tokens), **common)
    down_conv_forward(x[:, :num_prefix_tokens], 1, 0, fc1_weight, fc1_bias, None, None,
                      layout=(seq_len, 0), clip_rows=num_prefix_tokens * num_frames, **common)
    return g, h, g_pre

