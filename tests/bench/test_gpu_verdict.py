"""The GPU verdict (benchmarks/gpu_verdict.sh, docs/design.md §11) as a CPU dry run: the same
stages on tiny shapes with the Triton interpreter, checked for what a GPU window needs: a plan
that fits 420 s (the caller's limit is 480 s), at most 8 well-named files, report.md headline
first, results.json rows from every stage, a tuned table the dispatch can read.

The dry run runs once per session (about 1.5-2.5 min on 2 cores). With
ST_ADAPTER_VERDICT_DRY_RUN_DIR set (.ci/run sets it) its files stay in that folder.
Never a timed assertion: the stage limits are the script's own business.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from st_adapter_fast.bench import verdict, verdict_parity
from st_adapter_fast.bench.verdict_sweep import SWEEP_NOISE, pick_tuned
from st_adapter_fast.kernels import tuning

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_verdict.sh"
PLAN_STAGES = ["setup", "env", "smoke", "headline", "parity", "sweep", "rest", "report"]
FILE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
EXPECTED_FILES = {"report.md", "results.json", "tuned_configs.json", "logs.tar.gz"}


def _run_verdict(out: Path, **env) -> SimpleNamespace:
    full_env = dict(os.environ, VERDICT_DEVICE="cpu", PYTHON=sys.executable, OMP_NUM_THREADS="1", **env)
    started = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    print(f"gpu_verdict.sh dry run: exit {proc.returncode} after {seconds:.0f} s")
    return SimpleNamespace(out=out, rc=proc.returncode, stdout=proc.stdout, stderr=proc.stderr, seconds=seconds,
                           log=proc.stdout[-4000:] + proc.stderr[-2000:])


@pytest.fixture(scope="session")
def dry_run(tmp_path_factory):
    out = Path(os.environ.get("ST_ADAPTER_VERDICT_DRY_RUN_DIR") or tmp_path_factory.mktemp("verdict"))
    run = _run_verdict(out)
    run.files = sorted(p for p in out.rglob("*") if p.is_file())
    return run


def _plan(stdout: str):
    lines = stdout.splitlines()
    assert lines and lines[0].startswith("verdict plan"), lines[:3]
    stages = []
    for line in lines[1:]:
        m = re.match(r"^\s+([a-z]+)\s+(\d+) s\s", line)
        if m:
            stages.append((m.group(1), int(m.group(2))))
            continue
        total = re.match(r"^plan total: (\d+) s$", line)
        assert total, f"the plan must end with 'plan total: N s', got {line!r}"
        return stages, int(total.group(1))
    raise AssertionError("no 'plan total' line")


def test_plan_comes_first_and_fits_the_window(dry_run):
    stages, total = _plan(dry_run.stdout)
    assert [s for s, _ in stages] == PLAN_STAGES
    assert total == sum(limit for _, limit in stages)
    assert total <= 420 < 480  # its own clock, then the caller's run(timeout_s=480)
    assert all(limit > 0 for _, limit in stages)


def test_dry_run_writes_at_most_8_well_named_files(dry_run):
    assert dry_run.rc == 0, dry_run.log
    names = {p.name for p in dry_run.files}
    assert len(dry_run.files) <= 8 and names == EXPECTED_FILES, names
    for p in dry_run.files:
        rel = p.relative_to(dry_run.out)
        assert len(rel.parts) <= 3 and all(FILE_NAME.match(part) for part in rel.parts), rel
        assert p.stat().st_size < 16 << 20


def test_report_starts_with_the_headline(dry_run):
    md = (dry_run.out / "report.md").read_text()
    headings = [ln for ln in md.splitlines() if ln.startswith("## ")]
    assert headings[0].startswith("## Headline: shape"), headings[:3]
    head = md.split("## Stages")[0]
    for needle in ("| eager |", "| triton |", "fwd+bwd ms", "vs torch.compile", "roofline", "saved beyond x",
                   "**Targets** (fwd <= 0.06 ms, fwd+bwd <= 0.26 ms", "**Smoke**", "triton PASS",
                   "**GPU parity** (pytest -m gpu): ALL SKIPPED", "**Stages**: all finished"):
        assert needle in head, needle
    table = md.split("## Stages")[1].split("\n## ")[0]
    for stage in PLAN_STAGES:
        assert re.search(rf"^\| {stage} \| \d+ \| [^|]* \| ok \|", table, re.M), (stage, table)


def test_results_hold_rows_of_every_stage(dry_run):
    data = json.loads((dry_run.out / "results.json").read_text())
    assert [s["stage"] for s in data["stages"]] == PLAN_STAGES and data["report_final"]
    assert data["env"]["torch"] and data["meta"]["device_type"] == "cpu"

    def rows(bucket, stage, **match):
        return [r for r in data[bucket] if r.get("stage") == stage and all(r.get(k) == v for k, v in match.items())]

    (triton_smoke,) = rows("smoke", "smoke", backend="triton")
    assert triton_smoke["verdict"] == "PASS" and triton_smoke["errors"]["out"]["err"] <= triton_smoke["errors"]["out"]["bound"]
    assert rows("smoke", "smoke", backend="cuda")[0]["verdict"] == "NOT RUN"
    for provider in ("eager", "triton"):
        for mode in ("fwd", "fwd+bwd"):
            (r,) = rows("op", "headline", provider=provider, mode=mode, shape_name="tiny")
            assert r["status"] == "ok" and r["time_ms"] > 0 and r["roofline_frac"] > 0
    assert {r["provider"] for r in rows("memory", "headline", status="ok")} == {"eager", "triton", "eager+ln", "triton+ln"}
    assert data["roofline"]["gemm_tflops"] > 0
    (parity,) = data["parity"]
    assert parity["stage"] == "parity" and parity["selected"] >= 10 and parity["counts"] == {"skipped": parity["selected"]}
    swept = rows("sweep", "sweep", status="ok")
    assert {r["kernel"] for r in swept} == set(tuning.SWEPT_KERNELS) and all(r["time_ms"] > 0 for r in swept)
    assert set(tuning.SWEPT_KERNELS) | tuning.VARIANT_FAMILIES == set(tuning.KERNELS)
    for name in ("tiny-B", "tiny-C"):
        assert len(rows("op", "rest", shape_name=name, status="ok")) == 4  # eager and triton, fwd and fwd+bwd
    assert {r["provider"] for r in rows("op", "rest", shape_name="tiny", status="ok")} == {"compile", "compile-max-autotune"}
    assert {r["provider"] for r in rows("e2e", "rest", status="ok")} == {"eager", "none"}


def test_tuned_table_is_what_the_dispatch_reads(dry_run):
    path = dry_run.out / "tuned_configs.json"
    table = tuning.load_tuned_table(path)
    kernels = {key.split("|")[0] for key in table}
    assert kernels == set(tuning.SWEPT_KERNELS)  # the variant-only families keep their defaults
    data = json.loads(path.read_text())
    assert data["version"] == tuning.TUNED_TABLE_VERSION and data["device"]
    for key in table:
        kernel, arch, dtype, kt = key.split("|")
        assert key == tuning.config_key(kernel, int(kt[2:]), {"fp32": __import__("torch").float32}[dtype], int(arch[2:]))


def test_logs_archive_holds_every_stage(dry_run):
    with tarfile.open(dry_run.out / "logs.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    for stage in PLAN_STAGES[:-1]:
        assert f"{stage}.log" in names, names
    assert {"stages.tsv", "plan.txt", "parity_pytest.log", "cuda_build.log"} <= names


def test_a_crashed_and_a_cut_short_stage_are_reported_with_what_they_finished(tmp_path):
    """env writes its rows then hangs past its limit; smoke raises at its start."""
    run = _run_verdict(tmp_path / "out", VERDICT_ONLY="env,smoke", VERDICT_INJECT="env=hang-after,smoke=raise",
                       VERDICT_LIMIT_ENV="25")
    assert run.rc == 1, run.log
    stages, total = _plan(run.stdout)
    assert [s for s, _ in stages] == ["setup", "env", "smoke", "report"] and total == 25 + 25 + 45 + 15
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} == {"report.md", "results.json", "logs.tar.gz"}
    md = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"^\| env \| 25 \| \d+ \| cut short \(time limit\) \| versions, GPU, clocks \|", md, re.M), md
    assert re.search(r"^\| smoke \| \d+ \| \d+ \| crashed \(see notes\) \| - \|", md, re.M), md
    assert "**Stages**: env cut short (time limit); smoke crashed" in md
    assert "stage smoke crashed: RuntimeError: VERDICT_INJECT" in md
    assert "**Smoke** (shape A, bf16, fwd+bwd against the float64 reference, docs/design.md §6): not run." in md


# ------------------------------------------------------------------------- pure pieces
def test_parse_pytest_log_reads_serial_and_xdist_outcomes():
    serial = ("collected 600 items / 590 deselected / 10 selected\n"
              "tests/ops/test_a.py::test_x[1] PASSED                [ 10%]\n"
              "tests/ops/test_a.py::test_y SKIPPED (needs a CUDA GPU) [ 20%]\n"
              "tests/cuda/test_b.py::test_z FAILED                  [ 30%]\n"
              "FAILED tests/cuda/test_b.py::test_z - AssertionError: out err 1e-1 > bound\n"
              "==== 1 failed, 1 passed, 1 skipped in 3.00s ====\n")
    row = verdict_parity.parse_pytest_log(serial)
    assert row["selected"] == 10 and row["counts"] == {"passed": 1, "skipped": 1, "failed": 1}
    assert row["failures"] == ["FAILED tests/cuda/test_b.py::test_z - AssertionError: out err 1e-1 > bound"]
    assert verdict_parity.parity_verdict(dict(row, rc=1)).startswith("FAIL (1 failed, 1 passed, 1 skipped")
    xdist = ("8 workers [3 items]\n"
             "[gw0] [ 33%] PASSED tests/ops/test_a.py::test_x[1] \n"
             "[gw1] [ 66%] PASSED tests/ops/test_a.py::test_x[2] \n")
    row = verdict_parity.parse_pytest_log(xdist)
    assert row["selected"] == 3 and row["counts"] == {"passed": 2}
    cut = verdict_parity.parity_verdict(dict(row, rc=2, cut_short=True, seconds=70))
    assert cut == "INCOMPLETE (2 passed; cut short after 70 s with 2 of 3 finished)"


def _sweep_row(kernel, candidate, shape, ms, status="ok"):
    return {"kernel": kernel, "candidate": candidate, "shape_name": shape, "status": status,
            "time_ms": ms if status == "ok" else None, "keys": [f"{kernel}|sm90|bf16|kt3"],
            "config": {"BLOCK_M": 64, "BLOCK_N": 32 * (candidate + 1), "BLOCK_K": 16, "num_warps": 8,
                       "num_stages": 2, "maxnreg": 255}}


def test_pick_tuned_needs_a_win_beyond_noise_on_every_complete_shape():
    rows = [
        # down_conv: #1 is 20 % faster on A and B; #2 fails to compile; C is incomplete (cut short)
        _sweep_row("down_conv", 0, "A", 1.0), _sweep_row("down_conv", 1, "A", 0.8), _sweep_row("down_conv", 2, "A", 0, "error"),
        _sweep_row("down_conv", 0, "B", 2.0), _sweep_row("down_conv", 1, "B", 1.6),
        _sweep_row("down_conv", 0, "C", 3.0),
        # wgrad: #1 is faster by less than the noise margin: the default stays
        _sweep_row("wgrad", 0, "A", 1.0), _sweep_row("wgrad", 1, "A", 1.0 - SWEEP_NOISE / 2),
        # conv_bwd: the default itself failed: no entry
        _sweep_row("conv_bwd", 0, "A", 0, "error"), _sweep_row("conv_bwd", 1, "A", 0.5),
    ]
    tuned = pick_tuned(rows)
    down = tuned["down_conv|sm90|bf16|kt3"]
    assert down["candidate"] == 1 and down["shapes"] == ["A", "B"] and abs(down["speedup_vs_default"] - 1.25) < 1e-9
    assert down["config"]["BLOCK_N"] == 64 and down["candidates_failed"] == 1
    assert tuned["wgrad|sm90|bf16|kt3"]["candidate"] == 0
    assert "conv_bwd|sm90|bf16|kt3" not in tuned


def test_time_limit_interrupts_a_stuck_measurement():
    started = time.perf_counter()
    with pytest.raises(verdict.StageTimeout):
        with verdict.time_limit(0.2):
            time.sleep(5)
    assert time.perf_counter() - started < 4


def test_rest_retries_the_cuda_rows_its_build_delayed(tmp_path, monkeypatch):
    """On a GPU, cuda rows skipped while the background build ran are run again once it is
    ready; rows that ran (or failed for another reason) are not. The GPU calls are stubbed."""
    results = verdict.Results(tmp_path, "cuda")
    pending = verdict.BUILD_PENDING + " (waited 0 s)"
    results.data["smoke"] = [{"backend": "triton", "verdict": "PASS"}, {"backend": "cuda", "verdict": "NOT RUN", "reason": pending}]
    results.data["op"] = [{"provider": "cuda", "mode": "fwd", "shape_name": "A", "status": "skipped", "reason": pending},
                          {"provider": "cuda", "mode": "fwd+bwd", "shape_name": "A", "status": "ok", "time_ms": 0.3},
                          {"provider": "triton", "mode": "fwd", "shape_name": "A", "status": "skipped", "reason": pending}]
    results.data["memory"] = [{"provider": "cuda", "shape_name": "A", "status": "skipped", "reason": pending}]
    ctx = verdict.Context("rest", "cuda", tmp_path, tmp_path, ROOT, time.time() + 60, results)
    calls = []
    monkeypatch.setattr(verdict, "stage_smoke", lambda ctx, backends: calls.append(("smoke", backends)))
    monkeypatch.setattr(verdict, "_op_task", lambda ctx, suite, shape, provider, mode, **kw: calls.append(("op", provider, mode)))
    monkeypatch.setattr(verdict, "_memory_task", lambda ctx, shape, provider: calls.append(("memory", provider)))
    monkeypatch.setattr(verdict, "_cuda_not_ready", lambda ctx, wait_s: "still building")
    verdict._catch_up_cuda(ctx)
    assert calls == []  # the build is not ready: nothing to retry yet
    monkeypatch.setattr(verdict, "_cuda_not_ready", lambda ctx, wait_s: None)
    verdict._catch_up_cuda(ctx)
    assert calls == [("smoke", ("cuda",)), ("op", "cuda", "fwd"), ("memory", "cuda")]


def test_a_sticky_cuda_error_skips_the_rest_of_the_stage(tmp_path):
    results = verdict.Results(tmp_path, "cpu")
    ctx = verdict.Context("sweep", "cpu", tmp_path, tmp_path, ROOT, time.time() + 60, results)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    first = ctx.task("sweep", {"kernel": "down_conv", "candidate": 3}, broken)
    second = ctx.task("sweep", {"kernel": "down_conv", "candidate": 4}, lambda: {"time_ms": 1.0})
    assert first["status"] == "error" and "illegal memory access" in first["reason"]
    assert second["status"] == "skipped" and "earlier CUDA error" in second["reason"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in saved["sweep"]] == ["error", "skipped"]
    ok = verdict.Context("sweep", "cpu", tmp_path, tmp_path, ROOT, time.time() + 60, results)
    assert ok.task("sweep", {"kernel": "wgrad", "candidate": 0}, lambda: {"time_ms": 1.0})["status"] == "ok"


def test_sweep_times_every_cuda_config_on_shape_a(tmp_path, monkeypatch):
    """The sweep's CUDA-config axis: one fwd+bwd row per entry of backends.cuda.gemm_configs(),
    each timed with ST_ADAPTER_CUDA_GEMM_CONFIG set to it (and restored after); rows carry no
    "config", so the Triton tuned table ignores them. Without a GPU: one skipped row."""
    import torch

    from st_adapter_fast.backends import cuda as cuda_backend
    from st_adapter_fast.bench import core, verdict_sweep

    results = verdict.Results(tmp_path, "cpu")
    ctx = verdict.Context("sweep", "cpu", tmp_path, tmp_path, ROOT, time.time() + 60, results)
    shape = core.TINY_TARGETS["A"]
    verdict_sweep.sweep_cuda_configs(ctx, shape, torch.float32, {"fixed_reps": 1})
    (skipped,) = results.data["sweep"]
    assert skipped["status"] == "skipped" and skipped["family"] == "cuda" and skipped["reason"]

    seen = []
    monkeypatch.delenv("ST_ADAPTER_CUDA_GEMM_CONFIG", raising=False)
    monkeypatch.setattr(core, "provider_unavailable", lambda *a: None)
    monkeypatch.setattr(core, "make_op_inputs", lambda *a, **k: {})
    monkeypatch.setattr(core, "make_step", lambda provider, *a: (lambda: seen.append((provider, cuda_backend.gemm_config())),
                                                                 lambda: None))
    monkeypatch.setattr(core, "time_fn", lambda step, *a, **k: step() or {"time_ms": 1.0 + cuda_backend.gemm_config()})
    monkeypatch.setattr(core, "_release", lambda device: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    (tmp_path / "gpu").mkdir()
    results = verdict.Results(tmp_path / "gpu", "cpu")
    ctx = verdict.Context("sweep", "cpu", tmp_path, tmp_path, ROOT, time.time() + 60, results)
    verdict_sweep.sweep_cuda_configs(ctx, shape, torch.float32, {"fixed_reps": 1})
    rows = results.data["sweep"]
    configs = cuda_backend.gemm_configs()
    assert [r["cuda_config"] for r in rows] == [c.index for c in configs] and len(configs) >= 3
    assert all(r["status"] == "ok" and r["mode"] == "fwd+bwd" and r["shape_name"] == shape.name for r in rows)
    assert [r["time_ms"] for r in rows] == [1.0 + c.index for c in configs]
    assert {p for p, _ in seen} == {"cuda"} and sorted({c for _, c in seen}) == [c.index for c in configs]
    assert "ST_ADAPTER_CUDA_GEMM_CONFIG" not in os.environ
    assert pick_tuned(rows) == {}
