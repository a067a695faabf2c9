"""CPU check of the CUDA kernels: nvcc compiles every csrc/*.cu kernel file for sm_80 and sm_90
with ``-Xptxas -v``; the test fails on a compile error, a register spill, a stack frame (a
window array demoted to local memory), or static shared memory over the arch's per-block limit.
It also checks that every (kernel, dtype, KT, GEMM config) instantiation the dispatch can
launch was compiled, that the fp16/bf16 kernels run on tensor cores (HMMA in the SASS), and that
their PTX is a cp.async pipeline feeding ldmatrix + mma.sync m16n8k16, with no WMMA anywhere.

Only the kernel files are compiled (-c, no torch): the binding needs a CUDA build of torch
(tests/cuda/test_cuda_build.py, marker cuda_build). Objects are cached per session in a tmp dir; the
four files x two archs (the 16-bit kernels in every GEMM config of the table) compile in 6-7 minutes on a busy
2-core machine (2-3 minutes with one depth).
"""

import concurrent.futures
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from st_adapter_fast.backends import cuda as cuda_backend
from st_adapter_fast.backends import cuda_model

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNEL_FILES = ("down_conv_fwd.cu", "conv_bwd.cu", "up_residual.cu", "wgrad.cu")
ARCHS = (80, 90)
# max static + dynamic shared memory per block (opt-in): A100 163 KB, H100 227 KB
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _find_nvcc():
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).is_file():
            return cand
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit absent)")

# the one ptxas -v parser (the work model's CUDA rows read registers and spills with it too)
_parse_ptxas = cuda_model.parse_ptxas


def _compile(src: str, arch: int, out_dir: Path):
    obj = out_dir / f"{Path(src).stem}.sm{arch}.o"
    # the PTX is embedded too (code=compute_XX), for test_gemm_ptx_uses_cp_async_and_mma_sync
    cmd = [NVCC, "-c", "-O3", "-std=c++17", "-lineinfo", f"-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]",
           "-Xptxas", "-v", "-I", str(CSRC), str(CSRC / src), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return src, arch, res.returncode, res.stdout + res.stderr, obj


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """{(file, arch): (returncode, log, object path)}, compiled once per session, 2 at a time."""
    out_dir = tmp_path_factory.mktemp("cuda_compile")
    jobs = [(src, arch) for src in KERNEL_FILES for arch in ARCHS]
    workers = max(1, min(len(jobs), os.cpu_count() or 1, 4))
    results = {}
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for src, arch, rc, log, obj in pool.map(lambda j: _compile(j[0], j[1], out_dir), jobs):
            results[(src, arch)] = (rc, log, obj)
    return results


def test_parse_ptxas_sees_spills():
    """The parser must catch spills and smem (so a green run means something)."""
    log = (
        "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z3fooPf\n"
        "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size, 17920 bytes smem, "
        "528 bytes cmem[0]\n"
    )
    k = _parse_ptxas(log)["_Z3fooPf"]
    assert (k["spill_st"], k["spill_ld"], k["stack"], k["regs"], k["smem"]) == (12, 8, 16, 255, 17920)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("src", KERNEL_FILES)
def test_kernels_compile_without_spills(src, arch, compiled):
    rc, log, _ = compiled[(src, arch)]
    assert rc == 0, f"nvcc failed for {src} sm_{arch}:\n{log[-4000:]}"
    assert "warning" not in log.lower(), f"nvcc warnings for {src} sm_{arch}:\n{log[-4000:]}"
    kernels = _parse_ptxas(log)
    assert kernels, f"no ptxas -v output parsed for {src}:\n{log[-2000:]}"
    bad = []
    for name, k in kernels.items():
        assert "regs" in k and "stack" in k, f"incomplete ptxas info for {name}:\n{log[-2000:]}"
        if k["spill_st"] or k["spill_ld"]:
            bad.append(f"{name}: {k['spill_st']} B spill stores, {k['spill_ld']} B spill loads ({k['regs']} regs)")
        if k["stack"]:
            bad.append(f"{name}: {k['stack']} B stack frame (local memory)")
        if k["smem"] > SMEM_LIMIT[arch]:
            bad.append(f"{name}: {k['smem']} B shared memory > sm_{arch} limit {SMEM_LIMIT[arch]}")
        # static shared memory above 48 KB does not even launch without an opt-in
        if k["smem"] > 48 * 1024:
            bad.append(f"{name}: {k['smem']} B static shared memory > 48 KB")
    assert not bad, f"{src} sm_{arch}:\n  " + "\n  ".join(bad)


# every instantiation the host dispatch can pick, by mangled-name fragments: dtype pairs (1 fp32 +
# 4 with 16-bit compute; wgrad: 1 + 6) x the distinct resolved tiles of the GEMM config table
# (backends/cuda.py gemm_configs(), checked against the compiled table by test_cuda_emulated.py):
# configs that agree on a kernel's tile share its instantiation.
KTS = (1, 3, 5, 7, 9)
FP32_K = (32, 3)  # fp32 kernels: the default K depth, the entry's tile rows


def _conv_tiles(kt, half):
    return {(cfg.conv_rows(kt),) + ((cfg.block_k, cfg.stages) if half else FP32_K) for cfg in cuda_backend.gemm_configs()}


def _expected(src):
    cfgs = cuda_backend.gemm_configs()
    if src in ("down_conv_fwd.cu", "conv_bwd.cu"):
        return sum(len(_conv_tiles(kt, False)) + 4 * len(_conv_tiles(kt, True)) for kt in KTS)
    if src == "up_residual.cu":
        return len({c.up_block_m for c in cfgs}) + 4 * len({(c.up_block_m, c.block_k, c.stages) for c in cfgs})
    return 1 + 6 * len({(c.block_k, c.stages) for c in cfgs})  # wgrad_simt_kernel<...>, wgrad_mma_kernel<...>


_FRAGMENT = {"down_conv_fwd.cu": "down_conv_fwd_kernel", "conv_bwd.cu": "conv_bwd_kernel",
             "up_residual.cu": "up_residual_kernel", "wgrad.cu": "wgrad_"}


@pytest.mark.parametrize("src", KERNEL_FILES)
def test_every_dispatched_instantiation_is_compiled(src, compiled):
    rc, log, _ = compiled[(src, 80)]
    assert rc == 0
    fragment, count = _FRAGMENT[src], _expected(src)
    names = [n for n in _parse_ptxas(log) if fragment in n.split("_cu_")[-1]]  # not the file name's "wgrad_cu"
    assert len(names) == count, f"{src}: expected {count} instantiations of {fragment}, got {len(names)}"
    if src in ("down_conv_fwd.cu", "conv_bwd.cu"):
        for kt in KTS:
            # template int arguments in order: KT, then the resolved rows per block, K depth and stages
            want = len(_conv_tiles(kt, False)) + 4 * len(_conv_tiles(kt, True))
            assert sum(re.findall(r"Li(\d+)E", n)[0] == str(kt) for n in names) == want, \
                f"{src}: KT={kt} not compiled for every dtype pair and GEMM config"


def _find_cuobjdump():
    cands = [shutil.which("cuobjdump"), str(Path(NVCC).resolve().parent / "cuobjdump")]
    spec = importlib.util.find_spec("triton")  # triton wheels bundle one; found without importing triton
    if spec is not None and spec.origin:
        cands.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in cands if c and Path(c).is_file()), None)


@pytest.mark.parametrize("src", KERNEL_FILES)
def test_half_kernels_use_tensor_cores(src, compiled):
    """fp16/bf16 instantiations contain HMMA instructions; fp32 ones use FFMA only."""
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (neither in the CUDA toolkit nor bundled with triton)")
    rc, _, obj = compiled[(src, 90)]
    assert rc == 0
    sass = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    functions = re.split(r"\n\s*Function : ", sass)[1:]
    assert functions, "no SASS functions found"
    seen_half = seen_float = 0
    for fn in functions:
        name = fn.split("\n", 1)[0].strip()
        if "sum_partials" in name:
            continue
        is_half = "half" in name or "bfloat16" in name
        if is_half:
            seen_half += 1
            assert "HMMA" in fn, f"{name} has no tensor-core MMA"
        else:
            seen_float += 1
            assert "HMMA" not in fn, f"{name}: the fp32 path must stay IEEE fp32 (no TF32 MMA)"
    assert seen_half and seen_float


_PTX_ENTRY = re.compile(r"\.entry\s+(\S+)\s*\(")


def _ptx_functions(ptx: str):
    """{mangled entry name: body} of a PTX module (each body runs to the next .entry)."""
    starts = [(m.group(1), m.start()) for m in _PTX_ENTRY.finditer(ptx)]
    return {name: ptx[pos:(starts[i + 1][1] if i + 1 < len(starts) else len(ptx))]
            for i, (name, pos) in enumerate(starts)}


def test_ptx_parser_splits_entries():
    ptx = ".visible .entry _Z1aIfEv(\n{ mma.sync.aligned }\n.visible .entry _Z1bv(\n{ ret; }\n"
    fns = _ptx_functions(ptx)
    assert list(fns) == ["_Z1aIfEv", "_Z1bv"] and "mma.sync" in fns["_Z1aIfEv"] and "mma" not in fns["_Z1bv"]


@pytest.mark.parametrize("src", KERNEL_FILES)
def test_gemm_ptx_uses_cp_async_and_mma_sync(src, compiled):
    """Every fp16/bf16 GEMM kernel is a cp.async pipeline (16-byte copies, group waits) feeding
    ldmatrix and mma.sync m16n8k16; no kernel uses WMMA; fp32 kernels stay IEEE SIMT (no mma)."""
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (neither in the CUDA toolkit nor bundled with triton)")
    rc, _, obj = compiled[(src, 80)]
    assert rc == 0
    ptx = subprocess.run([cuobjdump, "-ptx", str(obj)], capture_output=True, text=True, check=True).stdout
    assert "wmma" not in ptx.lower(), f"{src}: WMMA in the PTX"
    functions = {n: body for n, body in _ptx_functions(ptx).items() if "sum_partials" not in n}
    assert functions, f"{src}: no PTX entries found"
    half = {n: body for n, body in functions.items() if "__half" in n or "__nv_bfloat16" in n}
    assert half and len(half) < len(functions), f"{src}: expected both 16-bit and fp32 instantiations"
    for name, body in functions.items():
        if name in half:
            for instr in ("cp.async.cg.shared.global", "cp.async.wait_group", "ldmatrix.sync.aligned.m8n8.x4",
                          "mma.sync.aligned.m16n8k16.row.col.f32"):
                assert instr in body, f"{name}: no {instr}"
        else:
            assert "mma.sync" not in body, f"{name}: the fp32 path must stay IEEE fp32 (no tensor-core MMA)"
