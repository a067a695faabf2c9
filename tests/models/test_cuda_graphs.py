"""CUDA graphs and host synchronisation.

The fused op allocates only through PyTorch's caching allocator and never reads a device value
on the host, so:
  * GPU: torch.cuda.graph captures forward + backward (op alone and the injected video model),
    replays match eager bitwise; torch.compile(mode="reduce-overhead") runs it under cudagraph
    trees without skipping; forward + backward raise nothing under
    torch.cuda.set_sync_debug_mode("error").
  * CPU twin (Triton interpreter): torch.compile(fullgraph=True, backend="aot_eager") traces the
    model and its backward with the fused op (and its backward op) as single nodes, no graph
    breaks (torch._dynamo.explain), no host-sync ops (``aten._local_scalar_dense``, what .item()
    becomes) in the forward or backward graph, and the compiled step equals eager; and the
    op's Python launchers read no tensor value on the host (.item(), bool(t), int(t), ...) during
    forward + backward.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import st_adapter_fast
from helpers import TOLERANCES, fused_device, requires_cuda, triton_interpreter_on
from tiny_clip import adapter_modules, build_model, fused_backend_or_skip, make_batch, trainable_grads

fused_available = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_on()),
    reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1 on CPU",
)

FUSED_OP = torch.ops.st_adapter_fast.fused_adapter.default
FUSED_BWD_OP = torch.ops.st_adapter_fast.fused_adapter_backward.default
HOST_SYNC_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)


def _adapter_inputs(device, dtype=torch.float32, b=2, t=8, grid=7, c=64, ca=48, seed=0):
    """x (B*T, 1 + grid^2, C), dO and random non-zero adapter parameters (leaves needing grad)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b * t, 1 + grid * grid, c, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)
    params = [
        torch.randn(ca, c, generator=gen) * c ** -0.5, torch.randn(ca, generator=gen) * 0.5,
        torch.randn(ca, 1, 3, 1, 1, generator=gen) * 0.5, torch.randn(ca, generator=gen) * 0.5,
        torch.randn(c, ca, generator=gen) * ca ** -0.5, torch.randn(c, generator=gen) * 0.5,
    ]
    params = [p.to(device=device, dtype=dtype).requires_grad_(True) for p in params]
    return x.to(device, dtype).requires_grad_(True), grad_out.to(device, dtype), params, t


def _step(x, grad_out, params, t, backend="triton"):
    out = st_adapter_fast.st_adapter(x, t, *params, backend=backend)
    out.backward(grad_out)
    return out


def _results(out, x, params):
    return {"out": out.detach().clone(), "x": x.grad.clone(), **{f"p{i}": p.grad.clone() for i, p in enumerate(params)}}


def _assert_fp32_close(got: dict, want: dict, what: str) -> None:
    """Relative to each tensor's max |value|, within the fp32 backstop of tests/helpers.py."""
    rel = TOLERANCES[torch.float32].backstop
    bad = {n: (got[n] - w).abs().max().item() for n, w in want.items()
           if not (got[n] - w).abs().max() <= rel * w.abs().max()}
    assert not bad, f"{what}: max abs errors {bad}"


# ---------------------------------------------------------------------------------- GPU
GPU_BACKENDS = ["triton", "cuda"]


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay_of_forward_backward(backend):
    fused_backend_or_skip(backend, "cuda")
    x, grad_out, params, t = _adapter_inputs("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream: Triton compiles here
        for _ in range(3):
            _step(x, grad_out, params, t, backend)
            for leaf in (x, *params):
                leaf.grad = None
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _step(x, grad_out, params, t, backend)  # .grad tensors are allocated in the graph pool

    gen = torch.Generator().manual_seed(1)
    for trial in range(2):
        new_x = torch.randn(x.shape, generator=gen).cuda()
        new_grad = torch.randn(x.shape, generator=gen).cuda()
        with torch.no_grad():
            x.copy_(new_x)
            grad_out.copy_(new_grad)
        graph.replay()
        torch.cuda.synchronize()
        replayed = _results(static_out, x, params)

        ex = new_x.clone().requires_grad_(True)
        eparams = [p.detach().clone().requires_grad_(True) for p in params]
        eager = _results(_step(ex, new_grad, eparams, t, backend), ex, eparams)
        for name, want in eager.items():
            assert torch.equal(replayed[name], want), (
                f"replay {trial}: {name} differs from eager by {(replayed[name] - want).abs().max().item():.3e}"
            )


@requires_cuda
def test_cuda_graph_capture_of_the_injected_model():
    """Whole-network capture (forward + backward of the video model with fused adapters).
    Compared within fp32 tolerance: the backbone's own kernels (cuDNN conv, cuBLAS) need not be
    bitwise reproducible; the op-level test above checks the fused op bitwise."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # memory-efficient attention's backward uses atomics
        _capture_injected_model()


def _capture_injected_model():
    model = build_model("triton").cuda()
    clips, labels = (t.cuda() for t in make_batch(2, seed=3))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            F.cross_entropy(model(clips), labels).backward()
            model.zero_grad(set_to_none=True)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = F.cross_entropy(model(clips), labels)
        static_loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    static_loss_before = static_loss.detach().clone()
    new_clips, new_labels = (t.cuda() for t in make_batch(2, seed=4))
    clips.copy_(new_clips)
    labels.copy_(new_labels)
    graph.replay()
    torch.cuda.synchronize()
    replayed = {"loss": static_loss.detach().clone(), **trainable_grads(model)}

    model.zero_grad(set_to_none=True)
    eager_loss = F.cross_entropy(model(new_clips), new_labels)
    eager_loss.backward()
    eager = {"loss": eager_loss.detach().clone(), **trainable_grads(model)}
    _assert_fp32_close(replayed, eager, "graph replay vs eager (injected model)")
    assert not torch.equal(replayed["loss"], static_loss_before), "replay did not recompute the loss"


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_reduce_overhead_compile_runs_under_cudagraphs_and_matches_eager(backend):
    from torch._dynamo.utils import counters

    fused_backend_or_skip(backend, "cuda")
    torch._dynamo.reset()
    counters.clear()
    module = st_adapter_fast.STAdapter(64, 48, backend=backend).cuda()
    x0, grad_out, params, t = _adapter_inputs("cuda")
    with torch.no_grad():
        for p, q in zip(module.parameters(), params):
            p.copy_(q)
    compiled = torch.compile(module, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, record, then replays
        torch.compiler.cudagraph_mark_step_begin()
        x = x0.detach().clone().requires_grad_(True)
        module.zero_grad(set_to_none=True)
        out = compiled(x, t)
        out.backward(grad_out)
        got = {"out": out.detach().clone(), "x": x.grad.clone(),
               **{n: p.grad.clone() for n, p in module.named_parameters()}}
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])

    x = x0.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, t)
    out.backward(grad_out)
    eager = {"out": out.detach(), "x": x.grad, **{n: p.grad for n, p in module.named_parameters()}}
    _assert_fp32_close(got, eager, "reduce-overhead vs eager")


@contextlib.contextmanager
def _sync_debug_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@requires_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_backward_issue_no_host_sync(dtype, backend):
    fused_backend_or_skip(backend, "cuda", dtype)
    x, grad_out, params, t = _adapter_inputs("cuda", dtype)

    def plain_and_autocast():
        _step(x, grad_out, params, t, backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 activations, bf16 compute
            out = st_adapter_fast.st_adapter(x.detach().float(), t, *[p.float() for p in params], backend=backend)
        out.sum().backward()

    plain_and_autocast()  # compile every kernel specialisation first (compilation may sync)
    torch.cuda.synchronize()
    with _sync_debug_error():  # any cudaDeviceSynchronize / blocking copy / .item() raises
        plain_and_autocast()
    torch.cuda.synchronize()


# ------------------------------------------------------------------------------ CPU twin
def _graph_recorder(graphs: dict):
    """An aot_eager-like torch.compile backend that keeps the forward and backward graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs.setdefault(kind, []).append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"))


def _call_targets(graph_modules):
    return [n.target for gm in graph_modules for n in gm.graph.nodes if n.op == "call_function"]


@fused_available
def test_model_traces_without_graph_breaks():
    device = fused_device()
    model = build_model("triton").to(device)
    clips, _ = make_batch(2, seed=7)
    explanation = torch._dynamo.explain(model)(clips.to(device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1, explanation.graph_count
    code = "\n".join(gm.code for gm in explanation.graphs)
    assert code.count("st_adapter_fast.fused_adapter") == len(list(adapter_modules(model))), code


@fused_available
def test_fullgraph_compile_of_training_step_matches_eager_and_has_no_host_sync():
    torch._dynamo.reset()
    device = fused_device()
    model = build_model("triton").to(device)
    num_adapters = len(list(adapter_modules(model)))
    clips, labels = (t.to(device) for t in make_batch(2, seed=8))

    def grads_of(fn):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fn(clips), labels)
        loss.backward()
        return {"loss": loss.detach(), **trainable_grads(model)}

    eager = grads_of(model)
    graphs: dict = {}
    compiled = torch.compile(model, backend=_graph_recorder(graphs), fullgraph=True)
    got = grads_of(compiled)

    forward_ops, backward_ops = _call_targets(graphs["forward"]), _call_targets(graphs["backward"])
    assert forward_ops.count(FUSED_OP) == num_adapters, forward_ops
    assert backward_ops.count(FUSED_BWD_OP) == num_adapters, backward_ops
    syncs = [op for op in forward_ops + backward_ops if op in HOST_SYNC_OPS]
    assert not syncs, f"host-sync ops in the compiled step: {syncs}"
    _assert_fp32_close(got, eager, "aot_eager fullgraph vs eager")


@fused_available
def test_fused_forward_backward_read_no_tensor_values_on_host():
    """Device-independent twin of the sync-debug test: any host read of a tensor value in the
    launchers (the Python that runs before the kernels) would be a sync on a GPU."""
    x, grad_out, params, t = _adapter_inputs(fused_device(), b=1, t=4, grid=3, c=24, ca=16)
    _step(x, grad_out, params, t)  # first call: imports and kernel set-up may do anything
    reads = []

    def forbidden(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise RuntimeError(f"host read of a tensor value: Tensor.{name}")
        return read

    with contextlib.ExitStack() as stack:
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            stack.enter_context(mock.patch.object(torch.Tensor, name, forbidden(name)))
        out = st_adapter_fast.st_adapter(x, t, *params, backend="triton")
        torch.autograd.backward(out, grad_out)
    assert not reads, reads
