"""Benchmark machinery shared by the CLI (``python -m st_adapter_fast bench``) and the
pytest-benchmark suites in benchmarks/: shapes, providers, GPU timing, memory, roofline.

Providers are the ways to run one adapter:
  eager                 the reference (plain PyTorch, what the official module runs), cuDNN on
  eager-nocudnn         the same under torch.backends.cudnn.flags(enabled=False): the native
                        depthwise conv3d the official config meant to use (docs/design.md §1)
  compile               torch.compile(reference), default mode
  compile-max-autotune  torch.compile(reference, mode="max-autotune")
  triton, cuda          the fused backends of st_adapter()
Every provider computes the same out-of-place op: out = x, out[:, P:] += adapter(x[:, P:]).

GPU timing: each repetition is bracketed by CUDA events after flushing L2 (zeroing a 256 MB
buffer, as triton.testing.do_bench does) and queueing a short GPU sleep, so the CPU runs
ahead and the Python dispatch cost of the op is hidden: ``time_ms`` is device time. ``loop_ms``
is back-to-back launches with a warm L2, host overhead included -- what an eager loop feels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import st_adapter_fast
from st_adapter_fast.reference import reference

from .timing import time_fn, timing_budget  # noqa: F401  (re-exported: the bench API)

__all__ = [
    "OpShape", "TARGET_SHAPES", "TINY_SHAPES", "TINY_TARGETS", "PROVIDERS", "MODES", "parse_shapes", "sweep_shapes",
    "op_flops", "op_min_bytes", "measure_roofline", "provider_unavailable", "make_op_inputs",
    "make_step", "prepare_op", "op_row", "time_fn", "SavedTensorCounter", "measure_memory", "nvtx_range", "time_op",
]

MODES = ("fwd", "fwd+bwd")
PROVIDERS = ("eager", "eager-nocudnn", "compile", "compile-max-autotune", "triton", "cuda", "eager+ln", "triton+ln")
# "<provider>+ln": the adapter and the LayerNorm after it (st_adapter_layernorm; docs/design.md §7),
# x -> (out, normed) with CLIP's fp32-compute LayerNorm; eager+ln is the two run one after the other
LAYERNORM_SUFFIX = "+ln"
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune"}
# None: torch.compile's default backend (inductor). The verdict's CPU dry run sets "aot_eager",
# which traces the same graph without inductor's C++ codegen: 85 s -> a few s on 2 CPU cores.
# A backend other than inductor takes no mode, so both compile providers then run the same.
COMPILE_BACKEND = None
PROVIDER_ALIASES = {"reference": "eager", "reference-nocudnn": "eager-nocudnn"}
# CPU tensors reach the Triton kernels only through the interpreter: usable on tiny shapes.
INTERPRETER_MAX_TOKENS = 4096


# ------------------------------------------------------------------------------------ shapes
# docs/design.md §9 switch sets a benchmark shape can carry (OpShape.variant): the AIM /
# Side4Video-style pre-norm + GELU, and MMAction2's switches (its kernel is the shape's kh, kw)
VARIANT_SWITCHES = {
    "": {},
    "ln-gelu": dict(norm="layernorm", act_after_fc1="gelu"),
    "mmaction2": dict(act_after_conv="relu", prefix_mode="mlp", scale=True),
}


@dataclasses.dataclass(frozen=True)
class OpShape:
    """One adapter call: x (B*T, L, C) with L = P + H*W (H = W), adapter width Ca, kernel
    (kt, kh, kw), and a VARIANT_SWITCHES set ("" = the official switches)."""

    name: str
    B: int
    T: int
    L: int
    C: int
    Ca: int
    kt: int = 3
    P: int = 1
    kh: int = 1
    kw: int = 1
    variant: str = ""

    @property
    def kernel(self) -> Tuple[int, int, int]:
        return (self.kt, self.kh, self.kw)

    @property
    def switches(self) -> dict:
        """st_adapter's switch keywords of this shape's variant (scale: True = a scale param)."""
        return VARIANT_SWITCHES[self.variant]

    @property
    def grid(self) -> Tuple[int, int]:
        side = math.isqrt(self.spatial)
        return (side, side) if side * side == self.spatial else (1, self.spatial)

    @property
    def spatial(self) -> int:
        return self.L - self.P

    @property
    def tokens(self) -> int:  # N = B*T*S rows through the two GEMMs
        return self.B * self.T * self.spatial

    @property
    def x_numel(self) -> int:
        return self.B * self.T * self.L * self.C

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# docs/design.md §5: A = ViT-B/16 (12x384), B = ViT-L/14, C = long clip.
TARGET_SHAPES = {
    "A": OpShape("A", B=16, T=8, L=197, C=768, Ca=384),
    "B": OpShape("B", B=8, T=8, L=257, C=1024, Ca=512),
    "C": OpShape("C", B=4, T=32, L=197, C=768, Ca=384),
}
# Small enough for the CPU reference and the Triton interpreter; C, Ca not powers of two.
TINY_SHAPES = {"tiny": OpShape("tiny", B=2, T=4, L=17, C=48, Ca=24)}


def _variant_shapes(base: OpShape) -> Dict[str, OpShape]:
    """Issue 15's benchmark rows on a base shape: kernel (3, 3, 3) (MMAction2's), and the
    LayerNorm before fc1 with GELU after it; each fused against eager with cuDNN on and off."""
    out = {}
    for suffix, kw in (("k333", dict(kh=3, kw=3)), ("ln-gelu", dict(variant="ln-gelu"))):
        name = f"{base.name}-{suffix}"
        out[name] = dataclasses.replace(base, name=name, **kw)
    return out


VARIANT_SHAPES = _variant_shapes(TARGET_SHAPES["A"])
TINY_VARIANT_SHAPES = _variant_shapes(TINY_SHAPES["tiny"])
# Stand-ins for A, B, C where kernels run in the interpreter (the verdict's CPU dry run): the
# same roles (B wider with a longer sequence, C the longest clip), each a few seconds per pass.
TINY_TARGETS = {
    "A": TINY_SHAPES["tiny"],
    "B": OpShape("tiny-B", B=1, T=4, L=26, C=64, Ca=32),
    "C": OpShape("tiny-C", B=1, T=8, L=17, C=48, Ca=24),
}


def parse_shapes(spec: str) -> List[OpShape]:
    """'A,B,C' | 'tiny' | 'A-k333' ... | 'all' -> shapes. Unknown names raise ValueError listing
    the known ones."""
    known = {**TARGET_SHAPES, **TINY_SHAPES, **VARIANT_SHAPES, **TINY_VARIANT_SHAPES}
    names = list(TARGET_SHAPES) if spec.strip().lower() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ValueError(f"--shapes needs at least one of {sorted(known)}, got {spec!r}")
    out = []
    for name in names:
        key = name if name in known else name[:1].upper() + name[1:]
        if key not in known:
            raise ValueError(f"unknown shape {name!r}; expected a comma-separated list of {sorted(known)}")
        out.append(known[key])
    return out


def sweep_shapes(tiny: bool) -> Dict[str, List[OpShape]]:
    """T sweep at a constant B*T (the token count stays that of shape A, only the clip length
    changes) and token-count sweep over B at T = 8, both on shape A's widths."""
    if tiny:
        base = TINY_SHAPES["tiny"]
        frames = [1, 2, 4, 8]
        t_sweep = [dataclasses.replace(base, name=f"T{t}", B=max(1, 8 // t), T=t) for t in frames]
        n_sweep = [dataclasses.replace(base, name=f"B{b}", B=b) for b in (1, 2, 4)]
    else:
        base = TARGET_SHAPES["A"]
        t_sweep = [dataclasses.replace(base, name=f"T{t}", B=128 // t, T=t) for t in (1, 2, 4, 8, 16, 32)]
        n_sweep = [dataclasses.replace(base, name=f"B{b}", B=b) for b in (1, 2, 4, 8, 16, 32)]
    return {"sweep-T": t_sweep, "sweep-tokens": n_sweep}


# ---------------------------------------------------------------------------------- roofline
def op_flops(shape: OpShape, mode: str) -> int:
    """Minimum FLOPs: fwd = fc1 + conv + fc2 (2*N*C*Ca each GEMM, 2*N*Ca*kt the stencil);
    fwd+bwd adds dg = dy Wu, dWu, dWd, dx (four GEMMs) and the conv's two (docs/design.md §2).
    Recompute of h and g is not counted: the floor is the work no implementation can avoid."""
    n, c, ca, kt = shape.tokens, shape.C, shape.Ca, shape.kt * shape.kh * shape.kw
    gemm = 2 * n * c * ca
    conv = 2 * n * ca * kt
    if mode == "fwd":
        return 2 * gemm + conv
    return 6 * gemm + 3 * conv


def op_min_bytes(shape: OpShape, mode: str, elem_bytes: int = 2) -> int:
    """Unavoidable traffic: fwd reads x and the parameters and writes out; fwd+bwd also reads
    dO and x again and writes dx and fp32 parameter gradients."""
    x = shape.x_numel * elem_bytes
    c, ca, kt = shape.C, shape.Ca, shape.kt * shape.kh * shape.kw
    n_params = 2 * c * ca + ca * kt + 2 * ca + c
    if mode == "fwd":
        return 2 * x + n_params * elem_bytes
    return 5 * x + 2 * n_params * elem_bytes + n_params * 4


def roofline_floor_ms(flops: int, nbytes: int, roofline: dict) -> Tuple[float, str]:
    compute_ms = flops / (roofline["gemm_tflops"] * 1e12) * 1e3
    memory_ms = nbytes / (roofline["copy_gbps"] * 1e9) * 1e3
    return (compute_ms, "compute") if compute_ms >= memory_ms else (memory_ms, "memory")


def measure_roofline(device: str, quick: bool = False) -> dict:
    """The device's achievable GEMM rate and copy bandwidth (read + write counted), measured
    now rather than taken from a datasheet: clocks and memory vary between cards."""
    if device == "cuda":
        dtype, n, copy_bytes = torch.bfloat16, 8192, 1 << 30
    else:
        dtype, n, copy_bytes = torch.float32, 512 if quick else 1024, 1 << 26
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = time_fn(lambda: torch.mm(a, b), device, warmup_ms=50, rep_ms=200 if not quick else 60,
                   flush_l2=False, hide_host=False, loop=False)
    src = torch.empty(copy_bytes, device=device, dtype=torch.uint8).random_(0, 255)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, warmup_ms=20, rep_ms=100 if not quick else 40,
                   flush_l2=False, hide_host=False, loop=False)
    return {
        "gemm_tflops": 2 * n ** 3 / (gemm["time_ms"] * 1e-3) / 1e12,
        "gemm_dtype": str(dtype).replace("torch.", ""),
        "gemm_size": n,
        "copy_gbps": 2 * copy_bytes / (copy["time_ms"] * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "method": "median of CUDA-event-timed torch.mm (n^3) and Tensor.copy_ (bytes read + written)"
        if device == "cuda" else "median wall time on CPU (harness check, not a kernel roofline)",
    }


# ------------------------------------------------------------------------------- providers
def normalize_provider(name: str) -> str:
    name = PROVIDER_ALIASES.get(name.strip(), name.strip())
    if name not in PROVIDERS:
        raise ValueError(f"unknown backend {name!r}; expected some of {list(PROVIDERS)} (or 'reference')")
    return name


def pair_base(provider: str) -> Optional[str]:
    """The adapter provider of an "<provider>+ln" pair provider, None for the adapter alone."""
    return provider[: -len(LAYERNORM_SUFFIX)] if provider.endswith(LAYERNORM_SUFFIX) else None


def provider_unavailable(provider: str, shape: OpShape, device: str, dtype: torch.dtype, *,
                         layernorm: bool = False) -> Optional[str]:
    """None if this provider can run the shape on this device, else the reason (for the report).
    layernorm: asked for the "+ln" pair provider built on this one."""
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device"
    base = pair_base(provider)
    if base is not None:
        return provider_unavailable(base, shape, device, dtype, layernorm=True)
    if provider == "eager":
        return None
    if provider == "eager-nocudnn":
        return None if device == "cuda" else "cuDNN applies to CUDA tensors only"
    if provider in COMPILE_MODES:
        if not hasattr(torch, "compile"):
            return "torch.compile is missing from this torch"
        return None
    if device == "cpu" and provider == "triton" and shape.tokens * max(shape.C, shape.Ca) > INTERPRETER_MAX_TOKENS * 64:
        return "the Triton interpreter (CPU) runs only tiny shapes; kernel timings need a GPU"
    try:
        backend = st_adapter_fast.backends.get_backend(provider)
    except ValueError as err:
        return str(err)
    probe = torch.empty(0, device=device, dtype=dtype)
    variant = _variant_of(shape)
    return backend.reason(probe, shape.kernel, dtype, None if variant.official else variant, layernorm=layernorm)


def _variant_of(shape: OpShape):
    from ..variants import Variant

    sw = shape.switches
    return Variant(norm=sw.get("norm"), act_after_fc1=sw.get("act_after_fc1"), act_after_conv=sw.get("act_after_conv"),
                   prefix_mode=sw.get("prefix_mode", "skip"), scale=bool(sw.get("scale")))


def make_op_inputs(shape: OpShape, device: str, dtype: torch.dtype, requires_grad: bool, seed: int = 0) -> dict:
    """x, dO and random non-zero parameters (a fresh adapter is the identity: zero conv); a
    variant's trained extras follow the six official ones: norm weight, bias; scale (0-dim)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    c, ca, kt, kh, kw = shape.C, shape.Ca, shape.kt, shape.kh, shape.kw

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    x = rnd(shape.B * shape.T, shape.L, c)
    params = [
        rnd(ca, c, scale=c ** -0.5), rnd(ca, scale=0.1), rnd(ca, 1, kt, kh, kw, scale=(kt * kh * kw) ** -0.5),
        rnd(ca, scale=0.1), rnd(c, ca, scale=ca ** -0.5), rnd(c, scale=0.1),
    ]
    if shape.switches.get("norm"):
        params += [1 + rnd(c, scale=0.1), rnd(c, scale=0.1)]
    if shape.switches.get("scale"):
        params.append(rnd((), scale=0.5))
    for t in [x, *params]:
        t.requires_grad_(requires_grad)
    return {"x": x, "params": params, "grad_out": rnd(*x.shape)}


def _switch_kwargs(shape: OpShape, extras: Sequence[torch.Tensor]) -> dict:
    """st_adapter / reference keywords of the shape's variant, its extra params (make_op_inputs)
    in place of the True flags."""
    kw = dict(shape.switches)
    extras = list(extras)
    if kw.get("norm"):
        kw["norm_weight"], kw["norm_bias"] = extras.pop(0), extras.pop(0)
    if kw.get("scale"):
        kw["scale"] = extras.pop(0)
    if shape.kh != 1 or shape.kw != 1:
        kw["grid_size"] = shape.grid
    return kw


def _reference_fn(shape: OpShape):
    def adapter(x, w1, b1, wc, bc, w2, b2, *extras):
        return reference(x, shape.T, w1, b1, wc, bc, w2, b2, num_prefix_tokens=shape.P,
                         **_switch_kwargs(shape, extras))

    return adapter


def _pair_fn(base: str, shape: OpShape) -> Callable:
    from ..adapter_layernorm import st_adapter_layernorm

    affine: dict = {}

    def pair(x, w1, b1, wc, bc, w2, b2):
        if not affine:  # a frozen backbone's LayerNorm: affine in x's dtype, no gradient
            gen = torch.Generator().manual_seed(1)
            affine["w"] = (1 + 0.1 * torch.randn(shape.C, generator=gen)).to(x.device, x.dtype)
            affine["b"] = (0.1 * torch.randn(shape.C, generator=gen)).to(x.device, x.dtype)
        return st_adapter_layernorm(x, shape.T, w1, b1, wc, bc, w2, b2, affine["w"], affine["b"], normed_dtype=x.dtype,
                                    num_prefix_tokens=shape.P, backend="reference" if base == "eager" else base)

    pair.frozen_params = affine  # the LayerNorm's weights exist anyway: measure_memory excludes them
    return pair


def backward_outputs(out, grad_out: torch.Tensor) -> None:
    """out.backward(grad_out); a pair provider's (out, normed) get grad_out each, in one pass."""
    if isinstance(out, tuple):
        torch.autograd.backward(list(out), [grad_out.to(t.dtype) for t in out])
    else:
        out.backward(grad_out)


def make_op_callable(provider: str, shape: OpShape) -> Callable:
    """(x, *params) -> out for this provider ((out, normed) for a "+ln" pair provider). Compiled
    providers get a fresh compile cache, so every (shape, mode) pays -- and reports -- its own
    compile time, and the recompile limit of a shared code object can never silently fall back
    to eager."""
    if pair_base(provider) is not None:
        return _pair_fn(pair_base(provider), shape)
    if provider in ("eager", "eager-nocudnn"):
        return _reference_fn(shape)
    if provider in COMPILE_MODES:
        torch._dynamo.reset()
        if COMPILE_BACKEND is not None:
            return torch.compile(_reference_fn(shape), backend=COMPILE_BACKEND, dynamic=False, fullgraph=True)
        mode = COMPILE_MODES[provider]
        return torch.compile(_reference_fn(shape), mode=mode, dynamic=False, fullgraph=True)

    def fused(x, w1, b1, wc, bc, w2, b2, *extras):
        return st_adapter_fast.st_adapter(x, shape.T, w1, b1, wc, bc, w2, b2, num_prefix_tokens=shape.P,
                                          backend=provider, **_switch_kwargs(shape, extras))

    return fused


def provider_context(provider: str):
    """cuDNN off around forward AND backward for eager-nocudnn."""
    if provider == "eager-nocudnn":
        return torch.backends.cudnn.flags(enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def nvtx_range(name: str, device: str):
    """An NVTX range around a measured call, so `ncu --nvtx --nvtx-include "<name>/"` profiles
    exactly that provider's kernels (see benchmarks/README.md)."""
    if device == "cuda":
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield


def make_step(provider: str, shape: OpShape, mode: str, inputs: dict, device: str):
    """(step, reset): step() runs one fwd or fwd+bwd; reset() clears grads between repetitions."""
    fn = make_op_callable(provider, shape)
    x, params, grad_out = inputs["x"], inputs["params"], inputs["grad_out"]
    label = f"{provider}.{mode}.{shape.name}"
    leaves = [x, *params]
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    uses_cudagraphs = provider == "compile-max-autotune" and device == "cuda"

    def step():
        with nvtx_range(label, device), provider_context(provider):
            out = fn(x, *params)
            if mode == "fwd+bwd":
                backward_outputs(out, grad_out)
        return out

    def reset():
        for t in leaves:
            t.grad = None
        if uses_cudagraphs and mark_step is not None:
            mark_step()

    return step, reset


# ------------------------------------------------------------------------------------ timing
# time_fn and timing_budget live in bench/timing.py (imported above, re-exported here)


def prepare_op(provider: str, shape: OpShape, mode: str, device: str, dtype: torch.dtype):
    """(step, reset, first_call_s): inputs built, first call done (torch.compile, Triton JIT and
    autotuning happen there -- timed separately, never mixed into the kernel time)."""
    inputs = make_op_inputs(shape, device, dtype, requires_grad=(mode == "fwd+bwd"))
    step, reset = make_step(provider, shape, mode, inputs, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    reset()
    step()
    sync()
    return step, reset, time.perf_counter() - t0


def op_row(suite: str, shape: OpShape, provider: str, mode: str, dtype: torch.dtype) -> dict:
    """The identifying fields of one op-level result row (the bench CLI's and the verdict's)."""
    return {"suite": suite, "shape_name": shape.name, "shape": shape.as_dict(), "provider": provider,
            "mode": mode, "flops": op_flops(shape, mode), "min_bytes": op_min_bytes(shape, mode, torch.finfo(dtype).bits // 8)}


def time_op(provider: str, shape: OpShape, mode: str, device: str, dtype: torch.dtype, quick: bool,
            timing: Optional[dict] = None) -> dict:
    """Time one (provider, shape, mode): first call (compile) separately, then time_fn with
    `timing` (time_fn's keyword arguments) or else timing_budget(device, quick)."""
    step, reset, first_call_s = prepare_op(provider, shape, mode, device, dtype)
    stats = time_fn(step, device, setup=reset, **(timing if timing is not None else timing_budget(device, quick)))
    stats["first_call_s"] = first_call_s
    if provider in COMPILE_MODES:
        stats["compile_s"] = first_call_s
    del step, reset
    _release(device)
    return stats


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ memory
class SavedTensorCounter:
    """saved_tensors_hooks that add up the bytes autograd keeps for backward: each storage
    counted once (so x saved as several views counts as one x), parameters excluded (they
    exist anyway). Tensors pass through unchanged."""

    def __init__(self, exclude: Sequence[torch.Tensor] = ()):
        self._exclude = {self._key(t) for t in exclude if t is not None}
        self._seen: Dict[tuple, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        try:
            return (str(t.device), t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses)
            return (str(t.device), id(t))

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        try:
            return t.untyped_storage().nbytes()
        except (RuntimeError, NotImplementedError):
            return t.numel() * t.element_size()

    def _pack(self, t):
        key = self._key(t)
        if key not in self._exclude:
            self._seen[key] = max(self._seen.get(key, 0), self._nbytes(t))
        return t

    def contains(self, t: torch.Tensor) -> bool:
        return self._key(t) in self._seen

    @property
    def saved_bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def measure_memory(provider: str, shape: OpShape, device: str, dtype: torch.dtype) -> dict:
    """Bytes saved for backward (any device) and, on CUDA, memory held after the forward
    (output + saved) and the peak over fwd+bwd, both above what x, dO and the parameters
    already take."""
    inputs = make_op_inputs(shape, device, dtype, requires_grad=True)
    x, params, grad_out = inputs["x"], inputs["params"], inputs["grad_out"]
    fn = make_op_callable(provider, shape)
    outputs = 2 if pair_base(provider) is not None else 1  # a pair returns out and normed
    result = {"x_bytes": x.numel() * x.element_size(), "output_bytes": outputs * x.numel() * x.element_size()}

    with provider_context(provider):  # warm-up: JIT and compile allocate caches once
        backward_outputs(fn(x, *params), grad_out)
    for t in [x, *params]:
        t.grad = None
    _release(device)

    try:
        frozen = list(getattr(fn, "frozen_params", {}).values())
        with provider_context(provider), SavedTensorCounter(exclude=[*params, *frozen]) as counter:
            out = fn(x, *params)
        result["saved_bytes"] = counter.saved_bytes
        result["saves_x"] = counter.contains(x)
        result["saved_beyond_x_bytes"] = counter.saved_bytes - (result["x_bytes"] if result["saves_x"] else 0)
        del out
    except Exception as err:  # torch.compile may refuse hooks it cannot trace
        result["saved_bytes"] = None
        result["saved_reason"] = f"saved_tensors_hooks failed: {type(err).__name__}: {str(err)[:200]}"
    for t in [x, *params]:
        t.grad = None
    _release(device)

    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with provider_context(provider):
            out = fn(x, *params)
            torch.cuda.synchronize()
            result["fwd_held_bytes"] = torch.cuda.memory_allocated() - base
            backward_outputs(out, grad_out)
        torch.cuda.synchronize()
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        del out
    else:
        result["fwd_held_bytes"] = None
        result["peak_bytes"] = None
        result["peak_reason"] = "peak memory needs the CUDA caching allocator"
    del inputs, x, params, grad_out, fn
    _release(device)
    return result


def dtype_for(device: str, name: Optional[str] = None) -> torch.dtype:
    """bf16 on GPU (docs/design.md §5); fp32 on CPU, where bf16 GEMMs are emulated and slow."""
    if name:
        table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                 "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
        if name not in table:
            raise ValueError(f"--dtype must be one of {sorted(table)}, got {name!r}")
        return table[name]
    return torch.bfloat16 if device == "cuda" else torch.float32


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def is_finite_positive(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0
