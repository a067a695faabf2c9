"""The package installs as users get it: a wheel built from this tree carries the Python API and
the Triton kernels as st_adapter_fast.kernels -- and no top-level `kernels` module, a name that
belongs to another PyPI project."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_layout(tmp_path):
    env = {**os.environ, "ST_ADAPTER_FAST_SKIP_CUDA_BUILD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "-q"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("st_adapter_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("st_adapter_fast/__init__.py", "st_adapter_fast/ops.py", "st_adapter_fast/reference.py",
                     "st_adapter_fast/kernels/__init__.py", "st_adapter_fast/kernels/adapter_fwd.py",
                     "st_adapter_fast/kernels/adapter_bwd.py", "st_adapter_fast/kernels/aot.py"):
        assert required in names, required
    assert not [n for n in names if n.startswith("kernels/")], "a top-level kernels package leaked into the wheel"
    metadata = next(n for n in names if n.endswith("METADATA"))
    requires = [line for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
                if line.startswith("Requires-Dist: torch")]
    # a plain `torch` requirement is fine; a pin to a CUDA build (+cuXXX) would pull gigabytes
    assert requires and all("+cu" not in r for r in requires), requires
