"""Memory suite: bytes saved for backward (saved_tensors_hooks; each storage once, parameters
excluded) and, on CUDA, memory held after the forward and the fwd+bwd peak, per backend.
The numbers are in extra_info; the timed function is one fwd+bwd."""

import pytest
import torch

from _bench_settings import DEVICE, DTYPE, PROVIDERS, SHAPES
from st_adapter_fast.bench import core


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_memory(benchmark, machine_info, shape, provider):
    benchmark.group = f"memory {shape.name}"
    reason = core.provider_unavailable(provider, shape, DEVICE, DTYPE)
    if reason is not None:
        pytest.skip(reason)
    mem = core.measure_memory(provider, shape, DEVICE, DTYPE)
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(shape=shape.as_dict(), provider=provider, **mem)
    step, reset, _ = core.prepare_op(provider, shape, "fwd+bwd", DEVICE, DTYPE)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    benchmark.pedantic(lambda: (step(), sync()), setup=reset, rounds=3, warmup_rounds=1)
    # sanity, not targets: every backward keeps something, and never more than a few x's worth
    if mem["saved_bytes"] is not None:
        assert 0 < mem["saved_bytes"] <= 4 * mem["x_bytes"], mem
    if DEVICE == "cuda":
        assert mem["peak_bytes"] >= mem["fwd_held_bytes"] >= mem["output_bytes"], mem
