"""report.md of the GPU verdict: the headline first (shape A per backend against the targets,
the smoke and parity verdicts), then how each stage went, the tile sweep, the environment and
the bench's own tables (report.render_tables).

The stage table comes from WORK/stages.tsv, one line per finished stage written by
benchmarks/gpu_verdict.sh (name, limit s, took s, exit code), and WORK/plan.tsv (name, limit s,
what it does): a stage the script killed has exit code 124 (timeout) or 137 (killed after the
grace period) and is reported as cut short, with the rows it had already written.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Dict, List, Optional

from .report import TARGETS, add_derived, render_roofline, render_tables, versions_line, write_json

HEADLINE_PROVIDERS = ("eager", "eager-nocudnn", "compile", "compile-max-autotune", "triton", "cuda")
EXIT_STATUS = {0: "ok", 1: "finished with errors", 2: "refused to run", 3: "crashed (see notes)",
               124: "cut short (time limit)",
               137: "cut short (killed)", 143: "cut short (terminated)", 130: "interrupted"}


def read_stage_table(work_dir: Path) -> List[dict]:
    plan = []
    plan_file = work_dir / "plan.tsv"
    if plan_file.is_file():
        for line in plan_file.read_text().splitlines():
            name, limit, what = (line.split("\t") + ["", "", ""])[:3]
            plan.append({"stage": name, "limit_s": int(limit) if limit.isdigit() else None, "what": what})
    done: Dict[str, dict] = {}
    stages_file = work_dir / "stages.tsv"
    if stages_file.is_file():
        for line in stages_file.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 4:
                continue
            name, limit, took, rc = parts[:4]
            note = parts[4] if len(parts) > 4 else ""
            rc_i = int(rc) if rc.lstrip("-").isdigit() else None
            status = EXIT_STATUS.get(rc_i, f"crashed (exit code {rc})") if rc_i is not None else rc
            done[name] = {"limit_s": int(limit) if limit.isdigit() else limit, "took_s": int(took) if took.isdigit() else took,
                          "rc": rc_i, "status": note or status}
    rows = []
    for p in plan or [{"stage": n, "limit_s": None, "what": ""} for n in done]:
        row = dict(p)
        row.update(done.get(p["stage"], {"status": "not run"}))
        rows.append(row)
    return rows


def write(results, work_dir: Path, *, final: bool, running: Optional[str] = None) -> Path:
    """Merge the stage table into results.json and (re)write report.md."""
    data = results.data
    stages = read_stage_table(work_dir)
    for s in stages:
        if s["stage"] == running and s["status"] == "not run":
            s["status"] = "finished, exit code pending"
        if final and s["stage"] == "report" and s["status"] == "not run":
            s["status"] = "ok"  # this one: it is writing the file you read
    data["stages"] = stages
    data["report_final"] = final
    if data.get("meta") is None:
        data["meta"] = {}
    add_derived(data)
    write_json(data, results.path.parent)
    path = results.path.parent / "report.md"
    path.write_text(render(data, final=final))
    return path


# -------------------------------------------------------------------------------- pieces
def _ms(r: Optional[dict]) -> str:
    return "-" if not r else f"{r['time_ms']:.4f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(r: Optional[dict]) -> str:
    return "-" if not r or r.get("roofline_frac") is None else f"{100 * r['roofline_frac']:.0f}%"


def _bytes(n) -> str:
    from .core import fmt_bytes

    return fmt_bytes(n)


def _met(value, target) -> str:
    return "met" if value <= target else "missed"


def shape_a_name(data: dict) -> str:
    return "tiny" if data.get("device_type") == "cpu" else "A"


def variant_lines(data: dict) -> List[str]:
    """Issue 15's quote: shape A with kernel (3, 3, 3) and with LayerNorm + GELU, Triton against
    eager with cuDNN on and off, per mode (suite "variant" of stage_rest)."""
    ops = {(r["shape_name"], r["provider"], r["mode"]): r for r in data.get("op", [])
           if r.get("suite") == "variant" and r.get("status") == "ok"}
    out = []
    for name in sorted({k[0] for k in ops}):
        parts = []
        for mode in ("fwd", "fwd+bwd"):
            fused = ops.get((name, "triton", mode))
            if fused is None:
                continue
            vs = [f"{ops[(name, p, mode)]['time_ms'] / fused['time_ms']:.2f}x vs {p}"
                  for p in ("eager", "eager-nocudnn") if (name, p, mode) in ops]
            parts.append(f"{mode} {fused['time_ms']:.4f} ms ({', '.join(vs) or 'no eager row'})")
        out.append(f"- variant {name}: triton " + ("; ".join(parts) if parts else "not measured"))
    return (["", "**Variants** (docs/design.md §9):"] + out) if out else []


def headline(data: dict) -> List[str]:
    a = shape_a_name(data)
    ops = {(r["provider"], r["mode"]): r for r in data.get("op", [])
           if r.get("suite") == "target" and r.get("shape_name") == a and r.get("status") == "ok"}
    mem = {r["provider"]: r for r in data.get("memory", []) if r.get("shape_name") == a and r.get("status") == "ok"}
    shape = next((r["shape"] for r in data.get("op", []) if r.get("shape_name") == a and "shape" in r), None)
    dims = (f"B{shape['B']} T{shape['T']} L{shape['L']} C{shape['C']} Ca{shape['Ca']} kt{shape['kt']}, " if shape else "")
    dtype = (data.get("meta") or {}).get("dtype", "?")
    lines = [f"## Headline: shape {a} ({dims}{dtype}) against the targets (docs/design.md §5)", ""]
    if data.get("device_type") == "cpu":
        lines += ["> CPU dry run: tiny stand-in shapes, Triton interpreter, torch.compile through aot_eager. "
                  "These numbers check the verdict's plumbing and say nothing about the kernels.", ""]
    lines += ["| backend | fwd ms | fwd+bwd ms | vs eager fwd / fwd+bwd | vs torch.compile fwd / fwd+bwd | "
              "roofline fwd / fwd+bwd | saved beyond x |", "|---|---|---|---|---|---|---|"]
    for p in HEADLINE_PROVIDERS:
        fwd, fb = ops.get((p, "fwd")), ops.get((p, "fwd+bwd"))
        m = mem.get(p)
        if not (fwd or fb or m):
            continue
        saved = "-" if not m or m.get("saved_beyond_x_bytes") is None else _bytes(m["saved_beyond_x_bytes"])
        lines.append(f"| {p} | {_ms(fwd)} | {_ms(fb)} | {_x(fwd and fwd.get('speedup_vs_eager'))} / "
                     f"{_x(fb and fb.get('speedup_vs_eager'))} | {_x(fwd and fwd.get('speedup_vs_compile'))} / "
                     f"{_x(fb and fb.get('speedup_vs_compile'))} | {_pct(fwd)} / {_pct(fb)} | {saved} |")
    if not ops:
        lines.append("| (no shape A timing finished) | | | | | | |")
    lines.append("")
    targets = []
    for p in ("triton", "cuda"):
        parts = []
        if (p, "fwd") in ops:
            parts.append(f"fwd {ops[(p, 'fwd')]['time_ms']:.4f} ms ({_met(ops[(p, 'fwd')]['time_ms'], TARGETS['fwd_ms'])})")
        if (p, "fwd+bwd") in ops:
            t = ops[(p, "fwd+bwd")]["time_ms"]
            parts.append(f"fwd+bwd {t:.4f} ms ({_met(t, TARGETS['fwd_bwd_ms'])})")
        if p in mem and mem[p].get("saved_beyond_x_bytes") is not None:
            v = mem[p]["saved_beyond_x_bytes"]
            parts.append(f"saved beyond x {_bytes(v)} ({_met(v, TARGETS['saved_beyond_x_bytes'])})")
        targets.append(f"{p}: " + (", ".join(parts) if parts else "not measured"))
    lines.append(f"**Targets** (fwd <= {TARGETS['fwd_ms']} ms, fwd+bwd <= {TARGETS['fwd_bwd_ms']} ms, "
                 f"saved <= 1 MB beyond x): " + "; ".join(targets) + ".")
    lines += variant_lines(data)
    pair = [(p, mem[p]) for p in ("eager+ln", "triton+ln") if mem.get(p, {}).get("saved_bytes") is not None]
    if pair:  # the adapter + LayerNorm pair (docs/design.md §7): saved per adapted position, in x
        lines.append("Adapter + LayerNorm per adapted position, saved for backward: " + ", ".join(
            f"{p} {_bytes(m['saved_bytes'])} ({m['saved_bytes'] / m['x_bytes']:.2f} x)" for p, m in pair) + ".")
    ratios = [f"{mode} {ops[('cuda', mode)]['time_ms'] / ops[('triton', mode)]['time_ms']:.2f}x"
              for mode in ("fwd", "fwd+bwd") if ("cuda", mode) in ops and ("triton", mode) in ops]
    if ratios:
        lines.append(f"CUDA / Triton time (target <= {TARGETS['cuda_vs_triton']}x): " + ", ".join(ratios) + ".")
    e2e = [r for r in data.get("e2e", []) if r.get("status") == "ok"]
    if e2e:
        steps = ", ".join(f"{r['provider']} {r['train_step_ms']:.2f} ms"
                          + (f" (peak {_bytes(r['peak_train_bytes'])})" if r.get("peak_train_bytes") else "")
                          for r in e2e if r["config"] != "0")
        base = next((r["train_step_ms"] for r in e2e if r["config"] == "0"), None)
        lines.append(f"End-to-end train step, {next(r['config'] for r in e2e)} adapters (target <= "
                     f"{TARGETS['e2e_12_train_ms']} ms): {steps or '-'}" + (f"; 0 adapters {base:.2f} ms" if base else "") + ".")
    lines.append("")
    lines.append("**Smoke** (shape A, bf16, fwd+bwd against the float64 reference, docs/design.md §6): "
                 + smoke_summary(data) + ".")
    lines.append("**GPU parity** (pytest -m gpu): " + parity_summary(data) + ".")
    lines.append("**Stages**: " + stages_summary(data) + ".")
    return lines + [""]


def smoke_summary(data: dict) -> str:
    rows = data.get("smoke", [])
    if not rows:
        return "not run"
    return "; ".join(f"{r['backend']} {r.get('verdict', r.get('status'))}"
                     f" ({(r.get('worst') or r.get('reason') or '')[:200]})" for r in rows)


def parity_summary(data: dict) -> str:
    from .verdict_parity import parity_verdict

    rows = data.get("parity", [])
    return parity_verdict(rows[-1]) if rows else "not run"


def stages_summary(data: dict) -> str:
    stages = data.get("stages", [])
    bad = [s for s in stages if s.get("status") not in ("ok",)]
    if not stages:
        return "no stage table"
    if not bad:
        return "all finished within their limits"
    return "; ".join(f"{s['stage']} {s['status']}" for s in bad)


def stage_rows_summary(data: dict, stage: str) -> str:
    """What a stage finished, from the rows it wrote."""
    if stage == "env":
        return "versions, GPU, clocks" if data.get("env") else "-"
    if stage == "smoke":
        return smoke_summary(data) if data.get("smoke") else "-"
    if stage == "parity":
        return parity_summary(data) if data.get("parity") else "-"
    counts: Dict[str, int] = {}
    last = None
    for bucket in ("aux", "op", "memory", "e2e", "sweep"):
        for r in data.get(bucket, []):
            if r.get("stage") == stage:
                counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
                last = r
    if not counts:
        return "-"
    text = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    if stage == "sweep":
        shapes = sorted({r["shape_name"] for r in data.get("sweep", []) if r.get("status") == "ok"})
        text += f"; shapes timed: {', '.join(shapes) or 'none'}"
    if last is not None:
        from .verdict import _row_label

        text += f"; last: {_row_label('', last).strip()}"
    return text


def render(data: dict, *, final: bool) -> str:
    m = data.get("meta") or {}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# GPU verdict: {m.get('device', '?')}, {m.get('date', '?')}", ""]
    if m.get("torch"):
        lines += [versions_line(m), ""]
    if not final:
        lines += [f"> Partial report written {now} while the verdict was still running.", ""]
    notes = [n for n in data.get("notes", []) if isinstance(n, str)]
    if (data.get("env") or {}).get("cuda_available") is False and data.get("device_type") == "cuda":
        notes.insert(0, "GPU run, but torch.cuda.is_available() is False: nothing was measured (see Environment).")
    if notes:
        lines += [f"> {n}" for n in notes] + [""]
    lines += headline(data)

    lines += ["## Stages (priority order; each under its own time limit)", "",
              "| stage | limit s | took s | status | finished |", "|---|---|---|---|---|"]
    for s in data.get("stages", []):
        lines.append(f"| {s['stage']} | {s.get('limit_s', '-')} | {s.get('took_s', '-')} | {s['status']} | "
                     f"{stage_rows_summary(data, s['stage'])} |")
    lines.append("")

    sweep = data.get("sweep", [])
    if sweep:
        from .verdict_sweep import pick_tuned

        tuned = pick_tuned(sweep)
        lines += ["## Tile-config sweep (tuned_configs.json)", "",
                  "Score = geometric mean over the shapes of time / the default's time, in the kernel's op pass; "
                  "the default stays unless a candidate wins by more than 2%.", "",
                  "| key | chosen | vs default | shapes | candidates timed / failed |", "|---|---|---|---|---|"]
        for key, v in sorted(tuned.items()):
            c = v["config"]
            cfg = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"
            lines.append(f"| {key} | {'default ' if v['candidate'] == 0 else ''}#{v['candidate']} {cfg} | "
                         f"{v['speedup_vs_default']:.3f}x | {', '.join(v['shapes'])} | "
                         f"{v['candidates_timed']} / {v['candidates_failed']} |")
        failed = [r for r in sweep if r.get("status") not in ("ok",)]
        for r in failed[:12]:
            lines.append(f"- {r.get('shape_name')} {r.get('kernel', '')} #{r.get('candidate', '-')}: "
                         f"{r.get('status')}: {str(r.get('reason', ''))[:200]}")
        lines.append("")

    parity = data.get("parity", [])
    if parity and parity[-1].get("failures"):
        lines += ["## GPU parity failures", ""] + [f"- {f}" for f in parity[-1]["failures"]] + [""]

    env = data.get("env") or {}
    if env:
        lines += ["## Environment", ""]
        for key in ("gpu", "capability", "sm_count", "gpu_memory_gb", "torch", "torch_cuda", "cudnn", "triton",
                    "numpy", "nvcc", "xdist", "timeout", "executable"):
            if key in env:
                lines.append(f"- {key}: {env[key]}")
        if env.get("nvidia_smi"):
            lines += ["", "```", env["nvidia_smi"].strip(), "```"]
        lines.append("")
    lines += render_roofline(data)
    lines += render_tables(data)
    lines.append(f"Report written {now}; logs (every stage's output) in logs.tar.gz.")
    return "\n".join(lines) + "\n"
