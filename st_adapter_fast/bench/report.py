"""Benchmark reports: results.json (raw), report.md (tables) and PNG plots (matplotlib, optional).

Derived columns are added here, once, from the raw rows: speedup vs eager and vs the best
torch.compile mode of the same (shape, mode), and roofline fraction = floor time / time.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .core import COMPILE_MODES, fmt_bytes, roofline_floor_ms

SCHEMA_VERSION = 1

# docs/design.md §5 targets (bf16, H100), quoted in the report's headline.
TARGETS = {"fwd_ms": 0.06, "fwd_bwd_ms": 0.26, "saved_beyond_x_bytes": 1e6, "e2e_12_train_ms": 39.5,
           "cuda_vs_triton": 1.1}


def device_name(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}".strip()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def repo_root() -> Optional[Path]:
    """The checkout holding this package (editable install), if any: st_adapter_fast/bench/ -> ../.."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() or (root / ".git").exists() else None


def default_out_dir(device: str) -> Path:
    """bench-results/<device>-<date> in the current directory: a run never writes into the
    installed package or the source tree unless asked to (--out benchmarks/results/...)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return Path.cwd() / "bench-results" / f"{slug(device_name(device))}-{date}"


def _git(*args: str) -> Optional[str]:
    root = repo_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def collect_meta(device: str, argv: List[str], dtype: torch.dtype) -> dict:
    import st_adapter_fast

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    now = datetime.datetime.now(datetime.timezone.utc)
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {
        "schema_version": SCHEMA_VERSION,
        "device": device_name(device),
        "device_type": device,
        "date": now.strftime("%Y-%m-%d"),
        "datetime_utc": now.isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device == "cuda" else None,
        "library_version": st_adapter_fast.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "platform": platform.platform(),
        "argv": list(argv),
        "dtype": str(dtype).replace("torch.", ""),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        meta["sm_count"] = props.multi_processor_count
        meta["gpu_memory_bytes"] = props.total_memory
        meta["capability"] = f"{props.major}.{props.minor}"
    return meta


# ------------------------------------------------------------------------------ derivations
def add_derived(results: dict) -> None:
    """Fill roofline floor/fraction and speedups into results['op'] rows (in place)."""
    roof = results.get("roofline")
    rows = results.get("op", [])
    by_key: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_key.setdefault((r["suite"], r["shape_name"], r["mode"]), {})[r["provider"]] = r
    for r in rows:
        if r.get("status") != "ok":
            continue
        if roof:
            floor_ms, bound = roofline_floor_ms(r["flops"], r["min_bytes"], roof)
            r["floor_ms"], r["bound"] = floor_ms, bound
            r["roofline_frac"] = floor_ms / r["time_ms"]
        peers = by_key[(r["suite"], r["shape_name"], r["mode"])]
        eager = peers.get("eager")
        r["speedup_vs_eager"] = eager["time_ms"] / r["time_ms"] if eager else None
        compiled = [p for name, p in peers.items() if name in COMPILE_MODES]
        if compiled:
            best = min(compiled, key=lambda p: p["time_ms"])
            r["speedup_vs_compile"] = best["time_ms"] / r["time_ms"]
            r["compile_ref"] = best["provider"]
        else:
            r["speedup_vs_compile"] = None


def write_json(results: dict, out_dir: Path) -> Path:
    path = out_dir / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


# --------------------------------------------------------------------------------- markdown
def _md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> List[str]:
    """A markdown table: the header, its separator (one column per header cell), one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _f(v, fmt="{:.3f}", none="-"):
    return none if v is None else fmt.format(v)


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def _pct(v):
    return "-" if v is None else f"{100 * v:.0f}%"


def versions_line(m: dict) -> str:
    return (f"torch {m['torch']}, triton {m['triton']}, python {m['python']}, CUDA {m['cuda']}, "
            f"st-adapter-fast {m['library_version']} (commit {(m.get('git_commit') or '?')[:10]}"
            f"{', dirty' if m.get('git_dirty') else ''}); dtype {m['dtype']}; {m['datetime_utc']}")


def render_markdown(results: dict) -> str:
    m = results["meta"]
    lines = [f"# st-adapter-fast benchmark: {m['device']}, {m['date']}", "", versions_line(m), ""]
    for note in results.get("notes", []):
        lines.append(f"> {note}")
    if results.get("notes"):
        lines.append("")
    lines += render_roofline(results)
    lines += _headline(results)
    lines += render_tables(results)
    lines.append(f"Total run time {results.get('elapsed_s', 0):.1f} s.")
    return "\n".join(lines) + "\n"


def _sweep_title(suite: str, rows: List[dict]) -> str:
    """Section title of an op suite; the sweeps name the values they hold fixed, read from the rows."""
    if suite == "target":
        return "Op level: target shapes (docs/design.md §5)"
    if suite == "variant":
        return "Op level: shape A's variants (docs/design.md §9): kernel (3, 3, 3); LayerNorm before fc1 + GELU"
    frames = sorted({r["shape"]["T"] for r in rows})
    tokens = sorted({r["shape"]["B"] * r["shape"]["T"] for r in rows})
    if suite == "sweep-T":
        return "Sweep over T (B*T constant" + (f" = {tokens[0]})" if len(tokens) == 1 else ")")
    if suite == "sweep-tokens":
        return "Sweep over token count (B" + (f" at T = {frames[0]})" if len(frames) == 1 else ")")
    return suite


def render_roofline(results: dict) -> List[str]:
    lines: List[str] = []
    roof = results.get("roofline")
    if roof:
        lines += [
            "## Roofline of this device (measured at start)",
            "",
            f"{roof['gemm_dtype']} GEMM ({roof['gemm_size']}^3): **{roof['gemm_tflops']:.3g} TFLOP/s**; "
            f"copy ({fmt_bytes(roof['copy_bytes'])}, read + write): **{roof['copy_gbps']:.0f} GB/s**. "
            "Floor of an op = max(FLOPs / GEMM rate, minimum bytes / copy bandwidth); "
            "roofline % = floor / measured time.",
            "",
        ]
    return lines


def render_tables(results: dict) -> List[str]:
    """Every table of a run after the headline: op suites, memory, end to end, what was skipped."""
    lines: List[str] = []
    op_rows = results.get("op", [])
    suites = []
    for r in op_rows:
        if r["suite"] not in suites:
            suites.append(r["suite"])
    for suite in suites:
        rows = [r for r in op_rows if r["suite"] == suite]
        lines += [f"## {_sweep_title(suite, rows)}", ""]
        shapes = {}
        for r in rows:
            shapes.setdefault(r["shape_name"], dict(r["shape"], name=r["shape_name"]))
        shapes = list(shapes.values())
        lines.append("| shape | B | T | L | C | Ca | kt | fwd GFLOP | fwd min MB | fwd+bwd GFLOP | fwd+bwd min MB |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for s in shapes:
            fl = {r["mode"]: r for r in rows if r["shape_name"] == s["name"] and "flops" in r}
            fw, fb = fl.get("fwd"), fl.get("fwd+bwd")
            lines.append(
                f"| {s['name']} | {s['B']} | {s['T']} | {s['L']} | {s['C']} | {s['Ca']} | {s['kt']} | "
                f"{_f(fw and fw['flops'] / 1e9, '{:.4g}')} | {_f(fw and fw['min_bytes'] / 1e6, '{:.4g}')} | "
                f"{_f(fb and fb['flops'] / 1e9, '{:.4g}')} | {_f(fb and fb['min_bytes'] / 1e6, '{:.4g}')} |"
            )
        lines += ["", "| shape | mode | backend | time ms | p20-p80 ms | loop ms | vs eager | vs compile | roofline | bound | first call s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r.get("status") != "ok":
                continue
            lines.append(
                f"| {r['shape_name']} | {r['mode']} | {r['provider']} | {r['time_ms']:.4f} | "
                f"{r['time_ms_p20']:.4f}-{r['time_ms_p80']:.4f} | {_f(r.get('loop_ms'), '{:.4f}')} | "
                f"{_x(r.get('speedup_vs_eager'))} | {_x(r.get('speedup_vs_compile'))} | "
                f"{_pct(r.get('roofline_frac'))} | {r.get('bound', '-')} | {_f(r.get('first_call_s'), '{:.2f}')} |"
            )
        lines.append("")
    mem = results.get("memory", [])
    if mem:
        lines += ["## Memory per adapter (fwd+bwd)", "",
                  "saved = bytes autograd keeps for backward, each storage once, parameters excluded; "
                  "held after fwd = output + saved; peak = over fwd+bwd; all above x, dO and the parameters.", ""]
        lines += _md_table(
            ["shape", "backend", "x", "saved", "saved beyond x", "held after fwd", "peak fwd+bwd"],
            [[r["shape_name"], r["provider"], fmt_bytes(r["x_bytes"]), fmt_bytes(r.get("saved_bytes")),
              fmt_bytes(r.get("saved_beyond_x_bytes")), fmt_bytes(r.get("fwd_held_bytes")),
              fmt_bytes(r.get("peak_bytes"))] for r in mem if r.get("status") == "ok"])
        lines.append("")
    e2e = results.get("e2e", [])
    if e2e:
        cfg = next((r.get("model") for r in e2e if r.get("model")), {})
        lines += [f"## End to end: {cfg.get('name', 'ViT')} video model, B={cfg.get('batch')} T={cfg.get('frames')}", "",
                  "Frozen backbone, trainable adapters + head, AdamW + GradScaler, "
                  f"autocast {next((r.get('amp') for r in e2e if r.get('status') == 'ok'), None)}. "
                  "The 0-adapter train step only updates the head (no backward through the backbone).", ""]
        lines += _md_table(
            ["adapters", "backend", "train step ms", "train clips/s", "infer ms", "infer clips/s", "peak train",
             "peak infer"],
            [[r["config"], r["provider"], f"{r['train_step_ms']:.2f}", f"{r['train_clips_per_s']:.1f}",
              f"{r['infer_ms']:.2f}", f"{r['infer_clips_per_s']:.1f}", fmt_bytes(r.get("peak_train_bytes")),
              fmt_bytes(r.get("peak_infer_bytes"))] for r in e2e if r.get("status") == "ok"])
        lines.append("")
    skipped = results.get("skipped", [])
    if skipped:
        lines += ["## Skipped", ""]
        seen = set()
        for s in skipped:
            key = (s["what"], s["reason"])
            if key in seen:
                continue
            seen.add(key)
            lines.append(f"- {s['what']}: {s['reason']}")
        lines.append("")
    plots = results.get("plots", [])
    if plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots] + [""]
    return lines


def _headline(results: dict) -> List[str]:
    """Shape A and the 12-adapter model against the docs/design.md §5 targets."""
    ops = {(r["provider"], r["mode"]): r for r in results.get("op", [])
           if r.get("suite") == "target" and r.get("shape_name") == "A" and r.get("status") == "ok"}
    mem = {r["provider"]: r for r in results.get("memory", []) if r.get("shape_name") == "A" and r.get("status") == "ok"}
    e2e = {(r["config"].split()[0], r["provider"]): r for r in results.get("e2e", []) if r.get("status") == "ok"}
    fused = [p for p in ("triton", "cuda") if (p, "fwd") in ops or p in mem]
    if not fused:
        return []

    def verdict(value, target):
        return "-" if value is None else ("met" if value <= target else "missed")

    lines = ["## Headline: shape A and the 12-adapter ViT-B/16 against the targets of docs/design.md §5", "",
             "| backend | fwd ms (<= 0.06) | fwd+bwd ms (<= 0.26) | saved beyond x (<= 1 MB) | "
             "12-adapter train step ms (<= 39.5) | vs eager fwd / fwd+bwd |", "|---|---|---|---|---|---|"]
    for p in ["eager", *fused]:
        fwd, fb = ops.get((p, "fwd")), ops.get((p, "fwd+bwd"))
        saved = mem.get(p, {}).get("saved_beyond_x_bytes")
        step = next((r["train_step_ms"] for (cfg, prov), r in e2e.items() if cfg.startswith("12x") and prov == p), None)
        cells = [
            "-" if fwd is None else f"{fwd['time_ms']:.4f} ({verdict(fwd['time_ms'], TARGETS['fwd_ms'])})",
            "-" if fb is None else f"{fb['time_ms']:.4f} ({verdict(fb['time_ms'], TARGETS['fwd_bwd_ms'])})",
            "-" if saved is None else f"{fmt_bytes(saved)} ({verdict(saved, TARGETS['saved_beyond_x_bytes'])})",
            "-" if step is None else f"{step:.2f} ({verdict(step, TARGETS['e2e_12_train_ms'])})",
            f"{_x(fwd and fwd.get('speedup_vs_eager'))} / {_x(fb and fb.get('speedup_vs_eager'))}",
        ]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    base = next((r["train_step_ms"] for (cfg, prov), r in e2e.items() if cfg == "0"), None)
    if base is not None:
        lines.append(f"\n0 adapters (head only): train step {base:.2f} ms.")
    ratios = [f"{mode}: {ops[('cuda', mode)]['time_ms'] / ops[('triton', mode)]['time_ms']:.2f}x"
              for mode in ("fwd", "fwd+bwd") if ("cuda", mode) in ops and ("triton", mode) in ops]
    if ratios:
        lines.append(f"\nCUDA / Triton time on shape A (target <= {TARGETS['cuda_vs_triton']}x): " + ", ".join(ratios) + ".")
    return lines + [""]


def write_markdown(results: dict, out_dir: Path) -> Path:
    path = out_dir / "report.md"
    path.write_text(render_markdown(results))
    return path


# ------------------------------------------------------------------------------------ plots
def write_plots(results: dict, out_dir: Path) -> List[str]:
    """PNG plots; returns their paths. Raises ImportError when matplotlib is missing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    title = f"{results['meta']['device']} {results['meta']['date']}"
    ok = [r for r in results.get("op", []) if r.get("status") == "ok"]

    def providers_of(rows):
        out = []
        for r in rows:
            if r["provider"] not in out:
                out.append(r["provider"])
        return out

    def grouped_bars(ax, rows, value, ylabel, log=False):
        shapes = []
        for r in rows:
            if r["shape_name"] not in shapes:
                shapes.append(r["shape_name"])
        provs = providers_of(rows)
        width = 0.8 / max(len(provs), 1)
        for i, p in enumerate(provs):
            vals = []
            for s in shapes:
                hit = [value(r) for r in rows if r["shape_name"] == s and r["provider"] == p]
                # a missing bar is NaN, not 0: zero breaks a log axis
                vals.append(hit[0] if hit and hit[0] is not None else float("nan"))
            ax.bar([k + i * width for k in range(len(shapes))], vals, width, label=p)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(shapes))])
        ax.set_xticklabels(shapes)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")

    targets = [r for r in ok if r["suite"] == "target"]
    if targets:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            grouped_bars(ax, [r for r in targets if r["mode"] == mode], lambda r: r["time_ms"], "time (ms)", log=True)
            ax.set_title(f"{mode}")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"ST-Adapter time per shape - {title}")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "time_per_shape.png", plt))

        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
            grouped_bars(ax, [r for r in targets if r["mode"] == mode], lambda r: r.get("speedup_vs_eager"),
                         "speedup vs eager (x, log)", log=True)
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_title(mode)
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Speedup over eager PyTorch (cuDNN on) - {title}")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "speedup.png", plt))

    sweeps = [r for r in ok if r["suite"].startswith("sweep")]
    if sweeps:
        suites = sorted({r["suite"] for r in sweeps})
        fig, axes = plt.subplots(len(suites), 2, figsize=(12, 4 * len(suites)), squeeze=False)
        for row, suite in enumerate(suites):
            for col, mode in enumerate(("fwd", "fwd+bwd")):
                ax = axes[row][col]
                rows = [r for r in sweeps if r["suite"] == suite and r["mode"] == mode]
                for p in providers_of(rows):
                    pts = [(r["shape"]["T"] if suite == "sweep-T" else r["shape"]["B"] * r["shape"]["T"] * (r["shape"]["L"] - r["shape"]["P"]),
                            r["time_ms"]) for r in rows if r["provider"] == p]
                    pts.sort()
                    ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=p)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("T (frames per clip)" if suite == "sweep-T" else "spatial tokens N = B*T*S")
                ax.set_ylabel("time (ms)")
                ax.set_title(f"{suite} {mode}")
                ax.legend(fontsize=8)
        fig.suptitle(f"Sweeps - {title}")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "sweeps.png", plt))

    mem = [r for r in results.get("memory", []) if r.get("status") == "ok"]
    if mem:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        grouped_bars(axes[0], mem, lambda r: (r.get("saved_bytes") or 0) / 1e6, "saved for backward (MB)")
        axes[0].set_title("bytes saved for backward")
        grouped_bars(axes[1], mem, lambda r: (r.get("peak_bytes") or 0) / 1e6, "peak above inputs (MB)")
        axes[1].set_title("peak memory fwd+bwd" + ("" if any(r.get("peak_bytes") for r in mem) else " (CUDA only)"))
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Memory per adapter - {title}")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "memory.png", plt))

    e2e = [r for r in results.get("e2e", []) if r.get("status") == "ok"]
    if e2e:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [f"{r['config'].split()[0]}\n{r['provider']}" for r in e2e]
        axes[0].bar(range(len(e2e)), [r["train_step_ms"] for r in e2e])
        axes[0].set_ylabel("train step (ms)")
        peaks = [(r.get("peak_train_bytes") or 0) / 1e9 for r in e2e]
        axes[1].bar(range(len(e2e)), peaks)
        axes[1].set_ylabel("peak train memory (GB)")
        for ax in axes:
            ax.set_xticks(range(len(e2e)))
            ax.set_xticklabels(labels, fontsize=7)
        fig.suptitle(f"End to end train step - {title}")
        fig.tight_layout()
        written.append(_save(fig, out_dir / "e2e.png", plt))
    return written


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
