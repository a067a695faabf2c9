"""Every test that needs a CUDA GPU carries the `gpu` marker, and no other test does: the GPU
verdict's parity stage runs exactly `pytest -m gpu` (benchmarks/gpu_verdict.sh), so an unmarked
GPU test would never run on a GPU, and a marked CPU test would spend the GPU window on nothing.

"Needs CUDA" is found without reading the markers: the suite is collected twice, as it is here
and once more with torch.cuda.is_available() answering True (and TRITON_INTERPRET unset, as on
a GPU machine). A test needs CUDA when a skip reason it has here goes away under the fake GPU,
or when it exists only under the fake GPU (a parametrization over the devices present).
Tests that skip themselves at run time (pytest.skip in the body) are not seen by this check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent('''
    import json, os
    import pytest

    if os.environ.get("GPU_MARKER_FAKE_CUDA") == "1":
        import torch
        torch.cuda.is_available = lambda: True
        torch.cuda.device_count = lambda: 1

    def _skip_reasons(item):
        reasons = [m.kwargs.get("reason", m.args[0] if m.args else "skip") for m in item.iter_markers("skip")]
        for mark in item.iter_markers("skipif"):
            conditions = mark.args or ([mark.kwargs["condition"]] if "condition" in mark.kwargs else [])
            for cond in conditions:
                if isinstance(cond, str):
                    from _pytest.skipping import evaluate_condition
                    hit, _ = evaluate_condition(item, mark, cond)
                else:
                    hit = bool(cond)
                if hit:
                    reasons.append(mark.kwargs.get("reason", str(cond)))
        return reasons

    def pytest_collection_modifyitems(session, config, items):
        out = {it.nodeid: {"gpu": it.get_closest_marker("gpu") is not None, "skip": _skip_reasons(it)} for it in items}
        with open(os.environ["GPU_MARKER_OUT"], "w") as f:
            json.dump(out, f)
''')


def _collect(tmp_path: Path, fake_cuda: bool) -> dict:
    (tmp_path / "gpu_marker_probe.py").write_text(PROBE)
    out = tmp_path / f"items-{int(fake_cuda)}.json"
    env = dict(os.environ, GPU_MARKER_OUT=str(out), GPU_MARKER_FAKE_CUDA="1" if fake_cuda else "0",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    if fake_cuda:
        env.pop("TRITON_INTERPRET", None)  # a GPU machine runs the compiled kernels
    else:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests", "--collect-only", "-q", "-p", "gpu_marker_probe",
                           "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_test_that_needs_cuda_is_marked_gpu_and_no_other(tmp_path):
    here = _collect(tmp_path, fake_cuda=False)
    fake = _collect(tmp_path, fake_cuda=True)
    unmarked, wrongly_marked = [], []
    for node, info in here.items():
        gone = set(info["skip"]) - set(fake.get(node, {"skip": info["skip"]})["skip"])
        needs_cuda = bool(gone)
        if needs_cuda and not info["gpu"]:
            unmarked.append(f"{node} (skipped here: {sorted(gone)})")
        if info["gpu"] and not needs_cuda:
            wrongly_marked.append(f"{node} (runs without CUDA: skip reasons here {info['skip']})")
    for node, info in fake.items():
        if node not in here and not info["gpu"]:
            unmarked.append(f"{node} (collected only when CUDA is present)")
    assert not unmarked, "tests that need CUDA without the gpu marker (use helpers.requires_cuda):\n  " + "\n  ".join(unmarked)
    assert not wrongly_marked, "gpu-marked tests that run on CPU:\n  " + "\n  ".join(wrongly_marked)
    gpu_tests = [n for n, i in here.items() if i["gpu"]]
    # the check itself can fail: the suite has GPU twins in several groups
    assert len(gpu_tests) >= 10 and len({n.split("/")[1] for n in gpu_tests}) >= 3, gpu_tests
