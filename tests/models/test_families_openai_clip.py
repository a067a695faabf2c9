"""inject_st_adapters on OpenAI's clip package (clip.model.VisionTransformer, on PyPI as
clip-anytorch): the model the official ST-Adapter code adapts. Its blocks run sequence first,
x (L, N, C). Integration: clip imports torchvision (torch 2.14.1 here), CI's second stage.

Checked: identity at init; placement with random non-zero adapters against the forward written
here from the model's own submodules and the reference adapter; only adapters train;
VideoClassifier = the official model (CLS averaged over frames, ln_post, fc) with T changing; an
adapter-only round trip; official checkpoint keys map one to one; the self-check.
"""

from __future__ import annotations

import pytest
import torch

from tiny_clip import assert_only_adapters_got_gradients
from st_adapter_fast.models.checkpoint import load_adapters, load_official_checkpoint, save_adapters
from st_adapter_fast.models.inject import inject_st_adapters, iter_st_adapters, remove_st_adapters, using_num_frames
from st_adapter_fast.models.video import VideoClassifier

from helpers import fused_device
from test_inject import adapter_ref, frames, randomize_adapters, requires_fused

pytestmark = pytest.mark.integration


def _clip():
    return pytest.importorskip("clip", reason="clip-anytorch is not installed (see .ci/run's second stage)")


def tiny_visual(seed: int = 0):
    clip = _clip()
    torch.manual_seed(seed)
    return clip.model.VisionTransformer(input_resolution=16, patch_size=8, width=32, layers=2, heads=2, output_dim=24)


def tiny_clip_model(seed: int = 0):
    clip = _clip()
    torch.manual_seed(seed)
    # clip sets the image tower's heads to width // 64
    return clip.model.CLIP(embed_dim=24, image_resolution=16, vision_layers=2, vision_width=64, vision_patch_size=8,
                           context_length=8, vocab_size=64, transformer_width=16, transformer_heads=2,
                           transformer_layers=1)


def tokens_by_hand(visual, images, num_frames):
    """VisionTransformer.forward up to the transformer output (L, N, C), adapters written in."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = visual.ln_pre(x + visual.positional_embedding).transpose(0, 1)  # (L, N, C)
    for block in visual.transformer.resblocks:
        if getattr(block, "adapter_pre_attn", None) is not None:
            x = adapter_ref(block.adapter_pre_attn, x.transpose(0, 1), num_frames).transpose(0, 1)
        x = x + block.attention(block.ln_1(x))
        if getattr(block, "adapter_pre_mlp", None) is not None:
            x = adapter_ref(block.adapter_pre_mlp, x.transpose(0, 1), num_frames).transpose(0, 1)
        x = x + block.mlp(block.ln_2(x))
    return x


def transformer_output(visual, images):
    captured = {}
    handle = visual.transformer.register_forward_hook(lambda mod, args, out: captured.update(out=out))
    try:
        visual(images)
    finally:
        handle.remove()
    return captured["out"]


def test_identity_and_placement_in_sequence_first_blocks():
    visual = tiny_visual()  # float32: clip's LayerNorm computes in float32 whatever the weights
    x = frames(2, 3)
    before = transformer_output(visual, x)
    report = inject_st_adapters(visual, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                                verbose=False)
    assert report.family == "openai_clip" and report.num_prefix_tokens == 1
    assert report.adapters[0] == "transformer.resblocks.0.adapter_pre_attn"  # the official names
    assert visual.transformer.resblocks[0].st_adapter_seq_first
    with using_num_frames(visual, 3):
        assert torch.equal(transformer_output(visual, x), before)
        randomize_adapters(visual)
        got = transformer_output(visual, x)
    torch.testing.assert_close(got, tokens_by_hand(visual, x, 3), rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-3


def test_whole_clip_model_adapts_the_image_tower_and_only_adapters_train():
    model = tiny_clip_model()
    report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                                verbose=False)
    assert report.adapters[0] == "visual.transformer.resblocks.0.adapter_pre_attn"
    assert not any(".adapter_" in n for n, _ in model.transformer.named_parameters())  # the text tower
    randomize_adapters(model)
    with using_num_frames(model, 2):
        transformer_output(model.visual, frames(2, 2)).square().sum().backward()
    assert_only_adapters_got_gradients(model)
    assert report.trainable_params == report.adapter_params


def test_video_classifier_is_the_official_model_and_checkpoints_round_trip(tmp_path):
    def video_of(seed):
        visual = tiny_visual()
        inject_st_adapters(visual, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                           verbose=False)
        torch.manual_seed(seed)
        video = VideoClassifier(visual, num_classes=3, dropout=0.0).eval()
        randomize_adapters(video, seed=seed)
        return video

    trained, fresh = video_of(1), video_of(2)
    assert trained.family == "openai_clip" and trained.fc.in_features == 32  # width: no proj
    visual = trained.backbone
    for t in (3, 2):
        x = torch.randn(2, 3, t, 16, 16)
        logits = trained(x)
        assert logits.shape == (2, 3)
        with using_num_frames(visual, t):
            tokens = transformer_output(visual, x.transpose(1, 2).flatten(0, 1))  # (L, B*T, C)
        official = trained.fc(visual.ln_post(tokens[0].view(2, t, -1).mean(1)))
        torch.testing.assert_close(logits, official, rtol=1e-5, atol=1e-6)
    x = torch.randn(1, 3, 2, 16, 16)
    assert not torch.allclose(trained(x), fresh(x))
    saved = save_adapters(trained, tmp_path / "openai.pt")
    assert load_adapters(fresh, tmp_path / "openai.pt").ok
    assert torch.equal(trained(x), fresh(x))
    # an official file: transformer.resblocks.{i}.adapter_* and fc.* -- the same layout
    official = {k[len("backbone."):] if k.startswith("backbone.") else k: v * 2 for k, v in saved["model"].items()}
    report = load_official_checkpoint(fresh, {"model": official})
    assert report.ok and len(report.loaded) == len(official) == 2 * 2 * 6 + 2
    assert torch.equal(fresh.backbone.transformer.resblocks[1].adapter_pre_mlp.fc2.weight,
                       official["transformer.resblocks.1.adapter_pre_mlp.fc2.weight"])


def test_self_check_catches_a_changed_block_forward(monkeypatch):
    clip = _clip()
    visual = tiny_visual()

    def changed(self, x):  # a release that forgets the MLP residual
        x = x + self.attention(self.ln_1(x))
        return self.mlp(self.ln_2(x))

    monkeypatch.setattr(clip.model.ResidualAttentionBlock, "forward", changed)
    with pytest.raises(TypeError, match=r"the installed clip \S+ changed ResidualAttentionBlock\.forward"):
        inject_st_adapters(visual, adapter_channels=8, backend="reference", verbose=False)
    assert list(iter_st_adapters(visual)) == []
    monkeypatch.undo()
    remove_st_adapters(visual)
    inject_st_adapters(visual, adapter_channels=8, backend="reference", verbose=False)
    assert len(list(iter_st_adapters(visual))) == 2


@requires_fused
def test_triton_backend_matches_reference_in_sequence_first_blocks():
    """The adapters see x.transpose(0, 1) of the (L, N, C) stream: a non-contiguous input."""
    device = fused_device()
    x = frames(1, 2).to(device)
    outs, grads = {}, {}
    for backend in ("reference", "triton"):
        visual = tiny_visual().to(device)
        inject_st_adapters(visual, adapter_channels=8, block_indices=[0], backend=backend, verbose=False)
        randomize_adapters(visual)
        with using_num_frames(visual, 2):
            out = transformer_output(visual, x)
        out.square().sum().backward()
        outs[backend] = out.detach()
        grads[backend] = [p.grad for _, a in iter_st_adapters(visual) for p in a.parameters()]
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-5)
    for fused, ref in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
