"""The verdict's GPU parity stage (stage "parity" of benchmarks/gpu_verdict.sh): `pytest -m gpu`
in parallel, cut at the stage's time, and the parsing of its output into one results row."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict

_OUTCOME = re.compile(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def stage_parity(ctx) -> None:
    """pytest -m gpu (the tests that need CUDA, see pytest.ini), in parallel with pytest-xdist
    where it is installed, each test under pytest-timeout where that is installed, no -x; cut at
    the stage's time, keeping every outcome already printed."""
    import importlib.util

    log_path = ctx.work_dir / "parity_pytest.log"
    junit = ctx.work_dir / "parity_junit.xml"
    cmd = [sys.executable, "-m", "pytest", str(ctx.repo / "tests"), "-m", "gpu", "-p", "no:cacheprovider",
           "-v", "-rfE", "--durations=10", f"--junitxml={junit}"]
    have_xdist = importlib.util.find_spec("xdist") is not None
    have_timeout = importlib.util.find_spec("pytest_timeout") is not None
    workers = int(os.environ.get("VERDICT_PARITY_WORKERS", "0")) or min(8, os.cpu_count() or 1)
    if have_xdist and workers > 1:
        cmd += ["-n", str(workers)]  # each worker JIT-compiles; the Triton cache on disk is shared
    if have_timeout:
        cmd += ["--timeout", os.environ.get("VERDICT_TEST_TIMEOUT_S", "90")]
    budget = max(ctx.left() - 8, 5)
    ctx.log(f"{' '.join(cmd[2:])} (at most {budget:.0f} s; xdist {'on' if have_xdist else 'absent: serial'}, "
            f"pytest-timeout {'on' if have_timeout else 'absent'})")
    started = time.time()
    cut_short = False
    with open(log_path, "w") as log:
        # its own session, so the SIGINT below reaches the xdist workers too; and if the script's
        # timeout ends this process first, take pytest down with it (it must not hold the GPU
        # through the next stage)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def on_term(signum, frame):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            sys.exit(124)

        signal.signal(signal.SIGTERM, on_term)
        try:
            rc = proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            cut_short = True
            os.killpg(proc.pid, signal.SIGINT)  # pytest prints its summary (and junit) on SIGINT
            try:
                rc = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    row = parse_pytest_log(log_path.read_text(errors="replace"))
    row.update(stage=ctx.stage, command=" ".join(cmd[2:]), rc=rc, cut_short=cut_short, xdist=have_xdist,
               per_test_timeout=have_timeout, seconds=round(time.time() - started, 1),
               status="timeout" if cut_short else "ok")
    ctx.results.add("parity", row)
    print(f"parity: {parity_verdict(row)}", flush=True)


def parse_pytest_log(text: str) -> dict:
    """Per-test outcomes from pytest -v output (serial 'nodeid PASSED' or xdist '[gw0] PASSED
    nodeid'), the selected count and the FAILED/ERROR summary lines."""
    outcomes: Dict[str, str] = {}
    for line in text.splitlines():
        m = _OUTCOME.search(line)
        if not m or "::" not in line or line.startswith(("FAILED ", "ERROR ")):
            continue
        node = next((tok for tok in line.split() if "::" in tok), None)
        if node:
            outcomes[node] = m.group(1)
    counts: Dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    selected = None
    m = re.search(r"(\d+) selected", text) or re.search(r"\[(\d+) items?\]", text) or re.search(r"collected (\d+) items?", text)
    if m:
        selected = int(m.group(1))
    failures = [ln.strip() for ln in text.splitlines() if ln.startswith(("FAILED ", "ERROR "))][:40]
    return {"selected": selected, "counts": counts, "failures": failures,
            "summary": next((ln.strip("= ") for ln in reversed(text.splitlines()) if " in " in ln and "=" in ln), None)}


def parity_verdict(row: dict) -> str:
    c = row.get("counts", {})
    done = sum(c.values())
    bad = c.get("failed", 0) + c.get("error", 0)
    text = ", ".join(f"{n} {k}" for k, n in sorted(c.items())) or "no test finished"
    verdict = "FAIL" if bad else ("PASS" if c.get("passed") and not row.get("cut_short") else
                                  "INCOMPLETE" if row.get("cut_short") else
                                  "ALL SKIPPED" if c.get("skipped") else "NOTHING RAN")
    if row.get("cut_short"):
        text += f"; cut short after {row.get('seconds')} s with {done} of {row.get('selected', '?')} finished"
    elif row.get("rc") not in (0, 5) and not bad:
        verdict = "FAIL"
        text += f"; pytest exit code {row.get('rc')}"
    return f"{verdict} ({text})"
