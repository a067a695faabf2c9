"""inject_st_adapters on the built-in CLIP-style ViT (always runs) and on tiny timm / open_clip
models (integration: skipped with a reason when timm / open_clip are not importable).

What is checked: a fresh adapter is the identity (outputs bit-equal), adapters sit exactly where
the official model puts them (a hand-written block forward with random NON-zero adapters agrees),
gradients reach only the adapters, num_frames can change between calls, prefix tokens and
options are read and validated, and the Triton backend (interpreter on CPU) matches the reference.
"""

from __future__ import annotations

import pytest
import torch

from st_adapter_fast import reference
from st_adapter_fast.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer
from st_adapter_fast.models.inject import (
    count_parameters, inject_st_adapters, iter_st_adapters, remove_st_adapters, set_num_frames,
    using_num_frames,
)

from helpers import fused_device, triton_interpreter_on

# the fused Triton backend runs on a GPU, or on CPU tensors in the interpreter (the CPU twin)
requires_fused = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_on()),
    reason="needs CUDA, or TRITON_INTERPRET=1 for the CPU twin (tests/conftest.py sets it without CUDA)",
)

TINY = CLIPVisionConfig(input_resolution=16, patch_size=8, width=32, layers=3, heads=2, output_dim=24)


def tiny_clip(seed: int = 0, dtype=torch.float32) -> CLIPVisionTransformer:
    torch.manual_seed(seed)
    return CLIPVisionTransformer(TINY).to(dtype)


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Random non-zero adapter parameters: a fresh adapter is the identity and proves nothing."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, adapter in iter_st_adapters(model):
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device) * 0.3)


def adapter_ref(adapter, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The adapter through the plain reference, whatever backend the module is set to."""
    return reference(x, num_frames, adapter.fc1.weight, adapter.fc1.bias, adapter.conv.weight, adapter.conv.bias,
                     adapter.fc2.weight, adapter.fc2.bias, num_prefix_tokens=adapter.num_prefix_tokens,
                     grid_size=adapter.grid_size)


def clip_by_hand(model: CLIPVisionTransformer, images: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The official ST-Adapter ViT forward written out: adapter_pre_attn -> attention residual ->
    adapter_pre_mlp -> MLP residual, per block; then ln_post(CLS) @ proj."""
    x = model.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([model.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = model.ln_pre(x + model.positional_embedding)
    for block in model.transformer.resblocks:
        if block.adapter_pre_attn is not None:
            x = adapter_ref(block.adapter_pre_attn, x, num_frames)
        x = x + block.attention(block.ln_1(x))
        if block.adapter_pre_mlp is not None:
            x = adapter_ref(block.adapter_pre_mlp, x, num_frames)
        x = x + block.mlp(block.ln_2(x))
    return model.ln_post(x[:, 0]) @ model.proj


def frames(batch: int, num_frames: int, size: int = 16, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch * num_frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------- built-in CLIP ViT (always)
@pytest.mark.parametrize("positions", [("pre_mlp",), ("pre_attn", "pre_mlp"), ("pre_attn",)])
def test_fresh_adapters_are_the_identity(positions):
    model = tiny_clip()
    x = frames(2, 3)
    before = model(x)
    inject_st_adapters(model, adapter_channels=16, positions=positions, backend="reference", verbose=False)
    with using_num_frames(model, 3):
        after = model(x)
    assert torch.equal(before, after)


@pytest.mark.parametrize("positions,last_n", [(("pre_mlp",), None), (("pre_attn", "pre_mlp"), 2)])
def test_adapters_sit_where_the_official_model_puts_them(positions, last_n):
    model = tiny_clip().double()
    report = inject_st_adapters(model, adapter_channels=12, positions=positions, last_n_blocks=last_n,
                                backend="reference", verbose=False)
    randomize_adapters(model)
    x = frames(2, 4).double()
    with using_num_frames(model, 4):
        got = model(x)
    want = clip_by_hand(model, x, 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the adapters really change the output (random non-zero parameters)
    assert (got - clip_by_hand(tiny_clip().double(), x, 4)).abs().max() > 1e-3
    expected_blocks = list(range(3 - (last_n or 3), 3))
    assert report.block_indices == expected_blocks
    assert len(report.adapters) == len(expected_blocks) * len(positions)


def test_backbone_frozen_and_gradients_reach_only_adapters():
    model = tiny_clip()
    report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), last_n_blocks=2,
                                backend="reference", verbose=False)
    adapter_params = {id(p) for _, a in iter_st_adapters(model) for p in a.parameters()}
    with using_num_frames(model, 2):
        # all tokens, not the CLS embedding: the last block's pre-MLP adapter only touches
        # patch tokens that no later attention reads, so CLS never depends on it
        model.forward_tokens(frames(2, 2)).square().sum().backward()
    for name, p in model.named_parameters():
        if id(p) in adapter_params:
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # at the identity init only conv (and fc2 bias) see a gradient; conv.weight must
    for _, adapter in iter_st_adapters(model):
        assert adapter.conv.weight.grad.abs().max() > 0
    n_adapter = sum(p.numel() for _, a in iter_st_adapters(model) for p in a.parameters())
    assert report.adapter_params == n_adapter == report.trainable_params
    assert report.total_params == count_parameters(model)[1]
    # 4 adapters of C=32 -> Ca=8, kernel (3,1,1): fc1 32*8+8, conv 8*3+8, fc2 8*32+32
    assert n_adapter == 4 * (32 * 8 + 8 + 8 * 3 + 8 + 8 * 32 + 32)


def test_freeze_backbone_false_leaves_requires_grad():
    model = tiny_clip()
    inject_st_adapters(model, adapter_channels=8, freeze_backbone=False, verbose=False)
    assert all(p.requires_grad for p in model.parameters())


def test_num_frames_can_change_between_calls():
    model = tiny_clip().double()
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                       verbose=False)
    randomize_adapters(model)
    x = frames(1, 6).double()  # 6 frames: one clip of 6, two of 3, three of 2
    outs = {}
    for t in (6, 3, 2, 6):
        set_num_frames(model, t)
        outs[t] = model(x)
        torch.testing.assert_close(outs[t], clip_by_hand(model, x, t), rtol=0, atol=1e-12)
    assert (outs[6] - outs[3]).abs().max() > 1e-3  # clip boundaries matter to the temporal conv
    # the context manager restores what was set before
    with using_num_frames(model, 2):
        assert all(a.num_frames == 2 for _, a in iter_st_adapters(model))
    assert all(a.num_frames == 6 for _, a in iter_st_adapters(model))
    # an explicit num_frames argument wins over the stored one
    torch.testing.assert_close(model(x, num_frames=3), outs[3], rtol=0, atol=0)


def test_num_frames_missing_or_bad_is_an_error():
    model = tiny_clip()
    inject_st_adapters(model, adapter_channels=8, verbose=False)
    with pytest.raises(RuntimeError, match="num_frames is not set"):
        model(frames(1, 2))
    with pytest.raises(TypeError, match="num_frames must be an int"):
        set_num_frames(model, 2.0)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        set_num_frames(model, 0)
    set_num_frames(model, 3)
    with pytest.raises(ValueError, match="not divisible by num_frames"):
        model(frames(1, 2))  # 2 images are not whole clips of 3


def test_options_and_errors():
    model = tiny_clip()
    report = inject_st_adapters(model, adapter_channels=0.5, kernel_size=5, block_indices=[0, -1], verbose=False)
    assert report.adapter_channels == 16 and report.kernel_size == (5, 1, 1)
    assert report.block_indices == [0, 2] and report.num_prefix_tokens == 1
    assert report.adapters == ["transformer.resblocks.0.adapter_pre_mlp", "transformer.resblocks.2.adapter_pre_mlp"]
    assert "trainable params" in str(report)
    with pytest.raises(ValueError, match="already has an adapter_pre_mlp"):
        inject_st_adapters(model, verbose=False)
    for kwargs, err, msg in [
        (dict(positions=("post_mlp",)), ValueError, "positions must be"),
        (dict(last_n_blocks=4), ValueError, r"last_n_blocks must be in \[1, 3\]"),
        (dict(last_n_blocks=1, block_indices=[0]), ValueError, "not both"),
        (dict(block_indices=[3]), ValueError, "out of range"),
        (dict(adapter_channels=True), TypeError, "adapter_channels"),
        (dict(adapter_channels=-0.5), ValueError, "adapter_channels"),
        (dict(num_prefix_tokens=-1), ValueError, "num_prefix_tokens"),
    ]:
        with pytest.raises(err, match=msg):
            inject_st_adapters(tiny_clip(), verbose=False, **kwargs)
    with pytest.raises(TypeError, match="no transformer blocks"):
        inject_st_adapters(torch.nn.Linear(3, 3), verbose=False)


def test_adapters_take_the_blocks_device_and_dtype():
    model = tiny_clip(dtype=torch.float64)
    inject_st_adapters(model, adapter_channels=8, verbose=False)
    assert all(p.dtype == torch.float64 for _, a in iter_st_adapters(model) for p in a.parameters())


def test_remove_restores_the_model():
    model = tiny_clip()
    x = frames(2, 2)
    before = model(x)
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), verbose=False)
    randomize_adapters(model)
    set_num_frames(model, 2)
    assert not torch.allclose(model(x), before)
    assert remove_st_adapters(model) == 6
    assert list(iter_st_adapters(model)) == []
    assert torch.equal(model(x), before)


@requires_fused
def test_triton_backend_matches_reference_in_a_model():
    """One adapted block, tiny shapes: the interpreter is slow."""
    outs, grads = {}, {}
    device = fused_device()
    x = frames(2, 2).to(device)
    for backend in ("reference", "triton"):
        model = tiny_clip().to(device)
        inject_st_adapters(model, adapter_channels=8, block_indices=[1], backend=backend, verbose=False)
        randomize_adapters(model)
        with using_num_frames(model, 2):
            out = model(x)
        out.square().sum().backward()
        outs[backend] = out.detach()
        grads[backend] = [p.grad for _, a in iter_st_adapters(model) for p in a.parameters()]
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-5)
    for g_fused, g_ref in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------- timm (integration)
def _timm():
    return pytest.importorskip("timm", reason="timm is not installed (optional extra; see .ci/run)")


def tiny_timm(reg_tokens: int = 2, **kwargs):
    timm = _timm()
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                             depth=3, num_heads=2, num_classes=0, reg_tokens=reg_tokens, **kwargs)


def timm_by_hand(model, images, num_frames):
    """timm VisionTransformer.forward_features with the adapters written in."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    for block in model.blocks:
        if getattr(block, "adapter_pre_attn", None) is not None:
            x = adapter_ref(block.adapter_pre_attn, x, num_frames)
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        if getattr(block, "adapter_pre_mlp", None) is not None:
            x = adapter_ref(block.adapter_pre_mlp, x, num_frames)
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return model.norm(x)


@pytest.mark.integration
def test_timm_identity_placement_prefix_tokens_and_grads():
    model = tiny_timm(reg_tokens=2).eval()
    x = frames(2, 3)
    before = model.forward_features(x)
    report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), last_n_blocks=2,
                                backend="reference", verbose=False)
    assert report.family == "timm" and report.num_prefix_tokens == model.num_prefix_tokens == 3
    assert report.adapters[0] == "blocks.1.adapter_pre_attn"
    with using_num_frames(model, 3):
        assert torch.equal(model.forward_features(x), before)
        randomize_adapters(model)
        got = model.forward_features(x)
    torch.testing.assert_close(got, timm_by_hand(model, x, 3), rtol=1e-5, atol=1e-5)
    assert (got - before).abs().max() > 1e-3
    # the 3 prefix tokens (CLS + 2 registers) pass the adapters untouched: change only patches
    set_num_frames(model, 3)
    got.square().sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if ".adapter_" not in n)
    assert all(p.grad is not None for _, a in iter_st_adapters(model) for p in a.parameters())
    assert report.trainable_params == report.adapter_params


@pytest.mark.integration
def test_timm_non_square_grid_and_unsupported_blocks():
    timm = _timm()
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(16, 24), patch_size=8,
                              embed_dim=32, depth=2, num_heads=2, num_classes=0)
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    randomize_adapters(model)
    x = torch.randn(4, 3, 16, 24)
    with using_num_frames(model, 2):
        torch.testing.assert_close(model.forward_features(x), timm_by_hand(model, x, 2), rtol=1e-5, atol=1e-5)
    post = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, embed_dim=32,
                             depth=2, num_heads=2, block_fn=timm.models.vision_transformer.ResPostBlock)
    with pytest.raises(TypeError, match="ResPostBlock"):
        inject_st_adapters(post, verbose=False)


@pytest.mark.integration
@requires_fused
def test_timm_triton_backend_matches_reference():
    outs = {}
    device = fused_device()
    x = frames(1, 2).to(device)
    for backend in ("reference", "triton"):
        model = tiny_timm(reg_tokens=0).eval().to(device)
        inject_st_adapters(model, adapter_channels=8, block_indices=[2], backend=backend, verbose=False)
        randomize_adapters(model)
        with using_num_frames(model, 2):
            outs[backend] = model.forward_features(x).detach()
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------- open_clip (integration)
def tiny_open_clip():
    open_clip = pytest.importorskip("open_clip", reason="open_clip is not installed (optional extra; see .ci/run)")
    torch.manual_seed(0)
    return open_clip.CLIP(
        embed_dim=24,
        vision_cfg=dict(image_size=16, layers=3, width=32, patch_size=8, head_width=16),
        text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1),
    )


def open_clip_by_hand(visual, images, num_frames):
    """open_clip VisionTransformer.forward up to the transformer output, adapters written in."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1), x], dim=1)
    x = visual.ln_pre(visual.patch_dropout(x + visual.positional_embedding))
    for block in visual.transformer.resblocks:
        if getattr(block, "adapter_pre_attn", None) is not None:
            x = adapter_ref(block.adapter_pre_attn, x, num_frames)
        x = x + block.ls_1(block.attention(q_x=block.ln_1(x)))
        if getattr(block, "adapter_pre_mlp", None) is not None:
            x = adapter_ref(block.adapter_pre_mlp, x, num_frames)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


@pytest.mark.integration
def test_open_clip_visual_identity_placement_and_freeze():
    clip = tiny_open_clip().eval()
    visual = clip.visual
    x = frames(2, 2)
    before = visual(x)
    # the whole CLIP model: adapters go into .visual (its .transformer is the text tower)
    report = inject_st_adapters(clip, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                                verbose=False)
    assert report.family == "open_clip" and report.num_prefix_tokens == 1
    assert report.adapters[0] == "visual.transformer.resblocks.0.adapter_pre_attn"
    assert not any(".adapter_" in n for n, _ in clip.transformer.named_parameters())
    assert report.trainable_params == report.adapter_params  # text tower frozen too
    captured = {}
    visual.transformer.register_forward_hook(lambda mod, args, out: captured.update(tokens=out))
    with using_num_frames(visual, 2):
        assert torch.equal(visual(x), before)
        randomize_adapters(visual)
        after = visual(x)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(captured["tokens"], open_clip_by_hand(visual, x, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_open_clip_sequence_first_transformer():
    """open_clip's Transformer(batch_first=False) runs its blocks on (L, N, C): the adapters
    must see (N, L, C) all the same, so both layouts give the same output."""
    clip = tiny_open_clip().eval()  # skips without open_clip
    import open_clip

    visual = clip.visual
    seq_first = open_clip.transformer.Transformer(32, 3, 2, batch_first=False)
    seq_first.load_state_dict(visual.transformer.state_dict())
    twin = tiny_open_clip().eval().visual
    twin.transformer = seq_first
    x = frames(1, 3)
    for model in (visual, twin):
        inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                           verbose=False)
        randomize_adapters(model, seed=4)
        set_num_frames(model, 3)
    assert twin.transformer.resblocks[0].st_adapter_seq_first and not visual.transformer.resblocks[0].st_adapter_seq_first
    out = visual(x)
    assert (out - tiny_open_clip().eval().visual(x)).abs().max() > 1e-3
    torch.testing.assert_close(twin(x), out, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ self-check (timm, open_clip)
@pytest.mark.integration
def test_timm_self_check_catches_a_changed_block_forward(monkeypatch):
    timm = _timm()
    model = tiny_timm(reg_tokens=0)
    block_cls = timm.models.vision_transformer.Block

    def changed(self, x, *args, **kwargs):  # a release that drops the MLP's layer scale path
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
        return x + self.mlp(self.norm2(x)) * 0.5

    monkeypatch.setattr(block_cls, "forward", changed)
    with pytest.raises(TypeError, match=rf"the installed timm {timm.__version__} changed Block\.forward"):
        inject_st_adapters(model, adapter_channels=8, verbose=False)
    assert list(iter_st_adapters(model)) == []
    inject_st_adapters(model, adapter_channels=8, verbose=False, check=False)  # skipped on request
    assert len(list(iter_st_adapters(model))) == 3


@pytest.mark.integration
def test_open_clip_self_check_catches_a_changed_block_forward(monkeypatch):
    clip = tiny_open_clip()
    import open_clip

    original = open_clip.transformer.ResidualAttentionBlock.forward

    def changed(self, q_x, k_x=None, v_x=None, attn_mask=None):
        return original(self, q_x, k_x, v_x, attn_mask) * 2.0

    monkeypatch.setattr(open_clip.transformer.ResidualAttentionBlock, "forward", changed)
    with pytest.raises(TypeError, match=r"the installed open_clip \S+ changed ResidualAttentionBlock\.forward"):
        inject_st_adapters(clip, adapter_channels=8, verbose=False)
    monkeypatch.undo()
    inject_st_adapters(clip, adapter_channels=8, verbose=False)
    assert len(list(iter_st_adapters(clip))) == 3
