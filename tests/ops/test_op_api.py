"""The op as PyTorch sees it: saved tensors, torch.compile, opcheck, bad input, module contract.
Fused paths run on CUDA when present, else under the Triton interpreter."""

import warnings

import pytest
import torch

from st_adapter_fast import STAdapter, reference, st_adapter

from helpers import Case, fused_device, make_inputs, triton_interpreter_on

DEVICE = fused_device()
fused_ok = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_interpreter_on(), reason="needs CUDA or TRITON_INTERPRET=1"
)


def _adapter(c=24, ca=16, kernel=(3, 1, 1), prefix=1, grid=None, backend="triton", dtype=torch.float32):
    m = STAdapter(c, ca, kernel, num_prefix_tokens=prefix, backend=backend, grid_size=grid)
    for p in m.parameters():  # non-zero everything: a fresh adapter is the identity
        torch.nn.init.normal_(p, std=0.2)
    return m.to(device=DEVICE, dtype=dtype)


# ------------------------------------------------------------------------------ contract
def test_state_dict_matches_official_adapter():
    m = STAdapter(768, 384)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "fc1.weight": (384, 768), "fc1.bias": (384,),
        "conv.weight": (384, 1, 3, 1, 1), "conv.bias": (384,),
        "fc2.weight": (768, 384), "fc2.bias": (768,),
    }
    for name in ("conv.weight", "conv.bias", "fc1.bias", "fc2.bias"):
        assert torch.count_nonzero(m.state_dict()[name]) == 0, name
    x = torch.randn(4, 5, 768)
    torch.testing.assert_close(m(x, 2), x, rtol=0, atol=0)  # fresh adapter = identity


def test_reference_matches_official_module_code():
    """The reference against a transcription of the official Adapter.forward (CLS token, square
    grid, in place)."""
    torch.manual_seed(0)
    m = _adapter(c=12, ca=8, backend="reference").cpu().double()
    x = torch.randn(2 * 3, 1 + 4, 12, dtype=torch.float64)

    def official(x, T):  # linziyi96/st-adapter models_adapter.py Adapter.forward
        BT, L, C = x.size()
        B = BT // T
        Ca = m.conv.in_channels
        H = W = round((L - 1) ** 0.5)
        assert L - 1 == H * W
        x_id = x
        x = x[:, 1:, :]
        x = m.fc1(x)
        x = x.view(B, T, H, W, Ca).permute(0, 4, 1, 2, 3).contiguous()
        x = m.conv(x)
        x = x.permute(0, 2, 3, 4, 1).contiguous().view(BT, L - 1, Ca)
        x = m.fc2(x)
        x_id[:, 1:, :] += x
        return x_id

    want = official(x.clone(), 3)
    torch.testing.assert_close(m(x, 3), want, rtol=0, atol=0)


def test_conv_cudnn_switch_turns_cudnn_off_around_the_conv_only(monkeypatch):
    """conv_cudnn=False (the official DWCONV3D_DISABLE_CUDNN's intent): cuDNN is off while the
    reference's conv runs, and the global flag is back afterwards, also when the conv raises."""
    import torch.nn.functional as F

    seen = []
    conv3d = F.conv3d

    def spy(*args, **kwargs):
        seen.append(torch.backends.cudnn.enabled)
        return conv3d(*args, **kwargs)

    monkeypatch.setattr(F, "conv3d", spy)
    torch.manual_seed(0)
    m = _adapter(c=12, ca=8, backend="reference").cpu()
    x = torch.randn(2 * 3, 1 + 4, 12)
    assert torch.backends.cudnn.enabled
    want = m(x, 3)
    m.conv_cudnn = False
    assert "conv_cudnn=False" in repr(m)
    torch.testing.assert_close(m(x, 3), want, rtol=0, atol=0)  # CPU convs never use cuDNN
    assert seen == [True, False] and torch.backends.cudnn.enabled

    def broken(*args, **kwargs):
        raise RuntimeError("conv failed")

    monkeypatch.setattr(F, "conv3d", broken)
    with pytest.raises(RuntimeError, match="conv failed"):
        m(x, 3)
    assert torch.backends.cudnn.enabled


@fused_ok
def test_forward_does_not_mutate_input_and_inplace_does():
    m = _adapter()
    x = torch.randn(4, 10, 24, device=DEVICE)
    x0 = x.clone()
    out = m(x, 2)
    assert torch.equal(x, x0) and out.data_ptr() != x.data_ptr()
    m.inplace = True
    assert m(x, 2) is x
    torch.testing.assert_close(x, out, rtol=0, atol=0)


@fused_ok
def test_saves_only_x_and_parameters():
    """Recompute backward: nothing but x and the six parameters is saved (no h, g, permutes)."""
    m = _adapter(c=32, ca=16)
    x = torch.randn(6, 10, 32, device=DEVICE, requires_grad=True)
    allowed = {x.data_ptr(): x.shape, **{p.data_ptr(): p.shape for p in m.parameters()}}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(x, 3)
    assert saved, "nothing saved at all: the backward could not work"
    for t in saved:
        assert t.data_ptr() in allowed and t.shape == allowed[t.data_ptr()], (
            f"saved a {tuple(t.shape)} {t.dtype} tensor that is neither x nor a parameter"
        )
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr())
    assert extra == sum(p.numel() * p.element_size() for p in m.parameters())
    out.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())

    # the reference, for contrast, saves activations of its own
    ref_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: ref_saved.append(t) or t, lambda t: t):
        m.backend = "reference"
        m(x, 3)
    assert sum(t.numel() for t in ref_saved) > sum(t.numel() for t in saved)


# ------------------------------------------------------------------------- torch.compile
@fused_ok
def test_torch_compile_fullgraph_no_graph_breaks():
    import torch._dynamo

    torch._dynamo.reset()
    m = _adapter()
    x = torch.randn(4, 10, 24, device=DEVICE, requires_grad=True)
    explanation = torch._dynamo.explain(lambda t: m(t, 2))(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(lambda t: m(t, 2), fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    eager = m(x, 2)
    eager.square().sum().backward()
    assert torch.equal(out, eager)
    for got, want in zip(grads, [x.grad] + [p.grad for p in m.parameters()]):
        assert torch.equal(got, want)


@fused_ok
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    case = Case(batch=1, frames=3, grid=(2, 2), channels=16, adapter_channels=16, bias=bias)
    inp = make_inputs(case)
    x = inp["x"].float().to(DEVICE).requires_grad_()
    params = [inp[n].float().to(DEVICE).requires_grad_() if inp[n] is not None else None
              for n in ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")]
    args = (x, *params, 3, 1, "triton")
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter.default, args)
    grad = torch.randn_like(x)
    bwd_args = (grad, x.detach(), *[p.detach() if p is not None else None for p in params], 3, 1, "triton")
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter_backward.default, bwd_args)


# ------------------------------------------------------------------------------ bad input
def _params(c=8, ca=4, kernel=(3, 1, 1), dtype=torch.float32, device="cpu"):
    m = STAdapter(c, ca, kernel).to(device=device, dtype=dtype)
    return [m.fc1.weight, m.fc1.bias, m.conv.weight, m.conv.bias, m.fc2.weight, m.fc2.bias]


def _with(params, index, value):
    params[index] = value
    return params


@pytest.mark.parametrize(
    "make,exc,words",
    [
        (lambda: (torch.randn(4, 5), 2, _params()), ValueError, ["(B*T, L, C)", "(4, 5)"]),
        (lambda: (torch.randn(5, 5, 8), 2, _params()), ValueError, ["5", "num_frames = 2"]),
        (lambda: (torch.randn(4, 6, 8), 2, _params()), ValueError, ["square", "grid_size"]),
        (lambda: (torch.randn(4, 5, 9), 2, _params()), ValueError, ["C=9", "(4, 8)"]),
        (lambda: (torch.randn(4, 5, 8), 2, _with(_params(), 2, torch.randn(4, 1, 2, 1, 1))), ValueError,
         ["odd", "(2, 1, 1)"]),
        (lambda: (torch.randn(4, 5, 8, dtype=torch.float16), 2, _params()), TypeError, ["float16", "float32"]),
        (lambda: (torch.randn(4, 5, 8), 2, _params(device="meta")), ValueError, ["meta", "cpu"]),
        (lambda: ("x", 2, _params()), TypeError, ["torch.Tensor", "str"]),
        (lambda: (torch.randn(4, 5, 8), 0, _params()), ValueError, ["num_frames", "0"]),
        (lambda: (torch.randn(4, 5, 8), 2.0, _params()), TypeError, ["num_frames", "float"]),
        (lambda: (torch.randint(0, 3, (4, 5, 8)), 2, _params()), TypeError, ["floating", "int64"]),
    ],
    ids=["rank", "frames", "grid", "channels", "even-kernel", "dtype-mix", "device-mix", "not-tensor",
         "zero-frames", "float-frames", "int-input"],
)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_bad_input_errors(make, exc, words, backend):
    x, t, params = make()
    with pytest.raises(exc) as info:
        st_adapter(x, t, *params, backend=backend)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_bad_param_shapes_name_expected_and_actual():
    w1, b1, wc, bc, w2, b2 = _params()
    x = torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match=r"fc2_weight must have shape \(C=8, Ca=4\), got \(8, 5\)"):
        st_adapter(x, 2, w1, b1, wc, bc, torch.randn(8, 5), b2)
    with pytest.raises(ValueError, match=r"conv_bias must have shape \(4,\), got \(3,\)"):
        st_adapter(x, 2, w1, b1, wc, torch.randn(3), w2, b2)
    with pytest.raises(ValueError, match=r"grid_size \(2, 3\) holds 6 tokens but the input has 4"):
        st_adapter(x, 2, w1, b1, wc, bc, w2, b2, grid_size=(2, 3))


def test_backend_errors_say_why():
    x = torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        st_adapter(x, 2, *_params(), backend="fast")
    with pytest.raises(RuntimeError, match="cuda"):
        st_adapter(x, 2, *_params(), backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        STAdapter(8, 4, backend="fast")


@fused_ok
def test_spatial_kernels_not_pretended_fused():
    x = torch.randn(4, 5, 8, device=DEVICE)
    # (3, 3, 3) is fused (tests/ops/test_spatial_fused.py); kh, kw beyond 7 are not
    params = [p.detach().normal_() for p in _params(kernel=(3, 9, 9), device=DEVICE)]
    with pytest.raises(RuntimeError, match=r"spatial kernels up to kh, kw = 7 are fused"):
        st_adapter(x, 2, *params, backend="triton")
    # ... while the reference (and 'auto', which picks it for this case) computes it correctly
    got = st_adapter(x, 2, *params, backend="auto")
    torch.testing.assert_close(got, reference(x, 2, *params))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto picks a fused backend only for CUDA tensors")
def test_auto_falls_back_with_one_warning_gpu():
    x = torch.randn(4, 5, 8, device="cuda")
    params = [p.detach().normal_() for p in _params(kernel=(3, 9, 9), device="cuda")]  # beyond Triton's kh, kw <= 7
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st_adapter(x, 2, *params)
        st_adapter(x, 2, *params)
    msgs = [str(w.message) for w in caught if "no fused backend" in str(w.message)]
    assert len(msgs) == 1 and "(3, 9, 9)" in msgs[0]


def test_auto_on_cpu_is_reference():
    from st_adapter_fast.ops import resolve_backend

    assert resolve_backend("auto", torch.randn(2, 5, 8), (3, 1, 1), torch.float32) == "reference"


@fused_ok
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_edge_shapes_work(backend):
    """Empty batch, prefix-only frames and T=1 work (or are plain copies)."""
    for shape, t, p in (((0, 5, 8), 2, 1), ((4, 1, 8), 2, 1), ((3, 5, 8), 1, 1), ((2, 4, 8), 2, 0)):
        x = torch.randn(*shape, device=DEVICE)
        params = [q.detach().normal_() for q in _params(device=DEVICE)]
        got = st_adapter(x, t, *params, num_prefix_tokens=p, backend=backend)
        want = reference(x.cpu().double(), t, *[q.cpu().double() for q in params], num_prefix_tokens=p)
        assert got.shape == x.shape
        torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_import_without_triton_keeps_reference(tmp_path):
    """`import st_adapter_fast` needs only torch; asking for triton then says it is missing."""
    import subprocess
    import sys
    import textwrap

    blocker = tmp_path / "triton.py"
    blocker.write_text("raise ImportError('triton blocked for this test')\n")
    code = textwrap.dedent("""
        import torch, st_adapter_fast as s
        x = torch.randn(4, 5, 8)
        m = s.STAdapter(8, 4)
        assert torch.equal(m(x, 2), x)
        try:
            s.st_adapter(x, 2, m.fc1.weight, m.fc1.bias, m.conv.weight, m.conv.bias,
                         m.fc2.weight, m.fc2.bias, backend="triton")
        except RuntimeError as e:
            assert "triton is not importable" in str(e), e
            print("OK")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
