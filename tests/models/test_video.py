"""VideoClassifier (clips (B, C, T, H, W) -> logits) and the mixed-precision recipe.

The CLIP-style ViT path must be the official model's forward: frames as B*T images, CLS of the
last block averaged over frames, ln_post, fc. timm / open_clip wrappers are integration tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from st_adapter_fast.models.clip_vit import CLIPVisionTransformer, build_clip_video_model
from st_adapter_fast.models.inject import inject_st_adapters, iter_st_adapters
from st_adapter_fast.models.mixed_precision import prepare_mixed_precision
from st_adapter_fast.models.video import VideoClassifier

from test_inject import TINY, clip_by_hand, randomize_adapters, tiny_clip, tiny_open_clip, tiny_timm


def clips(batch: int, num_frames: int, size: int = 16, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, num_frames, size, size, generator=torch.Generator().manual_seed(seed))


def official_logits(video: VideoClassifier, x: torch.Tensor) -> torch.Tensor:
    """models_adapter.VisionTransformer.forward, written out for our modules."""
    b, _, t = x.shape[:3]
    backbone = video.backbone
    frames = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
    tokens = backbone.conv1(frames).flatten(2).transpose(1, 2)
    tokens = torch.cat([backbone.class_embedding.view(1, 1, -1).expand(tokens.shape[0], -1, -1), tokens], dim=1)
    tokens = backbone.ln_pre(tokens + backbone.positional_embedding)
    tokens = backbone.transformer(tokens, t)
    cls = tokens.view(b, t, tokens.shape[1], tokens.shape[2])[:, :, 0, :].mean(dim=1)
    return video.fc(video.dropout(backbone.ln_post(cls)))


def test_clip_video_model_is_the_official_forward_and_num_frames_follows_the_input():
    backbone = tiny_clip().double()
    inject_st_adapters(backbone, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                       verbose=False)
    randomize_adapters(backbone)
    video = VideoClassifier(backbone, num_classes=5, dropout=0.5).double().eval()
    for t in (4, 2, 3):  # T changes from call to call; nothing to set by hand
        x = clips(2, t).double()
        logits = video(x)
        assert logits.shape == (2, 5)
        assert all(a.num_frames == t for _, a in iter_st_adapters(video))
        torch.testing.assert_close(logits, official_logits(video, x), rtol=0, atol=1e-12)
    # frames really are coupled in time: shuffling the frames of a clip changes its logits
    x = clips(1, 4).double()
    assert (video(x) - video(x[:, :, [2, 0, 3, 1]])).abs().max() > 1e-6


def test_video_wrapper_shapes_head_and_errors():
    video = VideoClassifier(tiny_clip(), num_classes=7)
    assert video.fc.in_features == TINY.width and video.fc.out_features == 7
    assert torch.all(video.fc.bias == 0) and 0.01 < video.fc.weight.std() < 0.03  # official init
    assert video(clips(3, 2)).shape == (3, 7)
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        video(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="pass feature_dim"):
        VideoClassifier(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4)), num_classes=2)
    # a generic per-frame embedder: (B*T, D) features averaged over frames
    embed = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 6))
    generic = VideoClassifier(embed, num_classes=2, feature_dim=6, dropout=0.0)
    x = clips(2, 3, size=4)
    per_frame = embed(x.transpose(1, 2).flatten(0, 1)).view(2, 3, 6).mean(1)
    torch.testing.assert_close(generic(x), generic.fc(per_frame))


def test_official_named_builders():
    video = build_clip_video_model(TINY, num_classes=3, adapter_channels=8, positions=("pre_attn", "pre_mlp"),
                                   backend="reference")
    assert isinstance(video.backbone, CLIPVisionTransformer)
    assert len(list(iter_st_adapters(video))) == 2 * TINY.layers
    trainable = {n for n, p in video.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in video.named_parameters() if ".adapter_pre_" in n} | {"fc.weight", "fc.bias"}
    assert video(clips(1, 2)).shape == (1, 3)
    with pytest.raises(ValueError, match="unknown arch"):
        build_clip_video_model("ViT-H/99")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_recipe(dtype):
    torch.manual_seed(0)
    video = build_clip_video_model(TINY, num_classes=2, adapter_channels=8, backend="reference", dropout=0.0)
    randomize_adapters(video)
    amp = prepare_mixed_precision(video, dtype, device_type="cpu")
    for name, p in video.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else dtype), name
    assert (amp.scaler is not None) == (dtype == torch.float16)
    optimizer = torch.optim.AdamW([p for p in video.parameters() if p.requires_grad], lr=1e-2)
    x, y = clips(4, 2), torch.tensor([0, 1, 0, 1])
    before = {n: p.detach().clone() for n, p in video.named_parameters()}
    with amp.autocast():
        loss = F.cross_entropy(video(x), y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    amp.step(loss, optimizer, max_grad_norm=1.0)
    for name, p in video.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == p.requires_grad, name  # adapters and head moved, the backbone did not
        assert p.grad is None  # step() zeroes the grads
    with pytest.raises(ValueError, match="float16 or torch.bfloat16"):
        prepare_mixed_precision(video, torch.float32)
    with pytest.raises(ValueError, match="no trainable parameters"):
        prepare_mixed_precision(tiny_clip().requires_grad_(False), dtype)


@pytest.mark.integration
def test_timm_video_classifier():
    model = tiny_timm(reg_tokens=1)
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    video = VideoClassifier(model, num_classes=4).eval()
    assert video.family == "timm" and video.fc.in_features == 32
    for t in (2, 3):
        x = clips(2, t)
        logits = video(x)
        assert logits.shape == (2, 4)
        frames = x.transpose(1, 2).flatten(0, 1)
        feats = model.forward_head(model.forward_features(frames), pre_logits=True).view(2, t, -1).mean(1)
        torch.testing.assert_close(logits, video.fc(feats))


@pytest.mark.integration
def test_open_clip_video_classifier():
    clip = tiny_open_clip()
    inject_st_adapters(clip, adapter_channels=8, backend="reference", verbose=False)
    video = VideoClassifier(clip.visual, num_classes=3)
    assert video.fc.in_features == clip.visual.output_dim
    logits = video(clips(2, 3))
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert all(p.grad is not None for n, p in video.named_parameters() if p.requires_grad)


@pytest.mark.integration
def test_timm_mixed_precision_step():
    model = tiny_timm(reg_tokens=0)
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    video = VideoClassifier(model, num_classes=2, dropout=0.0)
    randomize_adapters(video)
    amp = prepare_mixed_precision(video, torch.bfloat16, device_type="cpu")
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.blocks[0].adapter_pre_mlp.fc1.weight.dtype == torch.float32
    optimizer = torch.optim.SGD([p for p in video.parameters() if p.requires_grad], lr=0.1)
    before = model.blocks[0].adapter_pre_mlp.conv.weight.detach().clone()  # the last block's cannot reach CLS
    with amp.autocast():
        loss = F.cross_entropy(video(clips(2, 2)), torch.tensor([0, 1]))
    amp.step(loss, optimizer)
    assert torch.isfinite(loss) and not torch.equal(model.blocks[0].adapter_pre_mlp.conv.weight, before)


def test_b_t_c_h_w_clips_are_a_layout_error_that_names_the_permute():
    """HF VideoMAE lays clips out (B, T, C, H, W); they used to fail deep in the patch embedding."""
    video = VideoClassifier(tiny_clip(), num_classes=2, dropout=0.0).eval()
    x = clips(2, 4)  # (B, C, T, H, W)
    videomae = x.permute(0, 2, 1, 3, 4).contiguous()  # (2, 4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"\(2, 4, 3, 16, 16\) look like \(B, T, C, H, W\).*"
                                         r"clips\.permute\(0, 2, 1, 3, 4\)"):
        video(videomae)
    torch.testing.assert_close(video(videomae.permute(0, 2, 1, 3, 4)), video(x), rtol=0, atol=0)
    assert video(clips(1, 3)).shape == (1, 2)  # T = 3 = C is the right layout, no false alarm


def test_adapter_channels_wider_than_the_model_warns():
    with pytest.warns(UserWarning, match=r"adapter_channels=64 is wider than the model \(32 channels\)"):
        inject_st_adapters(tiny_clip(), adapter_channels=64, verbose=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inject_st_adapters(tiny_clip(), adapter_channels=32, verbose=False)  # as wide is fine


def test_printed_trainable_count_includes_the_head(capsys):
    backbone = tiny_clip()
    report = inject_st_adapters(backbone, adapter_channels=8, backend="reference")  # verbose: prints
    assert f"trainable params: {report.trainable_params:,}" in capsys.readouterr().out
    video = VideoClassifier(backbone, num_classes=5)
    out = capsys.readouterr().out
    head = TINY.width * 5 + 5
    assert f"trainable params: {report.trainable_params + head:,} / {report.total_params + head:,}" in out
    assert f"adapters {report.adapter_params:,}, head {head:,}" in out
    # a quiet injection gives a quiet classifier, unless asked
    quiet = tiny_clip()
    inject_st_adapters(quiet, adapter_channels=8, verbose=False)
    VideoClassifier(quiet, num_classes=5)
    assert capsys.readouterr().out == ""
    VideoClassifier(quiet, num_classes=5, verbose=True)
    assert "head 165" in capsys.readouterr().out
