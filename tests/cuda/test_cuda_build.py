"""Optional CPU check (marker ``cuda_build``): JIT-build the real extension (binding.cpp + the
kernels) with a CUDA build of torch through cuda_backend's own build path, import it, and check
that the ops are registered and the binding's input checks raise ValueError / TypeError.

Needs a CUDA torch and nvcc, no GPU; takes minutes, so it skips elsewhere. Run it as
    CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST=9.0 \\
        python -m pytest -m cuda_build tests/cuda/test_cuda_build.py   # with a CUDA build of torch
"""

import os

import pytest
import torch

from st_adapter_fast.backends import cuda as cuda_backend

pytestmark = [
    pytest.mark.cuda_build,
    pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch"),
    pytest.mark.skipif(torch.version.cuda is not None and cuda_backend._jit_unavailable_reason() is not None,
                       reason=f"the extension cannot be JIT-built here: {cuda_backend._jit_unavailable_reason()}"),
]


@pytest.fixture(scope="module")
def ext():
    mp = pytest.MonkeyPatch()
    if not torch.cuda.is_available():  # no GPU to take the arch from
        mp.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    try:
        yield cuda_backend._jit_build()
    finally:
        mp.undo()


def test_extension_builds_and_registers(ext):
    assert callable(ext.fwd) and callable(ext.bwd)
    assert ext.MAX_KT == cuda_backend.MAX_KT


def test_binding_rejects_bad_inputs(ext):
    ca, c, kt = 4, 8, 3
    wd, taps, wu = torch.zeros(ca, c), torch.zeros(ca, kt), torch.zeros(c, ca)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        ext.fwd(torch.zeros(2, 5, c), 2, 1, wd, None, taps, None, wu, None)
    if torch.cuda.is_available():
        x = torch.zeros(2, 5, c, device="cuda")
        with pytest.raises(ValueError, match="fc2 weight must have shape"):
            ext.fwd(x, 2, 1, wd.cuda(), None, taps.cuda(), None, wu.t().cuda(), None)
        with pytest.raises(TypeError, match="must be"):
            ext.fwd(x.half(), 2, 1, wd.cuda().bfloat16(), None, taps.cuda().bfloat16(), None,
                    wu.cuda().bfloat16(), None)
