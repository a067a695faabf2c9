"""Whole-model parity: ``verify_model(model, example_input)``.

Runs a user's model with the adapters' fused backend and again with every adapter on the
reference, and reports per-adapter and end-to-end differences under st_adapter_fast.parity's rule.
In the order of a check: the model's state (``preserved_state`` puts back what the check touches,
also after an exception; ``perturb_adapters`` first gives the adapters seeded random weights,
since a fresh adapter's zero conv makes fc1's gradients exactly zero in every backend); the runs
(a float64 copy, the reference run, the fused run whose hooks check each adapter call); the
comparison. An adapter whose "fused" run resolved to the reference checked nothing: never a pass.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import backends as _backends
from . import parity
from .module import STAdapter
from .ops import resolve_backend, st_adapter
from .parity import format_error, json_finite

__all__ = ["verify_model", "ModelParityResult", "AdapterDiff", "preserved_state", "perturb_adapters"]

WEIGHTS = ("perturbed", "as_is")


# ------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class AdapterDiff:
    """One STAdapter of the model, checked in the fused run.

    ``local``: the adapter's fused output against the reference on the SAME input (the input the
    adapter saw in the fused run), under THE rule against float64 -- isolates this adapter.
    ``propagated_*``: its output in the fused run against its output in the reference run, which
    also carries the differences of every earlier layer (information, not a pass criterion).
    """

    name: str
    backend: str  # the adapter's backend setting in the fused run
    ran: str  # what that resolved to (e.g. "triton", or "reference" for auto on CPU)
    calls: int
    compute_dtype: str
    local: Any  # parity.TensorError of the worst call
    propagated_err: float
    propagated_rel: float

    @property
    def fused(self) -> bool:
        """Every call ran a fused backend (a reference run checks nothing)."""
        return "reference" not in self.ran.split("/")

    @property
    def passed(self) -> bool:
        return self.fused and self.local.passed


@dataclasses.dataclass
class ModelParityResult:
    """What verify_model found; ``str(result)`` is a readable table, ``passed`` the verdict."""

    passed: bool
    compute_dtype: str  # the dtype whose tolerance row judged the end-to-end tensors
    upcast: bool  # True: judged under THE rule against a float64 copy; False: backstop only
    fused_checked: bool  # False when every adapter resolved to the reference in the fused run
    adapters: List[AdapterDiff]
    outputs: List[Any]  # parity.TensorError per floating output tensor
    grads: List[Any]  # parity.TensorError per gradient (inputs and parameters requiring grad)
    notes: List[str]
    weights: str = "perturbed"  # "perturbed": seeded random adapter weights; "as_is": the model's

    def failures(self) -> List[str]:
        out = [f"adapter {a.name}: ran the reference ({a.backend}), so nothing fused was checked"
                for a in self.adapters if not a.fused]
        out += [f"adapter {a.name}: {a.local.describe()}" for a in self.adapters if a.fused and not a.local.passed]
        out += [t.describe() for t in self.outputs + self.grads if not t.passed]
        return out

    def to_dict(self) -> dict:
        return json_finite({
            "passed": self.passed, "compute_dtype": self.compute_dtype, "upcast": self.upcast,
            "fused_checked": self.fused_checked, "weights": self.weights,
            "adapters": [{**{k: v for k, v in dataclasses.asdict(a).items() if k != "local"},
                          "local": dataclasses.asdict(a.local), "fused": a.fused, "passed": a.passed}
                         for a in self.adapters],
            "outputs": [dataclasses.asdict(t) for t in self.outputs],
            "grads": [dataclasses.asdict(t) for t in self.grads],
            "notes": list(self.notes),
        })

    def _headline(self) -> str:
        ran = sorted({a.ran for a in self.adapters})
        verdict = "PASSED" if self.passed else "FAILED"
        if not self.fused_checked:
            verdict += " (nothing fused was checked)"
        rule = ("rule: err vs a float64 copy <= ratio * eager err + floor (per adapter: also <= backstop)"
                if self.upcast else "rule: backstop only (no float64 run), err = fused vs reference run")
        return (f"verify_model {verdict}: {len(self.adapters)} adapters, {self.weights} adapter weights, "
                f"fused run used {'/'.join(ran)}; compute dtype {self.compute_dtype}; {rule}")

    def __str__(self) -> str:
        lines = [self._headline(), "per adapter (err: fused vs reference on the same input; propagated: "
                                   "fused run vs reference run at this adapter):"]
        lines += _columns([("adapter", "backend", "calls", "dtype", "err", "rel", "eager err", "bound",
                            "propagated", "prop rel", "status")] + [_adapter_row(a) for a in self.adapters])
        limit = 40
        grads = sorted(self.grads, key=lambda t: (t.passed, -_bound_ratio(t)))
        lines.append("end to end (outputs, then gradients, worst first):")
        lines += _columns([("tensor", "err", "rel", "eager err", "eager rel", "bound", "status")]
                          + [_tensor_row(t) for t in list(self.outputs) + grads[:limit]])
        if len(grads) > limit:
            lines.append(f"... {len(grads) - limit} more gradients, all within their bounds")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _bound_ratio(t) -> float:
    """err / bound; an error above a zero bound is infinitely far out."""
    return t.err / t.bound if t.bound > 0 else (math.inf if t.err > 0 else 0.0)


def _adapter_row(a: AdapterDiff) -> Tuple[str, ...]:
    status = "PASS" if a.passed else ("FAIL" if a.fused else "NOT FUSED")
    return (a.name, f"{a.backend}->{a.ran}", str(a.calls), a.compute_dtype, format_error(a.local.err),
            format_error(a.local.rel_err), format_error(a.local.eager_err), format_error(a.local.bound),
            format_error(a.propagated_err), format_error(a.propagated_rel), status)


def _tensor_row(t) -> Tuple[str, ...]:
    return (t.name, format_error(t.err), format_error(t.rel_err), format_error(t.eager_err),
            format_error(t.eager_rel_err), format_error(t.bound), "PASS" if t.passed else "FAIL")


def _columns(rows: List[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


# ------------------------------------------------------------------------------ model state
class _Snapshot:
    """What verify_model may change; ``restore()`` puts it back bitwise. Parameter values are kept
    for the adapters only (perturb_adapters writes no others): no second copy of a ViT-L's 300M."""

    def __init__(self, model: nn.Module):
        adapters = [m for m in model.modules() if isinstance(m, STAdapter)]
        self.backends = [(m, m.backend) for m in adapters]
        self.training = [(m, m.training) for m in model.modules()]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.adapter_values = [(p, p.detach().clone()) for m in adapters for p in m.parameters()]
        self.requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self.grads = [(p, p.grad) for p in model.parameters()]

    def reset_buffers(self) -> None:
        """Undo buffer updates (e.g. BatchNorm statistics of a train-mode run) between runs."""
        with torch.no_grad():
            for b, value in self.buffers:
                b.copy_(value)

    def restore(self) -> None:
        for m, backend in self.backends:
            m.backend = backend
        for m, mode in self.training:
            m.training = mode
        self.reset_buffers()
        with torch.no_grad():
            for p, value in self.adapter_values:
                p.copy_(value)
        for (p, flag), (_, g) in zip(self.requires_grad, self.grads):
            p.requires_grad_(flag)
            p.grad = g


def _cuda_devices(model: nn.Module, device: Optional[torch.device]) -> List[int]:
    devices = [t.device for t in [*model.parameters(), *model.buffers()]] + ([device] if device is not None else [])
    return sorted({torch.cuda.current_device() if d.index is None else d.index for d in devices if d.type == "cuda"})


@contextlib.contextmanager
def preserved_state(model: nn.Module, device: Optional[torch.device] = None) -> Iterator[_Snapshot]:
    """Restore the model's state on exit, also when the body raises: bitwise, the adapters'
    parameter values and backends, every module's train/eval mode, all buffers, requires_grad and
    .grad (the same tensors), and the RNG states (CPU; CUDA devices of the model and ``device``).
    Yields the snapshot, whose ``reset_buffers()`` undoes buffer updates between runs."""
    snapshot = _Snapshot(model)
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model, device)):
            yield snapshot
    finally:
        snapshot.restore()


# Each adapter adds about 0.1x its input's RMS (0.097 measured at C=768, Ca=384): fc1/fc2 weights
# ~ N(0, 1/fan_in) keep the RMS, the conv's 0.1/sqrt(taps) scales it by 0.1. The residual stream
# grows ~1% in variance per adapter (ViT-B/16's 24: ~1.3x), far from fp16's range.
_CONV_GAIN = 0.1
_BIAS_STD = 0.02


def perturb_adapters(adapters: Sequence[nn.Module], seed: int = 0) -> None:
    """Overwrite every adapter parameter in place with seeded random non-zero values: fc1/fc2
    weights ~ N(0, 1/fan_in), conv.weight ~ N(0, 0.1^2 / (kt*kh*kw)), biases ~ N(0, 0.02^2).
    Drawn on the CPU from torch.Generator(seed), so they do not depend on the device. Use inside
    ``preserved_state`` to get the model's own weights back."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters:
            taps = math.prod(adapter.conv.weight.shape[2:])
            stds = {"fc1.weight": adapter.fc1.in_features ** -0.5, "fc2.weight": adapter.fc2.in_features ** -0.5,
                    "conv.weight": _CONV_GAIN * taps ** -0.5}
            for name, p in adapter.named_parameters():
                value = torch.randn(p.shape, generator=gen, dtype=torch.float64) * stds.get(name, _BIAS_STD)
                p.copy_(value.to(dtype=p.dtype))


# ------------------------------------------------------------------------------------- runs
def _flatten(obj, prefix: str = "output") -> List[Tuple[str, torch.Tensor]]:
    """Floating tensors of a model output (tensor, tuple/list, dict, dataclass-like), named."""
    if isinstance(obj, torch.Tensor):
        return [(prefix, obj)] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}[{k!r}]")]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in _flatten(v, f"{prefix}[{i}]")]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [kv for f in dataclasses.fields(obj) for kv in _flatten(getattr(obj, f.name), f"{prefix}.{f.name}")]
    return []


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        items = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


Named = Dict[str, torch.Tensor]


@dataclasses.dataclass
class _Run:
    outputs: Named  # floating outputs by name, detached
    grads: Named  # by "grad input[i]" / "grad <parameter name>", detached


@dataclasses.dataclass
class _Runner:
    """How every run calls the model: fresh leaf copies of the same inputs, the same seed, the
    same autocast, and one fixed random float64 cotangent per floating output."""

    args: tuple
    kwargs: dict
    device: torch.device
    grads: bool
    autocast_dtype: Optional[torch.dtype]
    seed: int
    cotangents: Named = dataclasses.field(default_factory=dict)

    def inputs(self, dtype: Optional[torch.dtype]) -> Tuple[tuple, dict]:
        def prep(t):
            if not t.is_floating_point():
                return t
            return t.detach().to(dtype=dtype or t.dtype, copy=True).requires_grad_(self.grads)

        def cast(t):
            return t.to(dtype) if (dtype and t.is_floating_point()) else t

        args = tuple(_map_tensors(a, prep) for a in self.args)
        return args, {k: _map_tensors(v, cast) for k, v in self.kwargs.items()}

    def run(self, net: nn.Module, params: List[Tuple[str, torch.Tensor]], dtype: Optional[torch.dtype] = None,
            use_autocast: bool = True) -> _Run:
        """One seeded run: outputs and gradients for the fixed cotangents."""
        torch.manual_seed(self.seed)
        args, kwargs = self.inputs(dtype)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if (self.autocast_dtype and use_autocast) else contextlib.nullcontext())
        with autocast:
            outs = _flatten(net(*args, **kwargs))
        wrt = [(f"grad input[{i}]", a) for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
        wrt += [(f"grad {n}", p) for n, p in params]
        return _Run({name: t.detach() for name, t in outs}, self._gradients(outs, wrt) if self.grads else {})

    def _gradients(self, outs: List[Tuple[str, torch.Tensor]], wrt: List[Tuple[str, torch.Tensor]]) -> Named:
        diff_outs, cots = [(n, t) for n, t in outs if t.requires_grad], []
        if not diff_outs or not wrt:
            return {}
        for n, t in diff_outs:
            if n not in self.cotangents:
                gen = torch.Generator().manual_seed(self.seed + 1 + len(self.cotangents))
                self.cotangents[n] = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            cots.append(self.cotangents[n].to(device=t.device, dtype=t.dtype))
        got = torch.autograd.grad([t for _, t in diff_outs], [w for _, w in wrt], cots, allow_unused=True)
        return {n: torch.zeros_like(w) if g is None else g.detach() for (n, w), g in zip(wrt, got)}


def _float64_run(model: nn.Module, runner: _Runner, param_names: List[str], notes: List[str]) -> Optional[_Run]:
    """The yardstick of THE rule: a float64 deep copy with every adapter on the reference;
    None, with a note, when the model cannot run in float64."""
    try:
        model64 = copy.deepcopy(model).to(torch.float64)
        for m in model64.modules():
            if isinstance(m, STAdapter):
                m.backend = "reference"
        params64 = dict(model64.named_parameters())
        return runner.run(model64, [(n, params64[n]) for n in param_names], torch.float64, use_autocast=False)
    except Exception as err:  # noqa: BLE001 -- fall back to the backstop, and say so
        notes.append(f"float64 copy failed ({type(err).__name__}: {err}); judged by the backstop only")
        return None


def _reference_run(adapters: List[Tuple[str, nn.Module]], model: nn.Module, runner: _Runner,
                   params: List[Tuple[str, torch.Tensor]]) -> Tuple[_Run, Dict[Tuple[str, int], torch.Tensor]]:
    """Every adapter on the reference, in the model's own dtype: the run, and the output of each
    adapter call by (adapter name, call index)."""
    calls: Dict[Tuple[str, int], torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def record(name):
        def hook(module, hook_args, hook_kwargs, output):
            counts[name] = counts.get(name, 0) + 1
            calls[(name, counts[name] - 1)] = output.detach().clone()
        return hook

    hooks = []
    try:
        for name, m in adapters:
            m.backend = "reference"
            hooks.append(m.register_forward_hook(record(name), with_kwargs=True))
        run = runner.run(model, params)
    finally:
        for h in hooks:
            h.remove()
    return run, calls


@dataclasses.dataclass
class _AdapterRecord:
    calls: int = 0
    ran: set = dataclasses.field(default_factory=set)
    dtypes: set = dataclasses.field(default_factory=set)
    worst: Any = None  # parity.TensorError of the call farthest out of (or nearest to) its bound
    propagated: float = 0.0
    propagated_rel: float = 0.0


def _call_reference(adapter, x: torch.Tensor, num_frames: int, dtype: Optional[torch.dtype] = None):
    """The reference on this adapter's call, in the current autocast state, or fully in dtype."""
    params = [adapter.fc1.weight, adapter.fc1.bias, adapter.conv.weight, adapter.conv.bias,
              adapter.fc2.weight, adapter.fc2.bias]
    autocast = contextlib.nullcontext()
    if dtype is not None:
        x = x.to(dtype)
        params = [p.to(dtype) if p is not None else None for p in params]
        autocast = torch.autocast(x.device.type, enabled=False)
    with torch.no_grad(), autocast:
        return st_adapter(x, num_frames, *params, num_prefix_tokens=adapter.num_prefix_tokens,
                          grid_size=adapter.grid_size, inplace=False, backend="reference")


class _AdapterChecks:
    """Hooks of the fused run: the pre-hook keeps each adapter call's input, the post-hook checks
    the call's output against the reference on that same input (against float64 under THE rule
    when ``upcast``) and against the reference run's output of the same call (propagated)."""

    def __init__(self, adapters: List[Tuple[str, nn.Module]], ref_calls: Dict[Tuple[str, int], torch.Tensor],
                 upcast: bool):
        self.adapters = adapters
        self.ref_calls = ref_calls
        self.upcast = upcast
        self.records = {name: _AdapterRecord() for name, _ in adapters}
        self._pending: Dict[str, list] = {}

    def attach(self) -> list:
        return [hook for name, m in self.adapters for hook in (
            m.register_forward_pre_hook(self._before(name), with_kwargs=True),
            m.register_forward_hook(self._after(name), with_kwargs=True))]

    def _before(self, name):
        def hook(module, args, kwargs):
            x = (args[0] if args else kwargs["x"]).detach()
            num_frames = args[1] if len(args) > 1 else kwargs["num_frames"]
            # an in-place adapter overwrites x: keep a copy of what it read
            self._pending.setdefault(name, []).append((x.clone() if module.inplace else x, num_frames))
        return hook

    def _after(self, name):
        def hook(module, args, kwargs, output):
            x, num_frames = self._pending[name].pop()
            self.check(name, module, x, num_frames, output.detach())
        return hook

    def check(self, name: str, module, x: torch.Tensor, num_frames: int, out: torch.Tensor) -> None:
        rec = self.records[name]
        call = rec.calls
        rec.calls += 1
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else module.fc1.weight.dtype
        rec.dtypes.add(dtype)
        try:
            rec.ran.add(resolve_backend(module.backend, x, module.kernel_size, dtype))
        except Exception:  # noqa: BLE001 -- the forward itself already succeeded
            rec.ran.add(module.backend)
        eager = _call_reference(module, x, num_frames)
        want = _call_reference(module, x, num_frames, torch.float64) if self.upcast else eager
        (err,) = parity.compare({"out": out}, {"out": want}, {"out": eager} if self.upcast else None, dtype)
        err.name = "out" if call == 0 else f"out (call {call})"
        if rec.worst is None or _bound_ratio(err) > _bound_ratio(rec.worst):
            rec.worst = err
        ref = self.ref_calls.get((name, call))
        if ref is not None and ref.shape == out.shape and out.numel():
            prop = (out.double() - ref.double()).abs().max().item()
            scale = ref.double().abs().max().item()
            rec.propagated = max(rec.propagated, prop)
            rec.propagated_rel = max(rec.propagated_rel, prop / scale if scale > 0 else 0.0)


def _fused_run(checks: _AdapterChecks, backends: Dict[str, str], model: nn.Module, runner: _Runner,
               params: List[Tuple[str, torch.Tensor]]) -> _Run:
    hooks = []
    try:
        for name, m in checks.adapters:
            m.backend = backends[name]
        hooks = checks.attach()
        return runner.run(model, params)
    finally:
        for h in hooks:
            h.remove()


# ------------------------------------------------------------------------------- comparison
_NARROWNESS = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def _adapter_diffs(checks: _AdapterChecks, backends: Dict[str, str], notes: List[str]) -> List[AdapterDiff]:
    diffs = []
    for name, _ in checks.adapters:
        rec = checks.records[name]
        if rec.calls == 0:
            notes.append(f"adapter {name} was not called by the model's forward")
            continue
        diffs.append(AdapterDiff(
            name=name, backend=backends[name], ran="/".join(sorted(rec.ran)), calls=rec.calls,
            compute_dtype="/".join(sorted(str(d).replace("torch.", "") for d in rec.dtypes)),
            local=rec.worst, propagated_err=rec.propagated, propagated_rel=rec.propagated_rel,
        ))
    return diffs


def _judge_dtype(checks: _AdapterChecks, autocast_dtype: Optional[torch.dtype], outputs: Named) -> torch.dtype:
    """The narrowest dtype the fused run computed in: its tolerance row judges end to end."""
    seen = {d for rec in checks.records.values() for d in rec.dtypes} | {t.dtype for t in outputs.values()}
    if autocast_dtype is not None:
        seen.add(autocast_dtype)
    judge = max(seen or {torch.float32}, key=lambda d: _NARROWNESS.get(d, 1))
    return judge if judge in parity.TOLERANCES else torch.float32


def _compare_runs(got: Named, ref: Named, ref64: Optional[Named], judge: torch.dtype) -> list:
    """THE rule against the float64 copy when there is one (no backstop end to end: eager's own
    error may exceed it in a deep or cancelling graph), else fused vs reference by the backstop."""
    names = [n for n in ref if n in got and (ref64 is None or n in ref64)]
    if ref64 is not None:
        want = {n: ref64[n].to(got[n].device) for n in names}
        return parity.compare({n: got[n] for n in names}, want, {n: ref[n] for n in names}, judge, backstop=False)
    return parity.compare({n: got[n] for n in names}, {n: ref[n].double() for n in names}, None, judge)


def _not_fused_notes(diffs: List[AdapterDiff]) -> List[str]:
    unfused = [a.name for a in diffs if not a.fused]
    if not unfused:
        return []
    if len(unfused) == len(diffs):
        which = "every adapter"
    else:
        which = f"{len(unfused)} of {len(diffs)} adapters ({', '.join(unfused[:4])}{', ...' * (len(unfused) > 4)})"
    return [f"nothing fused was checked for {which}: the 'fused' run resolved to the reference "
            f"(backend 'auto' on CPU tensors, or a case no fused backend covers), and the reference "
            f"against itself is no check. Pass backend='triton' (CPU tensors need TRITON_INTERPRET=1) "
            f"or run on a GPU"]


# ------------------------------------------------------------------------------ entry point
def _check_arguments(model, backend, weights, autocast_dtype) -> List[Tuple[str, nn.Module]]:
    """The model's adapters, named; raises for bad arguments."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapters = [(name or "<model>", m) for name, m in model.named_modules() if isinstance(m, STAdapter)]
    if not adapters:
        raise ValueError("verify_model: the model holds no st_adapter_fast.STAdapter (searched "
                         "model.modules()); add or inject adapters first")
    if backend is not None:
        known = ["auto", *_backends.available_backends()]
        if not isinstance(backend, str) or backend not in known:
            raise ValueError(f"verify_model: unknown backend {backend!r}; expected one of {known}")
        if backend == "reference":
            raise ValueError("verify_model: backend='reference' would compare the reference with itself and "
                             "check nothing fused; pass a fused backend ('triton', 'cuda'), 'auto' on CUDA "
                             "tensors, or None for each adapter's own setting")
    if weights not in WEIGHTS:
        raise ValueError(f"verify_model: weights must be one of {WEIGHTS}, got {weights!r}")
    if autocast_dtype is not None and autocast_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"autocast_dtype must be torch.float16 or torch.bfloat16, got {autocast_dtype}")
    return adapters


def verify_model(
    model: nn.Module,
    example_input,
    *,
    backend: Optional[str] = None,
    weights: str = "perturbed",
    forward_kwargs: Optional[Dict[str, Any]] = None,
    grads: bool = True,
    autocast_dtype: Optional[torch.dtype] = None,
    train: Optional[bool] = False,
    upcast: bool = True,
    seed: int = 0,
) -> ModelParityResult:
    """Run ``model`` with its STAdapters' fused backend and again with every adapter on the
    reference, on the same weights and input; report per-adapter and end-to-end differences.

    Args:
        model: any nn.Module holding st_adapter_fast.STAdapter modules (found via model.modules()).
        example_input: a tensor, or a tuple/list of positional arguments for ``model``.
        backend: backend of every adapter in the fused run (default: each adapter's own setting).
            An adapter whose fused run resolves to the reference ("auto" on CPU tensors, a case no
            fused backend covers) checked nothing: the result fails and says so. "reference"
            raises ValueError.
        weights: "perturbed" (default) checks with seeded random non-zero adapter weights
            (perturb_adapters; the model's own are restored exactly afterwards), so every
            gradient path is exercised even on a freshly injected model, whose zero conv makes
            fc1's gradients exactly zero in every backend; "as_is" checks the model's weights.
        forward_kwargs: keyword arguments for ``model``.
        grads: also compare the gradients of the floating inputs and of every parameter that
            requires grad, for a fixed random cotangent on each floating output.
        autocast_dtype: run every forward under torch.autocast(device, autocast_dtype).
        train: False (default) runs in eval mode (no dropout; BatchNorm on running statistics:
            over a tiny batch, train mode amplifies rounding by orders of magnitude in every run
            alike). True runs in train mode, None keeps the model's modes; every run is seeded
            with ``seed`` so dropout draws alike.
        upcast: also run a float64 copy (copy.deepcopy, adapters on the reference) and judge
            every tensor under THE rule of st_adapter_fast.parity: the fused run's error against
            float64 may be at most ~2x the reference run's error plus a floor. False (or a model
            that cannot run in float64) judges fused vs reference by the dtype's backstop alone.
        seed: seeds the perturbed weights, the RNG of each run and the cotangents.

    The model's state is left as found, also when a run raises (preserved_state). Returns a
    ModelParityResult (``passed``; ``print(result)`` shows the tables).
    """
    adapters = _check_arguments(model, backend, weights, autocast_dtype)
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device if tensors else next(model.parameters()).device
    runner = _Runner(args, dict(forward_kwargs or {}), device, grads, autocast_dtype, seed)
    backends = {name: (backend if backend is not None else m.backend) for name, m in adapters}
    notes: List[str] = []
    with preserved_state(model, device) as snapshot:
        if train is not None:
            model.train(train)
        if weights == "perturbed":
            perturb_adapters([m for _, m in adapters], seed)
        if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0 for m in model.modules()):
            notes.append("dropout is active (train mode): every run is seeded alike; pass train=False "
                         "if the float64 copy draws different masks")
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if grads else []
        run64 = _float64_run(model, runner, [n for n, _ in params], notes) if upcast else None
        ref, ref_calls = _reference_run(adapters, model, runner, params)
        snapshot.reset_buffers()
        checks = _AdapterChecks(adapters, ref_calls, upcast)
        fused = _fused_run(checks, backends, model, runner, params)
    return _verdict(checks, backends, notes, autocast_dtype, weights, grads, fused, ref, run64)


def _verdict(checks: _AdapterChecks, backends: Dict[str, str], notes: List[str], autocast_dtype: Optional[torch.dtype],
             weights: str, grads: bool, fused: _Run, ref: _Run, run64: Optional[_Run]) -> ModelParityResult:
    """Judge the per-adapter checks and the fused run's outputs and gradients end to end."""
    diffs = _adapter_diffs(checks, backends, notes)
    fused_checked = any(a.fused for a in diffs)
    notes += _not_fused_notes(diffs)
    judge = _judge_dtype(checks, autocast_dtype, fused.outputs)
    outputs = _compare_runs(fused.outputs, ref.outputs, run64 and run64.outputs, judge)
    grad_errors = _compare_runs(fused.grads, ref.grads, run64 and run64.grads, judge) if grads else []
    if grads and not grad_errors:
        notes.append("no gradients compared: no floating output requires grad, or nothing to differentiate")
    passed = fused_checked and all(a.passed for a in diffs) and all(t.passed for t in outputs + grad_errors)
    return ModelParityResult(
        passed=passed, compute_dtype=str(judge).replace("torch.", ""), upcast=run64 is not None,
        fused_checked=fused_checked, adapters=diffs, outputs=outputs, grads=grad_errors, notes=notes, weights=weights,
    )
