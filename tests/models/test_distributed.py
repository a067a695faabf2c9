"""Adapters under torch.distributed: DDP and FSDP2 (fully_shard) on 2 CPU ranks with gloo.

Each rank trains a tiny CLIP video model (st_adapter_fast.models.clip_vit + inject_st_adapters +
VideoClassifier: frozen backbone, trainable ST-Adapters and head) on its half of a global batch; the result must match single-process training on the whole batch: same
all-reduced gradients on both ranks, same loss, same parameters after N SGD steps (fp32
tolerance), frozen parameters untouched and without gradients. Ranks are started with
torch.multiprocessing (spawn) and talk over 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from helpers import TOLERANCES, requires_interpreter, triton_interpreter_on
from tiny_clip import (
    build_model, frozen_state, is_block, make_batch, strip_wrapper_prefix, trainable_grads,
    trainable_state,
)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")

WORLD_SIZE = 2
LOCAL_BATCH = 2
LR = 0.5  # large enough that N steps move every adapter parameter visibly
SPAWN_TIMEOUT_S = 240


# ----------------------------------------------------------------------------------- ranks
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    if wrapper == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    if wrapper == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # one FSDP group per residual block (frozen and trainable parameters mixed), then the rest
        for block in [m for m in model.modules() if is_block(m)]:
            fully_shard(block)
        return fully_shard(model)
    raise ValueError(f"wrapper must be 'ddp' or 'fsdp', got {wrapper!r}")


def train(model: torch.nn.Module, steps: int, rank: int, world_size: int):
    """SGD with momentum on the global batches of `steps` seeds; this rank takes its slice.
    Returns (per-step losses, gradients after the first backward)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR, momentum=0.9)
    losses, first_grads = [], None
    for step in range(steps):
        video, labels = make_batch(LOCAL_BATCH * WORLD_SIZE, seed=1000 + step)
        per_rank = video.shape[0] // world_size
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = F.cross_entropy(model(video[mine]), labels[mine])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if first_grads is None:
            first_grads = trainable_grads(model)
        opt.step()
        losses.append(loss.detach().clone())
    return torch.stack(losses), first_grads


def _train_one(rank: int, wrapper: str, backend: str, steps: int) -> dict:
    model = build_model(backend)
    frozen_before = frozen_state(model)
    wrapped = _wrap(model, wrapper)
    losses, first_grads = train(wrapped, steps, rank, WORLD_SIZE)
    frozen_grads = [n for n, p in wrapped.named_parameters() if not p.requires_grad and p.grad is not None]
    return {
        "losses": losses,
        "first_grads": strip_wrapper_prefix(first_grads),
        "params": strip_wrapper_prefix(trainable_state(wrapped)),
        "frozen_before": frozen_before,
        "frozen_after": strip_wrapper_prefix(frozen_state(wrapped)),
        "frozen_with_grad": frozen_grads,
    }


def _rank_main(rank: int, port: int, runs: list, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, never the host's NIC
    torch.set_num_threads(1)  # two ranks share the CI machine's two cores
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=SPAWN_TIMEOUT_S),
    )
    try:
        # all runs in one process group: starting ranks (spawn re-imports torch) is the slow part
        results = {run: _train_one(rank, *run) for run in runs}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(runs: list, out_dir: Path) -> list:
    """Start WORLD_SIZE ranks that do each (wrapper, backend, steps) run in turn; wait (bounded:
    a hung collective must not hang CI); returns each rank's {run: result}."""
    ctx = mp.start_processes(
        _rank_main, args=(_free_port(), runs, str(out_dir)),
        nprocs=WORLD_SIZE, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException with the rank's traceback
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"ranks did not finish {runs} within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


# --------------------------------------------------------------------------------- checks
def assert_close_fp32(got: dict, want: dict, what: str) -> None:
    """fp32 training-state comparison with the fp32 backstop of tests/helpers.py (relative to the
    largest |value| of each tensor): only reduction order differs between the runs."""
    assert got.keys() == want.keys(), f"{what}: names differ: {sorted(got)} vs {sorted(want)}"
    rel = TOLERANCES[torch.float32].backstop
    failures = []
    for name, w in want.items():
        err = (got[name] - w).abs().max().item()
        bound = rel * w.abs().max().item()
        if not err <= bound:
            failures.append(f"{name}: max err {err:.3e} > {bound:.3e}")
    assert not failures, f"{what}:\n  " + "\n  ".join(failures)


@functools.lru_cache(maxsize=None)
def single_process(backend: str, steps: int):
    model = build_model(backend)
    losses, first_grads = train(model, steps, rank=0, world_size=1)
    return losses, first_grads, trainable_state(model)


def local_only_grads(backend: str) -> dict:
    """Rank 0's gradient WITHOUT the all-reduce: proves the ranks' batches differ, so matching the
    global gradient really needs the reduction."""
    model = build_model(backend)
    video, labels = make_batch(LOCAL_BATCH * WORLD_SIZE, seed=1000)
    F.cross_entropy(model(video[:LOCAL_BATCH]), labels[:LOCAL_BATCH]).backward()
    return trainable_grads(model)


def check_against_single_process(ranks: list, backend: str, steps: int) -> None:
    want_losses, want_grads, want_params = single_process(backend, steps)
    trainable = set(want_params)
    # the official recipe: adapters and the classification head train, the backbone is frozen
    assert trainable and all(".adapter_pre_" in n or n.startswith("fc.") for n in trainable), sorted(trainable)
    assert sum(".adapter_pre_" in n for n in trainable) == 6 * 3, sorted(trainable)

    for r, res in enumerate(ranks):
        assert set(res["params"]) == trainable, f"rank {r} trains {sorted(res['params'])}"
        assert not res["frozen_with_grad"], f"rank {r}: frozen params got grads: {res['frozen_with_grad']}"
        for name, before in res["frozen_before"].items():
            assert torch.equal(res["frozen_after"][name], before), f"rank {r}: frozen {name} changed"
    # all-reduced: both ranks hold bit-identical gradients and parameters
    for key in ("first_grads", "params"):
        for name, t in ranks[0][key].items():
            assert torch.equal(t, ranks[1][key][name]), f"{key}[{name}] differs between ranks"

    mean_loss = torch.stack([res["losses"] for res in ranks]).mean(0)
    assert torch.allclose(mean_loss, want_losses, rtol=1e-5, atol=1e-6), (mean_loss, want_losses)
    assert_close_fp32(ranks[0]["first_grads"], want_grads, "all-reduced grads vs single process")
    assert_close_fp32(ranks[0]["params"], want_params, f"params after {steps} steps vs single process")

    # the test is not vacuous: local grads are far from the global ones, params moved
    local = local_only_grads(backend)
    rel = TOLERANCES[torch.float32].backstop
    far = [n for n in want_grads if (local[n] - want_grads[n]).abs().max() > 100 * rel * want_grads[n].abs().max()]
    assert len(far) == len(want_grads), f"rank-local grads already match the global ones for {set(want_grads) - set(far)}"
    initial = trainable_state(build_model(backend))
    for name, p in want_params.items():
        assert not torch.allclose(p, initial[name], rtol=1e-3, atol=1e-4), f"{name} did not move"


# ---------------------------------------------------------------------------------- tests
REFERENCE_STEPS = 3
TRITON_STEPS = 2  # the interpreter is slow: two steps still check momentum and the all-reduce


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    runs = [("ddp", "reference", REFERENCE_STEPS), ("fsdp", "reference", REFERENCE_STEPS)]
    if triton_interpreter_on():
        runs.append(("ddp", "triton", TRITON_STEPS))
    ranks = run_two_ranks(runs, tmp_path_factory.mktemp("ranks"))
    return {run: [rank[run] for rank in ranks] for run in runs}


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_two_ranks_match_single_process_reference_backend(wrapper, two_rank_results):
    check_against_single_process(two_rank_results[(wrapper, "reference", REFERENCE_STEPS)], "reference", REFERENCE_STEPS)


@requires_interpreter
def test_ddp_two_ranks_match_single_process_triton_backend(two_rank_results):
    """The fused custom op (Triton interpreter) under DDP: its parameter grads flow into DDP's
    gradient buckets like any autograd leaf's."""
    check_against_single_process(two_rank_results[("ddp", "triton", TRITON_STEPS)], "triton", TRITON_STEPS)


def test_example_train_ddp_runs_under_torchrun(tmp_path):
    """examples/train_ddp.py as documented, on 2 CPU ranks (gloo), with block checkpointing."""
    script = Path(__file__).resolve().parents[2] / "examples" / "train_ddp.py"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD_SIZE}",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        str(script), "--arch", "tiny", "--steps", "2", "--batch-size", "2", "--frames", "4",
        "--activation-checkpointing", "--save", str(tmp_path / "adapters.pt"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SPAWN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("loss") == 2, proc.stdout
    saved = torch.load(tmp_path / "adapters.pt")["model"]
    assert saved and all(".adapter_pre_mlp." in k or k.startswith("fc.") for k in saved), sorted(saved)
    assert any(k.startswith("fc.") for k in saved) and any(".adapter_pre_mlp." in k for k in saved)
