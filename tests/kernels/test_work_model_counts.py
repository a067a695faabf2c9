"""The work model's flops_executed is what the kernels really issue: under the interpreter every
MMA tile goes through _common._mma, so counting 2*m*n*k there over a forward and a backward must
give the model's number for the same shape and configs (tile padding, masked rows, halo frames
included; frames outside the clip skipped). The model itself reads only the recorded launches."""

import contextlib

import pytest
import torch

from helpers import requires_interpreter

triton = pytest.importorskip("triton")

# B, T, L, C, Ca: 2 clips x 36 spatial tokens = 72 flattened rows (five 16-row tiles, the last
# padded), 7 frames, C and Ca off the 16-wide tiles. runs 0: the plan from occupancy on 6 SMs
# (some row blocks whole, some split), 1: whole clips, 3: every row block in runs of 3 frames.
SHAPE = (2, 7, 37, 40, 24)
SMS = 6


@requires_interpreter
@pytest.mark.parametrize("runs", [0, 1, 3])
def test_model_flops_match_the_mma_tiles_issued(runs, monkeypatch):
    from st_adapter_fast.kernels import _common, adapter_bwd, adapter_fwd, tuning, wgrad, work_model
    from st_adapter_fast.kernels._common import TileConfig

    issued = []
    original = _common._mma

    def counting_mma(a, b, acc, dot_fp32, precision):
        issued.append(2 * int(a.shape[0]) * int(a.shape[1]) * int(b.shape[1]))
        return original(a, b, acc, dot_fp32, precision)

    for mod in (_common, wgrad):
        monkeypatch.setattr(mod, "_mma", counting_mma)
    for mod in (adapter_fwd, wgrad):
        monkeypatch.setattr(mod, "sm_count", lambda t: SMS)
    small = TileConfig(16, 16, 16, num_warps=4, num_stages=1, runs=runs, splits=2)
    families = ("down_conv", "up_residual", "conv_bwd", "wgrad", "up_residual_unaligned",
                "conv_bwd_unaligned", "wgrad_unaligned")
    b, t, seq, c, ca = SHAPE
    with contextlib.ExitStack() as stack:
        for fam in families:
            stack.enter_context(tuning.forced_config(fam, small))
        rows = work_model.model_rows({"s": SHAPE}, torch.float32, 90, 3, compile_kernels=False, sms=SMS)
        if runs == 0:  # the occupancy plan mixes whole-clip and split row blocks here
            plan = [r for r in rows if r.kernel == "adapter_down_conv_fwd_kernel"]
            n_whole, split_runs, _ = _common.window_plan(7, 3, 2, 5, SMS)  # 2 Ca x 5 row blocks
            assert 0 < n_whole < 5 and plan[0].programs == 2 * (n_whole + (5 - n_whole) * split_runs)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b * t, seq, c, generator=g)
        params = [torch.randn(ca, c, generator=g), torch.randn(ca, generator=g), torch.randn(ca, 3, generator=g),
                  torch.randn(ca, generator=g), torch.randn(c, ca, generator=g), torch.randn(c, generator=g)]
        adapter_fwd.adapter_forward(x, t, 1, *params)
        fwd_issued = sum(issued)
        adapter_bwd.adapter_backward(torch.randn(x.shape, generator=g), x, t, 1, *params)
    model_fwd = sum(r.flops_executed for r in rows if r.pass_ == "fwd")
    model_bwd = sum(r.flops_executed for r in rows if r.pass_ == "bwd")
    assert fwd_issued == model_fwd
    assert sum(issued) - fwd_issued == model_bwd
    required = 7 * 2 * b * t * (seq - 1) * c * ca
    assert sum(r.flops_required for r in rows) == required < model_fwd + model_bwd
