"""Every Triton kernel variant the GPU dispatch can pick compiles ahead of time for sm_80 and
sm_90 on this CPU machine: no register spills, shared memory within the chip's limit, and no
"wgmma serialized" warning from ptxas.

The variants come from running the real launchers on meta tensors (kernels/aot.py), for the
Target shape A of docs/design.md §5 (aligned: cp.async / wgmma paths) and an unaligned odd shape (C=200,
L=50: the register-hungriest path), fp32 (IEEE and TF32), fp16 and bf16, forward and backward.
Temporal kernels: KT=3 (the common case) and 9, the largest of the KT > 3 tile bucket --
register pressure grows with KT (KT-1 fp32 partials), so KT 5 and 7 share 9's tiles with room
to spare and KT=1 (no partials, KT=3's tiles) sits below 3. On sm_90 the bf16 variants compile
a second time with the weights through tensor descriptors (TileConfig.USE_TMA). `python -m
st_adapter_fast.kernels.aot` checks every KT and shape.

The norm and spatial paths (docs/design.md §9) are a covering subset here: bf16 at KT 3 and 9,
IEEE fp32 on the odd shape at KT 3 (fp16 shares bf16's tiles, TF32 fp32's with fewer registers);
ST_ADAPTER_FAST_FULL_GRID=1 compiles them in every dtype and KT too (620 variants instead of 499).

It runs in a subprocess: AOT compilation needs triton.jit's real JITFunction, which
TRITON_INTERPRET=1 (set for this test session on CPU) replaces.
"""

import json
import os
import subprocess
import sys

import pytest

KERNELS = {
    "adapter_down_conv_fwd_kernel",
    "adapter_up_residual_fwd_kernel",
    "adapter_conv_bwd_kernel",
    "adapter_wgrad_kernel",
    "adapter_grad_finalize_kernel",
    "adapter_up_residual_ln_fwd_kernel",  # the adapter + LayerNorm pair (kernels/adapter_layernorm.py)
    "adapter_up_ln_bwd_kernel",
    "adapter_norm_fold_kernel",  # norm="layernorm" (kernels/adapter_prenorm.py): the parameter fold
    "adapter_prenorm_dgrad_kernel",  # and the dgrad with the LayerNorm backward folded in
    # spatial kernels (kt, kh, kw) (kernels/adapter_stencil.py): elementwise stencils, no MMA
    "adapter_stencil_fwd_kernel",
    "adapter_stencil_bwd_kernel",
}
GEMM_KERNELS = KERNELS - {"adapter_grad_finalize_kernel", "adapter_norm_fold_kernel", "adapter_stencil_fwd_kernel",
                          "adapter_stencil_bwd_kernel"}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("aot") / "reports.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "st_adapter_fast.kernels.aot", "--kt", "3", "--kt", "9",
           "--shapes", "A,odd", "--jobs", str(min(4, os.cpu_count() or 1)), "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    print(proc.stdout[-20000:])
    assert out.exists(), f"the AOT checker wrote no report:\n{proc.stderr[-5000:]}"
    return proc.returncode, json.loads(out.read_text()), proc.stdout


def test_every_variant_compiles_without_spills(reports):
    returncode, rows, stdout = reports
    bad = [f"sm_{r['arch']} {r['variant']}: {r['spill_bytes']} B spilled, {r['shared_bytes']} B smem "
           f"(limit {r['smem_limit']}), wgmma serialized={r['wgmma_serialized']}"
           for r in rows
           if r["spill_bytes"] or r["shared_bytes"] > r["smem_limit"] or r["wgmma_serialized"]]
    assert not bad, "\n".join(bad)
    assert returncode == 0, stdout[-3000:]


def test_coverage_of_kernels_archs_and_dtypes(reports):
    _, rows, _ = reports
    seen = {(r["variant"].split("[")[0], r["arch"]) for r in rows}
    assert seen == {(k, a) for k in KERNELS for a in (80, 90)}, seen
    for dtype in ("*bf16", "*fp16", "*fp32"):
        assert any(dtype in r["variant"] for r in rows), dtype
    assert any("INPUT_PRECISION=tf32" in r["variant"] for r in rows)
    for kt in (3, 9, 0):  # 0: no conv, prefix_mode="mlp"'s prefix-row launches (aot._record_switches)
        assert any(f"KT={kt} " in r["variant"] for r in rows), kt
    assert any("USE_TMA=True" in r["variant"] and r["arch"] == 90 for r in rows)
    for arch in (80, 90):  # the LayerNorm folded into the down-conv's K loop, fwd and recompute
        for store_h in (False, True):
            assert any(f"STORE_H={store_h}" in r["variant"] and "NORM=True" in r["variant"] and r["arch"] == arch
                       for r in rows), (arch, store_h)
    assert all(r["registers"] > 0 for r in rows), "ptxas -v output was not parsed"


def test_hopper_uses_wgmma_for_16bit_gemms(reports):
    """On sm_90 the 16-bit GEMM tiles should run on wgmma (HGMMA), not the older mma path."""
    _, rows, _ = reports
    checked = 0
    for r in rows:
        kernel = r["variant"].split("[")[0]
        if r["arch"] == 90 and kernel in GEMM_KERNELS and ("*bf16" in r["variant"] or "*fp16" in r["variant"]):
            assert r["uses_wgmma"], r["variant"]
            checked += 1
    assert checked >= len(GEMM_KERNELS)
