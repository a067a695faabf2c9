"""Whole-model parity: ``verify_model(model, example_input)``.

Runs a user's model once with the adapters' fused backend and once with every adapter switched to
the reference, and reports per-adapter and end-to-end differences under the rule of
st_adapter_fast.parity.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from .parity import format_error, json_finite

__all__ = ["verify_model", "ModelParityResult", "AdapterDiff"]


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
    def passed(self) -> bool:
        return self.local.passed


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

    def failures(self) -> List[str]:
        out = [f"adapter {a.name}: {a.local.describe()}" for a in self.adapters if not a.passed]
        out += [t.describe() for t in self.outputs + self.grads if not t.passed]
        return out

    def to_dict(self) -> dict:
        return json_finite({
            "passed": self.passed, "compute_dtype": self.compute_dtype, "upcast": self.upcast,
            "fused_checked": self.fused_checked,
            "adapters": [{**{k: v for k, v in dataclasses.asdict(a).items() if k != "local"},
                          "local": dataclasses.asdict(a.local), "passed": a.passed} for a in self.adapters],
            "outputs": [dataclasses.asdict(t) for t in self.outputs],
            "grads": [dataclasses.asdict(t) for t in self.grads],
            "notes": list(self.notes),
        })

    def __str__(self) -> str:
        ran = sorted({a.ran for a in self.adapters})
        lines = [
            f"verify_model {'PASSED' if self.passed else 'FAILED'}: {len(self.adapters)} adapters, fused run "
            f"used {'/'.join(ran)}; compute dtype {self.compute_dtype}; "
            + ("rule: err vs a float64 copy <= ratio * eager err + floor (per adapter: also <= backstop)" if self.upcast
               else "rule: backstop only (no float64 run), err = fused vs reference run"),
        ]
        table = [("adapter", "backend", "calls", "dtype", "err", "rel", "eager err", "bound",
                  "propagated", "prop rel", "status")]
        for a in self.adapters:
            table.append((a.name, f"{a.backend}->{a.ran}", str(a.calls), a.compute_dtype, format_error(a.local.err),
                          format_error(a.local.rel_err), format_error(a.local.eager_err), format_error(a.local.bound),
                          format_error(a.propagated_err), format_error(a.propagated_rel), "PASS" if a.passed else "FAIL"))
        lines.append("per adapter (err: fused vs reference on the same input; propagated: fused run vs "
                     "reference run at this adapter):")
        lines += _columns(table)
        rows = [("tensor", "err", "rel", "eager err", "eager rel", "bound", "status")]
        shown = list(self.outputs)
        grads = sorted(self.grads, key=lambda t: (t.passed, -(t.err / t.bound if t.bound > 0 else math.inf * (t.err > 0))))
        limit = 40
        shown += grads[:limit]
        for t in shown:
            rows.append((t.name, format_error(t.err), format_error(t.rel_err), format_error(t.eager_err), format_error(t.eager_rel_err),
                         format_error(t.bound), "PASS" if t.passed else "FAIL"))
        lines.append("end to end (outputs, then gradients, worst first):")
        lines += _columns(rows)
        if len(grads) > limit:
            lines.append(f"... {len(grads) - limit} more gradients, all within their bounds")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _columns(rows: List[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]


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


def _compute_dtype(adapter, x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return adapter.fc1.weight.dtype


def _adapter_params(adapter) -> list:
    return [adapter.fc1.weight, adapter.fc1.bias, adapter.conv.weight, adapter.conv.bias,
            adapter.fc2.weight, adapter.fc2.bias]


def _adapter_call(adapter, args, kwargs) -> Tuple[torch.Tensor, int]:
    """(x, num_frames) of a call ``adapter(x, num_frames)`` / ``adapter(x, num_frames=T)``."""
    x = args[0] if args else kwargs["x"]
    num_frames = args[1] if len(args) > 1 else kwargs["num_frames"]
    return x, num_frames


def _call_reference(adapter, x: torch.Tensor, num_frames: int, dtype: Optional[torch.dtype] = None):
    """The reference on this adapter's call, in the current autocast state, or fully in dtype."""
    from .ops import st_adapter

    params = _adapter_params(adapter)
    autocast = contextlib.nullcontext()
    if dtype is not None:
        x = x.to(dtype)
        params = [p.to(dtype) if p is not None else None for p in params]
        autocast = torch.autocast(x.device.type, enabled=False)
    with torch.no_grad(), autocast:
        return st_adapter(x, num_frames, *params, num_prefix_tokens=adapter.num_prefix_tokens,
                          grid_size=adapter.grid_size, inplace=False, backend="reference")


_NARROWNESS = {torch.float64: 0, torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


def verify_model(
    model: torch.nn.Module,
    example_input,
    *,
    backend: Optional[str] = None,
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
        backend: backend of every adapter in the fused run (default: each adapter's own setting;
            note "auto" on CPU tensors resolves to the reference, which checks nothing fused).
        forward_kwargs: keyword arguments for ``model``.
        grads: also compare the gradients of the floating inputs and of every parameter that
            requires grad, for a fixed random cotangent on each floating output.
        autocast_dtype: run every forward under torch.autocast(device, autocast_dtype).
        train: False (default) runs in eval mode -- no dropout, BatchNorm on its running
            statistics -- so the runs are deterministic and as well-conditioned as the model
            allows (BatchNorm over a tiny batch in train mode amplifies rounding by orders of
            magnitude, in every run alike). True runs in train mode, None keeps the model's
            modes; every run is seeded with ``seed`` so dropout draws alike.
        upcast: also run a float64 copy (copy.deepcopy, adapters on the reference) and judge
            every tensor under THE rule of st_adapter_fast.parity: the fused run's error against
            float64 may be at most ~2x the reference run's error plus a floor. False (or a model
            that cannot run in float64) judges fused vs reference by the dtype's backstop alone.
        seed: seeds the RNG of each run and the cotangents.

    The model's state is left as found: adapter backends, training modes, buffers (e.g.
    BatchNorm statistics), parameters' .grad and requires_grad, and the global RNG state.

    Returns:
        ModelParityResult (``passed``; ``print(result)`` shows the tables).
    """
    from . import backends as _backends
    from . import parity
    from .module import STAdapter
    from .ops import resolve_backend

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    adapters = [(name or "<model>", m) for name, m in model.named_modules() if isinstance(m, STAdapter)]
    if not adapters:
        raise ValueError("verify_model: the model holds no st_adapter_fast.STAdapter (searched "
                         "model.modules()); add or inject adapters first")
    if backend is not None:
        known = ["auto", *_backends.available_backends()]
        if not isinstance(backend, str) or backend not in known:
            raise ValueError(f"verify_model: unknown backend {backend!r}; expected one of {known}")
    if autocast_dtype is not None and autocast_dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"autocast_dtype must be torch.float16 or torch.bfloat16, got {autocast_dtype}")
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    kwargs = dict(forward_kwargs or {})
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    device = tensors[0].device if tensors else next(model.parameters()).device
    notes: List[str] = []

    # ---- state to restore
    saved_backends = [(m, m.backend) for _, m in adapters]
    saved_training = [(m, m.training) for m in model.modules()]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    saved_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    saved_grads = [(p, p.grad) for p in model.parameters()]
    hooks = []
    fused_backends = {name: (backend if backend is not None else m.backend) for name, m in adapters}

    named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad] if grads else []

    def inputs_for(dtype: Optional[torch.dtype]):
        def prep(t):
            if not t.is_floating_point():
                return t
            t = t.detach().to(dtype=dtype or t.dtype, copy=True)
            return t.requires_grad_(grads)
        return tuple(_map_tensors(a, prep) for a in args), {
            k: _map_tensors(v, (lambda t: t.to(dtype) if (dtype and t.is_floating_point()) else t)) for k, v in kwargs.items()}

    cotangents: Dict[str, torch.Tensor] = {}

    def forward_and_grads(net, params, dtype=None, use_autocast=True):
        """(outputs by name, grads by name) of one seeded run, detached."""
        torch.manual_seed(seed)
        run_args, run_kwargs = inputs_for(dtype)
        ctx = (torch.autocast(device.type, dtype=autocast_dtype) if (autocast_dtype and use_autocast)
               else contextlib.nullcontext())
        with ctx:
            out = net(*run_args, **run_kwargs)
        outs = _flatten(out)
        result_out = {name: t.detach() for name, t in outs}
        result_grads: Dict[str, torch.Tensor] = {}
        if grads:
            diff_outs = [(n, t) for n, t in outs if t.requires_grad]
            wrt = [(f"grad input[{i}]", a) for i, a in enumerate(run_args)
                   if isinstance(a, torch.Tensor) and a.requires_grad]
            wrt += [(f"grad {n}", p) for n, p in params]
            if diff_outs and wrt:
                cots = []
                for n, t in diff_outs:
                    if n not in cotangents:
                        gen = torch.Generator().manual_seed(seed + 1 + len(cotangents))
                        cotangents[n] = torch.randn(t.shape, generator=gen, dtype=torch.float64)
                    cots.append(cotangents[n].to(device=t.device, dtype=t.dtype))
                got = torch.autograd.grad([t for _, t in diff_outs], [w for _, w in wrt], cots,
                                          allow_unused=True)
                for (n, w), g in zip(wrt, got):
                    result_grads[n] = torch.zeros_like(w) if g is None else g.detach()
        return result_out, result_grads

    rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            if train is not None:
                model.train(train)
            if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.training and m.p > 0
                   for m in model.modules()):
                notes.append("dropout is active (train mode): every run is seeded alike; pass train=False "
                             "if the float64 copy draws different masks")

            # ---- float64 copy on the reference: the yardstick of THE rule
            out64 = grads64 = None
            if upcast:
                try:
                    model64 = copy.deepcopy(model).to(torch.float64)
                    for m in model64.modules():
                        if isinstance(m, STAdapter):
                            m.backend = "reference"
                    params64 = dict(model64.named_parameters())
                    out64, grads64 = forward_and_grads(
                        model64, [(n, params64[n]) for n, _ in named_params], torch.float64, use_autocast=False)
                    del model64
                except Exception as err:  # noqa: BLE001 -- fall back to the backstop, and say so
                    out64 = grads64 = None
                    notes.append(f"float64 copy failed ({type(err).__name__}: {err}); judged by the backstop only")

            # ---- reference run in the model's own dtype, recording each adapter's outputs
            ref_outputs: Dict[Tuple[str, int], torch.Tensor] = {}
            call_count: Dict[str, int] = {}

            def record_hook(name):
                def hook(module, hook_args, hook_kwargs, output):
                    i = call_count.get(name, 0)
                    call_count[name] = i + 1
                    ref_outputs[(name, i)] = output.detach().clone()
                return hook

            for name, m in adapters:
                m.backend = "reference"
                hooks.append(m.register_forward_hook(record_hook(name), with_kwargs=True))
            ref_out, ref_grads = forward_and_grads(model, named_params)
            for h in hooks:
                h.remove()
            hooks.clear()
            for p, b in saved_buffers:  # undo e.g. BatchNorm statistics updates before the next run
                with torch.no_grad():
                    p.copy_(b)

            # ---- fused run, checking each adapter against the reference on its own input
            local: Dict[str, Any] = {}
            info: Dict[str, dict] = {name: {"calls": 0, "ran": set(), "dtype": set(), "prop": 0.0, "prop_rel": 0.0}
                                     for name, _ in adapters}
            pending: Dict[str, list] = {}

            def pre_hook(name):
                def hook(module, hook_args, hook_kwargs):
                    x, num_frames = _adapter_call(module, hook_args, hook_kwargs)
                    saved_x = x.detach().clone() if module.inplace else x.detach()
                    pending.setdefault(name, []).append((saved_x, num_frames))
                return hook

            def post_hook(name):
                def hook(module, hook_args, hook_kwargs, output):
                    x, num_frames = pending[name].pop()
                    rec = info[name]
                    i = rec["calls"]
                    rec["calls"] += 1
                    dtype = _compute_dtype(module, x)
                    rec["dtype"].add(dtype)
                    try:
                        rec["ran"].add(resolve_backend(module.backend, x, module.kernel_size, dtype))
                    except Exception:  # noqa: BLE001 -- the forward itself already succeeded
                        rec["ran"].add(module.backend)
                    out = output.detach()
                    eager = _call_reference(module, x, num_frames)
                    want = _call_reference(module, x, num_frames, torch.float64) if upcast else eager
                    (err,) = parity.compare({"out": out}, {"out": want}, {"out": eager} if upcast else None, dtype)
                    err.name = "out" if i == 0 else f"out (call {i})"
                    prev = local.get(name)
                    ratio = lambda e: e.err / e.bound if e.bound > 0 else (math.inf if e.err > 0 else 0.0)
                    if prev is None or ratio(err) > ratio(prev):
                        local[name] = err
                    ref = ref_outputs.get((name, i))
                    if ref is not None and ref.shape == out.shape:
                        prop = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
                        scale = ref.double().abs().max().item() if out.numel() else 0.0
                        rec["prop"] = max(rec["prop"], prop)
                        rec["prop_rel"] = max(rec["prop_rel"], prop / scale if scale > 0 else 0.0)
                return hook

            for name, m in adapters:
                m.backend = fused_backends[name]
                hooks.append(m.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
                hooks.append(m.register_forward_hook(post_hook(name), with_kwargs=True))
            fused_out, fused_grads = forward_and_grads(model, named_params)
    finally:
        for h in hooks:
            h.remove()
        for m, b in saved_backends:
            m.backend = b
        for m, mode in saved_training:
            m.training = mode
        with torch.no_grad():
            for b, value in saved_buffers:
                b.copy_(value)
        for p, flag in saved_requires_grad:
            p.requires_grad_(flag)
        for p, g in saved_grads:
            p.grad = g

    # ---- verdicts
    adapter_diffs = []
    dtypes_seen = set()
    for name, m in adapters:
        rec = info[name]
        if rec["calls"] == 0:
            notes.append(f"adapter {name} was not called by the model's forward")
            continue
        dtypes_seen |= rec["dtype"]
        adapter_diffs.append(AdapterDiff(
            name=name, backend=fused_backends[name], ran="/".join(sorted(rec["ran"])), calls=rec["calls"],
            compute_dtype="/".join(sorted(str(d).replace("torch.", "") for d in rec["dtype"])),
            local=local[name], propagated_err=rec["prop"], propagated_rel=rec["prop_rel"],
        ))
    if autocast_dtype is not None:
        dtypes_seen.add(autocast_dtype)
    dtypes_seen |= {t.dtype for t in fused_out.values()}
    judge = max(dtypes_seen or {torch.float32}, key=lambda d: _NARROWNESS.get(d, 1))
    judge = judge if judge in parity.TOLERANCES else torch.float32
    fused_checked = any(a.ran != "reference" for a in adapter_diffs)
    if not fused_checked:
        notes.append("every adapter ran the reference in the 'fused' run (backend='auto' on CPU tensors "
                     "resolves to the reference): nothing fused was checked; pass backend='triton' "
                     "(CPU needs TRITON_INTERPRET=1 before import) or run on a GPU")
    upcast_used = upcast and out64 is not None

    def judge_all(got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], r64: Optional[Dict[str, torch.Tensor]]):
        names = [n for n in ref if n in got]
        if r64 is not None:
            names = [n for n in names if n in r64]
            want = {n: r64[n].to(got[n].device) for n in names}
            # no backstop end to end: eager's own error may exceed it in a deep or cancelling graph
            return parity.compare({n: got[n] for n in names}, want, {n: ref[n] for n in names}, judge,
                                  backstop=False)
        return parity.compare({n: got[n] for n in names}, {n: ref[n].double() for n in names}, None, judge)

    outputs = judge_all(fused_out, ref_out, out64 if upcast_used else None)
    grad_errors = judge_all(fused_grads, ref_grads, grads64 if upcast_used else None) if grads else []
    if grads and not grad_errors:
        notes.append("no gradients compared: no floating output requires grad, or nothing to differentiate")
    passed = all(a.passed for a in adapter_diffs) and all(t.passed for t in outputs + grad_errors)
    return ModelParityResult(
        passed=passed, compute_dtype=str(judge).replace("torch.", ""), upcast=upcast_used,
        fused_checked=fused_checked, adapters=adapter_diffs, outputs=outputs, grads=grad_errors, notes=notes,
    )
