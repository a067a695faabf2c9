"""Fixtures of the pytest-benchmark suites; settings live in _bench_settings.py (imported first:
it sets TRITON_INTERPRET on a CPU machine before anything imports triton)."""

import pytest
import torch

from _bench_settings import DEVICE, DTYPE, QUICK, _HAS_CUDA
from st_adapter_fast.bench import core


@pytest.fixture(scope="session")
def roofline():
    return core.measure_roofline(DEVICE, quick=QUICK or not _HAS_CUDA)


@pytest.fixture
def machine_info():
    from st_adapter_fast.bench import report

    return {"device": report.device_name(DEVICE), "dtype": str(DTYPE).replace("torch.", ""),
            "torch": torch.__version__}
