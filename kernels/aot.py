"""Ahead-of-time compile checks for the Triton kernels, on a machine with no GPU.

`dispatch_variants(arch)` runs the real launchers on meta tensors for the target shapes, with
every kernel replaced by a recorder, so the variants checked are exactly the (kernel,
constexprs, tile config, argument specialisation) the GPU dispatch picks -- not a hand-kept list.
`compile_variant` then compiles one for sm_80 / sm_90 with triton.compile (the JIT's own
specialisation rules: ints equal to 1 become constexprs, pointers and multiples of 16 get
divisibility hints) and runs Triton's bundled ptxas -v on the PTX to read registers, spills
and the "wgmma serialized" warning.

Run as a script (no TRITON_INTERPRET) to print a table:  python -m st_adapter_fast.kernels.aot
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Iterator, List, Optional, Tuple

import torch
import triton

from . import _common, adapter_bwd, adapter_fwd, adapter_layernorm, adapter_prenorm, adapter_stencil, wgrad

# ST_ADAPTER_FAST_FULL_GRID=1: the norm and spatial paths in every dtype and KT too (CI: a covering
# subset, see _dispatch_variants)
FULL_GRID = os.environ.get("ST_ADAPTER_FAST_FULL_GRID", "0") == "1"

# Shared memory a block may use (opt-in maximum): A100 163 KB, H100 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# (B, T, L, C, Ca) of docs/design.md §5 plus one odd small shape.
TARGET_SHAPES = {
    "A": (16, 8, 197, 768, 384),
    "B": (8, 8, 257, 1024, 512),
    "C": (4, 32, 197, 768, 384),
    "odd": (2, 17, 50, 200, 72),
}

_KERNELS = {
    "adapter_down_conv_fwd_kernel": (adapter_fwd, adapter_fwd.adapter_down_conv_fwd_kernel),
    "adapter_up_residual_fwd_kernel": (adapter_fwd, adapter_fwd.adapter_up_residual_fwd_kernel),
    "adapter_conv_bwd_kernel": (adapter_bwd, adapter_bwd.adapter_conv_bwd_kernel),
    "adapter_wgrad_kernel": (wgrad, wgrad.adapter_wgrad_kernel),
    "adapter_grad_finalize_kernel": (wgrad, wgrad.adapter_grad_finalize_kernel),
    "adapter_up_residual_ln_fwd_kernel": (adapter_layernorm, adapter_layernorm.adapter_up_residual_ln_fwd_kernel),
    "adapter_up_ln_bwd_kernel": (adapter_layernorm, adapter_layernorm.adapter_up_ln_bwd_kernel),
    # norm="layernorm" (kernels/adapter_prenorm.py)
    "adapter_norm_fold_kernel": (adapter_prenorm, adapter_prenorm.adapter_norm_fold_kernel),
    "adapter_prenorm_dgrad_kernel": (adapter_prenorm, adapter_prenorm.adapter_prenorm_dgrad_kernel),
    # spatial kernels (kt, kh, kw): the conv as a stencil over a in memory
    "adapter_stencil_fwd_kernel": (adapter_stencil, adapter_stencil.adapter_stencil_fwd_kernel),
    "adapter_stencil_bwd_kernel": (adapter_stencil, adapter_stencil.adapter_stencil_bwd_kernel),
}

_TYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str
    signature: Tuple[Tuple[str, str], ...]  # (arg name, type) in order; "constexpr" for constants
    constexprs: Tuple[Tuple[str, object], ...]
    divisible: Tuple[str, ...]  # args hinted divisible by 16
    num_warps: int
    num_stages: int
    maxnreg: Optional[int] = None

    def label(self) -> str:
        keys = ("KT", "KH", "KW", "PREFIX", "STORE_H", "STORE_GPRE", "G_DROP", "HAS_BIAS", "INPUT_PRECISION", "USE_TMA",
                "ACT1", "ACT2", "HAS_SCALE", "HAS_DROP", "A0_DROP", "SCALED", "NORM", "HAS_LNW", "HAS_LNB", "BLOCK_M",
                "BLOCK_N", "BLOCK_K")
        consts = dict(self.constexprs)
        dtypes = sorted({t for _, t in self.signature if t.startswith("*")})
        parts = [f"{k}={consts[k]}" for k in keys if k in consts]
        return f"{self.kernel}[{','.join(dtypes)} {' '.join(parts)} w{self.num_warps}s{self.num_stages}]"


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the variant it compiles to, its grid and its argument values
    (tensors stay meta tensors) -- what the work model (kernels/work_model.py) reads."""

    variant: Variant
    grid: Tuple[int, ...]
    args: dict


class _Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kw)` records instead of launching."""

    def __init__(self, name: str, fn, sink: List[Variant], launches: Optional[List[Launch]] = None):
        self.name, self.fn, self.sink, self.launches = name, fn, sink, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, num_stages=3, maxnreg=None, **constexprs):
            names = self.fn.arg_names
            sig, consts, div = [], dict(), []
            for name, value in zip(names, args):
                if isinstance(value, torch.Tensor):
                    sig.append((name, "*" + _TYPE[value.dtype]))
                    div.append(name)  # torch allocations are 16-byte aligned
                elif isinstance(value, bool):
                    sig.append((name, "constexpr"))
                    consts[name] = value
                elif isinstance(value, float):
                    sig.append((name, "fp32"))
                elif isinstance(value, int):
                    if value == 1:  # the JIT specialises ints equal to 1 as constants
                        sig.append((name, "constexpr"))
                        consts[name] = 1
                    else:
                        sig.append((name, "i64" if abs(value) >= 2**31 else "i32"))
                        if value % 16 == 0:
                            div.append(name)
                else:
                    raise TypeError(f"{self.name}: unexpected argument {name}={value!r}")
            for name in names[len(args):]:
                sig.append((name, "constexpr"))
                consts[name] = constexprs[name]
            variant = Variant(self.name, tuple(sig), tuple(consts.items()), tuple(div),
                              num_warps, num_stages, maxnreg)
            self.sink.append(variant)
            if self.launches is not None:
                values = dict(zip(names, args))
                values.update(constexprs)
                self.launches.append(Launch(variant, tuple(grid), values))

        return launch


@contextlib.contextmanager
def _recording(arch: int, sink: List[Variant], launches: Optional[List[Launch]] = None,
               sms: Optional[int] = None) -> Iterator[None]:
    saved = {}
    for name, (mod, fn) in _KERNELS.items():
        saved[name] = (mod, getattr(mod, name))
        setattr(mod, name, _Recorder(name, fn, sink, launches))
    sms = sms or (132 if arch >= 90 else 108)
    patched = {"arch_of": lambda t: arch, "sm_count": lambda t: sms}
    mods = (_common, adapter_fwd, adapter_bwd, adapter_layernorm, adapter_prenorm, adapter_stencil, wgrad)
    old = [(m, k, getattr(m, k)) for m in mods for k in patched if hasattr(m, k)]
    for m, k, _ in old:
        setattr(m, k, patched[k])
    interp = _common.INTERPRET
    _common.INTERPRET = False  # dot flags as on a GPU
    try:
        yield
    finally:
        _common.INTERPRET = interp
        for m, k, v in old:
            setattr(m, k, v)
        for name, (mod, fn) in saved.items():
            setattr(mod, name, fn)


def dispatch_variants(arch: int, kts=(1, 3, 5, 7, 9), dtypes=(torch.bfloat16, torch.float16, torch.float32),
                      shapes=None, tma: bool = True) -> List[Variant]:
    """Every distinct kernel variant the launchers pick for the given shapes, forward and backward;
    fp32 both with IEEE dots and with TF32 (torch.backends.cuda.matmul.allow_tf32 = True); on
    sm_90 16-bit also with the weights through tensor descriptors (TileConfig.USE_TMA)."""
    from . import tuning

    variants = _dispatch_variants(arch, kts, dtypes, shapes, switches=True)
    if arch >= 90 and tma:
        with tuning.override(USE_TMA=True):
            # bf16 stands for fp16 (same tiles, same registers to within a few)
            variants += _dispatch_variants(arch, kts, tuple(d for d in dtypes if d == torch.bfloat16), shapes)
    return list(dict.fromkeys(variants))


def _dispatch_variants(arch, kts, dtypes, shapes, switches: bool = False) -> List[Variant]:
    """switches: also one representative docs/design.md §9 variant (_record_switches), bf16 at
    KT=3 (or the first KT asked for), so the compile count grows by ~6 per shape and arch."""
    sink: List[Variant] = []
    switch_kt = 3 if 3 in kts else kts[0]
    shapes = shapes or TARGET_SHAPES
    tf32 = torch.backends.cuda.matmul.allow_tf32
    with _recording(arch, sink):
        try:
            for dtype in dtypes:
                for allow_tf32 in ((False, True) if dtype == torch.float32 else (False,)):
                    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
                    for kt in kts:
                        for b, t, seq, c, ca in shapes.values():
                            meta = dict(device="meta", dtype=dtype)
                            x = torch.empty(b * t, seq, c, **meta)
                            wd, bd = torch.empty(ca, c, **meta), torch.empty(ca, **meta)
                            taps, bc = torch.empty(ca, kt, **meta), torch.empty(ca, **meta)
                            wu, bu = torch.empty(c, ca, **meta), torch.empty(c, **meta)
                            adapter_fwd.adapter_forward(x, t, 1, wd, bd, taps, bc, wu, bu)
                            _record_backward(x, t, wd, bd, taps, bc, wu, bu)
                            if kt == kts[0]:  # the pair has no KT of its own: one kt records it
                                _record_layernorm_pair(x, t, wd, bd, taps, bc, wu, bu)
                            # bf16 stands for fp16 (same tiles); fp32 (IEEE dots, half-width
                            # tiles) on the unaligned odd shape only, the register-hungriest path
                            if switches and kt == switch_kt and (
                                    dtype == torch.bfloat16 or (dtype == torch.float32 and not allow_tf32
                                                                and (b, t, seq, c, ca) == TARGET_SHAPES["odd"])):
                                _record_switches(x, t, wd, bd, taps, bc, wu, bu)
                            # norm and spatial paths: bf16 (fp16 shares its tiles, registers within a
                            # few) and IEEE fp32 on the odd shape (TF32 shares its tiles with fewer
                            # registers than the FMA dots; unaligned is the register-hungriest path):
                            # 620 variants to compile on A + odd otherwise, ~14 min on 2 cores
                            odd = (b, t, seq, c, ca) == TARGET_SHAPES["odd"]
                            primary = FULL_GRID or dtype == torch.bfloat16 or (
                                dtype == torch.float32 and not allow_tf32 and odd)
                            # (other KTs, the widest window with the stats: bf16 only)
                            if (primary and kt == switch_kt) or dtype == torch.bfloat16 or FULL_GRID:
                                _record_norm(x, t, wd, bd, taps, bc, wu, bu, switches and kt == switch_kt
                                             and dtype == torch.bfloat16, kt == kts[0])
                            if kt == switch_kt and primary:
                                # spatial (kt, 3, 3): the stencils' registers do not grow with the
                                # taps (a runtime loop), so one kernel size stands for all
                                _record_spatial(x, t, wd, bd, torch.empty(ca, kt, 3, 3, **meta), bc, wu, bu,
                                                switches and dtype == torch.bfloat16)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
    return list(dict.fromkeys(sink))


def _record_backward(x, t, wd, bd, taps, bc, wu, bu):
    # adapter_backward reduces partials with torch ops, which meta tensors support
    adapter_bwd.adapter_backward(x, x, t, 1, wd, bd, taps, bc, wu, bu)


def _record_switches(x, t, wd, bd, taps, bc, wu, bu):
    """The §9 switches the Triton kernels fuse, all at once (every new constexpr on): GELU after
    fc1, ReLU after the conv, a scale, DropPath -- forward and backward; then once more with
    prefix_mode="mlp" (its KT = 0 prefix launches and the (B*T*L, Ca) buffer layout)."""
    switches = dict(act_after_fc1="gelu", act_after_conv="relu", scale=torch.empty((), device="meta", dtype=x.dtype),
                    drop_draw=torch.empty(x.shape[0] // t, device="meta", dtype=torch.float32), drop_path=0.1)
    for prefix_mlp in (False, True):
        adapter_fwd.adapter_forward(x, t, 1, wd, bd, taps, bc, wu, bu, prefix_mlp=prefix_mlp, **switches)
        adapter_bwd.adapter_backward(x, x, t, 1, wd, bd, taps, bc, wu, bu, prefix_mlp=prefix_mlp, **switches)


def _record_norm(x, t, wd, bd, taps, bc, wu, bu, with_switches: bool, without_affine: bool):
    """norm="layernorm" forward and backward (NORM down-conv, the fold, the LN dgrad, the wgrad
    on z, the nine-segment finalize); with_switches: also with every §9 switch the kernels fuse,
    prefix_mode="mlp" among them; without_affine: also with norm_weight = norm_bias = None (the
    HAS_LNW / HAS_LNB = False paths)."""
    c = x.shape[-1]
    affine = (torch.empty(c, device="meta", dtype=x.dtype), torch.empty(c, device="meta", dtype=x.dtype))
    for lnw, lnb in [affine] + ([(None, None)] if without_affine else []):
        norm = dict(norm=(lnw, lnb, 1e-5))
        adapter_fwd.adapter_forward(x, t, 1, wd, bd, taps, bc, wu, bu, **norm)
        adapter_bwd.adapter_backward(x, x, t, 1, wd, bd, taps, bc, wu, bu, **norm)
    if with_switches:
        switches = dict(act_after_fc1="gelu", act_after_conv="relu",
                        scale=torch.empty((), device="meta", dtype=x.dtype),
                        drop_draw=torch.empty(x.shape[0] // t, device="meta", dtype=torch.float32), drop_path=0.1,
                        norm=(*affine, 1e-5))
        for prefix_mlp in (False, True):
            adapter_fwd.adapter_forward(x, t, 1, wd, bd, taps, bc, wu, bu, prefix_mlp=prefix_mlp, **switches)
            adapter_bwd.adapter_backward(x, x, t, 1, wd, bd, taps, bc, wu, bu, prefix_mlp=prefix_mlp, **switches)


def _record_spatial(x, t, wd, bd, taps, bc, wu, bu, switches: bool):
    """A spatial kernel's forward and backward (down-projection, stencils, dg launch), plain and,
    with switches, with every §9 switch the Triton path fuses (as _record_switches), then with
    prefix_mode="mlp" too (the stencils' PREFIX rows)."""
    adapter_fwd.adapter_forward(x, t, 1, wd, bd, taps, bc, wu, bu)
    adapter_bwd.adapter_backward(x, x, t, 1, wd, bd, taps, bc, wu, bu)
    if switches:
        kw = dict(act_after_fc1="gelu", act_after_conv="relu", scale=torch.empty((), device="meta", dtype=x.dtype),
                  drop_draw=torch.empty(x.shape[0] // t, device="meta", dtype=torch.float32), drop_path=0.1)
        c = x.shape[-1]
        affine = (torch.empty(c, device="meta", dtype=x.dtype), torch.empty(c, device="meta", dtype=x.dtype))
        # then MMAction2's switches with a LayerNorm before fc1 as well: every flag at once
        for prefix_mlp, norm in ((False, None), (True, None), (True, (*affine, 1e-5))):
            adapter_fwd.adapter_forward(x, t, 1, wd, bd, taps, bc, wu, bu, prefix_mlp=prefix_mlp, norm=norm, **kw)
            adapter_bwd.adapter_backward(x, x, t, 1, wd, bd, taps, bc, wu, bu, prefix_mlp=prefix_mlp, norm=norm, **kw)


def _record_layernorm_pair(x, t, wd, bd, taps, bc, wu, bu):
    """The adapter + LayerNorm pair, forward and backward, LayerNorm affine trained (the
    AFFINE_GRADS variant) and frozen."""
    c = x.shape[-1]
    lnw, lnb = torch.empty(c, device="meta", dtype=x.dtype), torch.empty(c, device="meta", dtype=x.dtype)
    adapter_layernorm.adapter_layernorm_forward(x, t, 1, wd, bd, taps, bc, wu, bu, lnw, lnb, 1e-5, x.dtype)
    stats = torch.empty(x.shape[:2], device="meta", dtype=torch.float32)
    for affine in (True, False):
        adapter_layernorm.adapter_layernorm_backward(x, x, x, t, 1, wd, bd, taps, bc, wu, bu, lnw, lnb, stats, stats,
                                                     affine_grads=affine)


@dataclasses.dataclass
class CompileReport:
    variant: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    smem_limit: int
    wgmma_serialized: bool
    uses_wgmma: bool
    ptxas_log: str

    @property
    def ok(self) -> bool:
        return self.spill_bytes == 0 and self.shared_bytes <= self.smem_limit and not self.wgmma_serialized


def ptxas_path(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (3.9 ships a newer one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except ImportError:
        from triton import knobs

        return knobs.nvidia.ptxas.path


def _compile_with_ptxas_log(src, target, options):
    """triton.compile, capturing the log of the ptxas run Triton itself makes (its own flags,
    e.g. --regAllocOptLevel=2 in 3.9, decide the register allocation we must judge)."""
    import contextlib
    import io

    knobs = getattr(triton, "knobs", None)
    nvidia = getattr(knobs, "nvidia", None)
    if nvidia is None or not hasattr(nvidia, "dump_ptxas_log"):
        return triton.compile(src, target=target, options=options.__dict__), ""
    old = nvidia.dump_ptxas_log
    nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        nvidia.dump_ptxas_log = old
    return compiled, buf.getvalue()


def _run_ptxas(ptx: str, arch: int) -> str:
    sm = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = os.path.join(tmp, "k.ptx")
        with open(ptx_file, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas_path(arch), "-v", f"-arch={sm}", ptx_file, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on sm_{arch}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout + proc.stderr


def compile_variant(variant: Variant, arch: int) -> CompileReport:
    from triton.backends.compiler import GPUTarget

    fn = _KERNELS[variant.kernel][1]
    signature = dict(variant.signature)
    constexprs = dict(variant.constexprs)
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in variant.divisible}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    launch_options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    if variant.maxnreg is not None:
        launch_options["maxnreg"] = variant.maxnreg
    options = backend.parse_options(launch_options)
    compiled, log = _compile_with_ptxas_log(src, target, options)
    if not log:  # a Triton without the log knob: run its ptxas on the PTX ourselves
        log = _run_ptxas(compiled.asm["ptx"], arch)
    ptx = compiled.asm["ptx"]
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)]
    return CompileReport(
        variant=variant.label(),
        arch=arch,
        registers=int(regs.group(1)) if regs else -1,
        spill_bytes=sum(spills),
        shared_bytes=int(compiled.metadata.shared),
        smem_limit=SMEM_LIMIT[arch],
        wgmma_serialized="serialized" in log,
        uses_wgmma="wgmma" in ptx,
        ptxas_log=log,
    )


def _compile_job(job):
    variant, arch = job
    return compile_variant(variant, arch)


def check_all(archs=(80, 90), jobs: int = 1, only: Optional[List[str]] = None, **kwargs) -> List[CompileReport]:
    """Compile every dispatch variant for every arch; `jobs` processes in parallel. only: just the
    variants whose label contains one of these strings (e.g. "NORM=True", a kernel's name)."""
    work = [(variant, arch) for arch in archs for variant in dispatch_variants(arch, **kwargs)
            if not only or any(o in variant.label() for o in only)]
    if jobs <= 1:
        return [_compile_job(w) for w in work]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile_job, work))


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="80 and/or 90 (default both)")
    parser.add_argument("--kt", type=int, action="append", help="temporal kernel sizes (default 1..9)")
    parser.add_argument("--dtype", action="append", choices=sorted(_TYPE.values()))
    parser.add_argument("--shapes", help="comma-separated names from TARGET_SHAPES (default all)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compile processes")
    parser.add_argument("--json", help="write the reports here")
    parser.add_argument("--only", action="append",
                        help="compile only variants whose label contains this (repeatable), e.g. NORM=True")
    parser.add_argument("--model", action="store_true",
                        help="the work model (docs/design.md §10): one row per launch of fwd and bwd")
    parser.add_argument("--layernorm", action="store_true",
                        help="with --model: also the adapter + LayerNorm pair's launches (shapes '<name>+LN')")
    parser.add_argument("--variants", help="with --model: comma-separated docs/design.md §9 variants of "
                        "work_model.VARIANTS (shapes '<name>+<tag>'), or 'all'")
    args = parser.parse_args(argv)
    if _common.INTERPRET:
        print("unset TRITON_INTERPRET: AOT compilation needs the real JIT", file=sys.stderr)
        return 2
    # a fresh cache: a cache hit would skip the ptxas run whose log we read
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="st-adapter-aot-")
    by_name = {v: k for k, v in _TYPE.items()}
    kwargs = {}
    if args.kt:
        kwargs["kts"] = tuple(args.kt)
    if args.dtype:
        kwargs["dtypes"] = tuple(by_name[d] for d in args.dtype)
    if args.shapes:
        kwargs["shapes"] = {name: TARGET_SHAPES[name] for name in args.shapes.split(",")}
    if args.model:
        return _main_model(args, kwargs)
    reports = check_all(tuple(args.arch or (80, 90)), jobs=args.jobs, only=args.only, **kwargs)
    for r in reports:
        flag = "ok  " if r.ok else "FAIL"
        print(f"{flag} sm_{r.arch} regs={r.registers:3d} spill={r.spill_bytes:5d}B smem={r.shared_bytes // 1024:3d}KB "
              f"wgmma={'y' if r.uses_wgmma else 'n'}{' SERIALIZED' if r.wgmma_serialized else ''} {r.variant}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
    return 0 if all(r.ok for r in reports) else 1


def _main_model(args, kwargs) -> int:
    from . import work_model

    if len(args.arch or ()) > 1 or len(kwargs.get("dtypes", (None,))) > 1 or len(kwargs.get("kts", ())) > 1:
        print("--model takes one --arch, one --dtype and at most one --kt", file=sys.stderr)
        return 2
    shapes = kwargs.get("shapes") or {k: TARGET_SHAPES[k] for k in ("A", "B", "C")}
    variants = tuple(work_model.VARIANTS) if args.variants == "all" else tuple(filter(None, (args.variants or "").split(",")))
    rows = work_model.model_rows(shapes, kwargs.get("dtypes", (torch.bfloat16,))[0], (args.arch or [90])[0],
                                 kwargs.get("kts", (3,))[0], layernorm=args.layernorm, variants=variants)
    # the CUDA backend's launches too (backend "cuda"; registers need nvcc)
    rows += work_model.cuda_model_rows(shapes, kwargs.get("dtypes", (torch.bfloat16,))[0], (args.arch or [90])[0],
                                       kwargs.get("kts", (3,))[0])
    print(work_model.format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [r.as_json() for r in rows], "summary": work_model.summary(rows),
                       "summary_cuda": work_model.summary(rows, "cuda")}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
