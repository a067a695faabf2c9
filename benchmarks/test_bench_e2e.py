"""End-to-end suite: train step (fwd + bwd + AdamW, fp16 autocast, GradScaler) of a ViT-B/16
video model (B=16, T=8) with 0, 12 pre-MLP or 24 pre-attn + pre-MLP ST-Adapters, per backend;
inference throughput and peak memory in extra_info. On CPU a 2-block tiny ViT stands in."""

import pytest

from _bench_settings import DEVICE, DTYPE, E2E, E2E_MODEL, PLAIN_PROVIDERS, QUICK, TINY
from st_adapter_fast.bench import core
from st_adapter_fast.bench import e2e

CFG = e2e.VIT_TINY if TINY else e2e.VIT_B16
CASES = [(layout, provider) for layout in e2e.adapter_layouts(CFG)
         for provider in (["none"] if not (layout[1] or layout[2]) else PLAIN_PROVIDERS)
         if provider != "eager+ln"]  # the eager pair is the eager model: nothing to fuse


@pytest.mark.skipif(not E2E, reason="ST_ADAPTER_BENCH_E2E=0")
@pytest.mark.parametrize("layout,provider", CASES, ids=[f"{l[0]}-{p}".replace(" ", "_") for l, p in CASES])
def test_train_step(benchmark, machine_info, layout, provider):
    name, pre_attn, pre_mlp = layout
    benchmark.group = f"e2e {CFG.name} train step"
    if provider != "none":
        probe = core.OpShape("e2e", CFG.batch, CFG.frames, CFG.seq_len, CFG.width, CFG.adapter_channels)
        reason = core.provider_unavailable(provider, probe, DEVICE, DTYPE)
        if reason is None and DEVICE == "cpu" and provider in ("triton", "triton+ln"):
            reason = "the Triton interpreter is too slow for a whole model; e2e needs a GPU"
        if reason is not None:
            pytest.skip(reason)
    bench = e2e.E2EBench(CFG, pre_attn, pre_mlp, provider, DEVICE, builder=E2E_MODEL)
    try:
        info = bench.measure(QUICK, core.time_fn)
        benchmark.extra_info.update(machine_info)
        benchmark.extra_info.update(config=name, provider=provider, builder=E2E_MODEL, **info)
        benchmark.pedantic(lambda: (bench.train_step(), bench.sync()), rounds=3 if (QUICK or DEVICE == "cpu") else 20,
                           warmup_rounds=1)
    finally:
        bench.close()
    assert info["train_step_ms"] > 0 and info["infer_clips_per_s"] > 0
    assert info["num_adapters"] == (CFG.layers if pre_mlp else 0) + (CFG.layers if pre_attn else 0)
