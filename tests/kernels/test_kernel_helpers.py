"""The Triton helpers the kernels share, each against a plain reference (mamba's ops/triton
habit): the fp32 -> bf16 cast, the temporal conv window, and the clip-run split."""

import pytest
import torch

from helpers import requires_interpreter

triton = pytest.importorskip("triton")
tl = triton.language
from st_adapter_fast.kernels._common import _cast, _conv_window_step, _load_taps  # noqa: E402


# jit kernels live at module level: the interpreter resolves names from module globals
@triton.jit
def cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, _cast(tl.load(x_ptr + offs), tl.bfloat16))


@triton.jit
def window_kernel(h_ptr, w_ptr, out_ptr, T, KT: tl.constexpr, C: tl.constexpr, REVERSE: tl.constexpr):
    """Frame t of h (T, C) broadcast over 16 rows through the window; row 0 stored."""
    offs_c = tl.arange(0, C)
    mask_c = offs_c < C
    r0, r1, r2, r3, r4, r5, r6, r7, r8 = _load_taps(w_ptr, offs_c, mask_c, KT, REVERSE)
    q0 = tl.zeros([16, C], dtype=tl.float32)
    q1, q2, q3, q4, q5, q6, q7 = q0, q0, q0, q0, q0, q0, q0
    rows = tl.arange(0, 16)
    for t_in in range(-(KT // 2), T + KT // 2):
        h = tl.zeros([16, C], dtype=tl.float32)
        if (t_in >= 0) & (t_in < T):
            h = tl.load(h_ptr + t_in * C + offs_c[None, :] + rows[:, None] * 0)
        g, q0, q1, q2, q3, q4, q5, q6, q7 = _conv_window_step(
            h, q0, q1, q2, q3, q4, q5, q6, q7, r0, r1, r2, r3, r4, r5, r6, r7, r8, KT)
        t_out = t_in - KT // 2
        if t_out >= 0:
            tl.store(out_ptr + t_out * C + offs_c[None, :] + rows[:, None] * 0, g, mask=rows[:, None] == 0)


@requires_interpreter
def test_bf16_cast_rounds_to_nearest_even():
    """The interpreter truncates fp32 -> bf16 (about half of random values differ from torch);
    _cast must round like torch and like the GPU's cvt.rn.bf16.f32, specials included."""
    x = torch.randn(4096) * torch.logspace(-20, 20, 4096)
    x[:6] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8])
    y = torch.empty(4096, dtype=torch.bfloat16)
    cast_kernel[(1,)](x, y, N=4096)
    assert torch.equal(y, x.to(torch.bfloat16))


@requires_interpreter
@pytest.mark.parametrize("kt", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("transposed", [False, True])
def test_conv_window_matches_conv1d(kt, transposed):
    """Walking frames through _conv_window_step gives conv1d with zero padding (forward: taps
    reversed) or its transpose (taps in order), per channel."""
    frames, channels = 11, 16
    h = torch.randn(frames, channels)
    taps = torch.randn(channels, kt)
    out = torch.empty(frames, channels)
    window_kernel[(1,)](h, taps, out, frames, KT=kt, C=channels, REVERSE=not transposed)
    weight = taps.flip(1) if transposed else taps  # the transposed conv is the conv with taps flipped
    want = torch.nn.functional.conv1d(h.t()[None], weight[:, None, :], padding=kt // 2, groups=channels)[0].t()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_frame_runs_and_token_splits_follow_occupancy():
    """Runs per clip and wgrad splits come from the compiled occupancy (slots = SMs x CTAs/SM):
    whole clips when one run per tile fills the waves, halo-paying runs only when SMs idle."""
    from st_adapter_fast.kernels._common import makespan, token_splits, window_plan, window_program_frames

    # shape A, 64x64 tiles: 294 whole-clip programs take 3 rounds of 132 slots; splitting some of
    # the 49 row blocks in two runs of 4 frames fills the third round for a few halo frames
    n_whole, runs, fpp = window_plan(8, 3, 6, 49, 132)
    frames = window_program_frames(8, 3, 6, 49, n_whole, runs, fpp)
    assert 0 < n_whole < 49 and runs == 2 and fpp == 4
    assert makespan([f + 0.5 for f in frames], 132) < makespan([8.5] * 294, 132)
    assert sum(frames) <= 1.05 * 8 * 294 and len(frames) / 396 >= 0.85
    assert window_plan(8, 3, 8, 32, 132) == (32, 1, 8)  # shape B: 256 programs, whole clips
    n_whole, runs, fpp = window_plan(32, 3, 6, 13, 132)  # shape C: every row block split
    assert n_whole == 0 and runs > 1 and runs * fpp >= 32
    assert window_plan(32, 3, 6, 13, 132, forced_runs=2) == (0, 2, 16)
    assert window_plan(1, 9, 1, 1, 132) == (1, 1, 1)
    # every frame of every (row, Ca) tile is owned by exactly one program
    assert sum(min(fpp, 32 - t0) for t0 in range(0, 32, fpp)) == 32
    splits = token_splits(25088, 32, tiles=36, slots=132)  # shape A, both weight GEMMs, 128x128
    programs = 36 * splits
    assert 1 < splits < 25088 // 32 // 8 and programs / (-(-programs // 132) * 132) >= 0.9, splits
    # a dearer partial (128x128 fp32 tiles vs 32-token steps) asks for fewer splits
    assert token_splits(25088, 32, tiles=36, slots=132, partial_steps=64) < splits
    assert token_splits(100, 32, tiles=1, slots=132) == 1  # every split keeps >= 8 token blocks
    assert token_splits(25088, 32, tiles=36, slots=132, forced=5) == 5
