"""inject_st_adapters(..., fuse_layernorm=True): every adapter and the LayerNorm after it run as
one op (docs/design.md §7). The fused model equals the unfused one under the parity rule, in our
CLIP ViT, HF CLIP / DINOv2 and (integration) timm, open_clip (sequence first) and OpenAI clip;
and under the official recipe it saves at least 0.9 x per adapter LESS than the same model
without adapters (unique storages autograd saves over a training forward)."""

import pytest
import torch
import torch.utils.checkpoint

from st_adapter_fast.bench.core import SavedTensorCounter
from st_adapter_fast.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer
from st_adapter_fast.models.inject import inject_st_adapters, iter_st_adapters, remove_st_adapters, using_num_frames
from st_adapter_fast.models.mixed_precision import prepare_mixed_precision
from st_adapter_fast.models.video import VideoClassifier

from helpers import compare, format_failures, fused_device, triton_interpreter_on

DEVICE = fused_device()
requires_fused = pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreter_on()),
                                    reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU twin")
TINY = CLIPVisionConfig(input_resolution=16, patch_size=8, width=32, layers=2, heads=2, output_dim=24)
FRAMES = 3


def randomize(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in iter_st_adapters(model):
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p) * 0.3)
        for name, p in model.named_parameters():  # LayerNorm affine off its (1, 0) init
            if ".ln_" in name or "norm" in name:
                p.copy_(p + 0.2 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))


def frames(batch=2, num_frames=FRAMES, size=16, seed=3):
    return torch.randn(batch * num_frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run_model(build, forward, backend, fuse, dtype=torch.float32, images=None):
    """(output, grads of the images and of every trainable parameter) as float64 CPU tensors."""
    model = build().to(device=DEVICE if backend == "triton" else "cpu", dtype=dtype)
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend=backend,
                       freeze_backbone=False, fuse_layernorm=fuse, verbose=False)
    randomize(model)
    device = next(model.parameters()).device
    x = (frames() if images is None else images).to(device=device, dtype=dtype).requires_grad_()
    with using_num_frames(model, FRAMES):
        out = forward(model, x)
    gen = torch.Generator().manual_seed(7)
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out))
    result = {"out": out.detach().double().cpu(), "images": x.grad.double().cpu()}
    for name, p in model.named_parameters():
        if p.grad is not None:  # (HF towers hold parameters the output does not reach)
            result[name] = p.grad.double().cpu()
    return result


def assert_fused_equals_unfused(build, forward, float64=True):
    """The parity rule against the unfused model in float64; float64=False (a model that cannot
    run in float64: OpenAI clip's LayerNorm casts to float32) compares with the unfused fused-
    backend model in fp32 instead, to the tolerance of the other model-level tests."""
    unfused = run_model(build, forward, "triton", False)
    fused = run_model(build, forward, "triton", True)
    if not float64:
        assert fused.keys() == unfused.keys()
        for name in fused:
            torch.testing.assert_close(fused[name], unfused[name], rtol=1e-4, atol=1e-5, msg=name)
        return fused
    ref64 = run_model(build, forward, "reference", False, torch.float64)
    eager = run_model(build, forward, "reference", False)
    for label, got in (("unfused", unfused), ("fuse_layernorm", fused)):
        errors = compare(got, ref64, eager, torch.float32, backstop=False)
        # a gradient that is exactly 0 (attention's key bias: softmax ignores a per-query
        # constant; max|float64| ~1e-17) holds only rounding noise in both fp32 runs, and the
        # rule's bound, relative to that zero, compares noise with noise (measured: 1.4e-8 vs
        # eager's 5.6e-9 after an unrelated tile change). Held instead to the noise level of the
        # terms: a few eager errors plus 1e-7 (a wrong kernel is off by ~1e-2).
        zero = [e for e in errors if e.scale < 1e-12]
        assert all(e.err <= 4 * (e.eager_err or 0.0) + 1e-7 for e in zero), format_failures(zero, label, "fp32")
        failed = [e for e in errors if not e.passed and e.scale >= 1e-12]
        assert not failed, format_failures(failed, label, "fp32")
    # the LayerNorm affine and every adapter got gradients through the fused pair
    assert any(".ln_1.weight" in k or "norm1.weight" in k or "layer_norm1.weight" in k for k in fused)
    return fused


def build_clip():
    torch.manual_seed(0)
    return CLIPVisionTransformer(TINY)


@requires_fused
def test_our_clip_vit_fused_equals_unfused():
    assert_fused_equals_unfused(build_clip, lambda m, x: m(x))


@requires_fused
def test_hf_clip_and_dinov2_fused_equal_unfused():
    transformers = pytest.importorskip("transformers")
    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                 patch_size=8)

    def clip():
        torch.manual_seed(0)
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**small))

    def dinov2():
        torch.manual_seed(0)
        return transformers.Dinov2Model(transformers.Dinov2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16, patch_size=8,
            layerscale_value=0.5))

    for build in (clip, dinov2):
        assert_fused_equals_unfused(build, lambda m, x: m(pixel_values=x).last_hidden_state)


@pytest.mark.integration
@requires_fused
def test_timm_open_clip_and_openai_clip_fused_equal_unfused():
    timm = pytest.importorskip("timm", reason="timm is not installed (optional extra; see .ci/run)")
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (optional extra; see .ci/run)")
    clip = pytest.importorskip("clip", reason="clip-anytorch is not installed (optional extra; see .ci/run)")

    def timm_vit():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                                 depth=2, num_heads=2, num_classes=0, reg_tokens=1)

    def open_clip_visual():  # batch_first=False: the sequence-first block
        torch.manual_seed(0)
        model = open_clip.CLIP(embed_dim=24, vision_cfg=dict(image_size=16, layers=2, width=32, patch_size=8,
                                                             head_width=16),
                               text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
        return model.visual

    def openai_visual():
        torch.manual_seed(0)
        return clip.model.VisionTransformer(input_resolution=16, patch_size=8, width=32, layers=2, heads=2,
                                            output_dim=24)

    assert_fused_equals_unfused(timm_vit, lambda m, x: m.forward_features(x))
    assert_fused_equals_unfused(open_clip_visual, lambda m, x: m(x))
    assert_fused_equals_unfused(openai_visual, lambda m, x: m(x), float64=False)


# ------------------------------------------------------------------------ injection plumbing
def test_fuse_flag_is_set_reported_and_removed():
    model = build_clip()
    report = inject_st_adapters(model, positions=("pre_attn", "pre_mlp"), adapter_channels=8, fuse_layernorm=True,
                                verbose=False)
    assert report.fuse_layernorm and "LayerNorm fused" in str(report)
    assert all(a.fuse_layernorm for _, a in iter_st_adapters(model))
    # a later injection without it leaves the fused adapters fused (the flag is per adapter)
    model2 = build_clip()
    inject_st_adapters(model2, positions="pre_attn", adapter_channels=8, fuse_layernorm=True, verbose=False)
    inject_st_adapters(model2, positions="pre_mlp", adapter_channels=8, freeze_backbone=False, verbose=False)
    flags = {n.rsplit(".", 1)[-1]: a.fuse_layernorm for n, a in iter_st_adapters(model2)}
    assert flags == {"adapter_pre_attn": True, "adapter_pre_mlp": False}
    assert remove_st_adapters(model) == 2 * TINY.layers


def test_fuse_layernorm_refuses_cuda_backend_and_unknown_norms():
    model = build_clip()
    with pytest.raises(ValueError, match="backend='cuda'.*does not fuse the LayerNorm"):
        inject_st_adapters(model, adapter_channels=8, backend="cuda", fuse_layernorm=True, verbose=False)

    class RMSNormish(torch.nn.Module):
        def __init__(self, c):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(c))

        def forward(self, x):
            return x * self.weight

    model.transformer.resblocks[1].ln_2 = RMSNormish(TINY.width)
    with pytest.raises(TypeError, match=r"resblocks\.1\.ln_2: fuse_layernorm=True.*RMSNormish"):
        inject_st_adapters(model, adapter_channels=8, fuse_layernorm=True, verbose=False)
    assert all(b.adapter_pre_mlp is None for b in model.transformer.resblocks)  # nothing half-injected


@requires_fused
def test_activation_checkpointing_of_a_fused_block():
    """A fused block under torch.utils.checkpoint: same output and gradients as without."""
    model = build_clip().to(DEVICE)
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="triton",
                       fuse_layernorm=True, verbose=False)
    randomize(model)
    block = model.transformer.resblocks[0]
    x = torch.randn(2 * FRAMES, 5, TINY.width, device=DEVICE, requires_grad=True)
    runs = []
    for checkpointed in (False, True):
        with using_num_frames(model, FRAMES):  # the checkpointed forward reruns in backward
            out = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
            out.square().sum().backward()
        runs.append([out.detach(), x.grad.clone()] + [p.grad.clone() for p in block.parameters() if p.requires_grad])
        x.grad = None
        model.zero_grad()
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- the memory goal
def saved_bytes_over_training_forward(adapters: str) -> tuple:
    """(unique saved bytes beyond parameters, adapter count, bytes of one adapter input x) for a
    training forward of a VideoClassifier on our CLIP ViT under the official recipe: bf16 frozen
    backbone (CLIP's LayerNorms computing in fp32), fp32 adapters and head, bf16 autocast. The
    clips require grad in all three models, so every backbone op saves what its input gradient
    needs in each of them alike, and the difference is what the adapters (and the pairs) change.
    (Without that, the plain frozen model would save almost nothing, and the adapted one
    whatever the ops after its first adapter need to pass gradients back to it.) Sizes keep the
    adapters' bf16 weight copies (autocast's casts, saved like eager's) near their share in
    ViT-B/16, ~0.05 x per adapter here (0.03 x there): 296 tokens of width 64, Ca = 8."""
    cfg = CLIPVisionConfig(input_resolution=48, patch_size=8, width=64, layers=2, heads=2, output_dim=None)
    torch.manual_seed(0)
    model = VideoClassifier(CLIPVisionTransformer(cfg), num_classes=5, dropout=0.0)
    n = 0
    model.backbone.requires_grad_(False)  # what inject_st_adapters does; the head stays trainable
    if adapters != "none":
        report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="triton",
                                    fuse_layernorm=adapters == "fused", verbose=False)
        randomize(model)
        n = len(report.adapters)
    amp = prepare_mixed_precision(model, torch.bfloat16, device_type="cpu")
    model = model.to(DEVICE)
    clips = torch.randn(2, 3, 4, 48, 48, device=DEVICE, requires_grad=True)
    params = [p for p in model.parameters()]
    with amp.autocast(), SavedTensorCounter(exclude=params) as counter:
        logits = model(clips)
    logits.sum().backward()  # the graph is whole: every saved tensor was usable
    tokens = 2 * 4 * (1 + (48 // 8) ** 2)
    return counter.saved_bytes, n, tokens * cfg.width * 2


@requires_fused
def test_fused_adapted_model_saves_less_than_the_plain_model():
    plain, _, x_bytes = saved_bytes_over_training_forward("none")
    fused, n, _ = saved_bytes_over_training_forward("fused")
    unfused, _, _ = saved_bytes_over_training_forward("unfused")
    per_adapter_fused = (fused - plain) / n / x_bytes
    per_adapter_unfused = (unfused - plain) / n / x_bytes
    # issue 16's goal: at least 0.9 x per adapter LESS than without adapters (about -1 x: the
    # LayerNorm's fp32 copy, 2 x, replaced by x itself); unfused adds about +1 x
    print(f"saved per adapter vs the plain model: fused {per_adapter_fused:+.3f} x, unfused {per_adapter_unfused:+.3f} x")
    assert per_adapter_fused <= -0.9, (per_adapter_fused, per_adapter_unfused)
    assert per_adapter_unfused >= 0.9, per_adapter_unfused


def test_load_adapters_inject_can_fuse(tmp_path):
    from st_adapter_fast.models.checkpoint import load_adapters, save_adapters

    model = build_clip()
    inject_st_adapters(model, positions=("pre_attn", "pre_mlp"), adapter_channels=8, verbose=False)
    with torch.no_grad():  # adapters only: the file carries nothing else
        for _, adapter in iter_st_adapters(model):
            for p in adapter.parameters():
                p.normal_(std=0.3)
    save_adapters(model, tmp_path / "a.pt")
    fresh = build_clip()
    load_adapters(fresh, tmp_path / "a.pt", inject=True, fuse_layernorm=True)
    assert [a.fuse_layernorm for _, a in iter_st_adapters(fresh)] == [True] * (2 * TINY.layers)
    x = frames()
    with torch.no_grad(), using_num_frames(model, FRAMES), using_num_frames(fresh, FRAMES):
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)  # reference backend on CPU: the same ops
