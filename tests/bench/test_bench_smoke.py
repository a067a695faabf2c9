"""CPU smoke of the benchmark suites and the bench CLI: tiny shapes, then check that the report
files exist and their fields are sane. Never a timed assertion (CI machines are shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import requires_cuda
from st_adapter_fast.bench import core
from st_adapter_fast.bench import cli as bench

ROOT = Path(__file__).resolve().parents[2]
try:
    import matplotlib  # noqa: F401  (plots are checked only where it is installed)

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


@pytest.fixture
def one_thread():
    # a 2-core CI box shared with other jobs: oversubscribed OpenMP threads make tiny ops 10x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _rel(a, b):
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------ pure pieces
def test_roofline_formulas_match_design():
    """docs/design.md §5: shape A forward is 29.6 GFLOP and 77 MB of unavoidable traffic."""
    a = core.TARGET_SHAPES["A"]
    assert a.tokens == 16 * 8 * 196
    assert _rel(core.op_flops(a, "fwd"), 29.6e9) < 0.01
    # 77.5 MB of x read + out written, plus 1.2 MB of weights the docs/design.md §5 figure leaves out
    assert _rel(core.op_min_bytes(a, "fwd"), 77e6) < 0.03
    # backward: four more GEMMs of the forward's size, so three times the forward
    assert _rel(core.op_flops(a, "fwd+bwd"), 3 * core.op_flops(a, "fwd")) < 1e-9
    assert core.op_min_bytes(a, "fwd+bwd") > 2 * core.op_min_bytes(a, "fwd")
    floor, bound = core.roofline_floor_ms(core.op_flops(a, "fwd"), core.op_min_bytes(a, "fwd"),
                                          {"gemm_tflops": 798.0, "copy_gbps": 3000.0})
    assert bound == "compute" and _rel(floor, 0.037) < 0.02


def test_parse_shapes_and_providers_reject_unknown_names():
    assert [s.name for s in core.parse_shapes("A,b,C")] == ["A", "B", "C"]
    assert [s.name for s in core.parse_shapes("tiny")] == ["tiny"]
    with pytest.raises(ValueError, match="unknown shape 'Z'"):
        core.parse_shapes("A,Z")
    assert core.normalize_provider("reference") == "eager"
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        core.normalize_provider("fast")


@pytest.mark.parametrize("name", sorted(core.TINY_VARIANT_SHAPES))
def test_variant_shapes_run_the_variant(name, one_thread):
    """Issue 15's benchmark rows: shape A with kernel (3, 3, 3) and with LayerNorm + GELU (and
    their tiny stand-ins) parse by name, and the eager provider computes that variant -- the
    reference with the same switches, not the official adapter -- forward and backward."""
    from st_adapter_fast.reference import reference

    assert {s.name for s in core.parse_shapes("A-k333,A-ln-gelu")} == {"A-k333", "A-ln-gelu"}
    assert core.parse_shapes("A-k333")[0].kernel == (3, 3, 3)
    shape = core.TINY_VARIANT_SHAPES[name]
    inputs = core.make_op_inputs(shape, "cpu", torch.float64, requires_grad=True)
    x, params = inputs["x"], inputs["params"]
    out = core.make_op_callable("eager", shape)(x, *params)
    official = reference(x, shape.T, *params[:6], num_prefix_tokens=shape.P, grid_size=shape.grid)
    kw = dict(grid_size=shape.grid)
    if shape.variant:
        kw.update(norm="layernorm", norm_weight=params[6], norm_bias=params[7], act_after_fc1="gelu")
        assert len(params) == 8
    else:
        assert params[2].shape[2:] == (3, 3, 3) and len(params) == 6
    torch.testing.assert_close(out, reference(x, shape.T, *params[:6], num_prefix_tokens=shape.P, **kw))
    if shape.variant:
        assert not torch.allclose(out, official)
    core.backward_outputs(out, inputs["grad_out"])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_saved_tensor_counter_counts_each_storage_once_and_skips_parameters():
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(5, 3, requires_grad=True)
    with core.SavedTensorCounter(exclude=[w]) as counter:
        y = x[1:] * x[:-1]  # saves two views of x: one storage
        z = y @ w  # saves y (a new storage) and w (a parameter: excluded)
    assert counter.contains(x) and not counter.contains(w)
    assert counter.saved_bytes == x.numel() * 4 + y.numel() * 4
    z.sum().backward()  # the hooks left the graph intact
    assert x.grad is not None and w.grad is not None


@pytest.mark.skipif(not core.triton_interpreter_on() and not torch.cuda.is_available(),
                    reason="needs CUDA or TRITON_INTERPRET=1")
def test_memory_of_the_adapter_layernorm_pair_providers(one_thread):
    """The memory benchmark's pair rows (docs/design.md §7): the eager pair keeps x plus the
    adapter's intermediates plus the LayerNorm's fp32 copy of out; the fused pair x and two fp32
    statistics per token. Both outputs (out, normed) are counted as the pair's output."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = core.TINY_SHAPES["tiny"]
    eager = core.measure_memory("eager+ln", shape, device, torch.float32)
    fused = core.measure_memory("triton+ln", shape, device, torch.float32)
    tokens = shape.B * shape.T * shape.L
    assert fused["saves_x"] and fused["saved_beyond_x_bytes"] == 2 * tokens * 4  # mean + rstd, fp32
    assert eager["saved_bytes"] >= eager["x_bytes"] * 2  # x + the LayerNorm's copy of out, at least
    assert fused["output_bytes"] == 2 * fused["x_bytes"]
    assert core.provider_unavailable("cuda+ln", shape, "cpu", torch.float32) is not None


def test_time_fn_on_cpu_returns_ordered_statistics():
    a = torch.randn(64, 64)
    stats = core.time_fn(lambda: a @ a, "cpu", warmup_ms=1, rep_ms=2, min_reps=5, max_reps=8)
    assert 5 <= stats["reps"] <= 8
    assert 0 < stats["time_ms_p20"] <= stats["time_ms"] <= stats["time_ms_p80"]


@pytest.mark.parametrize("pre_attn,pre_mlp", [(False, False), (False, True), (True, True)])
def test_e2e_model_is_the_library_clip_vit(pre_attn, pre_mlp, one_thread):
    """The bench measures the library's own network (one CLIP ViT in the package): clip_vit +
    inject_st_adapters + VideoClassifier, official module names, adapters and head trainable;
    eager-nocudnn is the same model with the conv_cudnn switch off."""
    from st_adapter_fast.bench import e2e
    from st_adapter_fast.models.clip_vit import CLIPVisionTransformer
    from st_adapter_fast.models.video import VideoClassifier
    from st_adapter_fast.module import STAdapter

    cfg = e2e.VIT_TINY
    model = e2e.build_video_vit(cfg, pre_attn, pre_mlp, "reference", "cpu", torch.float32)
    assert isinstance(model, VideoClassifier) and isinstance(model.backbone, CLIPVisionTransformer)
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, STAdapter)}
    want = [f"backbone.transformer.resblocks.{i}.adapter_{pos}" for i in range(cfg.layers)
            for pos, on in (("pre_attn", pre_attn), ("pre_mlp", pre_mlp)) if on]
    assert sorted(adapters) == sorted(want)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{a}.{p}" for a, m in adapters.items() for p, _ in m.named_parameters()} | {"fc.weight", "fc.bias"}
    for m in adapters.values():  # non-zero like trained adapters, so the conv path does work
        assert m.conv.weight.abs().sum() > 0 and m.conv_cudnn
    clips = torch.randn(cfg.batch, 3, cfg.frames, cfg.image, cfg.image)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        nocudnn = e2e.build_video_vit(cfg, pre_attn, pre_mlp, "reference", "cpu", torch.float32, cudnn_off=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        same = e2e.build_video_vit(cfg, pre_attn, pre_mlp, "reference", "cpu", torch.float32, builder="builtin")
    assert all(not m.conv_cudnn for m in nocudnn.modules() if isinstance(m, STAdapter))
    assert same.state_dict().keys() == nocudnn.state_dict().keys() == model.state_dict().keys()
    # CPU tensors never use cuDNN: switching it off around the conv changes nothing here
    assert torch.equal(same(clips), nocudnn(clips))
    assert model(clips).shape == (cfg.batch, cfg.num_classes)
    with pytest.raises(ValueError, match="builder"):
        e2e.build_video_vit(cfg, False, False, "reference", "cpu", torch.float32, builder="timm")


def test_report_headline_compares_shape_a_with_the_targets():
    from st_adapter_fast.bench import report

    a = core.TARGET_SHAPES["A"]

    def op(provider, mode, ms):
        return {"suite": "target", "shape_name": "A", "shape": a.as_dict(), "provider": provider, "mode": mode,
                "status": "ok", "time_ms": ms, "time_ms_p20": ms, "time_ms_p80": ms, "loop_ms": ms,
                "first_call_s": 0.1, "flops": core.op_flops(a, mode), "min_bytes": core.op_min_bytes(a, mode)}

    results = {
        "meta": {"device": "GPU", "date": "d", "datetime_utc": "t", "torch": "t", "triton": "t", "python": "p",
                 "cuda": "c", "library_version": "v", "git_commit": "0" * 40, "dtype": "bfloat16"},
        "roofline": {"gemm_tflops": 800.0, "copy_gbps": 3000.0, "gemm_dtype": "bfloat16", "gemm_size": 8192,
                     "copy_bytes": 1 << 30},
        "op": [op("eager", "fwd", 0.5), op("eager", "fwd+bwd", 2.4), op("triton", "fwd", 0.05),
               op("triton", "fwd+bwd", 0.30), op("cuda", "fwd", 0.05), op("cuda", "fwd+bwd", 0.33)],
        "memory": [{"shape_name": "A", "provider": "triton", "status": "ok", "x_bytes": 1, "saved_bytes": 1,
                    "saved_beyond_x_bytes": 0}],
        "e2e": [{"config": "12x384 pre-MLP", "provider": "triton", "status": "ok", "train_step_ms": 40.0,
                 "train_clips_per_s": 1.0, "infer_ms": 1.0, "infer_clips_per_s": 1.0}],
    }
    report.add_derived(results)
    md = report.render_markdown(results)
    (triton_row,) = [ln for ln in md.splitlines() if ln.startswith("| triton |") and "(met)" in ln]
    assert "0.0500 (met)" in triton_row and "0.3000 (missed)" in triton_row and "40.00 (missed)" in triton_row
    assert "10.00x / 8.00x" in triton_row
    assert "fwd: 1.00x, fwd+bwd: 1.10x" in md
    (row,) = [r for r in results["op"] if r["provider"] == "triton" and r["mode"] == "fwd"]
    assert row["bound"] == "compute" and abs(row["roofline_frac"] - 0.037 / 0.05) < 0.02


def test_default_out_dir_is_in_the_current_directory(tmp_path, monkeypatch):
    from st_adapter_fast.bench import report

    monkeypatch.chdir(tmp_path)
    out = report.default_out_dir("cpu")
    assert out.parent == tmp_path / "bench-results" and out.name.startswith("cpu-")
    assert ROOT not in out.parents


def test_cli_rejects_bad_arguments(capsys):
    assert bench.main(["--device", "cpu", "--shapes", "Z"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert bench.main(["--device", "cpu", "--backends", "nope"]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_bench_is_dispatched_by_the_package_cli(capsys):
    from st_adapter_fast.__main__ import main as package_main

    with pytest.raises(SystemExit) as exit_info:
        package_main(["bench", "--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out
    for option in ("--device", "--shapes", "--backends", "--quick", "--out", "--no-e2e", "--profile", "--budget-s"):
        assert option in usage, option


def test_gpu_verdict_script_parses():
    script = ROOT / "benchmarks" / "gpu_verdict.sh"
    assert script.is_file()
    subprocess.run(["bash", "-n", str(script)], check=True)


# ------------------------------------------------------------------------------ the CLI
def _load(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    meta = results["meta"]
    for key in ("device", "date", "torch", "triton", "python", "library_version", "git_commit", "dtype"):
        assert key in meta, key
    assert meta["torch"] == torch.__version__ and meta["library_version"]
    roof = results["roofline"]
    assert core.is_finite_positive(roof["gemm_tflops"]) and core.is_finite_positive(roof["copy_gbps"])
    return results


def _ok(rows, **match):
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    assert hits, f"no row with {match}"
    assert all(r["status"] == "ok" for r in hits), hits
    return hits


def test_cli_cpu_reference_end_to_end(tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    assert bench.main(["--device", "cpu", "--shapes", "tiny", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "Kernel timings need a GPU" in printed.err
    results = _load(out)
    shape = core.TINY_SHAPES["tiny"]

    for mode in core.MODES:
        (row,) = _ok(results["op"], suite="target", provider="eager", mode=mode)
        assert row["flops"] == core.op_flops(shape, mode) and row["min_bytes"] == core.op_min_bytes(shape, mode, 4)
        assert core.is_finite_positive(row["time_ms"]) and row["reps"] >= 3
        assert row["speedup_vs_eager"] == 1.0
        assert 0 < row["roofline_frac"] and row["bound"] in ("compute", "memory")
    for suite in ("sweep-T", "sweep-tokens"):
        assert len(_ok(results["op"], suite=suite, provider="eager")) >= 4

    (mem,) = _ok(results["memory"], provider="eager")
    # eager keeps a copy of x's spatial tokens, h and the conv output for backward
    assert mem["x_bytes"] < mem["saved_bytes"] <= 4 * mem["x_bytes"]
    assert mem["peak_bytes"] is None and mem["peak_reason"]

    e2e = {r["config"]: r for r in _ok(results["e2e"])}
    assert sorted(r["num_adapters"] for r in e2e.values()) == [0, 2, 4]
    for r in e2e.values():
        assert core.is_finite_positive(r["train_step_ms"]) and core.is_finite_positive(r["infer_clips_per_s"])

    md = (out / "report.md").read_text()
    for heading in ("Roofline", "Op level", "Sweep over T", "Memory per adapter", "End to end"):
        assert heading in md, heading
    # the sweep headings name the values held fixed in the rows: the tiny shape has T = 4
    assert "## Sweep over token count (B at T = 4)" in md and "T = 8" not in md
    assert f"## Sweep over T (B*T constant = {8})" in md
    assert "Kernel timings need a GPU" in md
    if HAS_MPL:
        for name in ("time_per_shape.png", "speedup.png", "sweeps.png", "memory.png", "e2e.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    else:
        assert any("matplotlib" in n for n in results["notes"])


def test_cli_keeps_the_report_when_a_case_fails(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(core, "time_op", broken)
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--shapes", "tiny", "--quick", "--no-e2e", "--no-sweeps", "--no-plots", "--out", str(out)]
    assert bench.main(argv) == 1
    assert "injected failure" in capsys.readouterr().err
    results = _load(out)
    assert [r["status"] for r in results["op"]] == ["error", "error"]
    assert all("injected failure" in r["reason"] for r in results["op"])
    _ok(results["memory"], provider="eager")  # the rest of the plan still ran
    assert (out / "report.md").is_file()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                    reason="the CPU twin runs the Triton kernels under TRITON_INTERPRET=1 (set without CUDA)")
def test_cli_triton_interpreter_tiny(tmp_path, one_thread):
    out = tmp_path / "run"
    argv = ["--device", "cpu", "--shapes", "tiny", "--quick", "--backends", "eager,triton,cuda",
            "--no-e2e", "--no-sweeps", "--no-plots", "--out", str(out)]
    assert bench.main(argv) == 0
    results = _load(out)
    for mode in core.MODES:
        (row,) = _ok(results["op"], provider="triton", mode=mode)
        assert core.is_finite_positive(row["speedup_vs_eager"])
    cuda_rows = [r for r in results["op"] if r["provider"] == "cuda"]
    assert cuda_rows and all(r["status"] == "skipped" and r["reason"] for r in cuda_rows)
    assert any(s["what"] == "cuda" for s in results["skipped"])
    (mem,) = _ok(results["memory"], provider="triton")
    # the fused op saves x and the parameters only (docs/design.md §5 target: <= 1 MB beyond x)
    assert mem["saves_x"] and mem["saved_beyond_x_bytes"] <= 1_000_000


@requires_cuda
def test_cli_cuda_tiny(tmp_path):
    out = tmp_path / "run"
    argv = ["--device", "cuda", "--shapes", "tiny", "--quick", "--backends", "eager,eager-nocudnn,triton,cuda",
            "--no-plots", "--out", str(out)]
    assert bench.main(argv) == 0
    results = _load(out)
    assert results["meta"]["device_type"] == "cuda"
    for provider in ("eager", "eager-nocudnn"):
        for mode in core.MODES:
            _ok(results["op"], suite="target", provider=provider, mode=mode)
        (mem,) = _ok(results["memory"], provider=provider)
        assert mem["peak_bytes"] >= mem["fwd_held_bytes"] > 0
    for r in _ok(results["e2e"]):
        assert r["peak_train_bytes"] > 0


# --------------------------------------------------------------------- pytest-benchmark suites
def test_pytest_benchmark_suites_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    report = tmp_path / "bench.json"
    # without pytest-xdist's worker variables: pytest-benchmark switches itself off (and writes no
    # JSON) when it believes it runs under xdist
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(ST_ADAPTER_BENCH_SHAPES="tiny", ST_ADAPTER_BENCH_BACKENDS="eager",
               ST_ADAPTER_BENCH_QUICK="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={report}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    benches = json.loads(report.read_text())["benchmarks"]
    names = {b["name"].split("[")[0] for b in benches}
    assert {"test_target_shape", "test_sweep", "test_memory", "test_train_step"} <= names
    for b in benches:
        info = b["extra_info"]
        assert b["stats"]["min"] > 0 and info["device"]
        if b["name"].startswith("test_target_shape"):
            assert info["flops"] > 0 and info["device_time_ms"] > 0 and info["roofline_frac"] > 0
        if b["name"].startswith("test_memory"):
            assert info["saved_bytes"] > 0
