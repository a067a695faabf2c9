"""Activation checkpointing (torch.utils.checkpoint, non-reentrant) around residual blocks that
hold fused ST-Adapters: the recomputed forward re-runs the fused op, and every gradient is
bitwise equal to the run without checkpointing (the kernels are deterministic, so recompute
reproduces the saved tensors exactly).

Blocks are wrapped the way FSDP users do it: apply_activation_checkpointing with the
non-reentrant checkpoint_wrapper."""

from __future__ import annotations

import collections
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint

import st_adapter_fast
from st_adapter_fast import backends
from helpers import fused_device, triton_interpreter_on
from tiny_clip import adapter_modules, build_model, is_block, make_batch, strip_wrapper_prefix, trainable_grads

fused_available = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_on()),
    reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1 on CPU",
)


@pytest.fixture
def counting_triton():
    """The Triton backend under another name that counts fused forward/backward launches, so the
    test can see the checkpoint's recompute go through the fused op (not a silent fallback)."""
    triton = backends.get_backend("triton")
    calls = collections.Counter()

    def forward(*args):
        calls["forward"] += 1
        return triton.forward(*args)

    def backward(*args):
        calls["backward"] += 1
        return triton.backward(*args)

    backends.register_backend(
        backends.Backend("counting_triton", triton.unavailable_reason, forward, backward, auto=False),
        replace=True,
    )
    yield calls
    backends.unregister_backend("counting_triton")


def _grads(model, video, labels):
    """Output, input gradient and adapter gradients of one training step."""
    video = video.clone().requires_grad_(True)  # so dx runs through every adapter too
    model.zero_grad(set_to_none=True)
    logits = model(video)
    F.cross_entropy(logits, labels).backward()
    return {"logits": logits.detach(), "video": video.grad, **strip_wrapper_prefix(trainable_grads(model))}


def _assert_bitwise_equal(got, want, what):
    assert got.keys() == want.keys()
    differ = {n: (got[n] - want[n]).abs().max().item() for n in want if not torch.equal(got[n], want[n])}
    assert not differ, f"{what}: not bitwise equal (max abs diff) {differ}"
    assert all(want[n].abs().max() > 0 for n in want), "an all-zero gradient would prove nothing"


def _count_adapter_calls(model):
    counts = collections.Counter()
    for name, adapter in adapter_modules(model):
        adapter.register_forward_pre_hook(lambda mod, args, name=name: counts.update([name]))
    return counts


@pytest.mark.parametrize("backend", ["reference", pytest.param("counting_triton", marks=fused_available)])
def test_block_checkpointing_gives_identical_gradients(backend, request):
    calls = request.getfixturevalue("counting_triton") if backend == "counting_triton" else None
    device = fused_device() if backend != "reference" else "cpu"
    model = build_model(backend).to(device)
    num_adapters = len(list(adapter_modules(model)))
    video, labels = (t.to(device) for t in make_batch(2, seed=5))

    plain = _grads(model, video, labels)
    adapter_calls = _count_adapter_calls(model)
    if calls is not None:
        assert calls == {"forward": num_adapters, "backward": num_adapters}, calls
        calls.clear()
    apply_activation_checkpointing(
        model, check_fn=is_block,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
    )
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules()) == 2
    checkpointed = _grads(model, video, labels)

    # recompute really happened: each adapter ran twice (forward + recompute), fused both times
    assert len(adapter_calls) == num_adapters and set(adapter_calls.values()) == {2}, adapter_calls
    if calls is not None:
        assert calls == {"forward": 2 * num_adapters, "backward": num_adapters}, calls
    _assert_bitwise_equal(checkpointed, plain, f"checkpointed vs plain ({backend})")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=fused_available)])
def test_checkpoint_around_the_functional_op(backend):
    """checkpoint() around st_adapter itself (the op's own saved tensors are dropped and rebuilt)."""
    device = fused_device() if backend != "reference" else "cpu"
    gen = torch.Generator().manual_seed(3)
    b, t, s, c, ca = 2, 3, 4, 24, 12
    x0 = torch.randn(b * t, 1 + s, c, generator=gen).to(device)
    params = [
        torch.randn(ca, c, generator=gen) * c ** -0.5, torch.randn(ca, generator=gen),
        torch.randn(ca, 1, 3, 1, 1, generator=gen) * 0.5, torch.randn(ca, generator=gen),
        torch.randn(c, ca, generator=gen) * ca ** -0.5, torch.randn(c, generator=gen),
    ]
    params = [p.to(device).requires_grad_(True) for p in params]
    grad_out = torch.randn(x0.shape, generator=gen).to(device)

    def adapter_then_gelu(x):
        # a nonlinearity after the op so backward needs the op's recomputed output, not only x
        return F.gelu(st_adapter_fast.st_adapter(x, t, *params, backend=backend))

    results = []
    for use_checkpoint in (False, True):
        x = x0.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        out = checkpoint(adapter_then_gelu, x, use_reentrant=False) if use_checkpoint else adapter_then_gelu(x)
        out.backward(grad_out)
        results.append({"out": out.detach(), "x": x.grad, **{f"p{i}": p.grad for i, p in enumerate(params)}})
    _assert_bitwise_equal(results[1], results[0], f"checkpointed st_adapter ({backend})")


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=fused_available)])
def test_inplace_adapters_in_checkpointed_blocks_are_never_silently_wrong(backend):
    """inplace=True (the official module's behaviour) overwrites the checkpointed block's input,
    which the recompute needs. Allowed outcomes: PyTorch's standard in-place error, or the same
    gradients as out-of-place adapters -- never different numbers. (Use inplace=False with
    activation checkpointing.)"""
    device = fused_device() if backend != "reference" else "cpu"
    clips, labels = (t.to(device) for t in make_batch(2, seed=6))
    out_of_place = _grads(build_model(backend).to(device), clips, labels)

    model = build_model(backend).to(device)
    for _, adapter in adapter_modules(model):
        adapter.inplace = True
    apply_activation_checkpointing(
        model, check_fn=is_block,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
    )
    try:
        got = _grads(model, clips, labels)
    except RuntimeError as err:
        assert "modified by an inplace operation" in str(err), err
        return
    for name, want in out_of_place.items():
        torch.testing.assert_close(got[name], want, msg=f"in-place + checkpointing: {name}")
