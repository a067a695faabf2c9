"""Op-level suite: forward and forward+backward of one adapter per backend, on the target
shapes of docs/design.md §5 and sweeps over T and token count.

pytest-benchmark's own numbers are wall time of synchronized calls (host dispatch included);
the CUDA-event device time (L2 flushed), compile time, FLOPs, minimum bytes and roofline
fraction are in each benchmark's extra_info.
"""

import pytest
import torch

from _bench_settings import DEVICE, DTYPE, PLAIN_PROVIDERS, PROVIDERS, QUICK, SHAPES, TINY
from st_adapter_fast.bench import core

SWEEPS = core.sweep_shapes(TINY)


def _bench_op(benchmark, roofline, machine_info, provider, shape, mode):
    reason = core.provider_unavailable(provider, shape, DEVICE, DTYPE)
    if reason is not None:
        pytest.skip(reason)
    step, reset, first_call_s = core.prepare_op(provider, shape, mode, DEVICE, DTYPE)
    stats = core.time_fn(step, DEVICE, setup=reset, **core.timing_budget(DEVICE, QUICK))
    flops = core.op_flops(shape, mode)
    nbytes = core.op_min_bytes(shape, mode, torch.finfo(DTYPE).bits // 8)
    floor_ms, bound = core.roofline_floor_ms(flops, nbytes, roofline)
    benchmark.extra_info.update(machine_info)
    benchmark.extra_info.update(
        shape=shape.as_dict(), provider=provider, mode=mode, first_call_s=first_call_s,
        device_time_ms=stats["time_ms"], device_time_ms_p20=stats["time_ms_p20"],
        device_time_ms_p80=stats["time_ms_p80"], loop_ms=stats["loop_ms"], flops=flops, min_bytes=nbytes,
        floor_ms=floor_ms, bound=bound, roofline_frac=floor_ms / stats["time_ms"],
    )
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def synced_step():
        step()
        sync()

    rounds = 5 if (QUICK or DEVICE == "cpu") else 50
    benchmark.pedantic(synced_step, setup=reset, rounds=rounds, warmup_rounds=1)
    assert stats["time_ms"] > 0


@pytest.mark.parametrize("mode", core.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_target_shape(benchmark, roofline, machine_info, shape, provider, mode):
    benchmark.group = f"{shape.name} {mode}"
    _bench_op(benchmark, roofline, machine_info, provider, shape, mode)


# the sweeps: one group per (sweep, mode), ids "sweep-T-<shape>", "sweep-tokens-<shape>"
SWEEP_CASES = [(name, shape) for name in ("sweep-T", "sweep-tokens") for shape in SWEEPS[name]]


@pytest.mark.parametrize("mode", core.MODES)
@pytest.mark.parametrize("provider", PLAIN_PROVIDERS)
@pytest.mark.parametrize("sweep, shape", SWEEP_CASES, ids=[f"{n}-{s.name}" for n, s in SWEEP_CASES])
def test_sweep(benchmark, roofline, machine_info, sweep, shape, provider, mode):
    benchmark.group = f"{sweep} {mode}"
    _bench_op(benchmark, roofline, machine_info, provider, shape, mode)


# issue 15's variant rows (docs/design.md §9): shape A with kernel (3, 3, 3), and with the LayerNorm
# before fc1 + GELU after it, fused against eager with cuDNN on and off
VARIANT_SHAPES = list((core.TINY_VARIANT_SHAPES if TINY else core.VARIANT_SHAPES).values())
VARIANT_PROVIDERS = [p for p in ("eager", "eager-nocudnn", "triton") if p in PLAIN_PROVIDERS]


@pytest.mark.parametrize("mode", core.MODES)
@pytest.mark.parametrize("provider", VARIANT_PROVIDERS)
@pytest.mark.parametrize("shape", VARIANT_SHAPES, ids=lambda s: s.name)
def test_variant_shape(benchmark, roofline, machine_info, shape, provider, mode):
    benchmark.group = f"{shape.name} {mode}"
    _bench_op(benchmark, roofline, machine_info, provider, shape, mode)
