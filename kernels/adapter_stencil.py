"""The depthwise 3-D conv of spatial kernels (kt, kh, kw) as a stencil over a buffer in memory
(docs/design.md §9: "h goes to memory once"), forward and transposed, for the Triton path.

The temporal kernels (kt, 1, 1) keep the conv in the down-projection's register window
(kernels/adapter_fwd.py). A spatial kernel couples a token with its grid neighbours, which live
in other row tiles, so the spatial path runs the down-projection as a plain GEMM (a = act1(x_s
Wd^T + bd), the window kernel with its identity conv) and this stencil after it:

1. adapter_stencil_fwd_kernel: g = act2(conv3d(a) + bc) [times DropPath's factor m, g before
   act2 to gpre: the backward recompute, as down_conv_forward's G_DROP / STORE_GPRE].
2. adapter_stencil_bwd_kernel: dh = conv3d^T(dg) * act1'(h), and per-program fp32 partial sums
   dwc[c, tap] = sum_n dg[n, c] * a[n + offset(tap), c] (kernels/wgrad.finalize sums them).

Layout: token n = f*S + s of frame f = b*T + t, s = i*W + j on the H x W grid, lives at row
f*BUF_L + BUF_P + s of a (B*T*BUF_L, Ca) buffer (flat buffers: BUF_L = S, BUF_P = 0; buffers
holding every token of a frame, prefix rows first: BUF_L = L, BUF_P = P). A program owns
BLOCK_M consecutive tokens x BLOCK_N channels and walks the kt*kh*kw taps; neighbours outside
[0, T) x [0, H) x [0, W) of the token's own clip and frame are the conv's zero padding (masked:
rows never read across clips or frame edges). Taps: (Ca, kt, kh, kw) contiguous, i.e. (Ca,
kt*kh*kw) with tap index (dt*kh + di)*kw + dj.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import TileConfig, _act, _act_grad, _cast, _drop_factor, arch_of

# _TAP_LOOP: the tap loop's trip count is a runtime argument. With the constexpr KT*KH*KW the
# compiler unrolled the 27 taps of (3, 3, 3) and hoisted their loads: 255 registers and 1.2 KB
# (forward) / 3.5 KB (backward) of spills on the unaligned odd shape (Ca = 72), sm_80.

# Largest fused spatial extents (backends/triton.py refuses beyond, naming them): the tap loop
# is a runtime loop, so this bounds nothing in registers; 7 covers every kernel seen in the field.
MAX_FUSED_KHW = 7


@triton.jit
def _token_coords(offs_m, n_tok, T, S, W, BUF_L, BUF_P):
    """(valid, t, i, j, buffer row) of tokens offs_m (n = f*S + i*W + j, t = f mod T); int64 row."""
    valid = offs_m < n_tok
    n = offs_m.to(tl.int64)
    f = n // S
    s = n - f * S
    t = f % T
    i = s // W
    j = s - i * W
    return valid, t, i, j, f * BUF_L + BUF_P + s


@triton.jit
def _tap_neighbour(tap, valid, t, i, j, row, T, H, W, BUF_L, SIGN: tl.constexpr,
                   KH: tl.constexpr, KW: tl.constexpr, PT: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr):
    """(in-bounds mask, buffer row) of the token at offset SIGN * (dt, di, dj) of tap `tap` from
    each token: +1 for the conv's input neighbour, -1 for the transposed conv's."""
    dt = SIGN * (tap // (KH * KW) - PT)
    rem = tap % (KH * KW)
    di = SIGN * (rem // KW - PH)
    dj = SIGN * (rem % KW - PW)
    tt = t + dt
    ii = i + di
    jj = j + dj
    ok = valid & (tt >= 0) & (tt < T) & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
    return ok, row + dt * BUF_L + di * W + dj


@triton.jit
def _prefix_tile(blk, pid_c, n_pre, T, CA, BUF_L, BUF_P, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(element offsets, mask, clip) of prefix row block blk: prefix row r = f*BUF_P + l of the
    n_pre = B*T*BUF_P prefix rows lives at buffer row f*BUF_L + l (l < BUF_P)."""
    r = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = r < n_pre
    r64 = r.to(tl.int64)
    f = r64 // BUF_P
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = (f * BUF_L + (r64 - f * BUF_P))[:, None] * CA + offs_c[None, :]
    return offs, valid[:, None] & (offs_c < CA)[None, :], (r // BUF_P) // T, valid


@triton.jit
def adapter_stencil_fwd_kernel(
    a_ptr, wc_ptr, bc_ptr, g_ptr, gpre_ptr, mask_ptr,
    n_tok,  # B*T*S tokens
    n_taps,  # KT*KH*KW, a runtime loop bound (see _TAP_LOOP)
    T, S, H, W, CA,
    BUF_L, BUF_P,  # buffer rows per frame, first spatial row (see the module docstring)
    drop_keep,  # 1 - p (G_DROP)
    n_pre, n_sp_blocks,  # PREFIX: B*T*BUF_P prefix rows, in the row blocks after the spatial ones
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BC: tl.constexpr,
    ACT2: tl.constexpr = 0, STORE_GPRE: tl.constexpr = False, G_DROP: tl.constexpr = False,
    BLOCK_M: tl.constexpr = 64, BLOCK_N: tl.constexpr = 64,
    PREFIX: tl.constexpr = False,
):
    """g (rows as a's) = act2(sum_tap wc[c, tap] * a[n + offset(tap)] + bc) [* m[clip] with
    G_DROP]; STORE_GPRE: the value before act2 to gpre too. a, g, gpre: (B*T*BUF_L, Ca).
    PREFIX (prefix_mode="mlp"): the prefix rows [0, BUF_P) of every frame too, with no conv and
    no conv bias (docs/design.md §9): g = act2(a) [* m], in row blocks n_sp_blocks on."""
    pid_c = tl.program_id(0)  # fastest: programs sharing a row block's neighbours run together
    pid_m = tl.program_id(1)
    if PREFIX:
        if pid_m >= n_sp_blocks:
            offs, mask, clip, valid = _prefix_tile(pid_m - n_sp_blocks, pid_c, n_pre, T, CA, BUF_L, BUF_P,
                                                   BLOCK_M, BLOCK_N)
            v = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if STORE_GPRE:
                tl.store(gpre_ptr + offs, _cast(v, gpre_ptr.dtype.element_ty), mask=mask)
            v = _act(v, ACT2)
            if G_DROP:
                v = v * _drop_factor(mask_ptr, clip, valid, drop_keep, G_DROP)[:, None]
            tl.store(g_ptr + offs, _cast(v, g_ptr.dtype.element_ty), mask=mask)
            return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < CA
    valid, t, i, j, row = _token_coords(offs_m, n_tok, T, S, W, BUF_L, BUF_P)
    NTAPS: tl.constexpr = KT * KH * KW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(n_taps):
        ok, nb = _tap_neighbour(tap, valid, t, i, j, row, T, H, W, BUF_L, 1, KH, KW, KT // 2, KH // 2, KW // 2)
        v = tl.load(a_ptr + nb[:, None] * CA + offs_c[None, :], mask=ok[:, None] & mask_c[None, :], other=0.0)
        w = tl.load(wc_ptr + offs_c * NTAPS + tap, mask=mask_c, other=0.0).to(tl.float32)
        acc += v.to(tl.float32) * w[None, :]
    if HAS_BC:
        acc += tl.load(bc_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    out = row[:, None] * CA + offs_c[None, :]
    mask = valid[:, None] & mask_c[None, :]
    if STORE_GPRE:
        tl.store(gpre_ptr + out, _cast(acc, gpre_ptr.dtype.element_ty), mask=mask)
    acc = _act(acc, ACT2)
    if G_DROP:
        clip = offs_m // (T * S)
        acc = acc * _drop_factor(mask_ptr, clip, valid, drop_keep, G_DROP)[:, None]
    tl.store(g_ptr + out, _cast(acc, g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def adapter_stencil_bwd_kernel(
    dg_ptr, a_ptr, h_ptr, wc_ptr, dh_ptr, dwc_part_ptr,
    n_tok, n_taps, T, S, H, W, CA,
    BUF_L, BUF_P,
    n_pre, n_sp_blocks,  # PREFIX: as the forward's
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    ACT1: tl.constexpr = 0,
    BLOCK_M: tl.constexpr = 64, BLOCK_N: tl.constexpr = 64,
    PREFIX: tl.constexpr = False,
):
    """dh = (sum_tap wc[c, tap] * dg[n - offset(tap)]) * act1'(h[n]) (h before act1, read with
    ACT1 only), and dwc_part[pid_m, tap, c] = sum over the program's tokens of dg[n, c] *
    a[n + offset(tap), c] (a = act1(h), the conv's input) in fp32. dg, a, h, dh: (B*T*BUF_L,
    Ca); dwc_part: (row blocks, kt*kh*kw, Ca) fp32, one slice per row block, no atomics.
    PREFIX: the prefix rows' dh = dg * act1'(h) too (no conv), in row blocks n_sp_blocks on."""
    pid_c = tl.program_id(0)
    pid_m = tl.program_id(1)
    if PREFIX:
        if pid_m >= n_sp_blocks:
            offs, mask, clip, valid = _prefix_tile(pid_m - n_sp_blocks, pid_c, n_pre, T, CA, BUF_L, BUF_P,
                                                   BLOCK_M, BLOCK_N)
            d = tl.load(dg_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if ACT1 != 0:
                d = d * _act_grad(tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32), ACT1)
            tl.store(dh_ptr + offs, _cast(d, dh_ptr.dtype.element_ty), mask=mask)
            return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_c = offs_c < CA
    valid, t, i, j, row = _token_coords(offs_m, n_tok, T, S, W, BUF_L, BUF_P)
    NTAPS: tl.constexpr = KT * KH * KW
    own = row[:, None] * CA + offs_c[None, :]
    mask = valid[:, None] & mask_c[None, :]
    dg_own = tl.load(dg_ptr + own, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    part = dwc_part_ptr + pid_m.to(tl.int64) * NTAPS * CA + offs_c
    for tap in range(n_taps):
        w = tl.load(wc_ptr + offs_c * NTAPS + tap, mask=mask_c, other=0.0).to(tl.float32)
        # transposed conv: token n receives dg of the token whose tap-`tap` input it was
        ok_in, nb_in = _tap_neighbour(tap, valid, t, i, j, row, T, H, W, BUF_L, -1, KH, KW, KT // 2, KH // 2, KW // 2)
        d = tl.load(dg_ptr + nb_in[:, None] * CA + offs_c[None, :], mask=ok_in[:, None] & mask_c[None, :], other=0.0)
        acc += d.to(tl.float32) * w[None, :]
        # the weight gradient: each owned output token times its tap-`tap` input
        ok_w, nb_w = _tap_neighbour(tap, valid, t, i, j, row, T, H, W, BUF_L, 1, KH, KW, KT // 2, KH // 2, KW // 2)
        v = tl.load(a_ptr + nb_w[:, None] * CA + offs_c[None, :], mask=ok_w[:, None] & mask_c[None, :], other=0.0)
        tl.store(part + tap * CA, tl.sum(dg_own * v.to(tl.float32), axis=0), mask=mask_c)
    if ACT1 != 0:
        acc = acc * _act_grad(tl.load(h_ptr + own, mask=mask, other=0.0).to(tl.float32), ACT1)
    tl.store(dh_ptr + own, _cast(acc, dh_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Tile configurations (tests/kernels/test_aot_compile.py compiles each for sm_80 and sm_90).
# Both kernels are elementwise stencils (no MMA; BLOCK_K unused). Registers follow the elements
# per thread, and the unaligned odd shape (Ca = 72: per-element 64-bit addresses, no vector
# loads) is the hungriest (ptxas -v, triton 3.9, (3, 3, 3)): 32 elements per thread (64x64, 4
# warps) spilled 1.2 KB (forward) / 3.5 KB (backward) at 255 registers on sm_80, 16 (64x64, 8
# warps) still 120-176 B in the backward; 8 per thread compile spill-free: forward 64x32 at
# 123-140 registers unaligned, 62-72 aligned (shape A); backward 128x16 at 170-194 / 90-99.
# The backward's rows are 128 tall because it writes kt*kh*kw x Ca fp32 partials per row block:
# shape A with (3, 3, 3) has 196 row blocks x 27 x 384 x 4 B = 8 MB of them (64 rows: 16 MB).
# num_stages=1: the tap loop has no MMA to pipeline.
# --------------------------------------------------------------------------------------------
def stencil_fwd_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    return TileConfig(64, 32, 16, num_warps=8, num_stages=1)


def stencil_bwd_config(compute_dtype: torch.dtype, arch: int) -> TileConfig:
    return TileConfig(128, 16, 16, num_warps=8, num_stages=1)


def _dims(taps: torch.Tensor, n_tok: int, num_frames: int, grid_size: Tuple[int, int]):
    ca, kt, kh, kw = taps.shape
    h, w = grid_size
    assert taps.is_contiguous(), "conv taps (Ca, kt, kh, kw) must be contiguous"
    assert n_tok % (num_frames * h * w) == 0, (n_tok, num_frames, grid_size)
    return ca, kt, kh, kw, h, w


def stencil_forward(
    a: torch.Tensor,
    num_frames: int,
    grid_size: Tuple[int, int],
    conv_taps: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    *,
    act2: int = 0,
    g_pre: Optional[torch.Tensor] = None,
    g_drop: Optional[tuple] = None,
    buf_l: Optional[int] = None,
    buf_p: int = 0,
    prefix: bool = False,
) -> torch.Tensor:
    """g = act2(conv3d(a) + bc), a new buffer shaped and laid out as a (rows outside the spatial
    tokens left unwritten, unless prefix: prefix_mode="mlp", the buf_p rows before each frame's
    spatial ones get g = act2(a) -- no conv -- with g_pre and g_drop as the spatial rows). a: (B*T*BUF_L, Ca) contiguous, BUF_L = buf_l (default H*W) rows per
    frame, spatial rows from buf_p; conv_taps (Ca, kt, kh, kw) contiguous; act2: an ACT_CODES
    code. g_pre: a buffer like a that also receives g before act2; g_drop = (draw (B,) fp32 0/1,
    p): g is stored times DropPath's factor draw[clip] / (1 - p) (the backward's recompute)."""
    s = grid_size[0] * grid_size[1]
    buf_l = s if buf_l is None else buf_l
    n_frames = a.shape[0] // buf_l
    n_tok = n_frames * s
    ca, kt, kh, kw, h, w = _dims(conv_taps, n_tok, num_frames, grid_size)
    assert a.is_contiguous() and a.shape == (n_frames * buf_l, ca), (a.shape, buf_l)
    g = torch.empty_like(a)
    if n_tok == 0:
        return g
    cfg = tuning.config_for("stencil_fwd", kt=kt, compute_dtype=a.dtype, arch=arch_of(a))
    n_pre = n_frames * buf_p if prefix else 0
    n_sp_blocks = triton.cdiv(n_tok, cfg.BLOCK_M)
    grid = (triton.cdiv(ca, cfg.BLOCK_N), n_sp_blocks + triton.cdiv(n_pre, cfg.BLOCK_M))
    draw, p_drop = g_drop if g_drop is not None else (a, 0.0)
    adapter_stencil_fwd_kernel[grid](
        a, conv_taps, conv_bias if conv_bias is not None else conv_taps, g,
        g_pre if g_pre is not None else g, draw,
        n_tok, kt * kh * kw, num_frames, s, h, w, ca, buf_l, buf_p, 1.0 - p_drop, n_pre, n_sp_blocks,
        KT=kt, KH=kh, KW=kw, HAS_BC=conv_bias is not None,
        ACT2=act2, STORE_GPRE=g_pre is not None, G_DROP=g_drop is not None,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, PREFIX=n_pre > 0, **cfg.launch_kwargs(),
    )
    return g


def stencil_backward(
    dg: torch.Tensor,
    a: torch.Tensor,
    h: Optional[torch.Tensor],
    num_frames: int,
    grid_size: Tuple[int, int],
    conv_taps: torch.Tensor,
    *,
    act1: int = 0,
    buf_l: Optional[int] = None,
    buf_p: int = 0,
    prefix: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dh, dwc partials (row blocks, kt*kh*kw, Ca) fp32): dh = conv3d^T(dg) * act1'(h), laid
    out as dg. dg, a (= act1(h), the conv input), h (before act1; needed only with act1): (B*T*
    BUF_L, Ca) contiguous, as stencil_forward's a. finalize() sums the partials into dwc. prefix:
    as stencil_forward's (the prefix rows' dh = dg * act1'(h); no dwc share)."""
    s = grid_size[0] * grid_size[1]
    buf_l = s if buf_l is None else buf_l
    n_tok = (dg.shape[0] // buf_l) * s
    ca, kt, kh, kw, hh, w = _dims(conv_taps, n_tok, num_frames, grid_size)
    assert dg.is_contiguous() and a.is_contiguous() and dg.shape == a.shape == (dg.shape[0], ca)
    assert not act1 or (h is not None and h.is_contiguous() and h.shape == dg.shape)
    cfg = tuning.config_for("stencil_bwd", kt=kt, compute_dtype=dg.dtype, arch=arch_of(dg))
    n_pre = (dg.shape[0] // buf_l) * buf_p if prefix else 0
    n_sp_blocks = triton.cdiv(n_tok, cfg.BLOCK_M)
    grid = (triton.cdiv(ca, cfg.BLOCK_N), n_sp_blocks + triton.cdiv(n_pre, cfg.BLOCK_M))
    dh = torch.empty_like(dg)
    dwc_part = torch.empty((n_sp_blocks, kt * kh * kw, ca), device=dg.device, dtype=torch.float32)
    if n_tok == 0:
        return dh, dwc_part
    adapter_stencil_bwd_kernel[grid](
        dg, a, h if act1 else dg, conv_taps, dh, dwc_part,
        n_tok, kt * kh * kw, num_frames, s, hh, w, ca, buf_l, buf_p, n_pre, n_sp_blocks,
        KT=kt, KH=kh, KW=kw, ACT1=act1,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, PREFIX=n_pre > 0, **cfg.launch_kwargs(),
    )
    return dh, dwc_part
