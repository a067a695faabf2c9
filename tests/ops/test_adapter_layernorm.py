"""The adapter + LayerNorm pair (st_adapter_fast.adapter_layernorm, docs/design.md §7): parity of
(out, normed) and of every gradient against float64 under THE rule, the op as PyTorch sees it
(opcheck, torch.compile fullgraph, saved tensors), backend choice and bad input.
Fused paths run on CUDA when present, else under the Triton interpreter."""

import pytest
import torch

from st_adapter_fast.adapter_layernorm import st_adapter_layernorm
from st_adapter_fast.parity import make_layernorm_inputs, run_layernorm
from st_adapter_fast.reference import reference_layernorm

from helpers import DTYPE_MODES, Case, compare, format_failures, fused_device, requires_cuda, triton_interpreter_on

DEVICE = fused_device()
fused_ok = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreter_on(),
                              reason="needs CUDA or TRITON_INTERPRET=1")

# P in {0, 1}; non-square and ragged grids; C = 72 spans two fp32 column blocks (64) with a
# ragged tail; a strided x; no biases; T = 1 (no temporal neighbours)
CASES = [
    Case(batch=2, frames=3, grid=(3, 3), prefix=1, channels=24, adapter_channels=40),
    Case(batch=1, frames=2, grid=(3, 5), prefix=0, channels=72, adapter_channels=20, noncontiguous=True),
    Case(batch=2, frames=1, grid=(2, 3), prefix=1, channels=40, adapter_channels=36, bias=False),
]
MODES = ["fp32", "fp16", "bf16", "autocast-bf16"]


def _check(case, mode_name, **kw):
    mode = DTYPE_MODES[mode_name]
    inputs = make_layernorm_inputs(case, affine=kw.pop("affine", True))
    ref64 = run_layernorm(case, inputs, "reference", torch.float64, "cpu", **kw)
    args = (mode.tensor_dtype, DEVICE)
    run_kw = dict(kw, autocast=mode.dtype if mode.autocast else None)
    got = run_layernorm(case, inputs, "triton", *args, **run_kw)
    eager = run_layernorm(case, inputs, "reference", mode.tensor_dtype, "cpu", **run_kw) if DEVICE == "cpu" else \
        run_layernorm(case, inputs, "reference", *args, **run_kw)
    errors = compare(got, ref64, eager, mode.dtype)
    failed = [e for e in errors if not e.passed]
    assert not failed, format_failures(failed, case.label(), mode.name)
    return got


@fused_ok
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label())
def test_pair_matches_float64_reference(case, mode):
    got = _check(case, mode)
    assert {"out", "normed", "x", "fc1_weight", "fc2_weight", "ln_weight", "ln_bias"} <= set(got)


@fused_ok
def test_pair_without_affine_and_with_frozen_affine():
    case = CASES[0]
    _check(case, "fp32", affine=False)
    got = _check(case, "bf16", affine_grads=False)
    assert "ln_weight" not in got  # frozen: no gradient asked for, none computed


@fused_ok
def test_pair_recipe_bf16_layernorm_params_under_autocast():
    """The official recipe's dtypes: fp32 adapters under bf16 autocast, x in bf16 (the backbone's
    residual stream), the LayerNorm's own params in bf16; normed comes back as the model's
    LayerNorm returns it (x's dtype for CLIP's fp32-compute LayerNorm)."""
    case = CASES[0]
    inputs = make_layernorm_inputs(case)
    kw = dict(autocast=torch.bfloat16, ln_dtype=torch.bfloat16, normed_dtype=torch.bfloat16)
    got = run_layernorm(case, inputs, "triton", torch.bfloat16, DEVICE, **kw)
    ref64 = run_layernorm(case, inputs, "reference", torch.float64, "cpu")
    eager = run_layernorm(case, inputs, "reference", torch.bfloat16, "cpu" if DEVICE == "cpu" else DEVICE, **kw)
    failed = [e for e in compare(got, ref64, eager, torch.bfloat16) if not e.passed]
    assert not failed, format_failures(failed, case.label(), "recipe")


def _pair_inputs(case=CASES[0], dtype=torch.float32, device=DEVICE, grad=True):
    inp = make_layernorm_inputs(case)
    names = ("x", "fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias", "ln_weight",
             "ln_bias")
    return [inp[n].to(device=device, dtype=dtype).requires_grad_(grad) if inp[n] is not None else None for n in names]


@fused_ok
def test_default_normed_dtype_follows_torch_layer_norm():
    x, *params = _pair_inputs(dtype=torch.bfloat16, grad=False)
    out, normed = st_adapter_layernorm(x, 3, *params, backend="triton")
    assert out.dtype == torch.bfloat16 and normed.dtype == torch.bfloat16
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        x32, *p32 = _pair_inputs(grad=False)
        out, normed = st_adapter_layernorm(x32, 3, *p32, backend="triton")
    assert out.dtype == torch.float32 and normed.dtype == torch.float32  # F.layer_norm under autocast: fp32
    want = torch.nn.functional.layer_norm(out.float(), (24,), p32[-2], p32[-1])
    torch.testing.assert_close(normed, want, rtol=0, atol=2e-5)  # normed is LN(out) of the out returned


@fused_ok
def test_saves_x_and_per_token_statistics_only():
    """Backward keeps x, the parameters and two fp32 (B*T, L) statistics: no out, no normed, no
    fp32 copy of out (what nn.LayerNorm keeps), no h or g."""
    x, *params = _pair_inputs()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, normed = st_adapter_layernorm(x, 3, *params, backend="triton")
    tokens = x.shape[0] * x.shape[1]
    param_ids = {id(p) for p in params if p is not None}
    activations = [t for t in saved if id(t) not in param_ids]
    assert any(t is x for t in activations)
    others = [t for t in activations if t is not x]
    assert sorted(t.shape for t in others) == [torch.Size(x.shape[:2])] * 2, [t.shape for t in others]
    assert all(t.dtype == torch.float32 and t.numel() == tokens for t in others)
    ref_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ref_saved.append(t) or t, lambda t: t):
        reference_layernorm(x, 3, *params)
    assert sum(t.numel() for t in ref_saved if id(t) not in param_ids) > x.numel() + 2 * tokens


@fused_ok
def test_opcheck():
    x, *params = _pair_inputs()
    args = (x, *params, 1e-5, torch.float32, 3, 1, "triton")
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter_layernorm.default, args)
    out, normed, mean, rstd = torch.ops.st_adapter_fast.fused_adapter_layernorm(*args)
    detached = [p.detach() if p is not None else None for p in params]
    bwd = (torch.randn_like(out), torch.randn_like(normed), x.detach(), *detached, mean, rstd, 3, 1, True, "triton")
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter_layernorm_backward.default, bwd)


@fused_ok
def test_torch_compile_fullgraph_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    x, *params = _pair_inputs()

    def step(t):
        out, normed = st_adapter_layernorm(t, 3, *params, backend="triton")
        return out.sum() + normed.square().sum()

    explanation = torch._dynamo.explain(step)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    grads = [t.grad.clone() for t in (x, *params) if t is not None]
    for t in (x, *params):
        if t is not None:
            t.grad = None
    eager = step(x)
    eager.backward()
    assert torch.equal(loss, eager)
    for got, t in zip(grads, [t for t in (x, *params) if t is not None]):
        assert torch.equal(got, t.grad)


@fused_ok
def test_deterministic():
    runs = []
    for _ in range(2):
        x, *params = _pair_inputs()
        out, normed = st_adapter_layernorm(x, 3, *params, backend="triton")
        torch.autograd.backward([out, normed], [torch.ones_like(out), normed.detach()])
        runs.append([out, normed] + [t.grad for t in (x, *params) if t is not None])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- backends, bad input
def test_cuda_backend_refuses_the_pair_by_name():
    x, *params = _pair_inputs(device="cpu", grad=False)
    with pytest.raises(RuntimeError, match="does not fuse the LayerNorm.*fuse_layernorm"):
        st_adapter_layernorm(x, 3, *params, backend="cuda")


def test_auto_on_cpu_is_the_reference_and_matches_it():
    x, *params = _pair_inputs(device="cpu", grad=False)
    got = st_adapter_layernorm(x, 3, *params)
    want = reference_layernorm(x, 3, *params)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_meta_tensors_give_meta_results():
    x, *params = _pair_inputs(device="meta", grad=False)
    out, normed = st_adapter_layernorm(x, 3, *params, backend="triton", normed_dtype=torch.bfloat16)
    assert out.device.type == "meta" and out.shape == x.shape and normed.dtype == torch.bfloat16


@pytest.mark.parametrize("bad, match", [
    (dict(norm_weight=torch.ones(23)), r"norm_weight must have shape \(24,\).*got \(23,\)"),
    (dict(norm_bias="zeros"), "norm_bias must be a torch.Tensor"),
    (dict(norm_eps=-1.0), "norm_eps must be a real number >= 0"),
    (dict(normed_dtype=torch.int32), "normed_dtype must be a floating torch.dtype"),
])
def test_bad_layernorm_input_names_expected_and_actual(bad, match):
    x, w1, b1, wc, bc, w2, b2, lw, lb = _pair_inputs(device="cpu", grad=False)
    kw = dict(norm_weight=lw, norm_bias=lb)
    kw.update(bad)
    lw, lb = kw.pop("norm_weight"), kw.pop("norm_bias")
    with pytest.raises((TypeError, ValueError), match=match):
        st_adapter_layernorm(x, 3, w1, b1, wc, bc, w2, b2, lw, lb, **kw)


@requires_cuda
def test_pair_on_gpu_bf16_matches_float64():
    _check(CASES[0], "bf16")
