"""The tensor-descriptor (TMA) load path of the weight operand, selectable per kernel family
(TileConfig.USE_TMA), against the pointer path and the float64 reference. The interpreter runs
descriptor kernels (zero-filled tails included), so this runs on CPU; on a GPU it runs compiled.
Both paths load the same values into the same tiles, so they must agree bit for bit."""

import pytest
import torch

from helpers import Case, assert_parity, fused_device, make_inputs, reference64, run, triton_interpreter_on

pytestmark = pytest.mark.skipif(fused_device() == "cpu" and not triton_interpreter_on(),
                                reason="needs CUDA or TRITON_INTERPRET=1")

CASES = [
    Case(batch=2, frames=5, grid=(2, 3), prefix=1, channels=24, adapter_channels=40, kernel=(3, 1, 1)),
    Case(batch=1, frames=4, grid=(3, 3), prefix=0, channels=40, adapter_channels=24, kernel=(5, 1, 1),
         noncontiguous=True, bias=False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=Case.label)
def test_descriptor_path_matches_pointer_path(case, dtype):
    from st_adapter_fast.kernels import tuning

    device = fused_device()
    inputs = make_inputs(case, 3)
    ref = reference64(case, inputs)
    eager = run(case, inputs, "reference", dtype, device)
    pointers = run(case, inputs, "triton", dtype, device)
    with tuning.override(USE_TMA=True):
        descriptors = run(case, inputs, "triton", dtype, device)
    assert_parity(descriptors, ref, eager, dtype, case.label())
    differ = [k for k in pointers if not torch.equal(pointers[k], descriptors[k])]
    assert not differ, f"descriptor and pointer paths differ in {differ}"


def test_descriptor_path_is_chosen_only_where_allowed():
    """USE_TMA needs sm_90+, a unit stride and 16-byte aligned rows; otherwise the pointer path."""
    from st_adapter_fast.kernels._common import TileConfig, weight_tma

    on = TileConfig(64, 64, 32, 8, 3, USE_TMA=True)
    w = torch.empty(40, 24, dtype=torch.bfloat16)  # rows of 48 bytes
    assert weight_tma(on, w, 90) == (True, False)
    assert weight_tma(on, w.t(), 90) == (True, True)  # unit stride along O: W^T is row-major
    assert weight_tma(on, w, 80) == (False, False)  # no TMA before Hopper
    assert weight_tma(TileConfig(64, 64, 32, 8, 3), w, 90) == (False, False)  # not asked for
    odd = torch.empty(40, 20, dtype=torch.bfloat16)  # rows of 40 bytes: not 16-byte aligned
    assert weight_tma(on, odd, 90)[0] is False
    assert weight_tma(on, torch.empty(40, 48, dtype=torch.bfloat16)[:, ::2], 90)[0] is False
