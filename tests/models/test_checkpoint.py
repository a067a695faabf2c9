"""Adapter-only checkpoints, official ST-Adapter checkpoint mapping, and OpenAI CLIP weight
loading (from a tiny synthetic state dict written to tmp: nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

from st_adapter_fast.models.checkpoint import (
    adapter_state_dict, load_adapter_state_dict, load_adapters, load_official_checkpoint,
    map_official_state_dict, save_adapters,
)
from st_adapter_fast.models.clip_vit import (
    CLIPVisionConfig, CLIPVisionTransformer, build_clip_video_model, clip_config_from_state_dict,
    load_openai_clip_visual,
)
from st_adapter_fast.models.inject import inject_st_adapters, iter_st_adapters, set_num_frames
from st_adapter_fast.models.video import VideoClassifier

from test_inject import TINY, randomize_adapters, tiny_clip, tiny_timm


def video_model(seed: int = 0, positions=("pre_attn", "pre_mlp"), last_n=None):
    torch.manual_seed(seed)
    return build_clip_video_model(TINY, num_classes=4, adapter_channels=8, positions=positions,
                                  last_n_blocks=last_n, backend="reference", dropout=0.0).eval()


def clips(seed: int = 7) -> torch.Tensor:
    return torch.randn(2, 3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_adapter_state_dict_round_trip_through_a_file(tmp_path):
    trained = video_model(seed=0)
    randomize_adapters(trained, seed=11)
    torch.nn.init.normal_(trained.fc.weight)
    state = adapter_state_dict(trained)
    # only adapters and the head: the frozen backbone is not in an adapter checkpoint
    assert set(state) == {n for n, _ in trained.named_parameters() if ".adapter_pre_" in n} | {"fc.weight", "fc.bias"}
    assert "backbone.transformer.resblocks.0.adapter_pre_mlp.fc1.weight" in state
    path = tmp_path / "adapters.pt"
    payload = save_adapters(trained, path, epoch=3)
    assert payload["epoch"] == 3 and len(payload["st_adapter_fast"]["adapters"]) == 2 * TINY.layers

    fresh = video_model(seed=0)  # same backbone seed, fresh (identity) adapters, new head
    x = clips()
    assert not torch.allclose(fresh(x), trained(x))
    report = load_adapters(fresh, path)
    assert report.ok and len(report.loaded) == len(state)
    torch.testing.assert_close(fresh(x), trained(x), rtol=0, atol=0)


def test_adapter_state_dict_strictness():
    model = video_model()
    state = adapter_state_dict(model)
    partial = {k: v for k, v in state.items() if "resblocks.0." not in k}
    with pytest.raises(ValueError, match="missing 12"):
        load_adapter_state_dict(model, partial)
    report = load_adapter_state_dict(model, partial, strict=False)
    assert len(report.missing_keys) == 12 and not report.unexpected_keys
    with pytest.raises(ValueError, match="unexpected 1"):
        load_adapter_state_dict(model, {**state, "backbone.nope": torch.zeros(1)})
    bad = dict(state)
    bad["fc.weight"] = torch.zeros(5, TINY.width)
    with pytest.raises(ValueError, match="shapes do not fit"):
        load_adapter_state_dict(model, bad, strict=False)


def features(backbone, x: torch.Tensor) -> torch.Tensor:
    """The bare ViT's per-clip output (frames through the backbone), for comparing adapters."""
    set_num_frames(backbone, x.shape[2])
    return backbone(x.transpose(1, 2).flatten(0, 1))


def test_files_are_relative_to_the_vit_and_load_into_either(tmp_path):
    trained = video_model(seed=0)
    randomize_adapters(trained, seed=11)
    path = tmp_path / "video.pt"
    payload = save_adapters(trained, path)
    # keys relative to the vision transformer (for our CLIP ViT the official ones); the head stays 'fc.*'
    assert "transformer.resblocks.0.adapter_pre_mlp.fc1.weight" in payload["model"]
    assert not any(k.startswith("backbone.") for k in payload["model"])
    assert payload["st_adapter_fast"]["outside"] == ["fc.weight", "fc.bias"]
    x = clips()
    # VideoClassifier file -> bare ViT (the head has no place there: skipped, not an error)
    bare = tiny_clip(seed=0)
    inject_st_adapters(bare, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference", verbose=False)
    assert not torch.allclose(features(bare, x), features(trained.backbone, x))
    report = load_adapters(bare, path)
    assert report.ok and report.skipped_keys == ["fc.weight", "fc.bias"] and len(report.loaded) == 12 * TINY.layers
    torch.testing.assert_close(features(bare, x), features(trained.backbone, x), rtol=0, atol=0)
    # bare-ViT file -> VideoClassifier (its own head is left as it is)
    save_adapters(bare, tmp_path / "bare.pt")
    assert set(torch.load(tmp_path / "bare.pt")["model"]) == {k for k in payload["model"] if not k.startswith("fc.")}
    video = video_model(seed=0)
    head = video.fc.weight.detach().clone()
    report = load_adapters(video, tmp_path / "bare.pt")
    assert report.ok and report.skipped_keys == ["fc.weight", "fc.bias"] and torch.equal(video.fc.weight, head)
    torch.testing.assert_close(features(video.backbone, x), features(trained.backbone, x), rtol=0, atol=0)
    # the same file is an official-format checkpoint too
    again = video_model(seed=0)
    assert load_official_checkpoint(again, path).ok
    torch.testing.assert_close(again(x), trained(x), rtol=0, atol=0)


def test_inject_from_the_file_alone_and_extras_come_back(tmp_path):
    torch.manual_seed(0)
    backbone = tiny_clip(seed=0)
    # mixed settings: 8-wide (3,1,1) before attention in blocks 0-1, 4-wide (5,1,1) before the MLP of block 2
    inject_st_adapters(backbone, adapter_channels=8, positions=("pre_attn",), block_indices=[0, 1],
                       backend="reference", verbose=False)
    inject_st_adapters(backbone, adapter_channels=4, kernel_size=(5, 1, 1), positions=("pre_mlp",),
                       block_indices=[2], num_prefix_tokens=1, backend="reference", verbose=False)
    trained = VideoClassifier(backbone, num_classes=4, dropout=0.0).eval()
    randomize_adapters(trained, seed=5)
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    x = clips()
    trained(x).sum().backward()
    optimizer.step()
    save_adapters(trained, tmp_path / "a.pt", epoch=7, optimizer=optimizer.state_dict())

    plain = VideoClassifier(tiny_clip(seed=0), num_classes=4, dropout=0.0).eval()  # no adapters at all
    report = load_adapters(plain, tmp_path / "a.pt", inject=True, backend="reference")
    assert report.ok and not report.skipped_keys
    assert sorted(report.injected) == sorted(n for n, _ in iter_st_adapters(trained))
    for (name, a), (name2, b) in zip(iter_st_adapters(plain), iter_st_adapters(trained)):
        assert name == name2 and a.kernel_size == b.kernel_size and a.fc1.out_features == b.fc1.out_features
    assert {n for n, p in plain.named_parameters() if p.requires_grad} == {
        n for n, p in trained.named_parameters() if p.requires_grad}  # backbone frozen, adapters + head train
    torch.testing.assert_close(plain(x), trained(x), rtol=0, atol=0)
    # extras come back: resume the optimizer from them
    assert report.extra["epoch"] == 7
    resumed = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-3)
    resumed.load_state_dict(report.extra["optimizer"])
    assert resumed.state_dict()["state"][0]["step"] == 1
    # into a bare plain ViT as well
    bare = tiny_clip(seed=0)
    assert load_adapters(bare, tmp_path / "a.pt", inject=True, backend="reference").ok
    torch.testing.assert_close(features(bare, x), features(trained.backbone, x), rtol=0, atol=0)
    # inject=True needs a plain model and a file that describes its adapters
    with pytest.raises(ValueError, match="already has 3 ST-Adapters"):
        load_adapters(bare, tmp_path / "a.pt", inject=True)
    with pytest.raises(ValueError, match="no adapter settings"):
        load_adapters(tiny_clip(), adapter_state_dict(trained), inject=True)
    # a file that does not fit leaves no half-loaded adapters behind
    wide = tiny_clip(seed=0)
    inject_st_adapters(wide, adapter_channels=6, positions=("pre_mlp",), backend="reference", verbose=False)
    save_adapters(wide, tmp_path / "wide.pt")
    small = tiny_clip(seed=0)
    small.transformer.resblocks[0].ln_1 = torch.nn.LayerNorm(16)  # a narrower width read by inject
    with pytest.raises((ValueError, RuntimeError)):
        load_adapters(small, tmp_path / "wide.pt", inject=True)
    assert not list(iter_st_adapters(small))


def test_version_1_files_still_load(tmp_path):
    """Files written before keys became relative: model-qualified keys, settings without block/position."""
    trained = video_model(seed=0)
    randomize_adapters(trained, seed=3)
    old = {"model": {k: v.clone() for k, v in adapter_state_dict(trained).items()},
           "st_adapter_fast": {"version": 1, "adapters": {
               name: {"in_channels": a.fc1.in_features, "adapter_channels": a.fc1.out_features,
                      "kernel_size": tuple(a.kernel_size), "num_prefix_tokens": a.num_prefix_tokens}
               for name, a in iter_st_adapters(trained)}},
           "epoch": 2}
    torch.save(old, tmp_path / "v1.pt")
    x = clips()
    same_kind = video_model(seed=0)
    report = load_adapters(same_kind, tmp_path / "v1.pt")
    assert report.ok and report.extra == {"epoch": 2}
    torch.testing.assert_close(same_kind(x), trained(x), rtol=0, atol=0)
    # into the bare ViT: its 'backbone.' keys find the adapters, the head has no place (strict says so)
    bare = tiny_clip(seed=0)
    inject_st_adapters(bare, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference", verbose=False)
    with pytest.raises(ValueError, match=r"unexpected 2 \[fc.weight, fc.bias\]"):
        load_adapters(bare, tmp_path / "v1.pt")
    assert len(load_adapters(bare, tmp_path / "v1.pt", strict=False).loaded) == 12 * TINY.layers
    torch.testing.assert_close(features(bare, x), features(trained.backbone, x), rtol=0, atol=0)
    # and inject=True reads block and position off the version-1 names
    plain = VideoClassifier(tiny_clip(seed=0), num_classes=4, dropout=0.0).eval()
    assert load_adapters(plain, tmp_path / "v1.pt", inject=True, backend="reference").ok
    torch.testing.assert_close(plain(x), trained(x), rtol=0, atol=0)


def official_checkpoint(layers: int, width: int, ca: int, classes: int, positions, seed: int = 0):
    """An official-format file: {'model': trainable params only, 'optimizer': ...}."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        for pos in positions:
            p = f"transformer.resblocks.{i}.adapter_{pos}."
            state[p + "fc1.weight"] = torch.randn(ca, width, generator=gen)
            state[p + "fc1.bias"] = torch.randn(ca, generator=gen)
            state[p + "conv.weight"] = torch.randn(ca, 1, 3, 1, 1, generator=gen)
            state[p + "conv.bias"] = torch.randn(ca, generator=gen)
            state[p + "fc2.weight"] = torch.randn(width, ca, generator=gen)
            state[p + "fc2.bias"] = torch.randn(width, generator=gen)
    state["fc.weight"] = torch.randn(classes, width, generator=gen)
    state["fc.bias"] = torch.randn(classes, generator=gen)
    return {"model": state, "optimizer": {}, "next_epoch": 12}


def test_official_checkpoint_maps_onto_the_clip_video_model(tmp_path):
    ckpt = official_checkpoint(TINY.layers, TINY.width, 8, 4, ("pre_attn", "pre_mlp"))
    path = tmp_path / "checkpoint-11.pth"
    torch.save(ckpt, path)
    model = video_model()
    report = load_official_checkpoint(model, path)
    assert report.ok and len(report.loaded) == len(ckpt["model"])
    params = dict(model.named_parameters())
    for key, value in ckpt["model"].items():
        assert torch.equal(params["backbone." + key if key.startswith("transformer") else key], value), key


def test_official_mapping_reports_missing_and_unexpected():
    # the file has adapters in all 3 blocks at both positions; the model only pre_mlp, last 2 blocks
    ckpt = official_checkpoint(TINY.layers, TINY.width, 8, 4, ("pre_attn", "pre_mlp"))
    ckpt["model"]["module.transformer.resblocks.0.ln_1.weight"] = torch.ones(TINY.width)  # DDP prefix, frozen key
    model = video_model(positions=("pre_mlp",), last_n=2)
    mapped, report = map_official_state_dict(ckpt["model"], model)
    assert set(mapped) == {n for n, _ in model.named_parameters() if ".adapter_pre_mlp" in n} | {"fc.weight", "fc.bias"}
    assert not report.missing_keys
    assert sorted(report.unexpected_keys) == sorted(
        [k for k in ckpt["model"] if "adapter_pre_attn" in k or "resblocks.0.adapter" in k]
        + ["transformer.resblocks.0.ln_1.weight"])
    with pytest.raises(ValueError, match="does not match"):
        load_official_checkpoint(model, ckpt)
    report = load_official_checkpoint(model, ckpt, strict=False)
    assert len(report.loaded) == len(mapped)
    # the other way round: a model with more adapters than the file
    small = official_checkpoint(TINY.layers, TINY.width, 8, 4, ("pre_mlp",))
    _, report = map_official_state_dict(small["model"], video_model())
    assert len(report.missing_keys) == 6 * TINY.layers and not report.unexpected_keys
    # wrong adapter width: mismatched, never loaded
    wide = official_checkpoint(TINY.layers, TINY.width, 16, 4, ("pre_attn", "pre_mlp"))
    mapped, report = map_official_state_dict(wide["model"], video_model())
    # every adapter tensor but fc2.bias (C,) has a Ca dimension: 5 per adapter, 2 adapters per block
    assert len(report.mismatched_keys) == 5 * 2 * TINY.layers
    assert len(mapped) == 2 * TINY.layers + 2  # the fc2.bias tensors and the head
    assert not report.ok


@pytest.mark.integration
def test_official_checkpoint_maps_onto_timm_blocks():
    model = tiny_timm(reg_tokens=0)
    inject_st_adapters(model, adapter_channels=8, positions=("pre_mlp",), backend="reference", verbose=False)
    ckpt = official_checkpoint(3, 32, 8, 4, ("pre_mlp",))
    mapped, report = map_official_state_dict(ckpt["model"], model)
    assert report.unexpected_keys == ["fc.weight", "fc.bias"]  # a bare timm backbone has no fc head
    assert "blocks.2.adapter_pre_mlp.conv.weight" in mapped and not report.missing_keys


def synthetic_clip_state_dict(config: CLIPVisionConfig, seed: int = 0):
    """A full-CLIP-style state dict ('visual.*' plus text-tower keys) from a random model."""
    torch.manual_seed(seed)
    visual = CLIPVisionTransformer(config)
    state = {"visual." + k: v.half() for k, v in visual.state_dict().items()}  # OpenAI ships fp16
    state["token_embedding.weight"] = torch.zeros(10, 8)
    state["logit_scale"] = torch.tensor(4.6)
    return state, visual


def test_load_openai_clip_visual_from_a_local_file(tmp_path):
    state, source = synthetic_clip_state_dict(TINY)
    path = tmp_path / "tiny-clip.pt"
    torch.save(state, path)
    assert clip_config_from_state_dict(state, heads=TINY.heads) == TINY
    assert clip_config_from_state_dict(state).heads == 1  # OpenAI's rule: width // 64
    model = video_model(seed=1)
    report = load_openai_clip_visual(model, path)
    assert not report.missing_keys and not report.unexpected_keys
    backbone_state = model.backbone.state_dict()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(backbone_state[key], value.half().float(), rtol=0, atol=0)
    # adapters stay as they were (fresh = identity); the CLIP embedding equals the source model's
    images = torch.randn(2, 3, 16, 16)
    set_num_frames(model, 1)
    torch.testing.assert_close(model.backbone(images), source.half().float()(images), rtol=1e-5, atol=1e-5)


def test_load_openai_clip_visual_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_openai_clip_visual(tiny_clip(), tmp_path / "missing.pt")
    big, _ = synthetic_clip_state_dict(CLIPVisionConfig(16, 8, 48, 1, 2, 24))
    with pytest.raises(ValueError, match="do not fit this model"):
        load_openai_clip_visual(tiny_clip(), big)
    partial = {k: v for k, v in synthetic_clip_state_dict(TINY)[0].items() if "ln_post" not in k}
    with pytest.raises(ValueError, match="missing 2"):
        load_openai_clip_visual(tiny_clip(), partial)
    report = load_openai_clip_visual(tiny_clip(), partial, strict=False)
    assert report.missing_keys == ["ln_post.weight", "ln_post.bias"]
    with pytest.raises(TypeError, match="CLIPVisionTransformer"):
        load_openai_clip_visual(torch.nn.Linear(2, 2), partial)
