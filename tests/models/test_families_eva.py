"""inject_st_adapters on timm's Eva (EvaBlock: EVA-02 / EVA-CLIP): layer scale gamma_1 / gamma_2,
drop path, register tokens and the rope table every block takes. Integration: timm imports
torchvision (torch 2.14.1 here), so these run in CI's second stage.

Checked: identity at init; placement with random non-zero adapters against forward_features
written here from Eva's own submodules and the reference adapter; only adapters train;
VideoClassifier shapes with T changing; an adapter-only round trip; the self-check.
"""

from __future__ import annotations

import pytest
import torch

from tiny_clip import assert_only_adapters_got_gradients
from st_adapter_fast.models.checkpoint import load_adapters, save_adapters
from st_adapter_fast.models.inject import inject_st_adapters, iter_st_adapters, remove_st_adapters, using_num_frames
from st_adapter_fast.models.video import VideoClassifier

from test_inject import adapter_ref, frames, randomize_adapters

pytestmark = pytest.mark.integration


def tiny_eva(seed: int = 0, **kwargs):
    timm = pytest.importorskip("timm", reason="timm is not installed (optional extra; see .ci/run)")
    torch.manual_seed(seed)
    args = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, swiglu_mlp=True,
                use_rot_pos_emb=True, ref_feat_shape=(2, 2), init_values=0.1, num_reg_tokens=1, num_classes=0,
                drop_path_rate=0.1)
    args.update(kwargs)
    return timm.models.eva.Eva(**args)


def eva_by_hand(model, images, num_frames):
    """Eva.forward_features with the adapters written in."""
    x, rope = model._pos_embed(model.patch_embed(images))
    x = model.norm_pre(x)
    for block in model.blocks:
        if getattr(block, "adapter_pre_attn", None) is not None:
            x = adapter_ref(block.adapter_pre_attn, x, num_frames)
        x_attn = block.attn(block.norm1(x), rope=rope)
        x = x + block.drop_path1(block.gamma_1 * x_attn)
        if getattr(block, "adapter_pre_mlp", None) is not None:
            x = adapter_ref(block.adapter_pre_mlp, x, num_frames)
        x = x + block.drop_path2(block.gamma_2 * block.mlp(block.norm2(x)))
    return model.norm(x)


def test_eva_identity_placement_rope_and_prefix_tokens():
    model = tiny_eva().double().eval()
    assert model.rope is not None and model.blocks[0].gamma_1 is not None
    x = frames(2, 3).double()
    before = model.forward_features(x)
    report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                                verbose=False)
    assert report.family == "timm" and report.num_prefix_tokens == model.num_prefix_tokens == 2  # CLS + 1 register
    assert report.adapters == [f"blocks.{i}.{p}" for i in range(2) for p in ("adapter_pre_attn", "adapter_pre_mlp")]
    with using_num_frames(model, 3):
        assert torch.equal(model.forward_features(x), before)
        randomize_adapters(model)
        got = model.forward_features(x)
    torch.testing.assert_close(got, eva_by_hand(model, x, 3), rtol=0, atol=1e-12)
    assert (got - before).abs().max() > 1e-3


def test_eva_only_adapters_train_in_training_mode():
    model = tiny_eva().train()  # drop path on
    report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                                verbose=False)
    randomize_adapters(model)
    with using_num_frames(model, 2):
        model.forward_features(frames(2, 2)).square().sum().backward()
    assert_only_adapters_got_gradients(model)
    assert report.trainable_params == report.adapter_params


def test_eva_video_classifier_and_checkpoint_round_trip(tmp_path):
    def video_of(seed):
        model = tiny_eva()
        inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
        torch.manual_seed(seed)
        video = VideoClassifier(model, num_classes=3, dropout=0.0).eval()
        randomize_adapters(video, seed=seed)
        return video

    trained, fresh = video_of(1), video_of(2)
    assert trained.family == "timm" and trained.fc.in_features == 32
    for t in (2, 3):
        x = torch.randn(2, 3, t, 16, 16)
        logits = trained(x)
        assert logits.shape == (2, 3)
        model = trained.backbone
        with using_num_frames(model, t):
            feats = model.forward_head(model.forward_features(x.transpose(1, 2).flatten(0, 1)), pre_logits=True)
        torch.testing.assert_close(logits, trained.fc(feats.view(2, t, -1).mean(1)))
    x = torch.randn(1, 3, 2, 16, 16)
    assert not torch.allclose(trained(x), fresh(x))
    saved = save_adapters(trained, tmp_path / "eva.pt")
    assert len(saved["model"]) == 2 * 6 + 2
    assert load_adapters(fresh, tmp_path / "eva.pt").ok
    assert torch.equal(trained(x), fresh(x))


def test_eva_self_check_catches_a_changed_block_forward(monkeypatch):
    model = tiny_eva()  # skips without timm
    import timm

    original = timm.models.eva.EvaBlock.forward

    def changed(self, x, rope=None, attn_mask=None, **kwargs):  # a release that drops the rope
        return original(self, x, None, attn_mask, **kwargs)

    monkeypatch.setattr(timm.models.eva.EvaBlock, "forward", changed)
    with pytest.raises(TypeError, match=rf"the installed timm {timm.__version__} changed EvaBlock\.forward"):
        inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    assert list(iter_st_adapters(model)) == []
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False, check=False)
    monkeypatch.undo()
    remove_st_adapters(model)
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)


def test_eva_mixed_rope_passes_the_self_check_and_is_the_identity_at_init():
    """rope_type='mixed' gives one rope table per depth (forward_features indexes it by block)."""
    model = tiny_eva(rope_type="mixed", use_abs_pos_emb=False).eval()
    assert getattr(model, "rope_mixed", False)
    x = frames(1, 2)
    before = model.forward_features(x)
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                       verbose=False)
    with using_num_frames(model, 2):
        assert torch.equal(model.forward_features(x), before)
