"""Registered is not usable: available_backends(device) / backend_status(device) say which backends
can run here and why the others cannot; and the Triton backend's CPU error says exactly when
TRITON_INTERPRET=1 must be set -- before triton is first imported -- which fresh processes check."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from st_adapter_fast import available_backends, backend_status

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # conftest sets it on machines without CUDA


def test_registered_and_usable_on_cpu_differ():
    assert available_backends()[:1] == ["reference"] and {"triton", "cuda"} <= set(available_backends())
    status = {s.name: s for s in backend_status("cpu")}
    assert list(status)[0] == "reference" and status["reference"].usable and status["reference"].reason is None
    assert not status["cuda"].usable and "CUDA tensors" in status["cuda"].reason
    assert status["triton"].usable == INTERPRETING
    if not INTERPRETING:
        assert "TRITON_INTERPRET=1 must be set before triton is first imported" in status["triton"].reason
    assert available_backends("cpu") == [n for n, s in status.items() if s.usable]
    assert "cuda" not in available_backends("cpu")
    assert str(status["cuda"]).startswith("cuda: not usable on cpu (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_no_backend_is_usable_on_cuda_without_a_gpu():
    statuses = backend_status("cuda")
    assert {s.name for s in statuses} == set(available_backends())
    assert all(not s.usable and "no CUDA device here" in s.reason for s in statuses)
    assert available_backends("cuda") == []


def run_fresh(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


PROBE = """
    import torch
    from st_adapter_fast import STAdapter, st_adapter
    adapter = STAdapter(16, 8, backend="triton")
    torch.nn.init.normal_(adapter.conv.weight)
    x = torch.randn(2 * 2, 1 + 2 * 2, 16)
    def fused():
        return adapter(x, num_frames=2)
"""


def test_interpreter_flag_set_after_importing_st_adapter_fast_still_works():
    # `import st_adapter_fast` and a refused Triton call import no triton, so the flag may come later
    proc = run_fresh(PROBE + """
    import os, sys
    try:
        fused()
        raise SystemExit("the Triton backend ran CPU tensors without the interpreter")
    except RuntimeError as err:
        print("REFUSED:", err)
    assert "triton" not in sys.modules, "the refusal imported triton"
    os.environ["TRITON_INTERPRET"] = "1"
    out = fused()
    assert "st_adapter_fast.kernels.adapter_fwd" in sys.modules  # the fused kernels really ran
    torch.testing.assert_close(out, st_adapter(x, 2, *adapter.parameters(), backend="reference"))
    print("FUSED OK")
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TRITON_INTERPRET=1 must be set before triton is first imported" in proc.stdout
    assert "still works" in proc.stdout and "FUSED OK" in proc.stdout


def test_interpreter_flag_set_after_importing_triton_is_refused_with_the_reason():
    proc = run_fresh("""
    import os, triton
    os.environ["TRITON_INTERPRET"] = "1"  # too late: triton decorated its own functions at import
    """ + PROBE + """
    try:
        fused()
    except RuntimeError as err:
        print("REFUSED:", err)
    """)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "REFUSED:" in proc.stdout and "was set after triton had been imported" in proc.stdout, proc.stdout
    assert "restart with TRITON_INTERPRET=1" in proc.stdout
