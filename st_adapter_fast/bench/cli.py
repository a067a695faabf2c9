"""``python -m st_adapter_fast bench``: op-level, memory, roofline and end-to-end benchmarks of
every backend, written to bench-results/<device>-<date>/ in the current directory (results.json,
report.md, PNGs; --out DIR elsewhere).

    python -m st_adapter_fast bench                       # GPU: everything, target shapes A,B,C
    python -m st_adapter_fast bench --quick --no-e2e      # a fast look
    python -m st_adapter_fast bench --device cpu --shapes tiny --backends eager,triton

Work runs in priority order (eager and fused timings, memory, torch.compile on the first shape,
end to end, sweeps, torch.compile on the other shapes), so ``--budget-s`` can cut the tail and still leave a useful report:
whatever is cut is listed as skipped, with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m st_adapter_fast bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--shapes", default=None,
                   help="comma-separated target shapes A,B,C (docs/design.md §5) or 'tiny'; "
                        "default A,B,C on cuda, tiny on cpu")
    p.add_argument("--backends", default=None,
                   help="comma-separated subset of eager,eager-nocudnn,compile,compile-max-autotune,triton,cuda "
                        "('reference' = eager); default: all on cuda, eager on cpu")
    p.add_argument("--dtype", default=None, help="bf16 (cuda default) | fp16 | fp32 (cpu default)")
    p.add_argument("--quick", action="store_true",
                   help="shorter timing, 3-point sweeps, max-autotune on the first shape only")
    p.add_argument("--out", default=None, help="results folder (default bench-results/<device>-<date> in the current directory)")
    p.add_argument("--e2e", dest="e2e", action="store_true", default=True, help="end-to-end ViT model (default)")
    p.add_argument("--no-e2e", dest="e2e", action="store_false")
    p.add_argument("--e2e-model", choices=("library", "builtin"), default="library",
                   help="the e2e model is st_adapter_fast.models.clip_vit + inject_st_adapters + VideoClassifier; "
                        "'builtin' is an older name for the same model")
    p.add_argument("--no-sweeps", dest="sweeps", action="store_false", default=True,
                   help="skip the sweeps over T and token count")
    p.add_argument("--profile", action="store_true",
                   help="also write a torch.profiler trace of fwd+bwd per backend on the first shape")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new work after this many seconds (the rest is reported as skipped)")
    p.add_argument("--pytest-summary", default=None,
                   help="a file with the GPU parity tests' output, copied into the results folder")
    p.add_argument("--no-plots", dest="plots", action="store_false", default=True)
    return p


@dataclasses.dataclass
class _Task:
    label: str
    run: Callable[[], None]
    on_skip: Callable[[str], None]


class _Progress:
    """tqdm when installed, else one plain line per task on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="task", dynamic_ncols=True, file=sys.stderr)
        except ImportError:
            self._bar = None
        self._total, self._done = total, 0

    def start(self, label: str) -> None:
        if self._bar is not None:
            self._bar.set_description(label[:48])
        else:
            print(f"[{self._done + 1}/{self._total}] {label}", file=sys.stderr, flush=True)

    def step(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)  # tqdm.write defaults to stdout
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    started = time.perf_counter()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2

    from . import core

    try:
        shapes = core.parse_shapes(args.shapes or ("A,B,C" if device == "cuda" else "tiny"))
        providers = ([core.normalize_provider(b) for b in args.backends.split(",") if b.strip()]
                     if args.backends else (list(core.PROVIDERS) if device == "cuda" else ["eager"]))
        dtype = core.dtype_for(device, args.dtype)
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    providers = list(dict.fromkeys(providers))
    if device == "cpu" and "triton" in providers and "triton" not in sys.modules:
        # CPU tensors run Triton kernels only in the interpreter, chosen when triton is imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from . import e2e as e2e_mod
    from . import report

    out_dir = Path(args.out) if args.out else report.default_out_dir(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiny = all(s.name == "tiny" for s in shapes)
    results = {
        "meta": report.collect_meta(device, list(argv if argv is not None else sys.argv[1:]), dtype),
        "config": {"shapes": [s.as_dict() for s in shapes], "providers": providers, "quick": args.quick,
                   "e2e": args.e2e, "sweeps": args.sweeps, "budget_s": args.budget_s},
        "notes": [], "roofline": None, "op": [], "memory": [], "e2e": [], "skipped": [], "plots": [],
        "profiles": [],
    }
    if device == "cpu":
        msg = ("No GPU: this run checks the reference path and the benchmark harness end to end. "
               "Kernel timings need a GPU (CUDA); CPU numbers here say nothing about the fused kernels.")
        results["notes"].append(msg)
        print(f"bench: {msg}", file=sys.stderr)
    if args.pytest_summary:
        src = Path(args.pytest_summary)
        if src.is_file():
            if src.resolve() != (out_dir / "pytest_summary.txt").resolve():
                shutil.copyfile(src, out_dir / "pytest_summary.txt")
            tail = [ln for ln in src.read_text(errors="replace").splitlines() if ln.strip()]
            results["meta"]["pytest_summary"] = tail[-1] if tail else ""
            results["notes"].append(f"GPU parity tests: {results['meta']['pytest_summary']}")

    def skip(what: str, reason: str) -> None:
        results["skipped"].append({"what": what, "reason": reason})

    # ------------------------------------------------------------------ the plan, in priority order
    tasks: List[_Task] = []
    compile_providers = [p for p in providers if p in core.COMPILE_MODES]
    plain_providers = [p for p in providers if p not in core.COMPILE_MODES]

    def add_task(label: str, bucket: str, row: dict, unavailable, measure, skipped_what) -> None:
        """Queue a task that appends `row` to results[bucket]: "skipped" with the reason
        `unavailable()` gives (recorded under `skipped_what(reason)`), else filled by `measure()`."""

        def run():
            reason = unavailable()
            if reason is not None:
                row.update(status="skipped", reason=reason)
                skip(skipped_what(reason), reason)
            else:
                row.update(status="ok", **measure())
            results[bucket].append(row)

        def on_skip(reason, status="skipped"):
            row.update(status=status, reason=reason)
            results[bucket].append(row)
            skip(label, reason)

        tasks.append(_Task(label, run, on_skip))

    def op_task(suite: str, shape, provider: str, mode: str) -> None:
        row = core.op_row(suite, shape, provider, mode, dtype)
        add_task(f"{suite} {shape.name} {provider} {mode}", "op", row,
                 lambda: core.provider_unavailable(provider, shape, device, dtype),
                 lambda: core.time_op(provider, shape, mode, device, dtype, args.quick),
                 lambda reason: provider)

    def memory_task(shape, provider: str) -> None:
        row = {"shape_name": shape.name, "shape": shape.as_dict(), "provider": provider}
        add_task(f"memory {shape.name} {provider}", "memory", row,
                 lambda: core.provider_unavailable(provider, shape, device, dtype),
                 lambda: core.measure_memory(provider, shape, device, dtype),
                 lambda reason: provider)

    def e2e_task(cfg, layout, provider: str) -> None:
        name, pre_attn, pre_mlp = layout
        row = {"config": name, "provider": provider, "model": dict(dataclasses.asdict(cfg), builder=args.e2e_model)}

        def unavailable():
            if provider == "none":
                return None
            probe = core.OpShape("e2e", cfg.batch, cfg.frames, cfg.seq_len, cfg.width, cfg.adapter_channels)
            if provider == "eager+ln":
                return "the eager pair is the eager model (fuse_layernorm needs a fused backend)"
            reason = core.provider_unavailable(provider, probe, device, torch.float16 if device == "cuda" else dtype)
            if reason is None and device == "cpu" and provider in ("triton", "triton+ln"):
                reason = "the Triton interpreter is too slow for a whole model; e2e needs a GPU"
            return reason

        add_task(f"e2e {name} {provider}", "e2e", row, unavailable,
                 lambda: e2e_mod.run_e2e(cfg, pre_attn, pre_mlp, provider, device, args.quick,
                                         core.time_fn, builder=args.e2e_model),
                 lambda reason: f"e2e {provider}" if "interpreter" in reason else provider)

    # priority order: a --budget-s cut drops the tail of this list
    for shape in shapes:
        for provider in plain_providers:
            for mode in core.MODES:
                op_task("target", shape, provider, mode)
    for shape in shapes:
        for provider in plain_providers:
            memory_task(shape, provider)
    for provider in compile_providers:  # the first shape (A) against torch.compile early
        for mode in core.MODES:
            op_task("target", shapes[0], provider, mode)
    if args.e2e:
        cfg = e2e_mod.VIT_TINY if (device == "cpu" or tiny) else e2e_mod.VIT_B16
        for layout in e2e_mod.adapter_layouts(cfg):
            for provider in (["none"] if not (layout[1] or layout[2]) else plain_providers):
                e2e_task(cfg, layout, provider)
    else:
        skip("e2e", "--no-e2e")
    if args.sweeps:
        for suite, sweep in core.sweep_shapes(tiny or device == "cpu").items():
            if args.quick:
                sweep = [sweep[0], sweep[len(sweep) // 2], sweep[-1]]
            for shape in sweep:
                for provider in plain_providers:
                    for mode in core.MODES:
                        op_task(suite, shape, provider, mode)
        if compile_providers:
            skip("sweeps with torch.compile", "compile providers run on the target shapes only "
                                              "(each sweep point would pay a fresh compile)")
    else:
        skip("sweeps", "--no-sweeps")
    for provider in compile_providers:
        for shape in shapes[1:]:
            if provider == "compile-max-autotune" and args.quick:
                skip(f"{provider} {shape.name}", "--quick runs max-autotune on the first shape only")
                continue
            for mode in core.MODES:
                op_task("target", shape, provider, mode)
    for provider in compile_providers:
        memory_task(shapes[0], provider)
    if args.profile:
        for provider in plain_providers:
            tasks.append(_Task(f"profile {shapes[0].name} {provider}",
                               lambda provider=provider: _profile(core, provider, shapes[0], device, dtype,
                                                                  out_dir, results, skip),
                               lambda reason, status="skipped", provider=provider: skip(f"profile {provider}", reason)))

    # -------------------------------------------------------------------------------- run it
    progress = _Progress(len(tasks) + 1)
    exit_code = 0
    try:
        progress.start("roofline")
        try:
            results["roofline"] = r = core.measure_roofline(device, quick=args.quick or device == "cpu")
            progress.write(f"roofline: {r['gemm_dtype']} GEMM {r['gemm_tflops']:.2f} TFLOP/s, "
                           f"copy {r['copy_gbps']:.0f} GB/s")
        except Exception as err:  # no roofline column, everything else still runs
            skip("roofline", f"error: {type(err).__name__}: {err}")
            exit_code = 1
        progress.step()
        for task in tasks:
            elapsed = time.perf_counter() - started
            if args.budget_s is not None and elapsed > args.budget_s:
                task.on_skip(f"time budget (--budget-s {args.budget_s:g}) used up after {elapsed:.0f} s")
                progress.step()
                continue
            progress.start(task.label)
            try:
                task.run()
            except Exception as err:  # one broken case must not lose the whole report
                reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
                progress.write(f"bench: {task.label} failed: {reason}")
                task.on_skip(f"error: {reason}", "error")  # the row stays in the report, with the error
                exit_code = 1
                results["skipped"][-1]["traceback"] = traceback.format_exc(limit=8)
                if device == "cuda":
                    torch.cuda.empty_cache()
            progress.step()
    except KeyboardInterrupt:  # gpu_verdict.sh's timeout sends SIGINT: keep what was measured
        results["notes"].append("interrupted: partial results")
        exit_code = 130
    finally:
        progress.close()
        results["elapsed_s"] = time.perf_counter() - started
        report.add_derived(results)
        if args.plots:
            try:
                results["plots"] = report.write_plots(results, out_dir)
            except ImportError:
                msg = "matplotlib is not installed: no plots (pip install matplotlib)"
                results["notes"].append(msg)
                print(f"bench: {msg}", file=sys.stderr)
        json_path = report.write_json(results, out_dir)
        md_path = report.write_markdown(results, out_dir)
    print(_summary(results, core))
    print(f"bench: wrote {json_path} and {md_path}" + (f" and {len(results['plots'])} plots" if results["plots"] else ""))
    return exit_code


def _summary(results: dict, core) -> str:
    """Headline lines for the console: each backend's time on each target shape and mode."""
    lines = []
    for r in results["op"]:
        if r["suite"] == "target" and r.get("status") == "ok":
            extra = []
            if r.get("speedup_vs_eager"):
                extra.append(f"{r['speedup_vs_eager']:.2f}x vs eager")
            if r.get("roofline_frac"):
                extra.append(f"{100 * r['roofline_frac']:.0f}% of roofline")
            lines.append(f"  {r['shape_name']:>5} {r['mode']:<8} {r['provider']:<21} {r['time_ms']:9.4f} ms  "
                         + ", ".join(extra))
    for r in results["e2e"]:
        if r.get("status") == "ok":
            lines.append(f"  e2e {r['config']:<26} {r['provider']:<14} train {r['train_step_ms']:8.2f} ms, "
                         f"infer {r['infer_clips_per_s']:8.1f} clips/s, peak {core.fmt_bytes(r.get('peak_train_bytes'))}")
    return "\n".join(lines)


def _profile(core, provider, shape, device, dtype, out_dir: Path, results: dict, skip) -> None:
    """torch.profiler trace of a few fwd+bwd steps (chrome trace JSON + a table of top ops)."""
    import torch

    reason = core.provider_unavailable(provider, shape, device, dtype)
    if reason is not None:
        skip(f"profile {provider}", reason)
        return
    from torch.profiler import ProfilerActivity, profile

    inputs = core.make_op_inputs(shape, device, dtype, requires_grad=True)
    step, reset = core.make_step(provider, shape, "fwd+bwd", inputs, device)
    for _ in range(2):
        reset()
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            reset()
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    trace = out_dir / f"trace-{shape.name}-{provider}.json"
    prof.export_chrome_trace(str(trace))
    table = None
    for sort_by in (["device_time_total", "cuda_time_total"] if device == "cuda" else []) + ["cpu_time_total"]:
        try:  # the key's name changed across torch versions
            table = prof.key_averages().table(sort_by=sort_by, row_limit=20)
            break
        except Exception:  # noqa: BLE001
            continue
    if table is None:
        table = prof.key_averages().table(row_limit=20)
    (out_dir / f"profile-{shape.name}-{provider}.txt").write_text(table)
    results["profiles"].append(str(trace))


if __name__ == "__main__":
    sys.exit(main())
