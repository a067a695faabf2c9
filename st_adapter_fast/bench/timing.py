"""Timing for the benchmarks: ``time_fn`` (CUDA events, L2 flush, host dispatch hidden behind a
queued GPU sleep; perf_counter on CPU) and the per-device time budgets. Re-exported by
bench/core.py, where the rest of the op-level machinery lives."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Optional

import torch

__all__ = ["time_fn", "timing_budget"]

_L2_FLUSH: Dict[str, torch.Tensor] = {}


def _flush_l2(device: str) -> None:
    # 256 MB > the L2 of any current GPU (H100: 50 MB, B200: 126 MB); triton's do_bench does the same.
    buf = _L2_FLUSH.get(device)
    if buf is None:
        buf = _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    buf.zero_()


def time_fn(
    fn: Callable,
    device: str,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    setup: Optional[Callable] = None,
    flush_l2: bool = True,
    hide_host: bool = True,
    min_reps: int = 5,
    max_reps: int = 1000,
    loop: bool = True,
    fixed_reps: Optional[int] = None,
) -> dict:
    """Median time of fn in ms (plus p20/p80, mean, reps). CUDA: per-repetition events, L2
    flushed, a queued GPU sleep hides host dispatch; also `loop_ms`, back-to-back launches.
    CPU: perf_counter per repetition. `setup` runs before each repetition, outside the timing.
    fixed_reps: exactly one warm-up call and that many repetitions, no time-based sizing (the
    interpreter's dry runs, where each call takes a second)."""
    if setup is None:
        setup = lambda: None  # noqa: E731
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # estimate one call, then size warm-up and repetitions by time like do_bench
    setup()
    t0 = time.perf_counter()
    fn()
    sync()
    if fixed_reps is not None:
        est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
        n_warmup, n_rep = 0, max(1, fixed_reps)
    else:
        t0 = time.perf_counter()
        n_est = 3
        for _ in range(n_est):
            setup()
            fn()
        sync()
        est_ms = max((time.perf_counter() - t0) * 1e3 / n_est, 1e-3)
        n_warmup = max(1, min(int(warmup_ms / est_ms), max_reps))
        n_rep = max(min_reps, min(int(rep_ms / est_ms), max_reps))
    for _ in range(n_warmup):
        setup()
        fn()
    sync()

    times = []
    loop_ms = None
    if cuda:
        # GPU busy-wait long enough (2x one call's wall time, clocks ~2 GHz) for the CPU to
        # queue the whole call behind it: the events then time the kernels, not Python.
        sleep_cycles = int(min(max(2 * est_ms, 0.05), 2.0) * 2e6)
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
        for i in range(n_rep):
            setup()
            if flush_l2:
                _flush_l2(device)
            if hide_host:
                torch.cuda._sleep(sleep_cycles)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    if cuda and loop:
        n_loop = max(min_reps, min(n_rep, 200))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n_loop):
            setup()
            fn()
        end.record()
        torch.cuda.synchronize()
        loop_ms = start.elapsed_time(end) / n_loop
    elif not cuda:
        for _ in range(n_rep):
            setup()
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        loop_ms = statistics.fmean(times)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) >= 2 else [times[0]] * 4
    return {
        "time_ms": statistics.median(times), "time_ms_p20": q[0], "time_ms_p80": q[3],
        "time_ms_mean": statistics.fmean(times), "loop_ms": loop_ms, "reps": len(times),
    }


def timing_budget(device: str, quick: bool) -> dict:
    if device == "cuda":
        return {"warmup_ms": 10.0, "rep_ms": 40.0} if quick else {"warmup_ms": 25.0, "rep_ms": 150.0}
    return {"warmup_ms": 1.0, "rep_ms": 5.0, "min_reps": 3, "max_reps": 5} if quick else \
        {"warmup_ms": 10.0, "rep_ms": 100.0, "min_reps": 3, "max_reps": 50}
