"""`python -m st_adapter_fast verify` and `st_adapter_fast.verify_model`.

The CLI runs in-process (main([...])) to save start-up time, plus one real subprocess run that
proves the CLI sets TRITON_INTERPRET=1 itself. Deliberately broken backends (registered with
auto=False, computed with the plain-PyTorch reference so they cost no interpreter time) prove
that the checks can fail: a flipped conv sign, a correct forward with a 5% wrong conv-bias
gradient (only the gradient check can catch that one), and fc1 gradients 1.5x too large (on a
freshly injected model only verify_model's perturbed weights can catch that one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import st_adapter_fast
from st_adapter_fast import STAdapter, parity, reference
from st_adapter_fast.backends import Backend, register_backend, unregister_backend
from st_adapter_fast.models.clip_vit import CLIPVisionTransformer
from st_adapter_fast.models.inject import inject_st_adapters
from st_adapter_fast.models.video import VideoClassifier
from st_adapter_fast.verify import main
from st_adapter_fast.verify_model import perturb_adapters, preserved_state, verify_model

import tiny_clip
from helpers import RESULT_NAMES, TOLERANCES, assert_parity, requires_cuda, triton_interpreter_on

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------- broken test backends
def _reference_backend(conv_sign: float = 1.0, conv_bias_grad_scale: float = 1.0, fc1_grad_scale: float = 1.0,
                       backward_error: str = "") -> Backend:
    """A fused-backend stand-in computed with the reference (backend signature of backends.py),
    wrong in a chosen way."""

    def forward(x, T, P, wd, bd, taps, bc, wu, bu):
        ca, kt = taps.shape
        conv_w = (conv_sign * taps).reshape(ca, 1, kt, 1, 1)
        # only temporal kernels reach a fused backend, so any (1, S) grid gives the same math
        return reference(x, T, wd, bd, conv_w, bc, wu, bu, num_prefix_tokens=P,
                         grid_size=(1, x.shape[1] - P))

    def backward(d_out, x, T, P, wd, bd, taps, bc, wu, bu):
        # autograd is off inside a custom op's implementation; torch.func.vjp has its own
        present = [i for i, t in enumerate((wd, bd, taps, bc, wu, bu)) if t is not None]

        def f(x, *given):
            params = [None] * 6
            for i, t in zip(present, given):
                params[i] = t
            return forward(x, T, P, *params)

        given = [t for t in (wd, bd, taps, bc, wu, bu) if t is not None]
        _, vjp = torch.func.vjp(f, x, *given)
        grads = vjp(d_out.to(x.dtype))
        dx, rest = grads[0], iter(grads[1:])
        dwd, dbd, dtaps, dbc, dwu, dbu = [next(rest) if t is not None else None for t in (wd, bd, taps, bc, wu, bu)]
        if backward_error:
            raise RuntimeError(backward_error)
        if dbc is not None:
            dbc = dbc * conv_bias_grad_scale
        dwd = dwd * fc1_grad_scale
        dbd = None if dbd is None else dbd * fc1_grad_scale
        as32 = lambda t: None if t is None else t.float()
        return dx, as32(dwd), as32(dbd), as32(dtaps), as32(dbc), as32(dwu), as32(dbu)

    def unavailable(x, kernel_size, dtype):
        if tuple(kernel_size[1:]) != (1, 1):
            return f"kernel_size {tuple(kernel_size)}: temporal kernels only"
        return None

    return forward, backward, unavailable


@pytest.fixture
def broken_backends():
    names = {"test_sign_flip": dict(conv_sign=-1.0), "test_bad_dbias": dict(conv_bias_grad_scale=1.05),
             "test_bad_dfc1": dict(fc1_grad_scale=1.5), "test_bwd_raises": dict(backward_error="fused backward failed"),
             "test_honest": {}}
    for name, kw in names.items():
        fwd, bwd, why = _reference_backend(**kw)
        register_backend(Backend(name, why, fwd, bwd, auto=False), replace=True)
    yield names
    for name in names:
        unregister_backend(name)


# ----------------------------------------------------------------------------- the rule
def test_rule_bound_is_the_documented_formula():
    tol = TOLERANCES[torch.float16]
    # ratio * eager + floor * scale, capped by the backstop
    assert parity.bound(1e-3, 2.0, tol) == pytest.approx(2 * 1e-3 + 1e-3 * 2.0)
    assert parity.bound(1.0, 2.0, tol) == pytest.approx(1e-2 * 2.0)
    assert parity.bound(1.0, 2.0, tol, backstop=False) == pytest.approx(2.0 + 2e-3)
    assert parity.bound(None, 2.0, tol) == pytest.approx(1e-2 * 2.0)
    # an all-zero reference must come back exactly zero
    assert parity.bound(0.0, 0.0, tol) == 0.0
    zero = {"out": torch.zeros(3, dtype=torch.float64)}
    (e,) = parity.compare({"out": torch.full((3,), 1e-30)}, zero, zero, torch.float32)
    assert not e.passed
    (e,) = parity.compare({"out": torch.tensor([float("nan"), 0.0, 0.0])}, zero, zero, torch.float32)
    assert not e.passed and e.err == float("inf")


def test_helpers_reexport_the_library_rule():
    import helpers

    assert helpers.TOLERANCES is parity.TOLERANCES
    assert helpers.Case is parity.Case and helpers.make_inputs is parity.make_inputs
    case = parity.Case(frames=2, grid=(2, 3), channels=12, adapter_channels=10)
    inputs = parity.make_inputs(case, seed=3)
    ref64 = parity.reference64(case, inputs)
    # the master copies stay untouched leaves (the float64 run used to mark them requires_grad)
    assert not inputs["x"].requires_grad
    eager = parity.run(case, inputs, "reference", torch.float32, "cpu")
    errors = assert_parity(eager, ref64, eager, torch.float32, case.label())
    assert set(errors) == set(RESULT_NAMES)
    wrong = dict(eager, conv_bias=eager["conv_bias"] * 1.01)
    with pytest.raises(AssertionError, match="conv_bias"):
        assert_parity(wrong, ref64, eager, torch.float32, case.label())


def test_grid_covers_design_section_6():
    full = parity.parity_grid()
    assert {(c.frames, c.kernel[0], c.prefix) for c in full} >= {
        (t, k, p) for t in (1, 2, 8, 17) for k in (1, 3, 5) for p in (0, 1, 2)}
    quick = parity.parity_grid(quick=True)
    for grid in (full, quick):
        assert {c.frames for c in grid} >= {1, 2, 8, 17}
        assert {c.kernel[0] for c in grid} >= {1, 3, 5}
        assert {c.prefix for c in grid} >= {0, 1, 2}
        assert any(c.noncontiguous for c in grid) and any(not c.noncontiguous for c in grid)
        assert any(not c.bias for c in grid)
        for c in grid:
            for n in (c.channels, c.adapter_channels):
                assert n & (n - 1) != 0, f"{c.label()}: {n} is a power of two"
            assert (c.grid[0] * c.grid[1]) % 8 != 0, f"{c.label()}: spatial count divisible by 8"
    assert len(quick) < len(full)


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.skipif(not triton_interpreter_on(), reason="in-process CPU run needs TRITON_INTERPRET=1 at import")
def test_cli_quick_cpu_passes_with_json(tmp_path, capsys):
    path = tmp_path / "verify.json"
    rc = main(["--device", "cpu", "--quick", "--json", str(path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(path.read_text())
    for key in ("st_adapter_fast", "torch", "device", "device_name", "rule", "backends", "results", "summary"):
        assert key in data, key
    assert data["device"] == "cpu"
    assert set(data["rule"]["tolerances"]) == {"float32", "float16", "bfloat16"}
    assert data["backends"]["reference"]["available"] and data["backends"]["triton"]["available"]
    cuda = data["backends"].get("cuda")
    assert cuda is not None and not cuda["available"] and cuda["reason"], "unavailable backends are listed"
    n_cases = len(parity.parity_grid(quick=True))
    rows = data["results"]
    assert len(rows) == 2 * 5 * n_cases  # reference + triton, 5 dtype modes
    assert {r["dtype"] for r in rows} == {"fp32", "fp16", "bf16", "autocast-fp16", "autocast-bf16"}
    for row in rows:
        assert row["status"] == "PASS", row
        names = {t["name"] for t in row["tensors"]}
        expected = set(RESULT_NAMES) if row["case_params"]["bias"] else set(RESULT_NAMES) - {
            "fc1_bias", "conv_bias", "fc2_bias"}
        assert names == expected
        for t in row["tensors"]:
            assert t["err"] <= t["bound"] and t["eager_err"] is not None and t["rel_err"] is not None
        if row["backend"] == "triton":
            assert any(t["err"] != t["eager_err"] for t in row["tensors"]), "triton rows must be a separate run"
    s = data["summary"]
    assert s["all_passed"] and s["failed"] == 0 and s["passed"] == len(rows)
    assert "unavailable" in s and "cuda" in s["unavailable"]
    # the printed table has a section per backend x dtype and the summary line
    assert "== triton / bf16:" in out and "== reference / autocast-fp16:" in out
    assert out.strip().splitlines()[-2].startswith("verify PASSED")


def test_cli_broken_backend_fails(tmp_path, capsys, broken_backends):
    path = tmp_path / "broken.json"
    rc = main(["--device", "cpu", "--quick", "--backends", "test_sign_flip,test_bad_dbias", "test_honest",
               "--dtypes", "fp32", "bf16", "--json", str(path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "FAIL" in out and "verify FAILED" in out
    rows = json.loads(path.read_text())["results"]
    by_backend = {}
    for row in rows:
        by_backend.setdefault(row["backend"], []).append(row)
    # sign flip: every case fails, and the forward output itself is wrong
    assert all(r["status"] == "FAIL" for r in by_backend["test_sign_flip"])
    for r in by_backend["test_sign_flip"]:
        assert not next(t for t in r["tensors"] if t["name"] == "out")["passed"]
    # 5% wrong conv-bias grad: the forward passes, only conv_bias fails (cases with a bias)
    for r in by_backend["test_bad_dbias"]:
        failed = {t["name"] for t in r["tensors"] if not t["passed"]}
        if r["case_params"]["bias"]:
            assert r["status"] == "FAIL" and failed == {"conv_bias"}, r
        else:
            assert r["status"] == "PASS"
    # the honest stand-in passes the same grid: the failures above are the bugs, not the harness
    assert all(r["status"] == "PASS" for r in by_backend["test_honest"])
    # failed cases are printed with every tensor
    assert "conv_bias" in out


def test_cli_bad_arguments(capsys):
    assert main(["--backends", "nope", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'nope'" in err and "reference" in err and "triton" in err
    assert main(["--dtypes", "fp8", "--device", "cpu"]) == 2
    assert "unknown dtype 'fp8'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["--device", "tpu"])
    assert exc.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cli_cuda_without_gpu_is_a_clear_error(capsys):
    assert main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device" in err and "--device cpu" in err


def test_cli_requested_unavailable_backend_exits_nonzero(capsys):
    # the CUDA backend cannot run CPU tensors: named explicitly, it must not pass silently
    rc = main(["--device", "cpu", "--quick", "--backends", "cuda", "--dtypes", "fp32", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "backend cuda: UNAVAILABLE on cpu" in out and "requested backend cuda could not be checked" in out


@requires_cuda
def test_cli_quick_cuda_passes(tmp_path, capsys):
    """GPU twin of test_cli_quick_cpu_passes_with_json: every fused backend on the GPU."""
    path = tmp_path / "verify_cuda.json"
    rc = main(["--device", "cuda", "--quick", "--json", str(path), "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(path.read_text())
    assert data["device"] == "cuda" and data["summary"]["all_passed"]
    assert data["backends"]["triton"]["available"], data["backends"]["triton"]["reason"]
    assert {r["backend"] for r in data["results"]} >= {"reference", "triton"}


@requires_cuda
def test_verify_model_cuda():
    model = _tiny_model().cuda()
    x = torch.randn(2 * 3, 1 + 9, 10, device="cuda")
    before = _snapshot(model)
    for kwargs in ({}, {"autocast_dtype": torch.float16}):
        result = verify_model(model, x, **kwargs)  # backend "auto" resolves to a fused one on CUDA
        assert result.passed, str(result)
        assert result.fused_checked and all(a.ran != "reference" for a in result.adapters)
    _assert_unchanged(model, before)


def test_cli_subprocess_sets_interpreter_itself(tmp_path):
    """The real entry point, with TRITON_INTERPRET unset: the CLI must set it before triton loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = tmp_path / "sub.json"
    proc = subprocess.run(
        [sys.executable, "-m", "st_adapter_fast", "verify", "--device", "cpu", "--quick",
         "--dtypes", "fp32", "bf16", "--json", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "set TRITON_INTERPRET=1" in proc.stdout
    last = proc.stdout.strip().splitlines()
    assert any(line.startswith("verify PASSED") for line in last[-3:])
    data = json.loads(path.read_text())
    assert data["backends"]["triton"]["available"]
    assert {r["backend"] for r in data["results"]} == {"reference", "triton"}


# --------------------------------------------------------------------------- verify_model
class _Block(nn.Module):
    """adapter -> token-mixing MLP (so the adapter's spatial tokens reach the pooled output)."""

    def __init__(self, c, ca, frames, kernel):
        super().__init__()
        self.frames = frames
        self.adapter = STAdapter(c, ca, kernel_size=kernel, num_prefix_tokens=1)
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * c, c))

    def forward(self, x):
        x = self.adapter(x, self.frames)
        return x + self.mlp(self.norm(x))


class TinyVideoModel(nn.Module):
    def __init__(self, din=10, c=20, ca=12, frames=3, classes=5):
        super().__init__()
        self.frames = frames
        self.embed = nn.Linear(din, c)
        self.blocks = nn.ModuleList([_Block(c, ca, frames, (3, 1, 1)), _Block(c, ca, frames, (5, 1, 1))])
        self.bn = nn.BatchNorm1d(c)  # buffers that a training-mode forward would update
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        pooled = x.mean(1).view(-1, self.frames, x.shape[-1]).mean(1)  # (B, C)
        return self.head(self.bn(pooled))


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = TinyVideoModel()
    for m in model.modules():
        if isinstance(m, STAdapter):  # random NON-ZERO adapters: a fresh one is the identity
            for p in m.parameters():
                nn.init.normal_(p, std=0.3)
    return model


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "backends": [m.backend for m in model.modules() if isinstance(m, STAdapter)],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "rng": torch.get_rng_state(),
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k in before["state"]:
        assert torch.equal(after["state"][k], before["state"][k]), k
    for key in ("training", "backends", "requires_grad", "grad_ids"):
        assert after[key] == before[key], key
    for a, b in zip(after["grads"], before["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(after["rng"], before["rng"])


@pytest.mark.skipif(not triton_interpreter_on(), reason="the fused run uses the Triton interpreter on CPU")
def test_verify_model_within_tolerance_and_model_unchanged():
    model = _tiny_model()
    model.blocks[0].norm.weight.requires_grad_(False)  # a frozen piece
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)  # a stale grad to keep
    x = torch.randn(2 * 3, 1 + 9, 10)
    x_before = x.clone()
    before = _snapshot(model)

    result = verify_model(model, x, backend="triton")

    _assert_unchanged(model, before)
    assert torch.equal(x, x_before) and not x.requires_grad
    assert result.passed, str(result)
    assert result.fused_checked and result.upcast
    assert [a.name for a in result.adapters] == ["blocks.0.adapter", "blocks.1.adapter"]
    for a in result.adapters:
        assert a.ran == "triton" and a.calls == 1 and a.local.passed
        assert 0 < a.local.err <= a.local.bound  # a fused run differs from the reference, within bounds
    assert [t.name for t in result.outputs] == ["output"]
    names = {t.name for t in result.grads}
    assert "grad input[0]" in names and "grad blocks.1.adapter.conv.weight" in names
    assert "grad blocks.0.norm.weight" not in names  # frozen: not differentiated
    # adapters' grads are non-zero (the model routes spatial tokens to the output)
    assert all(t.scale > 0 for t in result.grads if ".adapter." in t.name)
    text = str(result)
    assert "verify_model PASSED" in text and "blocks.1.adapter" in text and "grad input[0]" in text
    json.dumps(result.to_dict())


@pytest.mark.skipif(not triton_interpreter_on(), reason="the fused run uses the Triton interpreter on CPU")
def test_verify_model_autocast_eval_mode():
    model = _tiny_model(1)
    torch.manual_seed(101)
    x = torch.randn(2 * 3, 1 + 9, 10)
    before = _snapshot(model)
    result = verify_model(model, x, backend="triton", autocast_dtype=torch.float16)
    _assert_unchanged(model, before)  # the default eval-mode run was undone: train mode again
    assert model.training
    assert result.passed, str(result)
    assert result.compute_dtype == "float16"
    assert all(a.compute_dtype == "float16" and a.local.eager_err > 0 for a in result.adapters)


def test_verify_model_train_mode_restores_batchnorm_statistics(broken_backends):
    model = _tiny_model(4)
    model.bn.running_mean.fill_(0.25)
    x = torch.randn(2 * 3, 1 + 9, 10)
    before = _snapshot(model)
    result = verify_model(model, x, backend="test_honest", train=True)
    _assert_unchanged(model, before)  # three training-mode forwards updated the statistics; undone
    assert any("dropout is active" in n for n in result.notes)
    assert all(a.ran == "test_honest" for a in result.adapters)


def test_verify_model_catches_a_broken_backend(broken_backends):
    model = _tiny_model(2).eval()
    x = torch.randn(2 * 3, 1 + 9, 10)
    before = _snapshot(model)
    bad = verify_model(model, x, backend="test_sign_flip")
    _assert_unchanged(model, before)
    assert not bad.passed and not any(a.passed for a in bad.adapters)
    assert not bad.outputs[0].passed and "FAIL" in str(bad)
    # a wrong conv-bias gradient: adapter forwards and the output pass, the grads catch it
    grad_bug = verify_model(model, x, backend="test_bad_dbias")
    assert not grad_bug.passed and all(a.passed for a in grad_bug.adapters)
    failed = {t.name for t in grad_bug.grads if not t.passed}
    assert failed and all(name.endswith("adapter.conv.bias") for name in failed), failed
    assert verify_model(model, x, backend="test_honest").passed
    _assert_unchanged(model, before)


def test_verify_model_restores_state_when_the_forward_raises(broken_backends):
    model = _tiny_model(3)
    x = torch.randn(2 * 3, 1 + 7, 10)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="square grid"):
        # 7 spatial tokens are not a square grid: the adapter raises mid-forward
        verify_model(model, x, backend="test_honest")
    _assert_unchanged(model, before)


def test_verify_model_bad_arguments():
    with pytest.raises(ValueError, match="no st_adapter_fast.STAdapter"):
        verify_model(nn.Linear(3, 3), torch.randn(2, 3))
    model = _tiny_model()
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        verify_model(model, torch.randn(6, 10, 10), backend="nope")
    with pytest.raises(ValueError, match="weights must be one of"):
        verify_model(model, torch.randn(6, 10, 10), backend="triton", weights="trained")
    with pytest.raises(TypeError, match="nn.Module"):
        verify_model(lambda x: x, torch.randn(2, 3))


def test_verify_model_lazy_export():
    assert st_adapter_fast.verify_model is verify_model


# ------------------------------------------------- verify_model that can fail (issue 19)
def _fresh_clip_model():
    """A freshly injected model, as users have it before training: the library's CLIP ViT,
    inject_st_adapters (adapters at their identity init: conv weight and biases zero) and the
    VideoClassifier head."""
    torch.manual_seed(0)
    backbone = CLIPVisionTransformer(tiny_clip.CONFIG)
    inject_st_adapters(backbone, adapter_channels=tiny_clip.ADAPTER_CHANNELS, positions=("pre_attn", "pre_mlp"),
                       verbose=False)
    return VideoClassifier(backbone, tiny_clip.NUM_CLASSES, dropout=0.0)


def _clips(seed=5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, tiny_clip.FRAMES, tiny_clip.IMAGE_SIZE, tiny_clip.IMAGE_SIZE, generator=gen)


def _adapters(model):
    return [m for m in model.modules() if isinstance(m, STAdapter)]


def test_verify_model_fails_a_bad_fc1_gradient_on_a_freshly_injected_model(broken_backends):
    model = _fresh_clip_model()
    assert all(torch.count_nonzero(m.conv.weight) == 0 for m in _adapters(model))
    clips = _clips()
    before = _snapshot(model)
    # weights="as_is" on the identity init: fc1's gradients are exactly zero in every backend, so a
    # backend with dWd and dbd 1.5x too large passes -- the vacuous check the default avoids
    as_is = verify_model(model, clips, backend="test_bad_dfc1", weights="as_is")
    _assert_unchanged(model, before)
    assert as_is.passed and as_is.weights == "as_is"
    fc1_as_is = [t for t in as_is.grads if ".fc1." in t.name]
    assert fc1_as_is and all(t.scale == 0 for t in fc1_as_is)

    bad = verify_model(model, clips, backend="test_bad_dfc1")  # default: perturbed weights
    _assert_unchanged(model, before)  # the zero convs are back, bitwise
    assert not bad.passed and bad.weights == "perturbed" and bad.fused_checked
    assert all(a.passed for a in bad.adapters)  # the forward is right: only gradients can tell
    failed = {t.name for t in bad.grads if not t.passed}
    assert failed and all(".fc1." in name for name in failed), failed
    assert any(name.endswith("fc1.weight") for name in failed) and any(name.endswith("fc1.bias") for name in failed)
    assert "verify_model FAILED" in str(bad) and "perturbed adapter weights" in str(bad)

    honest = verify_model(model, clips, backend="test_honest")
    assert honest.passed, str(honest)
    # perturbed weights reach fc1: non-zero gradients (the last pre-MLP adapter cannot reach the
    # CLS-pooled logits: its gradients are zero in any weights, see tests/tiny_clip.py)
    reaching = [t for t in honest.grads if ".fc1." in t.name and "resblocks.1.adapter_pre_mlp" not in t.name]
    assert reaching and all(t.scale > 0 for t in reaching)
    _assert_unchanged(model, before)


def test_verify_model_refuses_to_pass_when_nothing_fused_ran(broken_backends):
    model = _fresh_clip_model()  # every adapter on backend "auto"
    clips = _clips()
    before = _snapshot(model)
    result = verify_model(model, clips)  # "auto" on CPU tensors resolves to the reference
    _assert_unchanged(model, before)
    assert not result.passed and not result.fused_checked
    assert result.adapters and all(a.ran == "reference" and not a.fused and not a.passed for a in result.adapters)
    text = str(result)
    assert "verify_model FAILED (nothing fused was checked)" in text and "NOT FUSED" in text
    assert any("nothing fused was checked for every adapter" in n for n in result.notes)
    assert len(result.failures()) >= len(result.adapters)
    with pytest.raises(ValueError, match="check nothing fused"):
        verify_model(model, clips, backend="reference")

    # one adapter fused, the others on the reference: the others checked nothing, so no pass
    adapters = _adapters(model)
    adapters[0].backend = "test_honest"
    before = _snapshot(model)
    mixed = verify_model(model, clips)
    _assert_unchanged(model, before)
    assert mixed.fused_checked and not mixed.passed
    assert [a.fused for a in mixed.adapters] == [True] + [False] * (len(adapters) - 1)
    assert mixed.adapters[0].passed
    assert any(f"{len(adapters) - 1} of {len(adapters)} adapters" in n for n in mixed.notes)


def test_verify_model_restores_state_bitwise_after_success_and_after_an_exception(broken_backends):
    model = TinyVideoModel()  # fresh adapters (identity), BatchNorm buffers, dropout
    model.bn.running_mean.fill_(0.25)
    model.blocks[0].adapter.backend = "test_honest"  # adapter backends come back as they were
    model.blocks[1].norm.weight.requires_grad_(False)
    model.head.weight.grad = torch.full_like(model.head.weight, 7.0)
    model.train()
    x = torch.randn(2 * 3, 1 + 9, 10)
    before = _snapshot(model)
    # train=True: every run updates the BatchNorm statistics; perturbed weights overwrite the adapters
    assert verify_model(model, x, backend="test_honest", train=True).passed
    _assert_unchanged(model, before)
    # fails in the fused run's backward: after the perturbation, the float64 copy, the reference
    # run and the fused forward have each changed what they change
    with pytest.raises(RuntimeError, match="fused backward failed"):
        verify_model(model, x, backend="test_bwd_raises", train=True)
    _assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="fused backward failed"):
        verify_model(model, x, backend="test_bwd_raises")  # default eval mode
    _assert_unchanged(model, before)
    assert model.training and all(torch.count_nonzero(m.conv.weight) == 0 for m in _adapters(model))


def test_preserved_state_and_perturb_adapters():
    model = TinyVideoModel()
    adapters = _adapters(model)
    before = _snapshot(model)
    with pytest.raises(KeyError):
        with preserved_state(model) as snapshot:
            perturb_adapters(adapters, seed=3)
            first = [p.detach().clone() for m in adapters for p in m.parameters()]
            perturb_adapters(adapters, seed=3)
            assert all(torch.equal(a, p) for a, p in zip(first, (p for m in adapters for p in m.parameters())))
            for m in adapters:  # seeded, non-zero, at an adapter's scale
                for name, p in m.named_parameters():
                    assert torch.count_nonzero(p) == p.numel(), name
                    assert p.abs().max() < 5 * (m.fc1.in_features ** -0.5 if name == "fc1.weight" else 1.0)
            model.eval()
            model.bn.running_mean.add_(1.0)
            snapshot.reset_buffers()
            assert torch.equal(model.bn.running_mean, before["state"]["bn.running_mean"])
            model.bn.running_var.mul_(3.0)
            adapters[0].backend = "reference"
            model.head.weight.requires_grad_(False)
            model.head.bias.grad = torch.ones_like(model.head.bias)
            torch.randn(3)  # moves the global RNG
            raise KeyError("inside")
    _assert_unchanged(model, before)
    perturb_adapters(adapters, seed=4)
    assert not all(torch.equal(a, p) for a, p in zip(first, (p for m in adapters for p in m.parameters())))


def test_readme_verify_model_cpu_example_runs():
    """README's delimited CPU example, as a new user runs it: a fresh process without
    TRITON_INTERPRET (the snippet sets it), in a scratch directory."""
    import re
    import tempfile

    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    block = re.search(r"<!-- verify_model CPU example: begin.*?-->\s*```python\n(.*?)```\s*"
                      r"<!-- verify_model CPU example: end -->", readme, re.S)
    assert block, "README.md lost its delimited verify_model CPU example"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    with tempfile.TemporaryDirectory() as scratch:
        proc = subprocess.run([sys.executable, "-c", block.group(1)], cwd=scratch, env=env,
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify_model PASSED" in proc.stdout and "perturbed adapter weights" in proc.stdout
    assert "triton->triton" in proc.stdout


# ------------------------------------------------------------------ the variants grid (§9)
def test_verify_variants_grid_checks_the_fused_triton_backend(tmp_path, capsys):
    """--variants checks the reference (eager in each dtype) and every fused backend that runs the
    switches against float64 on the §9 grid, every variant tensor included: Triton fuses every
    case of the grid (the interpreter on CPU), the CUDA backend none (listed as unavailable with
    its reason, never as passing rows)."""
    path = tmp_path / "variants.json"
    # bf16 alone: the 16-bit rule is the one with switches that can flip (~60 s in the interpreter)
    rc = main(["--variants", "--quick", "--dtypes", "bf16", "--no-progress", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    data = json.loads(path.read_text())
    n = len(parity.variant_grid())
    assert data["args"]["variants"] is True and data["args"]["cases"] == n
    fused = {"reference", "triton"} if triton_interpreter_on() else {"reference"}
    assert {r["backend"] for r in data["results"]} == fused
    assert len(data["results"]) == n * len(fused)
    assert all(r["status"] == "PASS" for r in data["results"]), [r for r in data["results"] if r["status"] != "PASS"]
    checked = {t["name"] for r in data["results"] for t in r["tensors"]}
    assert {"norm_weight", "norm_bias", "scale"} <= checked
    assert data["backends"]["cuda"] == {"available": False, "reason": data["summary"]["unavailable"]["cuda"]}
    assert data["backends"]["cuda"]["reason"]
    assert ("no fused backend here covers the variant switches" in out) != triton_interpreter_on()


def test_verify_variants_never_passes_a_backend_on_switches_it_cannot_run(capsys):
    """A backend that claims the switches but whose functions lack their arguments gets ERROR
    rows (the op passes the switches as keywords); an old-style backend asked for by name is
    unavailable, which fails the run."""
    fwd, bwd, why = _reference_backend()
    register_backend(Backend("test_claims_variants", lambda x, k, d, variant=None: None, fwd, bwd, auto=False,
                             variant_aware=True), replace=True)
    register_backend(Backend("test_old_style", why, fwd, bwd, auto=False), replace=True)
    try:
        rc = main(["--variants", "--quick", "--dtypes", "fp32", "--no-progress",
                   "--backends", "reference", "test_claims_variants"])
        out = capsys.readouterr().out
        assert rc == 1 and "ERROR: TypeError" in out and "unexpected keyword argument" in out
        rc = main(["--variants", "--quick", "--dtypes", "fp32", "--no-progress", "--backends", "test_old_style"])
        out = capsys.readouterr().out
        assert rc == 1 and "requested backend test_old_style could not be checked" in out
    finally:
        unregister_backend("test_claims_variants")
        unregister_backend("test_old_style")
