"""The verdict's tile-config sweep (stage "sweep" of benchmarks/gpu_verdict.sh): every kernel's
tuning.candidate_configs timed under tuning.forced_config, the winners written to
DIR/tuned_configs.json in the format tuning.load_tuned_table reads (commit it as
kernels/tuned_configs.json and the dispatch uses it)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Dict, List

# Keep the default tile config unless a candidate beats it by more than this (geometric mean
# over the swept shapes): the p20-p80 spread of one GPU timing here is ~1-2 %.
SWEEP_NOISE = 0.02


@contextlib.contextmanager
def observed_configs():
    """Record every tuning.config_for call the kernels make: (kernel, kt, dtype, arch, config).
    The sweep learns from it which keys an op pass uses, and checks a forced config was applied."""
    from st_adapter_fast.kernels import tuning

    calls = []
    original = tuning.config_for

    def spy(kernel, *, kt, compute_dtype, arch):
        cfg = original(kernel, kt=kt, compute_dtype=compute_dtype, arch=arch)
        calls.append((kernel, kt, compute_dtype, arch, cfg))
        return cfg

    tuning.config_for = spy
    try:
        yield calls
    finally:
        tuning.config_for = original


def stage_sweep(ctx) -> None:
    """Each kernel's tuning.candidate_configs on shapes A, B, C (tiny A and B in the dry run: tiny A
    is unaligned and tiny B aligned, so every kernel family runs), timed in
    the op pass the kernel belongs to (fwd when it launches in the forward, else fwd+bwd) under
    tuning.forced_config; after each (shape, kernel) DIR/tuned_configs.json is rewritten with the
    best config per tuning.config_key. A candidate that fails to compile or run is a row with
    its error, never the end of the sweep. Then the CUDA backend's configs on shape A
    (sweep_cuda_configs)."""
    import torch

    from st_adapter_fast.kernels import tuning

    from . import core

    dtype = torch.bfloat16 if not ctx.cpu else torch.float32
    targets = core.TINY_TARGETS if ctx.cpu else core.TARGET_SHAPES
    shapes = [targets[k] for k in (("A", "B") if ctx.cpu else ("A", "B", "C"))]
    max_candidates = 2 if ctx.cpu else None  # the interpreter: check the plumbing, not the configs
    timing = {"fixed_reps": 1} if ctx.cpu else {"warmup_ms": 5.0, "rep_ms": 30.0}
    for shape in shapes:
        reason = core.provider_unavailable("triton", shape, ctx.device, dtype)
        if reason:
            ctx.results.add("sweep", {"stage": ctx.stage, "shape_name": shape.name, "status": "skipped", "reason": reason})
            continue
        passes = {}
        # which kernels (and keys) each pass launches: the adapter's, then the adapter + LayerNorm
        # pair's (its two kernels of its own; its other launches are the adapter's kernels)
        for provider in ("triton", "triton+ln"):
            for mode in core.MODES:
                inputs = core.make_op_inputs(shape, ctx.device, dtype, requires_grad=(mode == "fwd+bwd"))
                step, reset = core.make_step(provider, shape, mode, inputs, ctx.device)
                with observed_configs() as calls:
                    reset()
                    step()
                passes[(provider, mode)] = (step, reset, calls)
        for kernel in tuning.SWEPT_KERNELS:  # the official op's families (tuning.VARIANT_FAMILIES: not yet)
            # the first pass that launches the kernel: the cheapest that times it
            launching = [k for k, v in passes.items() if any(c[0] == kernel for c in v[2])]
            provider, mode = launching[0] if launching else ("triton", "fwd+bwd")
            step, reset, calls = passes[(provider, mode)]
            keys = sorted({(c[1], c[2], c[3]) for c in calls if c[0] == kernel}, key=str)
            if not keys:
                # not an error: each kernel has an aligned and an *_unaligned family, and a shape
                # launches one of the two (A, B, C are aligned; the dry run's tiny A is not, its tiny B is)
                ctx.results.add("sweep", {"stage": ctx.stage, "shape_name": shape.name, "kernel": kernel,
                                          "status": "skipped",
                                          "reason": f"this shape launches no {kernel} in {mode}"})
                continue
            kt, cdtype, arch = keys[0]
            key_names = [tuning.config_key(kernel, k[0], k[1], k[2]) for k in keys]
            candidates = tuning.candidate_configs(kernel, kt=kt, compute_dtype=cdtype, arch=arch)[:max_candidates]
            for i, cfg in enumerate(candidates):
                def measure(cfg=cfg, step=step, reset=reset, kernel=kernel):
                    with tuning.forced_config(kernel, cfg), observed_configs() as seen:
                        first = None
                        if not ctx.cpu:  # the interpreter compiles nothing: time_fn's warm-up will do
                            t0 = time.perf_counter()
                            reset()
                            step()  # compiles this config; a failure here is this candidate's row
                            torch.cuda.synchronize()
                            first = time.perf_counter() - t0
                        stats = core.time_fn(step, ctx.device, setup=reset, loop=False, **timing)
                    applied = [c[4] for c in seen if c[0] == kernel]
                    if not applied or any(c != cfg for c in applied):
                        raise RuntimeError(f"forced_config({kernel!r}) was not what the launches used: {applied[:2]}")
                    return dict(stats, first_call_s=first)

                ctx.task("sweep", {"shape_name": shape.name, "kernel": kernel, "provider": provider, "mode": mode,
                                   "keys": key_names,
                                   "candidate": i, "is_default": i == 0, "config": dataclasses.asdict(cfg)},
                         measure, cap_s=60 if not ctx.cpu else 120)
            write_tuned_table(ctx)
        del passes
        core._release(ctx.device)
    sweep_cuda_configs(ctx, targets["A"], dtype, timing)


def sweep_cuda_configs(ctx, shape, dtype, timing) -> None:
    """The CUDA backend's tile configs (backends.cuda.gemm_configs(), ST_ADAPTER_CUDA_GEMM_CONFIG),
    each timed on shape A fwd+bwd only (3 rows, ~1 s of GPU time plus one warm-up each): one GPU
    window A/Bs them. Rows carry cuda_config / cuda_config_label and no "config", so pick_tuned
    (Triton tile tables) ignores them; a config that fails is its row's error."""
    from st_adapter_fast.backends import cuda as cuda_backend

    from . import core

    reason = core.provider_unavailable("cuda", shape, ctx.device, dtype)
    configs = cuda_backend.gemm_configs()
    if reason:
        ctx.results.add("sweep", {"stage": ctx.stage, "shape_name": shape.name, "family": "cuda", "status": "skipped",
                                  "cuda_configs": [c.describe() for c in configs], "reason": reason})
        return
    import torch

    try:
        inputs = core.make_op_inputs(shape, ctx.device, dtype, requires_grad=True)
        step, reset = core.make_step("cuda", shape, "fwd+bwd", inputs, ctx.device)
    except Exception as err:  # the sweep goes on without this axis
        ctx.results.add("sweep", {"stage": ctx.stage, "shape_name": shape.name, "family": "cuda", "status": "error",
                                  "reason": f"{type(err).__name__}: {str(err)[:300]}"})
        return
    for cfg in configs:
        def measure(cfg=cfg):
            old = os.environ.get("ST_ADAPTER_CUDA_GEMM_CONFIG")
            os.environ["ST_ADAPTER_CUDA_GEMM_CONFIG"] = str(cfg.index)
            try:
                if cuda_backend.gemm_config() != cfg.index:
                    raise RuntimeError(f"ST_ADAPTER_CUDA_GEMM_CONFIG={cfg.index} was not applied")
                reset()
                step()
                torch.cuda.synchronize()
                return core.time_fn(step, ctx.device, setup=reset, loop=False, **timing)
            finally:
                if old is None:
                    os.environ.pop("ST_ADAPTER_CUDA_GEMM_CONFIG", None)
                else:
                    os.environ["ST_ADAPTER_CUDA_GEMM_CONFIG"] = old

        ctx.task("sweep", {"shape_name": shape.name, "family": "cuda", "mode": "fwd+bwd", "cuda_config": cfg.index,
                           "cuda_config_label": cfg.describe(), "is_default": cfg.index == 0}, measure, cap_s=60)
    del inputs
    core._release(ctx.device)


def pick_tuned(rows: List[dict]) -> Dict[str, dict]:
    """{key: winner} from sweep rows. Only shapes on which every non-failing candidate of the
    kernel was timed count; the score is the geometric mean over them of time / default time;
    the default stays unless a candidate wins by more than SWEEP_NOISE."""
    out: Dict[str, dict] = {}
    by_kernel: Dict[str, List[dict]] = {}
    for r in rows:
        if r.get("kernel") and "config" in r:
            by_kernel.setdefault(r["kernel"], []).append(r)
    for kernel, krows in by_kernel.items():
        cand_ids = sorted({r["candidate"] for r in krows})
        failed = {r["candidate"] for r in krows if r.get("status") != "ok"}
        alive = [c for c in cand_ids if c not in failed]
        if 0 not in alive:
            continue  # the default itself failed: nothing to compare against
        shapes = sorted({r["shape_name"] for r in krows})
        complete = [s for s in shapes if all(any(r["candidate"] == c and r["shape_name"] == s and r.get("status") == "ok"
                                                 for r in krows) for c in alive)]
        if not complete:
            continue
        t = {(r["candidate"], r["shape_name"]): r["time_ms"] for r in krows if r.get("status") == "ok"}
        score = {c: math.exp(sum(math.log(t[(c, s)] / t[(0, s)]) for s in complete) / len(complete)) for c in alive}
        best = min(alive, key=lambda c: score[c])
        if score[best] > 1.0 - SWEEP_NOISE:
            best = 0
        cfg = next(r["config"] for r in krows if r["candidate"] == best)
        keys = next(r["keys"] for r in krows if r["candidate"] == best)
        for key in keys:
            out[key] = {"config": cfg, "candidate": best, "speedup_vs_default": 1.0 / score[best],
                        "shapes": complete, "candidates_timed": len(alive), "candidates_failed": len(failed)}
    return out


def write_tuned_table(ctx) -> Path:
    """DIR/tuned_configs.json in the format tuning.load_tuned_table reads."""
    from st_adapter_fast.kernels import tuning

    from . import report

    tuned = pick_tuned(ctx.results.data["sweep"])
    table = {"version": tuning.TUNED_TABLE_VERSION, "device": report.device_name(ctx.device),
             "configs": {k: v["config"] for k, v in sorted(tuned.items())},
             "sweep": {k: {f: v[f] for f in v if f != "config"} for k, v in sorted(tuned.items())}}
    path = ctx.out_dir / "tuned_configs.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    os.replace(tmp, path)
    return path
