"""The stages of the GPU verdict (benchmarks/gpu_verdict.sh; docs/design.md §11).

    python -m st_adapter_fast.bench.verdict STAGE --out DIR --work WORK [--stage-limit S]

STAGE is one of env, cuda-build, smoke, headline, parity, sweep, rest, report. The script runs
each in its own process under its own `timeout`, in priority order; cuda-build runs in the
background from the start of env. Every stage appends its rows to DIR/results.json as it
finishes them (a whole-file atomic rewrite per row), so a stage the script kills keeps what it
finished, and re-renders DIR/report.md when it ends. Inside a stage each measurement also runs
under a SIGALRM limit, so one stuck compile costs that row, not the stage.

On a machine without a GPU (VERDICT_DEVICE=cpu, the dry run in CI) the same stages run on the
tiny stand-ins core.TINY_TARGETS with the Triton interpreter: the numbers mean nothing, the
plumbing is what is checked.

Test hook: VERDICT_INJECT="smoke=raise,sweep=hang,env=hang-after" makes a stage raise or hang at
its start, or hang after writing its rows, so tests can check that a crashed or cut-short stage
is reported as such, with what it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

STAGES = ("env", "smoke", "headline", "parity", "sweep", "rest")
FUSED = ("triton", "cuda")
# Errors after which the process's CUDA context is unusable (every later call fails with them).
STICKY_CUDA_ERRORS = ("illegal memory access", "illegal instruction", "unspecified launch failure",
                      "misaligned address", "device-side assert")
# The reason a cuda row gives while the background build runs; such rows are retried by `rest`.
BUILD_PENDING = "the CUDA extension's JIT build is still running"
RESULT_LISTS = ("op", "memory", "e2e", "skipped", "smoke", "parity", "sweep", "aux", "notes", "plots")
# The rest stage leaves this much of its time to the e2e step when it starts max-autotune,
# whose autotuning can take minutes (it compiles and times every mm template).
E2E_RESERVE_S = 60.0


class StageTimeout(Exception):
    """A measurement ran past its time limit (raised from SIGALRM)."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float]):
    """Raise StageTimeout in this thread after `seconds` (None: no limit)."""
    if seconds is None:
        yield
        return

    def on_alarm(signum, frame):
        raise StageTimeout(f"ran past its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.05))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------- results
class Results:
    """DIR/results.json: loaded once per stage, rewritten atomically after every row."""

    def __init__(self, out_dir: Path, device: str):
        self.path = out_dir / "results.json"
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
        else:
            self.data = {"kind": "st-adapter-fast gpu verdict", "device_type": device, "meta": None,
                         "env": {}, "roofline": None, "stages": [], "plan": []}
        for key in RESULT_LISTS:
            self.data.setdefault(key, [])

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def add(self, bucket: str, row: dict) -> dict:
        self.data[bucket].append(row)
        if row.get("status") not in (None, "ok") and bucket in ("op", "memory", "e2e", "sweep"):
            self.data["skipped"].append({"what": _row_label(bucket, row), "reason": row.get("reason", "")})
        self.save()
        return row


def _row_label(bucket: str, row: dict) -> str:
    parts = [row.get(k) for k in ("stage", "suite", "shape_name", "kernel", "provider", "mode", "config")]
    if "candidate" in row:
        parts.append(f"candidate #{row['candidate']}")
    return f"{bucket} " + " ".join(str(p) for p in parts if p and not isinstance(p, dict))


@dataclasses.dataclass
class Context:
    """What every stage needs: where to write, on what, and until when."""

    stage: str
    device: str
    out_dir: Path
    work_dir: Path
    repo: Path
    deadline: float  # time.time() by which the stage must be done
    results: Results
    # set by a sticky CUDA error (an illegal address): every later launch in this process fails
    # too, so the stage's remaining rows are skipped and the next stage starts a fresh process
    poisoned: Optional[str] = None

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def left(self) -> float:
        return self.deadline - time.time()

    def log(self, msg: str) -> None:
        print(f"[{self.stage}] {msg}", flush=True)

    def task(self, bucket: str, row: dict, measure: Callable[[], dict], *, cap_s: float = 120.0,
             unavailable: Optional[Callable[[], Optional[str]]] = None, needs_s: float = 0.0) -> dict:
        """Run one measurement into a row of results[bucket]: 'ok' with measure()'s fields,
        'skipped' (unavailable() gave a reason, or fewer than needs_s seconds are left),
        'timeout' (over min(cap_s, time left)) or 'error' (with the traceback's tail)."""
        row = dict(row, stage=self.stage)
        left = self.left() - 1.0  # a second to write the row
        started = time.time()
        try:
            reason = None
            if self.poisoned:
                reason = f"not run: an earlier CUDA error in this stage's process ({self.poisoned[:120]})"
            if reason is None and unavailable is not None:
                reason = unavailable()
            if reason is None and left < max(needs_s, 1.0):
                reason = f"not started: {max(left, 0):.0f} s left in the stage, this needs ~{needs_s:.0f} s"
            if reason is not None:
                row.update(status="skipped", reason=reason)
            else:
                with time_limit(min(cap_s, left)):
                    row.update(measure())
                row["status"] = "ok"
        except StageTimeout as err:
            row.update(status="timeout", reason=str(err))
        except Exception as err:  # one broken case must not cost the stage
            first = str(err).splitlines()[0][:300] if str(err) else ""
            row.update(status="error", reason=f"{type(err).__name__}: {first}",
                       traceback=traceback.format_exc(limit=6))
            if any(sticky in str(err) for sticky in STICKY_CUDA_ERRORS):
                self.poisoned = row["reason"]
            _recover(self.device)
        row["seconds"] = round(time.time() - started, 2)
        self.log(f"{_row_label(bucket, dict(row, stage=None))}: {row['status']}"
                 + (f" ({row['reason'][:160]})" if row.get("reason") else "")
                 + (f" {row['time_ms']:.4f} ms" if isinstance(row.get("time_ms"), float) else ""))
        return self.results.add(bucket, row)


def _recover(device: str) -> None:
    if device == "cuda":
        import torch

        with contextlib.suppress(Exception):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def _setup_device(device: str) -> None:
    """Settings shared by every stage process; before the first Triton import."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import core

    if device == "cpu":
        core.COMPILE_BACKEND = "aot_eager"
        import torch

        # a 2-core box shared with other jobs: two intra-op threads made tiny eager ops take
        # 100 ms instead of 0.2 ms (a thread waiting for a core); one keeps the dry run steady
        torch.set_num_threads(1)


def _shapes(ctx: Context) -> Dict[str, "object"]:
    from . import core

    return core.TINY_TARGETS if ctx.cpu else core.TARGET_SHAPES


def _dtype(ctx: Context):
    from . import core

    return core.dtype_for(ctx.device)


# ----------------------------------------------------------------------------------- env
def stage_env(ctx: Context) -> None:
    """Versions, GPU, clocks (read-only nvidia-smi queries; never changes a setting)."""
    import platform

    import torch

    from . import report

    meta = report.collect_meta(ctx.device, sys.argv[1:], _dtype(ctx))
    ctx.results.data["meta"] = meta
    env: Dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "torch_cuda": torch.version.cuda, "executable": sys.executable}
    from importlib import metadata

    for dist in ("triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "timm", "transformers", "ninja"):
        try:  # the installed version, without importing (timm and transformers take seconds)
            env[dist.replace("pytest-", "")] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            env[dist.replace("pytest-", "")] = None
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                   gpu_memory_gb=round(props.total_memory / 1e9, 1), cudnn=torch.backends.cudnn.version())
    query = ("name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,"
             "temperature.gpu,utilization.gpu,memory.used,memory.total")
    env["nvidia_smi"] = _command(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], ctx.work_dir / "nvidia_smi.txt")
    _command(["nvidia-smi", "-q", "-d", "CLOCK,PERFORMANCE,POWER"], ctx.work_dir / "nvidia_smi_q.txt")
    env["nvcc"] = (_command(["nvcc", "--version"], None) or "").strip().splitlines()[-1:] or None
    ctx.results.data["env"] = env
    ctx.results.save()
    for key in ("gpu", "capability", "torch", "torch_cuda", "triton", "numpy", "xdist", "timeout", "nvcc"):
        ctx.log(f"{key}: {env.get(key)}")
    if env["nvidia_smi"]:
        ctx.log("nvidia-smi: " + " | ".join(env["nvidia_smi"].strip().splitlines()))


def _command(argv: List[str], log: Optional[Path], timeout: float = 20) -> Optional[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as err:
        text = f"{argv[0]}: {type(err).__name__}: {err}"
        if log is not None:
            log.write_text(text + "\n")
        return None
    if log is not None:
        log.write_text(out.stdout + out.stderr)
    return out.stdout if out.returncode == 0 else None


# ---------------------------------------------------------------------------- cuda build
def stage_cuda_build(ctx: Context) -> None:
    """JIT-build csrc/ (the script runs this in the background); WORK/cuda_build.json says how it went."""
    import torch

    started = time.time()
    status = {"ready": False, "error": None}
    if not torch.cuda.is_available():
        status["error"] = "no CUDA device"
    else:
        try:
            from st_adapter_fast.backends import cuda as cuda_backend

            status["ready"] = cuda_backend.load_extension() is not None
            status["error"] = None if status["ready"] else cuda_backend.extension_error()
        except Exception as err:  # noqa: BLE001
            status["error"] = f"{type(err).__name__}: {err}"
    status["seconds"] = round(time.time() - started, 1)
    (ctx.work_dir / "cuda_build.json").write_text(json.dumps(status))
    ctx.log(f"cuda extension: {'ready' if status['ready'] else 'unavailable: ' + str(status['error'])}"
            f" after {status['seconds']} s")


def _cuda_not_ready(ctx: Context, wait_s: float) -> Optional[str]:
    """None once the background build succeeded; else why not (waits up to wait_s for it)."""
    status_file = ctx.work_dir / "cuda_build.json"
    end = time.time() + max(wait_s, 0)
    while not status_file.is_file() and time.time() < end:
        time.sleep(1.0)
    if not status_file.is_file():
        return f"{BUILD_PENDING} (waited {max(wait_s, 0):.0f} s)"
    status = json.loads(status_file.read_text())
    return None if status.get("ready") else f"CUDA extension unavailable: {status.get('error')}"


# --------------------------------------------------------------------------------- smoke
def _case_of(shape):
    from st_adapter_fast.parity import Case

    side = math.isqrt(shape.spatial)
    grid = (side, side) if side * side == shape.spatial else (1, shape.spatial)
    return Case(batch=shape.B, frames=shape.T, grid=grid, prefix=shape.P, channels=shape.C,
                adapter_channels=shape.Ca, kernel=(shape.kt, 1, 1))


def stage_smoke(ctx: Context, backends=FUSED) -> None:
    """Each fused backend on shape A in bf16, fwd+bwd, against the float64 reference under THE
    parity rule (st_adapter_fast/parity.py); one PASS / FAIL / NOT RUN line each. On a GPU a
    backend that cannot run FAILs, except cuda while its build is still running (NOT RUN; the
    rest stage retries it)."""
    import torch

    from st_adapter_fast.parity import compare, make_inputs, run

    from . import core

    case = _case_of(_shapes(ctx)["A"])
    inputs = make_inputs(case, seed=0)
    ref64 = run(case, inputs, "reference", torch.float64, ctx.device)  # float64 on the GPU: fast, same oracle
    eager = run(case, inputs, "reference", torch.bfloat16, ctx.device)
    for backend in backends:
        def unavailable(backend=backend):
            if backend == "cuda" and not ctx.cpu:
                reason = _cuda_not_ready(ctx, ctx.left() - 25)
                if reason:
                    return reason
            return core.provider_unavailable(backend, _shapes(ctx)["A"], ctx.device, torch.bfloat16)

        def measure(backend=backend):
            got = run(case, inputs, backend, torch.bfloat16, ctx.device)
            errors = compare(got, ref64, eager, torch.bfloat16)
            worst = max(errors, key=lambda e: e.err / e.bound if e.bound > 0 else math.inf)
            return {"verdict": "PASS" if all(e.passed for e in errors) else "FAIL",
                    "failed": [e.describe() for e in errors if not e.passed],
                    "errors": {e.name: {"err": e.err, "bound": e.bound, "rel_err": e.rel_err} for e in errors},
                    "worst": f"{worst.name} err {worst.err:.2e} vs bound {worst.bound:.2e}"}

        row = ctx.task("smoke", {"backend": backend, "case": case.label(), "dtype": "bfloat16"}, measure,
                       unavailable=unavailable, cap_s=90)
        if row["status"] != "ok":
            pending = str(row.get("reason", "")).startswith(BUILD_PENDING)
            row["verdict"] = "NOT RUN" if ctx.cpu or pending else "FAIL"
            ctx.results.save()
        print(f"smoke {backend}: {row['verdict']} ({row.get('worst') or row.get('reason')})", flush=True)


def _catch_up_cuda(ctx: Context) -> None:
    """Smoke and shape A rows of cuda that earlier stages skipped while its build was running."""
    if ctx.cpu or _cuda_not_ready(ctx, 0) is not None:
        return
    data = ctx.results.data
    if any(r.get("backend") == "cuda" and r.get("verdict") == "NOT RUN" for r in data["smoke"]) and \
            not any(r.get("backend") == "cuda" and r.get("verdict") in ("PASS", "FAIL") for r in data["smoke"]):
        stage_smoke(ctx, backends=("cuda",))
    shape = _shapes(ctx)["A"]
    pending = lambda r: r.get("provider") == "cuda" and str(r.get("reason", "")).startswith(BUILD_PENDING)  # noqa: E731
    for r in [r for r in data["op"] if pending(r) and r.get("shape_name") == shape.name]:
        if not any(o.get("provider") == "cuda" and o.get("mode") == r["mode"] and o.get("shape_name") == shape.name
                   and o.get("status") == "ok" for o in data["op"]):
            _op_task(ctx, "target", shape, "cuda", r["mode"], quick=False, cap_s=60)
    if any(pending(r) for r in data["memory"]):
        _memory_task(ctx, shape, "cuda")


# ------------------------------------------------------------------------------ headline
def _provider_check(ctx: Context, shape, provider: str, dtype, cuda_wait_s: float):
    """() -> why `provider` cannot run `shape` now (None: it can); cuda waits for its build."""
    from . import core

    def unavailable():
        if provider == "cuda" and not ctx.cpu:
            reason = _cuda_not_ready(ctx, cuda_wait_s)
            if reason:
                return reason
        return core.provider_unavailable(provider, shape, ctx.device, dtype)

    return unavailable


def _op_task(ctx: Context, suite: str, shape, provider: str, mode: str, *, quick: bool, cap_s: float = 120,
             needs_s: float = 0.0, cuda_wait_s: float = 0.0):
    from . import core

    dtype = _dtype(ctx)

    unavailable = _provider_check(ctx, shape, provider, dtype, cuda_wait_s)

    row = core.op_row(suite, shape, provider, mode, dtype)
    if provider in core.COMPILE_MODES and core.COMPILE_BACKEND is not None:
        row["compile_backend"] = core.COMPILE_BACKEND
    # the interpreter takes ~1 s a call: 3 timed calls check the plumbing, more would only cost CI time
    timing = {"fixed_reps": 3} if ctx.cpu else None
    return ctx.task("op", row, lambda: core.time_op(provider, shape, mode, ctx.device, dtype, quick, timing),
                    unavailable=unavailable, cap_s=cap_s, needs_s=needs_s)


def _memory_task(ctx: Context, shape, provider: str, cuda_wait_s: float = 0.0):
    from . import core

    dtype = _dtype(ctx)

    unavailable = _provider_check(ctx, shape, provider, dtype, cuda_wait_s)

    row = {"shape_name": shape.name, "shape": shape.as_dict(), "provider": provider}
    return ctx.task("memory", row, lambda: core.measure_memory(provider, shape, ctx.device, dtype),
                    unavailable=unavailable, cap_s=60)


def stage_headline(ctx: Context) -> None:
    """Roofline, then shape A fwd and fwd+bwd for eager, triton, eager-nocudnn, cuda, then the
    bytes each saves for backward, and the adapter + LayerNorm pair's, eager and fused (cuda last:
    its build may still be finishing)."""
    from . import core

    def roofline():
        ctx.results.data["roofline"] = core.measure_roofline(ctx.device, quick=ctx.cpu)
        return dict(ctx.results.data["roofline"])

    ctx.task("aux", {"what": "roofline"}, roofline, cap_s=30)
    shape = _shapes(ctx)["A"]
    for provider in ("eager", "triton", "eager-nocudnn", "cuda"):
        for mode in core.MODES:
            _op_task(ctx, "target", shape, provider, mode, quick=ctx.cpu, cap_s=60,
                     cuda_wait_s=max(ctx.left() - 30, 0))
    # the adapter + LayerNorm pair (docs/design.md §7): saved bytes per adapter position, with
    # and without fuse_layernorm
    for provider in ("eager", "triton", "eager-nocudnn", "eager+ln", "triton+ln", "cuda"):
        _memory_task(ctx, shape, provider)


# ---------------------------------------------------------------------------------- rest
def stage_rest(ctx: Context) -> None:
    """Shapes B and C, shape A's variants (kernel (3, 3, 3); LayerNorm + GELU), torch.compile
    (default, fwd and fwd+bwd) then max-autotune fwd on A, and
    the end-to-end train step with 12 adapters (then without, for the baseline; then with
    fuse_layernorm, the adapter + LayerNorm pair)."""
    import torch

    from . import core
    from . import e2e as e2e_mod

    shapes = _shapes(ctx)
    _catch_up_cuda(ctx)
    for name in ("B", "C"):
        for provider in ("eager", "triton", "eager-nocudnn", "cuda"):
            for mode in core.MODES:
                _op_task(ctx, "target", shapes[name], provider, mode, quick=True, cap_s=60)
    # issue 15: shape A with kernel (3, 3, 3) and with LayerNorm + GELU, fused against eager with
    # cuDNN on and off (docs/design.md §9)
    for shape in (core.TINY_VARIANT_SHAPES if ctx.cpu else core.VARIANT_SHAPES).values():
        for provider in ("eager", "triton", "eager-nocudnn"):
            for mode in core.MODES:
                _op_task(ctx, "variant", shape, provider, mode, quick=True, cap_s=60)
    compile_cap = 150.0
    for mode in core.MODES:
        _op_task(ctx, "target", shapes["A"], "compile", mode, quick=ctx.cpu, cap_s=compile_cap, needs_s=20)
    _op_task(ctx, "target", shapes["A"], "compile-max-autotune", "fwd", quick=ctx.cpu,
             cap_s=max(ctx.left() - E2E_RESERVE_S, 1.0), needs_s=30)

    cfg = e2e_mod.VIT_TINY if ctx.cpu else e2e_mod.VIT_B16
    layouts = {label: (pre_attn, pre_mlp) for label, pre_attn, pre_mlp in e2e_mod.adapter_layouts(cfg)}
    twelve = next(label for label, (pre_attn, pre_mlp) in layouts.items() if pre_mlp and not pre_attn)
    for label, provider in ((twelve, "triton"), (twelve, "eager"), ("0", "none"), (twelve, "triton+ln"),
                            (twelve, "cuda")):
        pre_attn, pre_mlp = layouts[label]

        def unavailable(provider=provider):
            if provider == "none":
                return None
            if provider == "cuda" and not ctx.cpu:
                reason = _cuda_not_ready(ctx, 0)
                if reason:
                    return reason
            probe = core.OpShape("e2e", cfg.batch, cfg.frames, cfg.seq_len, cfg.width, cfg.adapter_channels)
            reason = core.provider_unavailable(provider, probe, ctx.device, torch.float16 if not ctx.cpu else torch.float32)
            if reason is None and ctx.cpu and provider in ("triton", "triton+ln"):
                reason = "the Triton interpreter is too slow for a whole model; e2e needs a GPU"
            return reason

        row = {"config": label, "provider": provider, "model": dict(dataclasses.asdict(cfg), builder="library")}
        ctx.task("e2e", row, lambda pre_attn=pre_attn, pre_mlp=pre_mlp, provider=provider: e2e_mod.run_e2e(
            cfg, pre_attn, pre_mlp, provider, ctx.device, True, core.time_fn, builder="library"),
            unavailable=unavailable, cap_s=120, needs_s=10)


# -------------------------------------------------------------------------------- driver
def stage_sweep(ctx: Context) -> None:
    from .verdict_sweep import stage_sweep as sweep

    sweep(ctx)


def stage_parity(ctx: Context) -> None:
    from .verdict_parity import stage_parity as parity

    parity(ctx)


STAGE_FUNCS = {"env": stage_env, "cuda-build": stage_cuda_build, "smoke": stage_smoke, "headline": stage_headline,
               "parity": stage_parity, "sweep": stage_sweep, "rest": stage_rest}


def _injected(stage: str) -> Optional[str]:
    for item in os.environ.get("VERDICT_INJECT", "").split(","):
        name, _, what = item.partition("=")
        if name.strip() == stage:
            return what.strip() or "raise"
    return None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m st_adapter_fast.bench.verdict", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=sorted(STAGE_FUNCS) + ["report"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    p.add_argument("--device", choices=("cpu", "cuda"), default=os.environ.get("VERDICT_DEVICE", "cuda"))
    p.add_argument("--stage-limit", type=float, default=600.0, help="seconds this stage may take")
    args = p.parse_args(argv)
    started = time.time()
    _setup_device(args.device)
    results = Results(args.out, args.device)
    from . import verdict_report

    if args.stage == "report":
        verdict_report.write(results, args.work, final=True)
        return 0
    ctx = Context(args.stage, args.device, args.out, args.work, args.repo.resolve(), started + args.stage_limit, results)
    if results.data.get("meta") is None and args.stage != "cuda-build":
        from . import report

        results.data["meta"] = report.collect_meta(args.device, [], _dtype(ctx))
    injected = _injected(args.stage)
    try:
        if injected == "hang":
            ctx.log("VERDICT_INJECT: hanging until the script's timeout")
            time.sleep(10 ** 6)
        if injected == "raise":
            raise RuntimeError(f"VERDICT_INJECT: stage {args.stage} raised on purpose")
        if args.device == "cuda" and args.stage != "env":  # env reports what it finds either way
            import torch

            if not torch.cuda.is_available():
                print(f"[{args.stage}] VERDICT_DEVICE=cuda but torch sees no CUDA device", file=sys.stderr)
                return 2
        STAGE_FUNCS[args.stage](ctx)
    except Exception as err:  # the stage's own code broke: say so in the report, exit 3
        traceback.print_exc()
        results.data["notes"].append(f"stage {args.stage} crashed: {type(err).__name__}: {str(err)[:300]}")
        if args.stage != "cuda-build":
            verdict_report.write(results, args.work, final=False, running=args.stage)
        return 3
    if args.stage == "cuda-build":
        return 0
    rows = [r for bucket in ("op", "memory", "e2e", "smoke", "sweep", "aux")
            for r in results.data[bucket] if isinstance(r, dict) and r.get("stage") == args.stage]
    verdict_report.write(results, args.work, final=False, running=args.stage)
    if injected == "hang-after":
        ctx.log("VERDICT_INJECT: rows written; hanging until the script's timeout")
        time.sleep(10 ** 6)
    return 1 if any(r.get("status") in ("error", "timeout") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
