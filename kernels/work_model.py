"""The work model of docs/design.md §10: performance one can check without a GPU.

`model_rows(shapes, dtype, arch)` runs the real launchers (forward, then backward with the
casts the registered op adds) on meta tensors with every Triton kernel replaced by the AOT
recorder (kernels/aot.py) and every torch op seen by a dispatch mode, and makes one row per
launch:
  flops_executed  2*m*n*k of every MMA tile the kernel issues: tile padding, masked rows and
                  halo recompute included, frames skipped at clip edges excluded
  flops_required  the launch's math without any of that
  hbm_bytes_min   each tensor the launch touches read or written once
  l2_bytes_est    the bytes every program's tile loads and stores move (full tiles)
  registers, spill_bytes, shared_bytes, uses_wgmma  from the AOT compile of that exact variant
  ctas_per_sm     from registers, warps and shared memory of the compile; waves = programs /
                  (SMs * ctas_per_sm); utilisation = programs / (ceil(waves) * SMs * ctas_per_sm)
Torch ops (reductions, casts) are rows with flops 0 and no compile data.

CLI: python -m st_adapter_fast.kernels.aot --model --shapes A,B,C --dtype bf16 --arch 90 --json F
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import aot, wgrad
from ._common import window_program_frames

SM_COUNT = {80: 108, 90: 132}
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}  # the per-SM pool; 1 KB of it reserved per CTA
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32


@dataclasses.dataclass
class Row:
    shape: str
    backend: str
    pass_: str  # "fwd" | "bwd" (JSON key "pass")
    kernel: str
    grid: Optional[Tuple[int, ...]]
    programs: Optional[int]
    flops_executed: int
    flops_required: int
    hbm_bytes_min: int
    l2_bytes_est: int
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    uses_wgmma: Optional[bool] = None
    ctas_per_sm: Optional[int] = None
    waves: Optional[float] = None
    utilisation: Optional[float] = None
    variant: str = ""

    @property
    def is_gemm(self) -> bool:
        return self.flops_required > 0

    def as_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["pass"] = d.pop("pass_")
        return d


# ----------------------------------------------------------------------------- op capture
@dataclasses.dataclass
class TorchOp:
    name: str
    bytes_moved: int


_NOT_LAUNCHES = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach",
                 "alias", "lift_fresh", "_local_scalar_dense"}


class _OpCapture(TorchDispatchMode):
    """Appends every torch op that launches a kernel (not views, not allocations) to `events`."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NOT_LAUNCHES:
            tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.events.append(TorchOp(f"aten.{name}", sum(t.numel() * t.element_size() for t in tensors)))
        return out


def _meta_params(b, t, seq, c, ca, kt, dtype):
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(b * t, seq, c, **meta)
    wd, bd = torch.empty(ca, c, **meta), torch.empty(ca, **meta)
    taps, bc = torch.empty(ca, kt, **meta), torch.empty(ca, **meta)
    wu, bu = torch.empty(c, ca, **meta), torch.empty(c, **meta)
    return x, (wd, bd, taps, bc, wu, bu)


def _ops_epilogue(grads, x, fc1_weight, conv_shape):
    """What ops.fused_adapter_backward does to the backend's result (keep in step with it): dx
    to x's dtype, every parameter gradient to the parameters' dtype, taps to conv.weight's shape."""
    dx, dwd, dbd, dtaps, dbc, dwu, dbu = grads
    pdtype = fc1_weight.dtype
    out = [dx.to(x.dtype)]
    for g in (dwd, dbd, dtaps, dbc, dwu, dbu):
        out.append(None if g is None else g.to(pdtype))
    out[3] = out[3].contiguous().reshape(conv_shape)
    return out


# docs/design.md §9 variants the model covers (CLI --variants; shapes "<name>+<tag>"): the
# switches as adapter_forward's keywords, plus "kernel" (kt, kh, kw), "norm" and "scale" as bools
VARIANTS: Dict[str, dict] = {
    # the epilogue switches: activations, the branch scale, DropPath (training)
    "acts": dict(act_after_fc1="gelu", act_after_conv="relu", scale=True, drop_path=0.1),
    "mlp": dict(prefix_mlp=True),
    # the LayerNorm before fc1 (kernels/adapter_prenorm.py), affine trained
    "norm": dict(norm=True),
    # MMAction2's STAdapter: a spatial kernel (down-projection, stencil, up-projection:
    # kernels/adapter_stencil.py), ReLU after the conv, prefix MLP, scale, DropPath
    "k333": dict(kernel=(3, 3, 3), act_after_conv="relu", prefix_mlp=True, scale=True, drop_path=0.1),
}


def _variant_kwargs(spec: dict, x: torch.Tensor, t: int, grid: Tuple[int, int]) -> dict:
    """adapter_forward / adapter_backward keywords of a VARIANTS entry, on meta tensors."""
    kw = {k: v for k, v in spec.items() if k not in ("kernel", "scale", "norm", "drop_path")}
    meta = dict(device="meta", dtype=x.dtype)
    if spec.get("scale"):
        kw["scale"] = torch.empty((), **meta)
    if spec.get("drop_path"):
        kw.update(drop_draw=torch.empty(x.shape[0] // t, device="meta", dtype=torch.float32),
                  drop_path=spec["drop_path"])
    if spec.get("norm"):
        c = x.shape[-1]
        kw["norm"] = (torch.empty(c, **meta), torch.empty(c, **meta), 1e-5)
    if tuple(spec.get("kernel", (1, 1, 1)))[1:] != (1, 1):
        kw["grid_size"] = grid
    return kw


def record_launches(shape: Tuple[int, ...], dtype: torch.dtype, arch: int, kt: int = 3, prefix: int = 1,
                    sms: Optional[int] = None, layernorm: bool = False, variant: Optional[dict] = None):
    """{"fwd": [...], "bwd": [...]} of aot.Launch / TorchOp events in launch order; layernorm: of
    the adapter + LayerNorm pair (kernels/adapter_layernorm.py; LayerNorm affine frozen, as in a
    frozen backbone -- trained, its grads ride in the same finalize launch); variant: a VARIANTS
    entry (its "kernel" replaces (kt, 1, 1); the grid is the square of L - prefix)."""
    from . import adapter_bwd, adapter_fwd, adapter_layernorm

    b, t, seq, c, ca = shape
    kernel = tuple(variant.get("kernel", (kt, 1, 1))) if variant else (kt, 1, 1)
    side = math.isqrt(seq - prefix)
    passes = {}
    for pass_name in ("fwd", "bwd"):
        events: list = []
        sink: list = []
        x, (wd, bd, taps, bc, wu, bu) = _meta_params(b, t, seq, c, ca, kernel[0], dtype)
        if kernel[1:] != (1, 1):
            taps = torch.empty(ca, *kernel, device="meta", dtype=dtype)
        with aot._recording(arch, sink, events, sms), _OpCapture(events):
            if layernorm:
                lnw, lnb = torch.empty(c, device="meta", dtype=dtype), torch.empty(c, device="meta", dtype=dtype)
                if pass_name == "fwd":
                    adapter_layernorm.adapter_layernorm_forward(x, t, prefix, wd, bd, taps, bc, wu, bu, lnw, lnb,
                                                                1e-5, dtype)
                else:
                    stats = torch.empty(x.shape[:2], device="meta", dtype=torch.float32)
                    grads = adapter_layernorm.adapter_layernorm_backward(
                        x, x, x, t, prefix, wd, bd, taps, bc, wu, bu, lnw, lnb, stats, stats, affine_grads=False)
                    _ops_epilogue(grads[:7], x, wd, (ca, 1, kt, 1, 1))
            else:
                kw = _variant_kwargs(variant, x, t, (side, side)) if variant else {}
                if pass_name == "fwd":
                    adapter_fwd.adapter_forward(x, t, prefix, wd, bd, taps, bc, wu, bu, **kw)
                else:
                    grads = adapter_bwd.adapter_backward(x, x, t, prefix, wd, bd, taps, bc, wu, bu, **kw)
                    _ops_epilogue(grads[:7], x, wd, (ca, 1, *kernel))
        passes[pass_name] = events
    return passes


# ----------------------------------------------------------------------- per-kernel work
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _elt(t: torch.Tensor) -> int:
    return t.element_size()


Work = Tuple[int, int, int, int]  # flops_executed, flops_required, hbm_bytes_min, l2_bytes_est


def _window(launch, act_name: str) -> tuple:
    """Shared bookkeeping of the two window kernels (1-D grid of _common._window_program)."""
    a = launch.args
    T, S, C, CA, kt = a["T"], a["S"], a["C"], a["CA"], a["KT"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    g_ca, g_r = a["G_CA"], _cdiv(a["n_rows"], bm)
    per_program = window_program_frames(T, kt, g_ca, g_r, a["n_whole_rows"], a["runs"], a["frames_per_prog"])
    assert len(per_program) == math.prod(launch.grid), (len(per_program), launch.grid)
    frames = sum(per_program)
    ksteps = _cdiv(C, bk)
    n_tok = a["n_rows"] * T
    executed = frames * 2 * bm * bn * bk * ksteps
    loads = frames * ksteps * bk * (bm * _elt(a[act_name]) + bn * _elt(a[list(a)[1]]))
    return executed, 2 * n_tok * C * CA, n_tok, g_ca * g_r * T * bm * bn, loads


def _work_down_conv(launch) -> Work:
    a = launch.args
    executed, required, n_tok, out_elems, loads = _window(launch, "x_ptr")
    outs = 2 if a["STORE_H"] else 1
    ge = _elt(a["g_ptr"])
    hbm = n_tok * a["C"] * _elt(a["x_ptr"]) + a["CA"] * a["C"] * _elt(a["wd_ptr"]) + outs * n_tok * a["CA"] * ge
    stats = 8 * n_tok if a.get("NORM") and a["STORE_H"] else 0  # norm: the recompute's mean, rstd (fp32)
    return executed, required, hbm + stats, loads + outs * out_elems * ge + stats


def _work_conv_bwd(launch) -> Work:
    a = launch.args
    executed, required, n_tok, out_elems, loads = _window(launch, "dout_ptr")
    he, kt = _elt(a["h_ptr"]), a["KT"]
    g_r = _cdiv(a["n_rows"], a["BLOCK_M"])
    parts = (a["n_whole_rows"] + (g_r - a["n_whole_rows"]) * a["runs"]) * (kt + 1) * a["CA"] * 4
    # h read (not with KT = 0 and no act1: the spatial path's dg launch), dh written
    h_read = 1 if kt or a["ACT1"] else 0
    hbm = n_tok * a["C"] * _elt(a["dout_ptr"]) + a["CA"] * a["C"] * _elt(a["wu_ptr"]) \
        + (1 + h_read) * n_tok * a["CA"] * he
    # h is loaded KT times per owned frame (once per tap), dh stored once
    return executed, required, hbm + parts, loads + (kt + 1) * out_elems * he + parts


def _work_up_residual(launch) -> Work:
    a, (g_n, g_m) = launch.args, launch.grid
    n_rows, L, S, K, NOUT = a["n_rows"], a["L"], a["S"], a["K"], a["NOUT"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    n_tok = n_rows // L * S
    re, ae, we, oe = _elt(a["res_ptr"]), _elt(a["a_ptr"]), _elt(a["w_ptr"]), _elt(a["out_ptr"])
    ksteps = _cdiv(K, bk)
    executed = g_n * g_m * 2 * bm * bn * bk * ksteps
    hbm = n_rows * NOUT * (re + oe) + n_tok * K * ae + NOUT * K * we
    l2 = g_n * g_m * (ksteps * bk * (bm * ae + bn * we) + bm * bn * (re + oe))
    return executed, 2 * n_tok * K * NOUT, hbm, l2


def _work_up_ln(launch, forward: bool) -> Work:
    """The pair's up-projection kernels: a program walks all of C twice, the GEMM on the first
    walk. fwd: read x, write out, re-read out (L2), write normed. bwd: recompute out (park it in
    dres), read d_normed twice, d_out once, write dres."""
    a, (progs,) = launch.args, launch.grid
    n_rows, L, S, CA, C = a["n_rows"], a["L"], a["S"], a["CA"], a["C"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    n_tok = n_rows // L * S
    xe, ge, we = _elt(a["x_ptr"]), _elt(a["g_ptr"]), _elt(a["wu_ptr"])
    ksteps, nblocks = _cdiv(CA, bk), _cdiv(C, bn)
    tiles = progs * nblocks
    executed = tiles * 2 * bm * bn * bk * ksteps
    gemm_l2 = tiles * ksteps * bk * (bm * ge + bn * we)
    weights = n_tok * CA * ge + C * CA * we + n_rows * 8  # g, Wu, mean + rstd
    if forward:
        oe, ne = _elt(a["out_ptr"]), _elt(a["normed_ptr"])
        hbm = n_rows * C * (xe + oe + ne) + weights
        l2 = gemm_l2 + tiles * bm * bn * (xe + 2 * oe + ne)
    else:
        de, dne, re = _elt(a["dout_ptr"]), _elt(a["dnormed_ptr"]), _elt(a["dres_ptr"])
        parts = progs * 2 * C * 4 if a["AFFINE_GRADS"] else 0
        hbm = n_rows * C * (xe + de + dne + re) + weights + parts
        l2 = gemm_l2 + tiles * bm * bn * (xe + 2 * dne + de + 3 * re) + parts
    return executed, 2 * n_tok * CA * C, hbm, l2


def _work_norm_fold(launch) -> Work:
    """norm="layernorm"'s parameter fold: read Wd (and gamma, beta), write Wd diag(gamma) (with
    gamma), u and b' (fp32)."""
    a = launch.args
    ca, c, we = a["CA"], a["C"], _elt(a["wd_ptr"])
    moved = ca * c * we * (2 if a["HAS_LNW"] else 1) + 2 * c * 4 + 2 * ca * 4
    return 0, 0, moved, moved


def _work_prenorm_dgrad(launch) -> Work:
    """The LN dgrad (kernels/adapter_prenorm.py): dz = dh Wd on walk 1 (parked in dx), walk 2
    reads it back with x and dO and writes dx and z = LN(x_s); x is read on both walks."""
    a, (progs,) = launch.args, launch.grid
    n_rows, L, S, CA, C = a["n_rows"], a["L"], a["S"], a["CA"], a["C"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    n_tok = n_rows // L * S
    he, we, xe, de = _elt(a["dh_ptr"]), _elt(a["wd_ptr"]), _elt(a["x_ptr"]), _elt(a["dout_ptr"])
    oe, ze = _elt(a["dx_ptr"]), _elt(a["z_ptr"])
    ksteps, nblocks = _cdiv(CA, bk), _cdiv(C, bn)
    tiles = progs * nblocks
    executed = tiles * 2 * bm * bn * bk * ksteps
    parts = 2 * progs * C * 4
    hbm = n_tok * CA * he + C * CA * we + n_tok * C * (xe + ze) + n_rows * C * (de + oe) + n_tok * 8 + parts
    l2 = tiles * ksteps * bk * (bm * he + bn * we) + tiles * bm * bn * (2 * xe + de + 3 * oe + ze) + parts
    return executed, 2 * n_tok * CA * C, hbm, l2


def _work_wgrad(launch) -> Work:
    a, (g_j, g_i, z) = launch.args, launch.grid
    N, I, J, per, splits = a["N"], a["I"], a["J"], a["tokens_per_split"], a["n_splits"]
    bm, bn, bk = a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"]
    problems = z // splits
    steps = sum(_cdiv(min(per, N - s * per), bk) for s in range(splits))
    executed = l2 = hbm = 0
    for p in range(problems):
        ae, be = _elt(a[f"a{p}_ptr"]), _elt(a[f"b{p}_ptr"])
        executed += g_j * g_i * steps * 2 * bm * bn * bk
        hbm += N * (I * ae + J * be)
        l2 += g_j * g_i * steps * bk * (bm * ae + bn * be)
    parts = problems * splits * I * J * 4 + splits * (I + J) * 4
    return executed, problems * 2 * N * I * J, hbm + parts, l2 + parts


def _work_stencil(launch, forward: bool) -> Work:
    """The spatial path's depthwise stencils (kernels/adapter_stencil.py): no MMA, so flops 0
    (their 2 * tokens * Ca * taps FMAs run on the CUDA cores). HBM: each buffer once; L2: every
    program's neighbour tile per tap (forward: a; backward: dg and a), its own tiles once, and
    the backward's fp32 dwc partials (row blocks x taps x Ca). PREFIX rows (prefix_mode="mlp")
    pass through once: forward a read, g (and g_pre) written; backward dg (and h) read, dh written."""
    a, (g_c, g_m) = launch.args, launch.grid
    n_tok, CA, taps = a["n_tok"], a["CA"], a["KT"] * a["KH"] * a["KW"]
    n_pre, sp_blocks = (a["n_pre"], a["n_sp_blocks"]) if a["PREFIX"] else (0, g_m)
    tile = a["BLOCK_M"] * a["BLOCK_N"]
    pre_tiles = g_c * (g_m - sp_blocks) * tile
    if forward:
        e = _elt(a["a_ptr"])
        outs = 2 if a["STORE_GPRE"] else 1
        hbm = (n_tok + n_pre) * CA * e * (1 + outs)
        l2 = g_c * sp_blocks * tile * e * (taps + outs) + pre_tiles * e * (1 + outs)
        return 0, 0, hbm + CA * taps * e, l2
    e = _elt(a["dg_ptr"])
    own = 3 if a["ACT1"] else 2  # dg (+ h) read, dh written
    parts = sp_blocks * taps * CA * 4
    hbm = n_tok * CA * e * (own + 1) + n_pre * CA * e * own + parts
    l2 = g_c * sp_blocks * tile * e * (2 * taps + own) + pre_tiles * e * own + parts
    return 0, 0, hbm, l2


def _work_finalize(launch) -> Work:
    """A fixed-order sum of fp32 partials into each output, cast: reads every partial once."""
    a = launch.args
    moved, seen = 0, set()
    for k in range(wgrad.FINALIZE_SEGMENTS):
        out = a[f"o{k}"]
        if id(out) in seen or (k and a[f"e{k}"] == a[f"e{k - 1}"]):
            continue
        seen.add(id(out))
        elems = a[f"r{k}"] * a[f"q{k}"] if isinstance(a[f"r{k}"], int) else 0
        moved += elems * (a[f"n{k}"] * 4 + _elt(out))
    return 0, 0, moved, moved


WORK: Dict[str, Callable] = {
    "adapter_down_conv_fwd_kernel": _work_down_conv,
    "adapter_up_residual_fwd_kernel": _work_up_residual,
    "adapter_conv_bwd_kernel": _work_conv_bwd,
    "adapter_wgrad_kernel": _work_wgrad,
    "adapter_grad_finalize_kernel": _work_finalize,
    "adapter_up_residual_ln_fwd_kernel": functools.partial(_work_up_ln, forward=True),
    "adapter_up_ln_bwd_kernel": functools.partial(_work_up_ln, forward=False),
    "adapter_norm_fold_kernel": _work_norm_fold,
    "adapter_prenorm_dgrad_kernel": _work_prenorm_dgrad,
    "adapter_stencil_fwd_kernel": functools.partial(_work_stencil, forward=True),
    "adapter_stencil_bwd_kernel": functools.partial(_work_stencil, forward=False),
}


# ---------------------------------------------------------------------------- occupancy
def ctas_per_sm(registers: int, num_warps: int, shared_bytes: int, arch: int) -> int:
    """Resident CTAs per SM: registers are allocated per warp in units of 256 (8 per thread),
    shared memory with 1 KB reserved per CTA, at most 64 warps and 32 CTAs."""
    regs_per_warp = _cdiv(max(registers, 1) * 32, 256) * 256
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM[arch] // (shared_bytes + 1024)
    by_warps = MAX_WARPS_PER_SM // num_warps
    return max(0, min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM))


@functools.lru_cache(maxsize=None)
def _compiled(variant: "aot.Variant", arch: int):
    return aot.compile_variant(variant, arch)


def _row(shape_name: str, pass_name: str, event, arch: int, compile_kernels: bool) -> Row:
    if isinstance(event, TorchOp):
        return Row(shape_name, "triton", pass_name, event.name, None, None, 0, 0, event.bytes_moved,
                   event.bytes_moved)
    executed, required, hbm, l2 = WORK[event.variant.kernel](event)
    programs = math.prod(event.grid)
    row = Row(shape_name, "triton", pass_name, event.variant.kernel, tuple(event.grid), programs,
              executed, required, hbm, l2, variant=event.variant.label())
    if compile_kernels:
        rep = _compiled(event.variant, arch)
        row.registers, row.spill_bytes = rep.registers, rep.spill_bytes
        row.shared_bytes, row.uses_wgmma = rep.shared_bytes, rep.uses_wgmma
        row.ctas_per_sm = ctas_per_sm(rep.registers, event.variant.num_warps, rep.shared_bytes, arch)
        slots = SM_COUNT[arch] * max(row.ctas_per_sm, 1)
        row.waves = programs / slots
        row.utilisation = programs / (math.ceil(row.waves) * slots)
    return row


def model_rows(shapes: Dict[str, tuple], dtype: torch.dtype = torch.bfloat16, arch: int = 90, kt: int = 3,
               compile_kernels: bool = True, sms: Optional[int] = None, layernorm: bool = False,
               variants: Tuple[str, ...] = ()) -> List[Row]:
    """One Row per launch of fwd and bwd for each (B, T, L, C, Ca) shape; `sms` stands in for the
    arch's SM count (tests use a small one to make the launchers split work). layernorm: also the
    adapter + LayerNorm pair's launches, as shape "<name>+LN"; variants: VARIANTS tags, each as
    shape "<name>+<tag>"."""
    rows = []
    for name, shape in shapes.items():
        cases = [(name, dict())] + ([(f"{name}+LN", dict(layernorm=True))] if layernorm else [])
        cases += [(f"{name}+{tag}", dict(variant=VARIANTS[tag])) for tag in variants]
        for label, kw in cases:
            for pass_name, events in record_launches(shape, dtype, arch, kt, sms=sms, **kw).items():
                rows += [_row(label, pass_name, ev, arch, compile_kernels) for ev in events]
    return rows


def summary(rows: List[Row], backend: str = "triton") -> Dict[str, dict]:
    """Per shape: executed/required FLOPs over fwd+bwd, launches per pass, L2 bytes, of one backend."""
    out: Dict[str, dict] = {}
    for r in rows:
        if r.backend != backend:
            continue
        s = out.setdefault(r.shape, {"flops_executed": 0, "flops_required": 0, "launches_fwd": 0,
                                     "launches_bwd": 0, "l2_bytes_est": 0, "hbm_bytes_min": 0})
        s["flops_executed"] += r.flops_executed
        s["flops_required"] += r.flops_required
        s[f"launches_{r.pass_}"] += 1
        s["l2_bytes_est"] += r.l2_bytes_est
        s["hbm_bytes_min"] += r.hbm_bytes_min
    for s in out.values():
        s["flops_ratio"] = s["flops_executed"] / max(s["flops_required"], 1)
    return out


def format_table(rows: List[Row]) -> str:
    head = (f"{'shape':5} {'pass':4} {'kernel':32} {'grid':>16} {'progs':>6} {'GF exec':>8} {'GF req':>8} "
            f"{'ratio':>6} {'HBM MB':>7} {'L2 MB':>7} {'regs':>4} {'spill':>5} {'smemKB':>6} {'wgmma':>5} "
            f"{'cta/SM':>6} {'waves':>6} {'util':>5}")
    lines = [head]

    def opt(v, fmt):
        return format(v, fmt) if v is not None else "-"

    for r in rows:
        ratio = r.flops_executed / r.flops_required if r.flops_required else None
        lines.append(
            f"{r.shape:5} {r.pass_:4} {r.kernel.replace('adapter_', '')[:32]:32} "
            f"{'x'.join(map(str, r.grid)) if r.grid else '-':>16} {opt(r.programs, 'd'):>6} "
            f"{r.flops_executed / 1e9:8.2f} {r.flops_required / 1e9:8.2f} {opt(ratio, '.3f'):>6} "
            f"{r.hbm_bytes_min / 1e6:7.1f} {r.l2_bytes_est / 1e6:7.1f} {opt(r.registers, 'd'):>4} "
            f"{opt(r.spill_bytes, 'd'):>5} {opt(r.shared_bytes and r.shared_bytes // 1024, 'd'):>6} "
            f"{opt(r.uses_wgmma and 'y' or (r.uses_wgmma is not None and 'n') or None, 's'):>5} "
            f"{opt(r.ctas_per_sm, 'd'):>6} {opt(r.waves, '.2f'):>6} {opt(r.utilisation, '.2f'):>5}")
    for shape, s in [(f"{sh} {be}", v) for be in ("triton", "cuda") for sh, v in summary(rows, be).items()]:
        lines.append(f"{shape}: executed/required FLOPs {s['flops_ratio']:.3f} "
                     f"({s['flops_executed'] / 1e9:.1f} / {s['flops_required'] / 1e9:.1f} GFLOP), launches "
                     f"fwd {s['launches_fwd']} bwd {s['launches_bwd']}, L2 {s['l2_bytes_est'] / 1e6:.0f} MB, "
                     f"HBM min {s['hbm_bytes_min'] / 1e6:.0f} MB")
    return "\n".join(lines)


# -------------------------------------------------------------------------- CUDA backend
def cuda_model_rows(shapes: Dict[str, tuple], dtype: torch.dtype = torch.bfloat16, arch: int = 90, kt: int = 3,
                    compile_kernels: bool = True, sms: Optional[int] = None) -> List[Row]:
    """Rows (backend "cuda") of the CUDA backend's launches: st_adapter_fast/backends/cuda_model.py
    (binding.cpp's launch sequence, these work functions, registers from nvcc -Xptxas -v)."""
    from st_adapter_fast.backends import cuda_model

    return cuda_model.model_rows(shapes, dtype, arch, kt, compile_kernels, sms)
