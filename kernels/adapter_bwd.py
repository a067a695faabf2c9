"""Fused ST-Adapter backward in Triton, with recompute: only x and the parameters are saved.

Given dO (B*T, L, C) (docs/design.md §2):
1. recompute g and h with the forward's down-conv kernel (STORE_H): h and g never saved.
2. adapter_conv_bwd_kernel: dg = dy Wu per frame (dy = dO's spatial rows), the transposed
   temporal conv in the same register window as the forward (dh never needs dg in memory),
   and per-program fp32 partial sums of dwc = sum dg * shifted h and dbc = sum dg.
3. dx = dO + dh Wd: the forward's up-residual kernel with Wd^T as its weight (prefix rows of dx
   are dO's, no extra launch).
4. adapter_wgrad_kernel once for both dWu = dy^T g (+ dbu) and dWd = dh^T x_s (+ dbd), split
   over tokens into fp32 partials (kernels/wgrad.py);
5. adapter_grad_finalize_kernel: every fp32 partial (dWu, dWd, biases, dwc, dbc) summed in a
   fixed order and cast to the parameters' dtype. Deterministic, no atomics: five launches.
Rows of the window kernels are the flattened (clip, spatial position) pairs, B*S of them.
Spatial kernels (kt, kh, kw): seven launches -- the recompute is the down-projection plus the
stencil (kernels/adapter_stencil.py), step 2 runs without a conv (KT = 0: dg and the dbc /
d(scale) partials only), and the transposed stencil makes dh and the dwc partials from dg.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from . import tuning
from ._common import (
    Switches,
    TileConfig,
    _act,
    _act_grad,
    _cast,
    _conv_window_step,
    _drop_factor,
    _flat_rows,
    _window_program,
    _gemm_rows_tile,
    _load_taps,
    _weight_desc,
    aligned,
    arch_of,
    dot_flags,
    weight_tma,
)
from . import adapter_stencil
from .adapter_fwd import down_conv_forward, mlp_down_conv_forward, spatial_grid, spatial_layout, up_residual_forward, window_grid
from .adapter_prenorm import prenorm_dgrad
from .wgrad import bu_dot_parts, finalize, weight_grad, weight_grad_config, weight_grad_partials  # noqa: F401


@triton.jit
def _branch_dg(a, g_ptrs, mask_tile, m_row, fac, dscale_acc, owned, ACT2: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_DROP: tl.constexpr):
    """(dg, dscale_acc) of one frame tile from a = dO Wu (fp32): dg = a * s * m[row] (fac), times
    act2'(g_pre) with ACT2 (g_ptrs: g before ACT2, else the recompute's g, which carries m);
    with HAS_SCALE and an owned frame, dscale_acc (BLOCK_M,) gains m * g . a per row:
    d(scale) = sum m * dO . (g Wu^T) = sum m * g . (dO Wu), no extra GEMM."""
    dg = a
    if (ACT2 != 0) | HAS_SCALE:
        g_in = tl.load(g_ptrs, mask=mask_tile, other=0.0).to(tl.float32)
        if HAS_SCALE:
            if owned:
                if ACT2 != 0:
                    dscale_acc += m_row * tl.sum(_act(g_in, ACT2) * a, axis=1)
                else:  # the recompute's g already carries m (its G_DROP)
                    dscale_acc += tl.sum(g_in * a, axis=1)
    if HAS_SCALE | HAS_DROP:
        dg = dg * fac[:, None]
    if ACT2 != 0:
        dg = dg * _act_grad(g_in, ACT2)
    return dg, dscale_acc


@triton.jit
def adapter_conv_bwd_kernel(
    dout_ptr, wu_ptr, wc_ptr, h_ptr, dh_ptr, dwc_part_ptr, dbc_part_ptr,
    g_ptr, scale_ptr, mask_ptr, dscale_part_ptr,  # §9 switches: see ACT2 / HAS_SCALE / HAS_DROP
    T, S, P, C, CA,
    BUF_L, BUF_P,  # h, g, dh viewed as (B*T, BUF_L, Ca): token s of frame f at row f*BUF_L + BUF_P + s
    n_rows,  # B*S flattened rows
    G_CA, n_whole_rows, runs, frames_per_prog,  # 1-D grid: whole-clip rows, then split rows
    stride_df, stride_dl, stride_dc,  # dO viewed as (B*T, L, C)
    stride_wu_o, stride_wu_i,  # fc2.weight (C, Ca)
    drop_keep, clip_rows,  # 1 - p and the rows of one clip (row // clip_rows: its clip) (HAS_DROP)
    KT: tl.constexpr, KT_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = False,  # Wu^T through a descriptor
    ACT1: tl.constexpr = 0, ACT2: tl.constexpr = 0,
    HAS_SCALE: tl.constexpr = False, HAS_DROP: tl.constexpr = False,
):
    """dh (N, Ca) and partial (dwc, dbc) sums of one (frame run, row block) per program.

    dwc_part: (runs * row blocks, KT, Ca) fp32, dbc_part: (runs * row blocks, Ca) fp32.
    docs/design.md §9 switches: h_ptr holds h before ACT1 (dwc takes act1(h), dh comes out as
    dh * act1'(h)); g_ptr holds g before ACT2 when ACT2 (dg -> dg * act2'(g)), else the
    recompute's g (times m with DropPath: its G_DROP), read only when needed. The branch
    factor s * m[clip] (HAS_SCALE: s = *scale_ptr; HAS_DROP: m = mask[clip] / drop_keep)
    multiplies dO Wu; with HAS_SCALE each program also writes dscale_part[program] = sum of
    m * g . (dO Wu) over its own frames and channels (the fc2 bias's share of d(scale) comes
    from the wgrad launch).
    """
    PAD: tl.constexpr = KT // 2
    pid_ca, pid_r, t0, t1, part = _window_program(G_CA, n_whole_rows, runs, frames_per_prog, T)

    offs_r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_ca = pid_ca * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < n_rows
    mask_ca = offs_ca < CA
    mask_tile = mask_r[:, None] & mask_ca[None, :]
    d_rows, _ = _flat_rows(offs_r, S, T, P, stride_df, stride_dl)
    buf_rows, _ = _flat_rows(offs_r, S, T, BUF_P, BUF_L * CA, CA)
    buf = buf_rows[:, None] + offs_ca[None, :]
    frame_elems = CA.to(tl.int64) * BUF_L
    # the branch factor s * m of each row's clip (rows are (clip, position) pairs)
    m_row = _drop_factor(mask_ptr, offs_r // clip_rows, mask_r, drop_keep, HAS_DROP)
    fac = m_row
    if HAS_SCALE:
        fac = fac * tl.load(scale_ptr).to(tl.float32)
    dscale_acc = tl.zeros([BLOCK_M], dtype=tl.float32)

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
    wu_desc = _weight_desc(wu_ptr, CA, C, stride_wu_i, stride_wu_o, BLOCK_N, BLOCK_K, USE_TMA, W_KMAJOR)
    for t_in in range(t0 - PAD, t1 + PAD):
        dg = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        if (t_in >= 0) & (t_in < T):
            # dg = dy @ Wu: Wu^T (Ca, C) is Wu with its strides swapped
            dg = _gemm_rows_tile(
                dout_ptr, d_rows + t_in * stride_df, mask_r, stride_dc, wu_ptr, stride_wu_i, stride_wu_o,
                offs_ca, mask_ca, C, BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32, INPUT_PRECISION,
                wu_desc, pid_ca * BLOCK_N, USE_TMA, W_KMAJOR,
            )
            dg, dscale_acc = _branch_dg(dg, g_ptr + t_in * frame_elems + buf, mask_tile, m_row, fac, dscale_acc,
                                        (t_in >= t0) & (t_in < t1), ACT2, HAS_SCALE, HAS_DROP)
            # conv-parameter gradients from the frames this program owns (halo frames belong
            # to the neighbouring run): dwc[c, j] += sum_s dg_t[s, c] * h_{t+j-PAD}[s, c]
            if (t_in >= t0) & (t_in < t1):
                dbc_acc += tl.sum(dg, axis=0)
                for j in tl.static_range(KT):
                    t_h = t_in + j - PAD
                    if (t_h >= 0) & (t_h < T):
                        h = tl.load(h_ptr + t_h * frame_elems + buf, mask=mask_tile, other=0.0).to(tl.float32)
                        contrib = tl.sum(dg * _act(h, ACT1), axis=0)
                        dwc_acc += tl.where(taps[:, None] == j, contrib[None, :], 0.0)
        dh, q0, q1, q2, q3, q4, q5, q6, q7 = _conv_window_step(
            dg, q0, q1, q2, q3, q4, q5, q6, q7, r0, r1, r2, r3, r4, r5, r6, r7, r8, KT
        )
        t_out = t_in - PAD
        if t_out >= t0:
            if ACT1 != 0:
                h_out = tl.load(h_ptr + t_out * frame_elems + buf, mask=mask_tile, other=0.0).to(tl.float32)
                dh = dh * _act_grad(h_out, ACT1)
            tl.store(dh_ptr + t_out * frame_elems + buf, _cast(dh, dh_ptr.dtype.element_ty), mask=mask_tile)

    part = part.to(tl.int64)
    tl.store(
        dwc_part_ptr + part * KT * CA + taps[:, None] * CA + offs_ca[None, :],
        dwc_acc,
        mask=(taps[:, None] < KT) & mask_ca[None, :],
    )
    tl.store(dbc_part_ptr + part * CA + offs_ca, dbc_acc, mask=mask_ca)
    if HAS_SCALE:
        tl.store(dscale_part_ptr + tl.program_id(0), tl.sum(dscale_acc, axis=0))


# --------------------------------------------------------------------------------------------

def conv_bwd_config(kt: int, compute_dtype: torch.dtype, arch: int) -> TileConfig:
    """The forward's down-conv budget plus the dwc/dbc accumulators and h loads: on sm_80 the
    64x64 KT=3 tile spilled 24 B, so Ampere takes the half-width tile there."""
    from .adapter_fwd import down_conv_config

    cfg = down_conv_config(kt, compute_dtype, arch)
    if compute_dtype != torch.float32 and arch < 90:
        return TileConfig(cfg.BLOCK_M, 32, cfg.BLOCK_K, cfg.num_warps, cfg.num_stages)
    return cfg


def conv_backward(
    dout: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc2_weight: torch.Tensor,
    conv_taps: torch.Tensor,
    h: torch.Tensor,
    *,
    frames_per_prog: Optional[int] = None,
    switches: Optional["Switches"] = None,
    g: Optional[torch.Tensor] = None,
    dscale_part: Optional[torch.Tensor] = None,
    dh: Optional[torch.Tensor] = None,
    layout: Optional[tuple] = None,
    clip_rows: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh (N, Ca) in the weights' dtype, dwc partials (parts, KT, Ca) fp32, dbc partials
    (parts, 1, Ca) fp32); finalize() sums the partials. With docs/design.md §9 switches: h is
    before act1, g (N, Ca) is before act2 (or the activated g without act2), and with a scale
    dscale_part[:conv_programs(...)] receives one fp32 partial of d(scale) per program.
    dh (given) and layout = (BUF_L, BUF_P): h, g and dh are (B*T*BUF_L, Ca) buffers with token s
    of frame f at row f*BUF_L + BUF_P + s (down_conv_forward's layout); default BUF_L = S, 0.
    clip_rows: as down_conv_forward's (DropPath's clip of a row)."""
    sw = switches or Switches()
    bt, seq_len, c = dout.shape
    ca, kt = conv_taps.shape if conv_taps is not None else (fc2_weight.shape[1], 0)
    s = seq_len - num_prefix_tokens
    b = bt // num_frames
    dtype = fc2_weight.dtype
    buf_l, buf_p = layout if layout is not None else (s, 0)
    if dh is None:
        dh = torch.empty((bt * s, ca), device=dout.device, dtype=dtype)
    is_aligned = aligned(c, ca, *dout.stride(), *fc2_weight.stride())
    fam = tuning.family("conv_bwd", is_aligned)
    cfg = tuning.config_for(fam, kt=kt, compute_dtype=dtype, arch=arch_of(dout))
    plan, grid = window_grid(cfg, b, num_frames, kt, s, ca, dout, frames_per_prog)
    n_whole, runs, _ = plan[1:]
    n_parts = n_whole + (triton.cdiv(b * s, cfg.BLOCK_M) - n_whole) * runs
    dwc_part = torch.empty((n_parts, kt, ca), device=dout.device, dtype=torch.float32)
    dbc_part = torch.empty((n_parts, 1, ca), device=dout.device, dtype=torch.float32)
    dot_fp32, precision = dot_flags(dtype)
    use_tma, kmajor = weight_tma(cfg, fc2_weight.t(), arch_of(dout), is_aligned)  # the GEMM's W is Wu^T
    adapter_conv_bwd_kernel[grid](
        dout, fc2_weight, conv_taps if conv_taps is not None else fc2_weight, h, dh, dwc_part, dbc_part,
        g if g is not None else h, sw.scale if sw.scale is not None else h,
        sw.drop_draw if sw.drop_draw is not None else h, dscale_part if dscale_part is not None else dwc_part,
        num_frames, s, num_prefix_tokens, c, ca, buf_l, buf_p, b * s, *plan,
        dout.stride(0), dout.stride(1), dout.stride(2),
        fc2_weight.stride(0), fc2_weight.stride(1),
        1.0 - sw.drop_path, clip_rows or s,
        KT=kt, KT_POW2=max(1, triton.next_power_of_2(kt)),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_FP32=dot_fp32, INPUT_PRECISION=precision, USE_TMA=use_tma, W_KMAJOR=kmajor,
        ACT1=sw.act1, ACT2=sw.act2, HAS_SCALE=sw.scale is not None, HAS_DROP=sw.drop_draw is not None,
        **cfg.launch_kwargs(),
    )
    return dh, dwc_part, dbc_part


def conv_programs(dout: torch.Tensor, num_frames: int, num_prefix_tokens: int, fc2_weight: torch.Tensor,
                  conv_taps: torch.Tensor, *, frames_per_prog: Optional[int] = None) -> int:
    """Programs of conv_backward's launch (one d(scale) partial each); conv_taps None: KT = 0."""
    bt, seq_len, c = dout.shape
    ca, kt = conv_taps.shape if conv_taps is not None else (fc2_weight.shape[1], 0)
    s = seq_len - num_prefix_tokens
    is_aligned = aligned(c, ca, *dout.stride(), *fc2_weight.stride())
    cfg = tuning.config_for(tuning.family("conv_bwd", is_aligned), kt=kt, compute_dtype=fc2_weight.dtype,
                            arch=arch_of(dout))
    _, (programs,) = window_grid(cfg, bt // num_frames, num_frames, kt, s, ca, dout, frames_per_prog)
    return programs


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
    act_after_fc1: Optional[str] = None,
    act_after_conv: Optional[str] = None,
    scale: Optional[torch.Tensor] = None,
    drop_draw: Optional[torch.Tensor] = None,
    drop_path: float = 0.0,
    grid_size: Optional[tuple] = None,
    norm: Optional[tuple] = None,
    prefix_mlp: bool = False,
) -> tuple:
    """Gradients (dx, dWd, dbd, dwc (Ca, KT), dbc, dWu, dbu) in five launches: recompute, conv
    backward, dgrad, both weight GEMMs, one fixed-order reduce-and-cast. Parameter grads come in
    the parameters' dtype (summed in fp32), dx in dO's dtype (contiguous). Bias grads are None
    where the bias is None. With a ``scale`` (0-dim) an eighth entry, d(scale), follows.

    docs/design.md §9 switches (as adapter_fwd.adapter_forward takes them), still five launches:
    the recompute stores h and (with act_after_conv) g before their activations, and g times
    DropPath's per-clip factor m (so dWu = dO^T (m g)); the conv backward applies s * m to dO Wu
    and the activations' derivatives, and writes d(scale) partials; the wgrad launch weights
    dbu's column sums by m and adds the fc2 bias's share of d(scale); finalize multiplies dWu,
    dbu by s and sums d(scale) with the rest.

    norm = (norm_weight or None, norm_bias or None, eps) (kernels/adapter_prenorm.py): one launch
    more -- the parameter fold, the recompute (also storing each row's mean and rstd), the conv
    backward, the dgrad with the LayerNorm backward folded in (it also writes z = LN(x) of the
    branch rows for dWd = dh^T z), the wgrad, the finalize (dgamma, dbeta too) -- and
    (dnorm_weight, dnorm_bias) follow the rest, in their own dtype (None where that affine tensor
    is None). With prefix_mlp the prefix rows are normalised too.

    Spatial kernels (conv_taps (Ca, kt, kh, kw), grid_size (H, W) or None: square; dwc comes
    back in that shape) take seven launches: the recompute is the down-projection (a = act1(h),
    h) plus the stencil (g, g_pre; kernels/adapter_stencil.py), the conv backward computes dg
    alone (KT = 0), and the transposed stencil turns dg into dh and the dwc partials."""
    sw = Switches.of(act_after_fc1, act_after_conv, scale, drop_draw, drop_path)
    bt, seq_len, _ = x.shape
    prefix_mlp = prefix_mlp and num_prefix_tokens > 0
    n_tokens = bt * (seq_len if prefix_mlp else seq_len - num_prefix_tokens)
    if dout.dtype != x.dtype:  # one wgrad launch reads dO and x through one pointer type
        dout = dout.to(x.dtype)
    grads = parameter_grads(x, fc1_weight, fc1_bias, conv_taps, conv_bias, fc2_weight, fc2_bias, scale=scale)
    norm_args, norm_out, stats = None, (), None
    if norm is not None:
        lnw, lnb, eps = norm
        # two tensors, not views of one buffer: the op's outputs may not alias
        norm_out = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else None
                         for t in (lnw, lnb))
        stats = torch.empty((2, n_tokens), device=x.device, dtype=torch.float32)  # the branch rows' mean, rstd
        norm_args = (lnw, lnb, stats[0], stats[1], norm_out)
    if n_tokens == 0:
        dx = torch.empty(dout.shape, device=dout.device, dtype=dout.dtype).copy_(dout)
        return (dx, *[None if g is None else g.zero_() for g in grads.values()],
                *[None if g is None else g.zero_() for g in norm_out])
    recompute = dict(store_h=True, frames_per_prog=frames_per_prog, act1=sw.act1, act2=sw.act2,
                     g_drop=(sw.drop_draw, sw.drop_path) if sw.drop_draw is not None else None,
                     norm=norm, norm_stats=(stats[0], stats[1]) if norm is not None else None)
    if conv_taps.dim() == 4:
        out = _spatial_backward(dout, x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
                                fc2_weight, fc2_bias, grads, sw, recompute, grid_size, frames_per_prog,
                                prefix_mlp, norm_args)
        return out + ((grads["dscale"],) if scale is not None else ()) + norm_out
    if prefix_mlp:
        g, h, g_pre = mlp_down_conv_forward(x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps,
                                            conv_bias, with_g_pre=sw.act2 != 0, **recompute)
    else:
        g_pre = torch.empty((n_tokens, conv_taps.shape[0]), device=x.device, dtype=fc1_weight.dtype) if sw.act2 else None
        g, h = down_conv_forward(x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
                                 g_pre=g_pre, **recompute)
    out = backward_from_recompute(dout, x, g, h, num_frames, num_prefix_tokens, fc1_weight, fc2_weight, conv_taps,
                                  grads, frames_per_prog=frames_per_prog, switches=sw, g_pre=g_pre, fc2_bias=fc2_bias,
                                  prefix_mlp=prefix_mlp, norm=norm_args)
    return out + ((grads["dscale"],) if scale is not None else ()) + norm_out


def _spatial_backward(dout, x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, conv_taps, conv_bias,
                      fc2_weight, fc2_bias, grads, sw, recompute, grid_size, frames_per_prog, prefix_mlp,
                      norm_args) -> tuple:
    """adapter_backward's seven launches for a spatial kernel (see there); prefix_mlp (P > 0):
    a, h, g over every row (B*T*L, Ca), prefix rows through the stencils without a conv, and
    backward_from_recompute's two KT = 0 conv-backward launches (spatial, prefix rows): eight."""
    grid = spatial_grid(x.shape[1] - num_prefix_tokens, grid_size)
    layout = spatial_layout(x.shape[1], num_prefix_tokens, prefix_mlp)
    # a = act1(h) is the conv's input (and dwc's operand); h before act1 only for act1'
    # (norm: the same fold, and the recompute's per-row LayerNorm statistics, which the kernel
    # writes only with STORE_H: h then goes to memory unread without act1, N*Ca more bytes)
    a, h = down_conv_forward(x, num_frames, 0 if prefix_mlp else num_prefix_tokens, fc1_weight, fc1_bias, None,
                             None, store_h=sw.act1 != 0 or recompute["norm"] is not None,
                             frames_per_prog=frames_per_prog, act1=sw.act1,
                             norm=recompute["norm"], norm_stats=recompute["norm_stats"])
    g_pre = torch.empty_like(a) if sw.act2 else None
    g = adapter_stencil.stencil_forward(a, num_frames, grid, conv_taps, conv_bias, act2=sw.act2, g_pre=g_pre,
                                        g_drop=recompute["g_drop"], **layout)

    def stencil(dg):
        return adapter_stencil.stencil_backward(dg, a, h, num_frames, grid, conv_taps, act1=sw.act1, **layout)

    return backward_from_recompute(dout, x, g, a, num_frames, num_prefix_tokens, fc1_weight, fc2_weight, None,
                                   grads, frames_per_prog=frames_per_prog, switches=sw, g_pre=g_pre,
                                   fc2_bias=fc2_bias, stencil=stencil, prefix_mlp=prefix_mlp, norm=norm_args)


def parameter_grads(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias, conv_taps: torch.Tensor, conv_bias,
                    fc2_weight: torch.Tensor, fc2_bias, *, scale: Optional[torch.Tensor] = None) -> dict:
    """Empty gradient buffers, in the parameters' dtype, that backward_from_recompute fills
    (plus "dscale", 0-dim in scale's dtype, when a branch scale is given). dwc is shaped as
    conv_taps: (Ca, kt) or (Ca, kt, kh, kw)."""
    ca = conv_taps.shape[0]
    pdtype = fc1_weight.dtype
    grads = dict(
        dwd=torch.empty(fc1_weight.shape, device=x.device, dtype=pdtype),
        dbd=torch.empty((ca,), device=x.device, dtype=pdtype) if fc1_bias is not None else None,
        dwc=torch.empty(conv_taps.shape, device=x.device, dtype=pdtype),
        dbc=torch.empty((ca,), device=x.device, dtype=pdtype) if conv_bias is not None else None,
        dwu=torch.empty(fc2_weight.shape, device=x.device, dtype=pdtype),
        dbu=torch.empty(fc2_weight.shape[:1], device=x.device, dtype=pdtype) if fc2_bias is not None else None,
    )
    if scale is not None:
        grads["dscale"] = torch.empty((), device=x.device, dtype=scale.dtype)
    return grads


def backward_from_recompute(
    dout: torch.Tensor,
    x: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    fc1_weight: torch.Tensor,
    fc2_weight: torch.Tensor,
    conv_taps: torch.Tensor,
    grads: dict,
    *,
    extra_segment: Optional[tuple] = None,
    frames_per_prog: Optional[int] = None,
    switches: Optional[Switches] = None,
    g_pre: Optional[torch.Tensor] = None,
    fc2_bias: Optional[torch.Tensor] = None,
    prefix_mlp: bool = False,
    norm: Optional[tuple] = None,
    stencil: Optional[Callable[[torch.Tensor], tuple]] = None,
) -> tuple:
    """Launches 2-5 of the backward, given the recomputed g, h (B*T*S, Ca): conv backward,
    dgrad, both weight GEMMs, and one fixed-order finalize that fills ``grads``
    (parameter_grads) -- plus ``extra_segment`` (partials (n, R, Q) fp32, out), a caller's own
    partial sums reduced in the same launch (the LayerNorm pair's affine grads).

    switches (docs/design.md §9, see adapter_backward): h is then before act1, g after act2 (and
    times DropPath's factor m with DropPath), g_pre (with act2) before act2; with a scale,
    grads["dscale"] is filled too (fc2_bias: its share). prefix_mlp (prefix_mode="mlp", P > 0):
    g, h, g_pre are mlp_down_conv_forward's (B*T*L, Ca) buffers; the conv backward runs twice
    (spatial rows with the conv, prefix rows with KT = 0) into one (B*T*L, Ca) dh, and dgrad and
    wgrad take every row as a branch row (P = 0): 6 launches instead of 5. norm = (norm_weight,
    norm_bias, mean, rstd (branch rows,) fp32, (dgamma out or None, dbeta out or None)) for
    norm="layernorm" (kernels/adapter_prenorm.py): the dgrad launch folds in the LayerNorm
    backward and writes z = LN(x) of the branch rows, the wgrad takes dWd = dh^T z, and the
    finalize fills dgamma and dbeta too.

    stencil (the spatial path): conv_taps is None, so the conv backward launch computes only dg
    (KT = 0, with the dbc and d(scale) partials; act1 is left to the stencil), and stencil(dg)
    returns (dh, dwc partials (parts, kt*kh*kw, Ca) fp32): one more launch. h is then not read."""
    sw = switches or Switches()
    assert extra_segment is None or sw.scale is None, "d(scale) takes the finalize launch's last segment"
    bt, seq_len, _ = x.shape
    p = num_prefix_tokens
    # the branch rows the up-projection, dgrad and wgrad see: S per frame, or all L with prefix_mlp
    p_branch, s_branch = (0, seq_len) if prefix_mlp else (p, seq_len - p)
    # problem 0: dWu = dy^T g (+ dbu = sum dy); problem 1: dWd^T = x_s^T dh (+ dbd = sum dh)
    has_bu = grads["dbu"] is not None
    # norm: dWd's A operand is z = LN(x) of the branch rows (B*T*s_branch, C), from the LN dgrad launch
    a1 = x if norm is None else torch.empty((bt * s_branch, x.shape[-1]), device=x.device, dtype=fc1_weight.dtype)
    problems = [(dout, g, 1 if has_bu else 0), (a1, None, 2 if grads["dbd"] is not None else 0)]
    # the conv-backward launches: (dO view, P of the view, taps, buffer layout)
    # the conv-backward launches: (dO view, frames per clip, P of the view, taps, buffer layout,
    # DropPath rows per clip); prefix rows as 1-frame clips, as in mlp_down_conv_forward
    launches = [(dout, num_frames, p, conv_taps, None, None)]
    if prefix_mlp:
        launches = [(dout, num_frames, p, conv_taps, (seq_len, p), None),
                    (dout[:, :p], 1, 0, None, (seq_len, 0), p * num_frames)]
    dscale_part, conv_parts, bu_dot = None, [], None
    if sw.scale is not None:
        # one fp32 partial per conv-backward program, then (bias) one per wgrad (split, C block)
        conv_parts = [conv_programs(d, nf, lp, fc2_weight, taps, frames_per_prog=frames_per_prog)
                      for d, nf, lp, taps, _, _ in launches]
        n_conv = sum(conv_parts)
        shapes = [(dout, g, problems[0][2]), (a1, g, problems[1][2])]  # dh is laid out as g
        n_bu = bu_dot_parts(shapes, fc1_weight.dtype, bt * s_branch) if has_bu else 0
        dscale_part = torch.empty((n_conv + n_bu, 1, 1), device=x.device, dtype=torch.float32)
        bu_dot = (fc2_bias, dscale_part[n_conv:].view(-1)) if has_bu else None
    dh = torch.empty(g.shape, device=x.device, dtype=fc2_weight.dtype)
    start = 0
    for i, (d, nf, lp, taps, layout, clip_rows) in enumerate(launches):
        _, dwc_i, dbc_i = conv_backward(
            d, nf, lp, fc2_weight, taps, h, frames_per_prog=frames_per_prog,
            switches=sw if stencil is None else dataclasses.replace(sw, act1=0),
            g=g_pre if sw.act2 else g, dh=dh, layout=layout, clip_rows=clip_rows,
            dscale_part=dscale_part[start:start + conv_parts[i]] if dscale_part is not None else None,
        )
        start += conv_parts[i] if conv_parts else 0
        if i == 0:  # the KT = 0 prefix launch has no conv parameters: its partials are empty/unused
            dwc_part, dbc_part = dwc_i, dbc_i
    del h, g_pre
    if stencil is not None:
        dh, dwc_part = stencil(dh)  # conv_backward's dh is dg here
    affine_segments = [None, None]
    if norm is None:
        dx = up_residual_forward(dout, dh, fc1_weight.t(), None, p_branch)
    else:  # dx with the LayerNorm backward folded in; dWd = dh^T z with z = LN(x) from the same launch
        lnw, lnb, mean, rstd, affine_out = norm
        dx, affine_part, _ = prenorm_dgrad(dout, x, dh, fc1_weight, lnw, lnb, mean, rstd, p_branch, z=a1)
        affine_segments = [(part, out) if out is not None else None for part, out in zip(affine_part, affine_out)]
    problems[1] = (a1, dh, problems[1][2])
    a0_drop = (sw.drop_draw, 1.0 - sw.drop_path, num_frames) if sw.drop_draw is not None else None
    dw_part, dbu_part, dbd_part, splits = weight_grad_partials(
        problems, fc1_weight.dtype, bt * s_branch, s_branch, p_branch, a0_drop=a0_drop, bu_dot=bu_dot,
    )
    scaled = sw.scale is not None  # dy = s * m * dO: m rode on g (and dbu's sums), s comes in here
    finalize([
        (dw_part[:splits], grads["dwu"], scaled),
        (dw_part[splits:], grads["dwd"].t()),
        (dbu_part[:, None, :], grads["dbu"], scaled) if has_bu else None,
        (dbd_part[:, None, :], grads["dbd"]) if grads["dbd"] is not None else None,
        (dwc_part, grads["dwc"].view(grads["dwc"].shape[0], -1).t()),
        (dbc_part, grads["dbc"]) if grads["dbc"] is not None else None,
        extra_segment if dscale_part is None else (dscale_part, grads["dscale"]),
        *affine_segments,
    ], multiplier=sw.scale)
    return dx, grads["dwd"], grads["dbd"], grads["dwc"], grads["dbc"], grads["dwu"], grads["dbu"]
