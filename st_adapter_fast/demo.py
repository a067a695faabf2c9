"""``python -m st_adapter_fast train-demo``: ST-Adapters learn temporal order where frame
averaging cannot.

Task: a square slides left or right across T frames of noise; the label is the direction. A
clip reversed in time is a clip of the other class with the same frames, and every batch holds
each clip and its reverse -- so any model that averages per-frame features (a frozen image
backbone + mean over frames + linear head) gives both the same logits and stays at chance
(loss >= ln 2, accuracy 50%), however long it trains. ST-Adapters (depthwise temporal conv
inside the blocks) let the same frozen backbone see motion, and learn the task.

Three runs on CPU in a few minutes (a 3-block, width-48 CLIP-style ViT, random init, frozen, on
8 frames of 32x32; ~10 s per 150 steps on an idle 2-core machine, the fused run ~10-30 s a step):
  (a) frozen backbone, no adapters, head only            -> loss stays at ln 2, accuracy 50%
  (b) the same frozen backbone + ST-Adapters (reference)  -> learns (100% by ~step 80)
  (c) (b) with the fused Triton backend for the first --fused-steps steps, same data and init
      -> the same loss curve (on CPU the kernels run in the Triton interpreter, which is slow,
         hence the short run)
Writes curves.json and curves.png (matplotlib, if installed) to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

__all__ = ["DemoConfig", "moving_square_clips", "build_model", "train", "evaluate", "run_demo", "main"]


@dataclasses.dataclass
class DemoConfig:
    frames: int = 8
    image_size: int = 32
    patch_size: int = 8
    width: int = 48
    layers: int = 3
    heads: int = 3
    adapter_channels: int = 24
    positions: Sequence[str] = ("pre_attn", "pre_mlp")
    batch_size: int = 16  # 8 clips + the same 8 played backwards
    lr: float = 5e-3
    steps: int = 150
    # the interpreter takes ~10-30 s per step on CPU; on CUDA the fused run is as long as (b)
    fused_steps: int = 3
    eval_clips: int = 512
    seed: int = 0
    device: str = "cpu"


def moving_square_clips(batch: int, frames: int, size: int, generator) -> "tuple":
    """(clips (B, 3, T, size, size) float32, labels (B,) int64): label 0 = moving right, 1 = left.

    Speed 1-3 px/frame over noise. The second half of the batch is the first half played
    backwards with the other label (a reversed right-mover IS a left-mover), so a model that
    averages over frames gives both halves the same logits and its loss on every batch is at
    least ln 2 -- chance, exactly, not just on average.
    """
    import torch

    if batch < 2 or batch % 2:
        raise ValueError(f"batch must be even and >= 2 (clips come in time-reversed pairs), got {batch}")
    clips, labels = _forward_clips(batch // 2, frames, size, generator)
    return torch.cat([clips, clips.flip(2)]), torch.cat([labels, 1 - labels])


def _forward_clips(batch: int, frames: int, size: int, generator):
    import torch

    square = max(size // 5, 2)
    if size - square - 3 * (frames - 1) < 0:
        raise ValueError(f"a {square}px square moving up to 3 px/frame for {frames} frames needs frames of "
                         f">= {square + 3 * (frames - 1)} px, got {size}")
    labels = torch.randint(0, 2, (batch,), generator=generator)
    speed = torch.randint(1, 4, (batch,), generator=generator)
    travel = speed * (frames - 1)
    # leftmost position of the trajectory, uniform over where the whole path fits
    room = size - square - travel + 1
    left = (torch.rand(batch, generator=generator) * room).floor().long()
    top = torch.randint(0, size - square + 1, (batch,), generator=generator)
    color = 0.5 + 0.5 * torch.rand(batch, 3, generator=generator)
    clips = 0.3 * torch.randn(batch, 3, frames, size, size, generator=generator)
    t = torch.arange(frames)
    for i in range(batch):
        xs = left[i] + speed[i] * (t if labels[i] == 0 else (frames - 1 - t))
        for f in range(frames):
            x0, y0 = int(xs[f]), int(top[i])
            clips[i, :, f, y0 : y0 + square, x0 : x0 + square] += color[i].view(3, 1, 1)
    return clips, labels


def build_model(cfg: DemoConfig, *, adapters: bool, backend: str = "reference"):
    """VideoClassifier around a frozen random-init CLIP-style ViT; the backbone weights depend
    only on cfg.seed, so every run starts from the same backbone."""
    import torch

    from .models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer
    from .models.inject import inject_st_adapters
    from .models.video import VideoClassifier

    torch.manual_seed(cfg.seed)
    backbone = CLIPVisionTransformer(CLIPVisionConfig(cfg.image_size, cfg.patch_size, cfg.width, cfg.layers,
                                                      cfg.heads, output_dim=None))
    for p in backbone.parameters():
        p.requires_grad_(False)
    if adapters:
        torch.manual_seed(cfg.seed + 1)
        inject_st_adapters(backbone, adapter_channels=cfg.adapter_channels, positions=tuple(cfg.positions),
                           backend=backend, verbose=False)
    torch.manual_seed(cfg.seed + 2)
    return VideoClassifier(backbone, num_classes=2, dropout=0.0).to(cfg.device)


def _progress(total: int, desc: str, enabled: bool):
    """tqdm if installed and wanted, else a plain printer with the same update/set_postfix/close."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, leave=True)
        except ImportError:
            pass

    class _Plain:
        def __init__(self):
            self.n, self.postfix, self.every = 0, "", max(total // 10, 1)

        def update(self, k=1):
            self.n += k
            if enabled and (self.n % self.every == 0 or self.n == total):
                print(f"  {desc}: step {self.n}/{total} {self.postfix}", flush=True)

        def set_postfix_str(self, s):
            self.postfix = s

        def close(self):
            pass

    return _Plain()


def train(model, cfg: DemoConfig, steps: int, *, desc: str = "train", progress: bool = True,
          distinct_batches: Optional[int] = None) -> List[float]:
    """AdamW on the trainable parameters; batch k is the same for every run (seeded by k), and
    with distinct_batches=n the same n batches are cycled (a memorisation check). Returns the
    loss per step."""
    import torch
    import torch.nn.functional as F

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses = []
    bar = _progress(steps, desc, progress)
    model.train()
    for step in range(steps):
        batch_index = step if distinct_batches is None else step % distinct_batches
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + batch_index)
        clips, labels = moving_square_clips(cfg.batch_size, cfg.frames, cfg.image_size, gen)
        loss = F.cross_entropy(model(clips.to(cfg.device)), labels.to(cfg.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix_str(f"loss {losses[-1]:.4f}")
        bar.update(1)
    bar.close()
    return losses


def evaluate(model, cfg: DemoConfig, clips: Optional[int] = None) -> float:
    """Accuracy on held-out clips (a generator seed no training batch uses)."""
    import torch

    n = clips or cfg.eval_clips
    gen = torch.Generator().manual_seed(10_000_019 + cfg.seed)
    correct = 0
    model.eval()
    with torch.no_grad():
        for start in range(0, n, 128):
            x, y = moving_square_clips(min(128, n - start), cfg.frames, cfg.image_size, gen)
            correct += int((model(x.to(cfg.device)).argmax(dim=1).cpu() == y).sum())
    return correct / n


def _fused_backend_reason(backend: str, device: str) -> Optional[str]:
    """None if the fused backend can run the demo here, else why not."""
    import torch

    from .backends import get_backend

    x = torch.empty(2, 17, 8, device=device)
    try:
        return get_backend(backend).unavailable_reason(x, (3, 1, 1), torch.float32)
    except ValueError as err:
        return str(err)


def run_demo(cfg: DemoConfig, *, fused_backend: str = "triton", progress: bool = True) -> Dict:
    """Runs (a), (b), (c); returns the results dict written to curves.json."""
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    results: Dict = {"config": dataclasses.asdict(cfg), "curves": {}, "eval_accuracy": {}, "seconds": {}}
    results["config"]["positions"] = list(cfg.positions)

    runs = [("no_adapters", False, "reference", cfg.steps), ("st_adapters_reference", True, "reference", cfg.steps)]
    reason = _fused_backend_reason(fused_backend, cfg.device) if cfg.fused_steps > 0 else "--fused-steps 0"
    if reason is None:
        runs.append((f"st_adapters_{fused_backend}", True, fused_backend, cfg.fused_steps))
    else:
        results["fused_skipped"] = f"{fused_backend}: {reason}"
    for name, adapters, backend, steps in runs:
        model = build_model(cfg, adapters=adapters, backend=backend)
        start = time.perf_counter()
        results["curves"][name] = train(model, cfg, steps, desc=name, progress=progress)
        results["seconds"][name] = round(time.perf_counter() - start, 2)
        if steps == cfg.steps:
            results["eval_accuracy"][name] = evaluate(model, cfg)
    if reason is None:
        ref = results["curves"]["st_adapters_reference"][: cfg.fused_steps]
        fused = results["curves"][f"st_adapters_{fused_backend}"]
        results["fused_vs_reference_max_abs_loss_diff"] = max(abs(a - b) for a, b in zip(ref, fused))
    return results


def _smooth(values: List[float], window: int) -> List[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def write_plot(results: Dict, path: str) -> Optional[str]:
    """curves.png: (a) and (b) smoothed with chance marked; beside them the fused run against the
    reference step by step. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fused = [k for k in results["curves"] if k not in results["eval_accuracy"]]
    fig, axes = plt.subplots(1, 2 if fused else 1, figsize=(11 if fused else 7, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1]} if fused else None)
    ax = axes[0][0]
    styles = {"no_adapters": "tab:gray", "st_adapters_reference": "tab:blue"}
    for name in results["eval_accuracy"]:
        curve = results["curves"][name]
        label = f"{name} (held-out acc {results['eval_accuracy'][name]:.0%})"
        ax.plot(range(1, len(curve) + 1), _smooth(curve, 10), color=styles.get(name), label=label,
                lw=2.5 if name == "no_adapters" else 1.5)
    ax.axhline(math.log(2), color="k", lw=0.8, ls=":", label="chance (ln 2)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (10-step mean)")
    ax.set_title("Direction of motion: frame averaging vs ST-Adapters (frozen ViT)", fontsize=10)
    ax.legend(fontsize=8)
    if fused:
        ax = axes[0][1]
        curve = results["curves"][fused[0]]
        steps = range(1, len(curve) + 1)
        ax.plot(steps, results["curves"]["st_adapters_reference"][: len(curve)], color="tab:blue", marker="o",
                label="reference")
        ax.plot(steps, curve, color="tab:red", ls="--", marker="x", label=fused[0].replace("st_adapters_", ""))
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (per step)")
        ax.set_title(f"fused vs reference: max |diff| {results['fused_vs_reference_max_abs_loss_diff']:.1e}",
                     fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m st_adapter_fast train-demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DemoConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="training steps of runs (a) and (b)")
    p.add_argument("--fused-steps", type=int, default=None,
                   help=f"steps of the fused run (c), compared with (b)'s first steps; 0 skips it "
                        f"(default: {d.fused_steps} on cpu, --steps on cuda)")
    p.add_argument("--fused-backend", default="triton", help="fused backend for run (c)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu (default; Triton runs in its interpreter) or cuda")
    p.add_argument("--out", default="train_demo_out", help="directory for curves.json and curves.png")
    p.add_argument("--quick", action="store_true", help="a shorter run: at most 100 steps, 2 fused steps, 128 eval clips")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / step prints")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    # On CPU the Triton kernels run only in the interpreter, which must be chosen before triton
    # is first imported.
    if args.device == "cpu" and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    fused_steps = args.fused_steps
    if fused_steps is None:
        fused_steps = args.steps if args.device.startswith("cuda") else min(DemoConfig().fused_steps, args.steps)
    cfg = DemoConfig(steps=args.steps, fused_steps=fused_steps, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, device=args.device)
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=min(cfg.steps, 100), fused_steps=min(cfg.fused_steps, 2), eval_clips=128)
    if cfg.batch_size < 2 or cfg.batch_size % 2:
        print(f"--batch-size must be even (clips come with their time-reversed twins), got {cfg.batch_size}",
              file=sys.stderr)
        return 2
    if cfg.steps < 1 or cfg.fused_steps < 0 or cfg.fused_steps > cfg.steps:
        print(f"need --steps >= 1 and 0 <= --fused-steps <= --steps, got {cfg.steps} and {cfg.fused_steps}",
              file=sys.stderr)
        return 2
    results = run_demo(cfg, fused_backend=args.fused_backend, progress=not args.no_progress)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "curves.json")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    png = write_plot(results, os.path.join(args.out, "curves.png"))

    for name, acc in results["eval_accuracy"].items():
        curve = results["curves"][name]
        tail = sum(curve[-10:]) / len(curve[-10:])
        print(f"{name:>24}: final loss {tail:.4f} (ln 2 = {math.log(2):.4f}), held-out accuracy {acc:.1%}, "
              f"{results['seconds'][name]} s")
    if "fused_vs_reference_max_abs_loss_diff" in results:
        fused = [k for k in results["curves"] if k not in results["eval_accuracy"]][0]
        print(f"{fused:>24}: {cfg.fused_steps} steps, max |loss - reference loss| = "
              f"{results['fused_vs_reference_max_abs_loss_diff']:.2e}, {results['seconds'][fused]} s")
    else:
        print(f"fused run skipped: {results.get('fused_skipped')}")
    print(f"wrote {json_path}" + (f" and {png}" if png else " (install matplotlib for curves.png)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
