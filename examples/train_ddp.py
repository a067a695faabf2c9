"""Multi-GPU ST-Adapter training with torchrun: DDP (default) or FSDP2, NCCL on GPUs.

A frozen CLIP ViT with injected ST-Adapters (st_adapter_fast.models.clip_vit), trained data-parallel.
Only the adapters and the head train, so DDP all-reduces a few MB of gradients per step and the
frozen backbone never enters the gradient buckets.

    # one node, 8 GPUs: the official ViT-B/16 "24x384" recipe (fp16 frozen backbone, fp32 adapters)
    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py \\
        --arch ViT-B/16 --weights ViT-B-16.pt --positions pre_attn pre_mlp \\
        --frames 8 --batch-size 8 --amp fp16 --steps 1000 --save adapters.pt

    # two nodes (run on each; HOST is node 0)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        examples/train_ddp.py --arch ViT-B/16 --weights ViT-B-16.pt ...

    # FSDP2 (fully_shard) instead of DDP, with activation checkpointing per block
    torchrun --standalone --nproc_per_node=8 examples/train_ddp.py --fsdp --activation-checkpointing ...

    # CPU smoke run (gloo; what tests/test_distributed.py runs)
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --arch tiny --steps 3

Data: a synthetic "which way does the square move" task (st_adapter_fast.demo), which a
frozen image backbone with frame averaging cannot learn and ST-Adapters can -- the loss should
fall. For real data, replace ``batches()`` with a DataLoader over your clips (B, 3, T, H, W) and a
``torch.utils.data.DistributedSampler`` (call ``sampler.set_epoch(epoch)`` every epoch).

Notes:
  * --weights is a local OpenAI CLIP file (e.g. ViT-B-16.pt); nothing is downloaded. Without it
    the backbone is random (fine for throughput tests).
  * --backend auto picks the fused Triton/CUDA kernels on GPUs and the reference on CPU.
  * The per-GPU batch is --batch-size; the global batch is batch-size x world size, and the
    gradients are averaged over it (as single-GPU training on the whole batch would compute).
  * --save writes an adapter-only checkpoint (adapters + head, official 'model' layout) on rank 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from st_adapter_fast.models.clip_vit import CLIPVisionConfig, ResidualAttentionBlock, build_clip_video_model
from st_adapter_fast.models.inject import iter_st_adapters
from st_adapter_fast.demo import moving_square_clips

TINY = CLIPVisionConfig(input_resolution=32, patch_size=8, width=64, layers=2, heads=2, output_dim=None)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny", help="'tiny' (CPU smoke test) or a CLIP name: ViT-B/16, ViT-L/14, ...")
    p.add_argument("--weights", default=None, help="local OpenAI CLIP .pt file for the backbone")
    p.add_argument("--positions", nargs="+", default=["pre_mlp"], choices=["pre_attn", "pre_mlp"])
    p.add_argument("--adapter-channels", type=int, default=384)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"])
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4, help="clips per process")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--amp", default="none", choices=["none", "fp16", "bf16"],
                   help="frozen backbone in this dtype, adapters fp32, autocast (fp16 adds a GradScaler)")
    p.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute every block in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the fused op is one graph node)")
    p.add_argument("--save", default=None, help="adapter-only checkpoint path (written by rank 0)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def setup() -> tuple:
    """(rank, world_size, device) from torchrun's environment; NCCL on GPUs, gloo on CPU."""
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    return rank, world_size, device


def build(args, device: torch.device) -> torch.nn.Module:
    arch = TINY if args.arch == "tiny" else args.arch
    channels = min(args.adapter_channels, TINY.width // 2) if args.arch == "tiny" else args.adapter_channels
    # same seed on every rank: identical initial adapters and head (DDP also broadcasts rank 0's)
    torch.manual_seed(args.seed)
    model = build_clip_video_model(
        arch, num_classes=2, weights=args.weights, adapter_channels=channels,
        positions=tuple(args.positions), backend=args.backend, dropout=0.0,
    ).to(device)
    if args.amp != "none":
        from st_adapter_fast.models.mixed_precision import prepare_mixed_precision

        args.mixed = prepare_mixed_precision(model, torch.float16 if args.amp == "fp16" else torch.bfloat16)
    else:
        args.mixed = None
    if args.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper,
        )

        apply_activation_checkpointing(
            model, check_fn=lambda m: isinstance(m, ResidualAttentionBlock),
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        )
    return model


def wrap(model: torch.nn.Module, args, device: torch.device) -> torch.nn.Module:
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        # FSDP2 all-gathers one flat buffer per group, so a group needs one dtype: with --amp the
        # fp32 adapters and head get their own groups apart from the half-precision frozen blocks.
        for _, adapter in iter_st_adapters(model):
            fully_shard(adapter)
        fully_shard(model.fc)
        for block in model.modules():
            if isinstance(block, ResidualAttentionBlock):
                fully_shard(block)
        return fully_shard(model)
    ddp_kwargs = dict(device_ids=[device.index]) if device.type == "cuda" else {}
    return torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def batches(args, rank: int, device: torch.device, image_size: int):
    """This rank's share of the global batch, step after step (a different seed per rank)."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + rank)
    while True:
        clips, labels = moving_square_clips(args.batch_size, args.frames, image_size, gen)
        yield clips.to(device, non_blocking=True), labels.to(device, non_blocking=True)


def adapter_checkpoint(model: torch.nn.Module) -> dict:
    """Trainable parameters (adapters + head) as full CPU tensors. Collective under FSDP: every
    rank must call it."""
    state = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
            state[name.removeprefix("module.")] = full.detach().cpu()
    return state


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world_size, device = setup()
    try:
        model = build(args, device)
        image_size = model.backbone.input_resolution
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        model = wrap(model, args, device)
        if args.compile:
            model = torch.compile(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        if rank == 0:
            print(f"world {world_size} x batch {args.batch_size}, {'FSDP2' if args.fsdp else 'DDP'}, "
                  f"{trainable:,} of {total:,} parameters train, device {device}", flush=True)

        data = batches(args, rank, device, image_size)
        losses = []
        for step in range(args.steps):
            clips, labels = next(data)
            start = time.perf_counter()
            autocast = args.mixed.autocast() if args.mixed is not None else contextlib.nullcontext()
            with autocast:
                loss = F.cross_entropy(model(clips), labels)
            if args.mixed is not None:
                args.mixed.step(loss, optimizer, max_grad_norm=1.0)
            else:
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            # the mean loss over all ranks, for the log only (a collective: every rank calls it)
            logged = loss.detach().float().clone()
            dist.all_reduce(logged)
            losses.append(logged.item() / world_size)
            if rank == 0:
                print(f"step {step:5d}  loss {losses[-1]:.4f}  {1e3 * (time.perf_counter() - start):7.1f} ms",
                      flush=True)

        state = adapter_checkpoint(model)
        if args.save and rank == 0:
            torch.save({"model": state, "args": vars(args) | {"mixed": None}}, args.save)
            print(f"saved {len(state)} adapter/head tensors to {args.save}", flush=True)
        # every rank leaves together: a rank tearing down gloo while its peer still saves can
        # abort the peer ("terminate called without an active exception")
        dist.barrier()
        return {"losses": losses, "state": state}
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
