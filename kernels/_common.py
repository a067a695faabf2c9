"""Pieces shared by the ST-Adapter Triton kernels: row addressing, the tile GEMM, the temporal
conv window, and the launch-time choices (dot precision, interpreter, tile configs).

Layout conventions used by every kernel:
- A "token tensor" is viewed as (F, L, C) with F = B*T frames; its spatial token n = f*S + s
  lives at row (f, P + s). Flat work buffers (g, h, dh: (N, Ca) with N = F*S) use the same
  addressing with P = 0, stride_f = S*Ca, stride_l = Ca, so one helper serves both.
- Offsets are computed in int64 so tensors over 2**31 elements address correctly.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import os
from typing import List, Optional

import torch
import triton
import triton.language as tl

# triton.jit decides at decoration time whether it builds an interpreted function, so this flag
# is fixed at import. CPU tensors can only run the kernels in that mode.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# The interpreter casts fp32 -> bf16 by truncating the mantissa (507 of 1024 random values
# differ from round-to-nearest-even); GPUs round (cvt.rn). _cast rounds first when interpreting,
# so CPU results carry the GPU's rounding error, not twice it. Compiled kernels never see it.
_INTERPRETER_BF16_RNE = tl.constexpr(INTERPRET)

# Widest temporal kernel the window in _conv_window_step holds (taps r0..r8, partials q0..q7).
MAX_FUSED_KT = 9


@triton.jit
def _row_offsets(n, S, P, stride_f, stride_l):
    """Element offset of spatial token n (= f*S + s) at row (f, P + s); int64."""
    n = n.to(tl.int64)
    f = n // S
    s = n - f * S
    return f * stride_f + (s + P) * stride_l


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest-even for fp32 -> bf16 under the interpreter too."""
    if _INTERPRETER_BF16_RNE:
        if dtype == tl.bfloat16:
            if x.dtype == tl.float32:
                bits = x.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _mma(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc += a @ b with a cast to b's dtype first (autocast: fp32 x against fp16 weights)."""
    a = _cast(a, b.dtype)
    if DOT_FP32:
        # Only set under TRITON_INTERPRET=1 with 16-bit operands: the interpreter's bf16 tl.dot
        # multiplies raw bit patterns (triton-lang/triton#11584). Upcasting after the cast above
        # gives the exact products + fp32 accumulation a tensor-core MMA computes.
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _weight_desc(w_ptr, O, K, stride_wo, stride_wi, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
                 USE_TMA: tl.constexpr, W_KMAJOR: tl.constexpr):
    """A tensor descriptor (TMA on sm_90) over W (O, K), or w_ptr itself on the pointer path.
    W_KMAJOR: W's unit stride is along O, i.e. W^T (K, O) is the row-major tensor."""
    desc = w_ptr
    if USE_TMA:
        if W_KMAJOR:
            desc = tl.make_tensor_descriptor(w_ptr, shape=[K, O], strides=[stride_wi, 1],
                                             block_shape=[BLOCK_K, BLOCK_O])
        else:
            desc = tl.make_tensor_descriptor(w_ptr, shape=[O, K], strides=[stride_wo, 1],
                                             block_shape=[BLOCK_O, BLOCK_K])
    return desc


@triton.jit
def _gemm_rows_tile(
    a_ptr, a_row_off, mask_m, stride_ak,  # A rows: a_ptr + a_row_off[m] + k * stride_ak
    w_ptr, stride_wo, stride_wi,  # W (O, K): w_ptr + o * stride_wo + k * stride_wi
    offs_o, mask_o, K,
    BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    w_desc=None, o0=0, USE_TMA: tl.constexpr = False, W_KMAJOR: tl.constexpr = False,
):
    """fp32 tile A[rows, :] @ W[offs_o, :]^T, (BLOCK_M, BLOCK_O). Masked rows/cols give 0.
    With USE_TMA the W tiles come through w_desc (_weight_desc; o0 = offs_o[0]): the descriptor
    zero-fills past O and K, and its tiles hold no per-element 64-bit addresses in registers."""
    acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        a = tl.load(
            a_ptr + a_row_off[:, None] + k[None, :].to(tl.int64) * stride_ak,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        if USE_TMA:
            if W_KMAJOR:
                w = w_desc.load([k0, o0])
            else:
                w = tl.trans(w_desc.load([o0, k0]))
        else:
            w = tl.load(
                w_ptr + offs_o[None, :] * stride_wo + k[:, None] * stride_wi,
                mask=mask_o[None, :] & mask_k[:, None],
                other=0.0,
            )
        acc = _mma(a, w, acc, DOT_FP32, INPUT_PRECISION)
    return acc


@triton.jit
def _flat_rows(offs_r, S, T, P, stride_f, stride_l):
    """Row r = b*S + s of the flattened (clip, spatial position) tile space -> (element offset of
    token (b, t=0, s) at row (b*T, P + s) of a (B*T, L, C) view, flat index b*T*S + s of its
    token); int64. Frame t adds t * stride_f and t * S. One division per tile, none per frame."""
    r = offs_r.to(tl.int64)
    b = r // S
    s = r - b * S
    return b * T * stride_f + (s + P) * stride_l, b * T * S + s


@triton.jit
def _window_program(G_CA, n_whole_rows, runs, frames_per_prog, T):
    """(Ca block, row block, first frame t0, end frame t1, partial index) of program_id(0) in a
    window grid: the first n_whole_rows row blocks walk whole clips (G_CA programs each), every
    later row block is split into `runs` runs of frames_per_prog frames (G_CA programs per run,
    Ca fastest so programs sharing x tiles run together). Partial index: one per (row, run)."""
    p = tl.program_id(0)
    n_whole = n_whole_rows * G_CA
    if p < n_whole:
        pid_r = p // G_CA
        pid_ca = p - pid_r * G_CA
        t0 = p * 0
        t1 = t0 + T
        part = pid_r
    else:
        q = p - n_whole
        per_row = G_CA * runs
        rr = q // per_row
        rem = q - rr * per_row
        j = rem // G_CA
        pid_ca = rem - j * G_CA
        pid_r = n_whole_rows + rr
        t0 = j * frames_per_prog
        t1 = tl.minimum(t0 + frames_per_prog, T)
        part = n_whole_rows + rr * runs + j
    return pid_ca, pid_r, t0, t1, part


@triton.jit
def _load_taps(wc_ptr, offs_c, mask_c, KT: tl.constexpr, REVERSE: tl.constexpr):
    """The window's nine taps r0..r8 (zeros past KT); REVERSE for the forward conv."""
    return (
        _load_tap(wc_ptr, offs_c, mask_c, 0, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 1, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 2, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 3, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 4, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 5, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 6, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 7, KT, REVERSE),
        _load_tap(wc_ptr, offs_c, mask_c, 8, KT, REVERSE),
    )


@triton.jit
def _load_tap(wc_ptr, offs_c, mask_c, j: tl.constexpr, KT: tl.constexpr, REVERSE: tl.constexpr):
    """Tap j of the depthwise temporal kernel wc (Ca, KT) as a (BLOCK_C,) fp32 vector; 0 past KT.
    KT = 0 is no conv at all, the identity (tap 0 = 1, wc unread): the window kernels then
    compute fc1 -> act1 -> act2 alone (prefix rows under prefix_mode="mlp")."""
    if KT == 0:
        if j == 0:
            tap = tl.full(offs_c.shape, 1.0, tl.float32)
        else:
            tap = tl.zeros(offs_c.shape, dtype=tl.float32)
    elif j < KT:
        if REVERSE:
            col = KT - 1 - j
        else:
            col = j
        tap = tl.load(wc_ptr + offs_c * KT + col, mask=mask_c, other=0.0).to(tl.float32)
    else:
        tap = tl.zeros(offs_c.shape, dtype=tl.float32)
    return tap


@triton.jit
def _conv_window_step(h, q0, q1, q2, q3, q4, q5, q6, q7,
                      r0, r1, r2, r3, r4, r5, r6, r7, r8, KT: tl.constexpr):
    """One step of a sliding-window temporal stencil, frame by frame, each input frame once.

    Frame t_in's tile h contributes r_j * h to output frame t_in - KT//2 + j. The partials
    q_i hold output frame t_in - KT//2 + 1 + i before this step; the step returns the finished
    output frame t_in - KT//2 and shifts the window. With r_j = wc[KT-1-j] this is the forward
    conv (g_t = sum_j wc_j h_{t+j-p}); with r_j = wc[j] it is its transpose (dh from dg).
    Unused partials stay zero and the compiler drops them (KT is a compile-time constant).
    """
    out = q0 + r0[None, :] * h
    if KT > 2:
        q0 = q1 + r1[None, :] * h
    if KT > 3:
        q1 = q2 + r2[None, :] * h
    if KT > 4:
        q2 = q3 + r3[None, :] * h
    if KT > 5:
        q3 = q4 + r4[None, :] * h
    if KT > 6:
        q4 = q5 + r5[None, :] * h
    if KT > 7:
        q5 = q6 + r6[None, :] * h
    if KT > 8:
        q6 = q7 + r7[None, :] * h
    # the newest partial: output frame t_in + KT//2 sees only this frame so far
    if KT == 2:
        q0 = r1[None, :] * h
    if KT == 3:
        q1 = r2[None, :] * h
    if KT == 4:
        q2 = r3[None, :] * h
    if KT == 5:
        q3 = r4[None, :] * h
    if KT == 6:
        q4 = r5[None, :] * h
    if KT == 7:
        q5 = r6[None, :] * h
    if KT == 8:
        q6 = r7[None, :] * h
    if KT == 9:
        q7 = r8[None, :] * h
    return out, q0, q1, q2, q3, q4, q5, q6, q7


# docs/design.md §9's activations as kernel constexprs (ACT1 after fc1, ACT2 after the conv)
ACT_CODES = {None: 0, "gelu": 1, "quick_gelu": 2, "relu": 3}
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2): erf GELU
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi): the GELU's derivative
_QUICK_GELU_A = tl.constexpr(1.702)  # CLIP's QuickGELU: t * sigmoid(1.702 t)


def act_code(name) -> int:
    """The ACT constexpr of an activation name (None | "gelu" | "quick_gelu" | "relu")."""
    try:
        return ACT_CODES[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACT_CODES)}") from None


@triton.jit
def _act(t, ACT: tl.constexpr):
    """act(t) in fp32 for ACT = 0 (identity), 1 (erf GELU), 2 (QuickGELU), 3 (ReLU)."""
    out = t
    if ACT == 1:
        out = 0.5 * t * (1.0 + tl.erf(t * _SQRT1_2))
    if ACT == 2:
        out = t * tl.sigmoid(t * _QUICK_GELU_A)  # tensor first: constexpr * tensor stays a constexpr
    if ACT == 3:
        out = tl.maximum(t, 0.0)
    return out


@triton.jit
def _act_grad(t, ACT: tl.constexpr):
    """d act / dt at the pre-activation t (fp32); ReLU's is 0 at t = 0, as torch's."""
    out = tl.full(t.shape, 1.0, tl.float32)
    if ACT == 1:
        out = 0.5 * (1.0 + tl.erf(t * _SQRT1_2)) + t * _INV_SQRT_2PI * tl.exp(-0.5 * t * t)
    if ACT == 2:
        sig = tl.sigmoid(t * _QUICK_GELU_A)
        out = sig + t * _QUICK_GELU_A * sig * (1.0 - sig)
    if ACT == 3:
        out = tl.where(t > 0.0, 1.0, 0.0)
    return out


@triton.jit
def _drop_factor(mask_ptr, clip, valid, drop_keep, HAS_DROP: tl.constexpr):
    """DropPath's per-row factor m = draw[clip] / (1 - p) in fp32 (draw: the per-clip 0/1
    Bernoulli vector, ops.drop_path_draw), or 1 without DropPath. clip: (BLOCK,) int."""
    if HAS_DROP:
        m = tl.load(mask_ptr + clip, mask=valid, other=0.0).to(tl.float32) / drop_keep
    else:
        m = tl.full(clip.shape, 1.0, tl.float32)
    return m


@dataclasses.dataclass(frozen=True, eq=False)
class Switches:
    """The docs/design.md §9 switches the Triton kernels fuse, as launch arguments: activations
    after fc1 / after the conv (ACT_CODES), the branch scale s (a 0-dim tensor in the compute
    dtype) and DropPath (drop_draw: the (B,) float32 0/1 per-clip draw; drop_path: p)."""

    act1: int = 0
    act2: int = 0
    scale: Optional[torch.Tensor] = None
    drop_draw: Optional[torch.Tensor] = None
    drop_path: float = 0.0

    @classmethod
    def of(cls, act_after_fc1=None, act_after_conv=None, scale=None, drop_draw=None, drop_path=0.0) -> "Switches":
        return cls(act_code(act_after_fc1), act_code(act_after_conv), scale,
                   drop_draw if drop_path > 0 else None, float(drop_path) if drop_draw is not None else 0.0)


def dot_flags(compute_dtype: torch.dtype) -> tuple[bool, str]:
    """(DOT_FP32, INPUT_PRECISION) for tl.dot on operands of ``compute_dtype``.

    fp32 follows torch.backends.cuda.matmul.allow_tf32 (torch's matmul is IEEE fp32 unless it is
    set; tl.dot would otherwise use TF32 and miss fp32 parity).
    """
    if INTERPRET:
        return compute_dtype != torch.float32, "ieee"
    if compute_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return False, "tf32"
    return False, "ieee"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel. Field names match the kernels' constexprs."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    # An explicit register cap: without one, ptxas (with Triton 3.9's --regAllocOptLevel=2)
    # settled on 128 registers for several 8-warp kernels and spilled 8-48 bytes rather than
    # use the 255 the launch allows.
    maxnreg: int = 255
    # CTAs per SM the AOT compile of this config gives on its arch (registers, warps, shared
    # memory; tests/kernels/test_work_model.py checks it): frame runs and wgrad splits are sized
    # so that programs fill whole waves of SMs * ctas_per_sm.
    ctas_per_sm: int = 1
    # 0 = sized from occupancy (above); > 0 forces the window kernels' frame runs per clip or the
    # wgrad kernel's token splits (a GPU sweep's knob).
    runs: int = 0
    splits: int = 0
    # weight operand through a tensor descriptor (TMA) where the arch (sm_90+) and the weight's
    # layout allow (unit stride, 16-byte aligned rows); the pointer path otherwise. Off by
    # default until a GPU has timed it (and checked the descriptor scratch allocator).
    USE_TMA: bool = False

    def launch_kwargs(self) -> dict:
        return dict(num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)


def weight_tma(cfg: "TileConfig", weight: torch.Tensor, arch: int, operands_aligned: bool = True) -> tuple:
    """(USE_TMA, W_KMAJOR) for a weight operand W (O, K): TMA only when asked for, on sm_90+,
    with a unit stride and 16-byte aligned rows (descriptor rules), and with aligned activations
    (the unaligned families' tiles: 128x64 up-residual + descriptor spilled 8 B on the odd
    shape); W_KMAJOR when the unit stride runs along O (W passed as a transposed view)."""
    kmajor = weight.stride(0) == 1 and weight.stride(1) != 1
    row_stride = weight.stride(1) if kmajor else weight.stride(0)
    unit = weight.stride(0) if kmajor else weight.stride(1)
    ok = cfg.USE_TMA and operands_aligned and arch >= 90 and unit == 1 and (row_stride * weight.element_size()) % 16 == 0 \
        and weight.data_ptr() % 16 == 0
    if ok and weight.device.type == "cuda":
        _ensure_descriptor_allocator()
    return bool(ok), bool(kmajor)


_ALLOCATOR_SET = False


def _ensure_descriptor_allocator() -> None:
    """Device-side tensor descriptors need global scratch memory from triton's allocator."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def aligned(*sizes: int) -> bool:
    """Every size / stride a multiple of 16 elements (unit strides pass): the JIT's divisibility
    hints then allow vectorised loads, which is what the larger aligned tiles need."""
    return all(v == 1 or v % 16 == 0 for v in sizes)


def waves_cost(programs: int, slots: int, work_per_program: float) -> float:
    """Time of a launch in units of one program's work: whole waves of `slots` resident programs."""
    return -(-programs // max(slots, 1)) * work_per_program


def run_frames(num_frames: int, kt: int, frames_per_prog: int) -> List[int]:
    """Frames whose GEMM each run of one clip issues: run [t0, t1) walks t0-pad .. t1+pad-1,
    skipping frames outside the clip (the conv's zero padding)."""
    pad = kt // 2
    return [min(t0 + frames_per_prog + pad, num_frames) - max(t0 - pad, 0)
            for t0 in range(0, num_frames, frames_per_prog)]


def window_program_frames(num_frames: int, kt: int, g_ca: int, g_r: int, n_whole_rows: int, runs: int,
                          frames_per_prog: int) -> List[int]:
    """Frames each program of a window grid computes, in launch order (see _window_program)."""
    whole = run_frames(num_frames, kt, num_frames)[0]
    split = run_frames(num_frames, kt, frames_per_prog)
    return [whole] * (n_whole_rows * g_ca) + [f for _ in range(g_r - n_whole_rows) for f in split for _ in range(g_ca)]


def makespan(durations: List[float], slots: int) -> float:
    """Finish time of programs dispatched in order to the first free of `slots` resident places."""
    free = [0.0] * min(max(slots, 1), max(len(durations), 1))
    heapq.heapify(free)
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        end = max(end, start + d)
        heapq.heappush(free, start + d)
    return end


@functools.lru_cache(maxsize=256)
def window_plan(num_frames: int, kt: int, g_ca: int, g_r: int, slots: int, forced_runs: int = 0) -> tuple:
    """(n_whole_rows, runs, frames_per_prog) of a window launch. Splitting a row block's clip walk
    into runs recomputes a KT//2 halo per cut, so it pays only where whole-clip programs leave
    slots idle: the plan minimises the simulated finish time (programs dispatched in order to
    SMs x CTAs/SM slots; one frame GEMM = 1, plus 0.5 per program for its prologue and stores);
    on ties a last wave at least 85% full, then the fewest extra frames. Shape A (294 whole-clip programs on 132 slots: 3 rounds) splits
    some row blocks in 2 to fill the third round; shape C splits every row block in 4."""
    if forced_runs:
        runs = max(1, min(forced_runs, num_frames))
        fpp = -(-num_frames // runs)
        return (g_r if runs == 1 else 0), -(-num_frames // fpp), fpp
    best, best_key = (g_r, 1, num_frames), None
    for runs in range(1, max(1, num_frames // max(kt, 2)) + 1):
        fpp = -(-num_frames // runs)
        runs = -(-num_frames // fpp)
        for n_whole in ([g_r] if runs == 1 else range(g_r, -1, -1)):
            frames = window_program_frames(num_frames, kt, g_ca, g_r, n_whole, runs, fpp)
            # ties (the durations are estimates): a last wave >= 85% full, then the fewest frames
            fill = len(frames) / (-(-len(frames) // slots) * slots)
            key = (makespan([f + 0.5 for f in frames], slots), fill < 0.85, sum(frames))
            if best_key is None or key < best_key:
                best, best_key = (n_whole, runs, fpp), key
    return best


def token_splits(num_tokens: int, block_k: int, tiles: int, slots: int, forced: int = 0,
                 partial_steps: float = 4.0) -> int:
    """Token splits of a wgrad launch: the fewest that minimise whole waves x (token steps per
    program + the cost of its fp32 partial tile, written here and read back by the finalize
    launch: `partial_steps` token steps; 4 for 64x64x32 bf16 tiles, 16 KB stored vs 8 KB loaded
    per step, both moved twice). Every split keeps >= 8 token blocks."""
    steps = max(1, -(-num_tokens // block_k))
    if forced:
        return max(1, min(forced, steps))
    best, best_cost = 1, None
    for splits in range(1, max(1, steps // 8) + 1):
        cost = waves_cost(tiles * splits, slots, -(-steps // splits) + partial_steps)
        if best_cost is None or cost < best_cost:
            best, best_cost = splits, cost
    return best


@functools.lru_cache(maxsize=None)
def device_arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def arch_of(tensor: torch.Tensor) -> int:
    """Compute capability as 80 / 90 / ...; the interpreter is treated as sm_90 for config picks."""
    if tensor.device.type != "cuda":
        return 90
    return device_arch(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())


def sm_count(tensor: torch.Tensor) -> int:
    if tensor.device.type != "cuda":
        return 4
    return num_sms(tensor.device.index if tensor.device.index is not None else torch.cuda.current_device())
