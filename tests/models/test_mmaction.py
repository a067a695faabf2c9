"""MMAction2's STAdapter (ViT-CLIP / VindLU backbones) as our STAdapter with its switches, and its
checkpoints mapped onto ours (docs/design.md §9).

The module below re-states, in this file's own code, the forward of MMAction2's STAdapter
(open-mmlab/mmaction2, mmaction/models/multimodal/vindlu/temporal_model.py) and timm's
drop_path that it uses: x [b, t, l, c]; linear1 on every token; the patch tokens through a
depthwise Conv3d with padding 'same', the CLS token without it; ReLU; linear2;
out = x + scale * DropPath(.), scale = nn.Parameter(torch.zeros([])); single-frame clips
(t == 1) are returned unchanged.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from st_adapter_fast import STAdapter
from st_adapter_fast.models.checkpoint import (
    MMACTION2_SWITCHES, load_mmaction_checkpoint, map_mmaction_state_dict,
)


def _timm_style_drop_path(y, p, training):
    """One Bernoulli(1-p) per sample along dim 0 in y's dtype, kept samples scaled by 1/(1-p)."""
    if p == 0.0 or not training:
        return y
    keep = 1.0 - p
    factor = y.new_empty((y.shape[0],) + (1,) * (y.dim() - 1)).bernoulli_(keep)
    if keep > 0.0:
        factor.div_(keep)
    return y * factor


class MMAction2STAdapter(nn.Module):
    """Parameter names and forward of MMAction2's STAdapter (see the module docstring)."""

    def __init__(self, kernel_size=(3, 3, 3), input_dim=768, hidden_dim=384, img_size=224, patch_size=16,
                 drop_prob=0.1):
        super().__init__()
        self.h = self.w = img_size // patch_size
        self.linear1 = nn.Linear(input_dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, input_dim)
        self.conv = nn.Conv3d(hidden_dim, hidden_dim, kernel_size=kernel_size, padding="same", groups=hidden_dim)
        self.drop_prob = drop_prob
        self.scale = nn.Parameter(torch.zeros([]))

    def forward(self, x):  # x: [b, t, 1 + h*w, c]
        b, t, l, _ = x.shape
        if t == 1:
            return x
        hidden = self.linear1(x)
        cls_token, patches = hidden[:, :, :1], hidden[:, :, 1:]
        grid = patches.reshape(b, t, self.h, self.w, -1).permute(0, 4, 1, 2, 3).contiguous()  # b c t h w
        patches = self.conv(grid).permute(0, 2, 3, 4, 1).reshape(b, t, self.h * self.w, -1)
        hidden = torch.relu(torch.cat([cls_token, patches], dim=2))
        return x + self.scale * _timm_style_drop_path(self.linear2(hidden), self.drop_prob, self.training)


def _pair(c=24, ca=12, side=3, drop_prob=0.1, scale=0.7, seed=0):
    """(MMAction2 module with trained-looking weights, our STAdapter loaded from its state dict)."""
    torch.manual_seed(seed)
    mm = MMAction2STAdapter(input_dim=c, hidden_dim=ca, img_size=side * 16, patch_size=16,
                            drop_prob=drop_prob).double()
    with torch.no_grad():
        for p in mm.parameters():
            p.normal_(0, 0.3)
        mm.scale.fill_(scale)
    ours = STAdapter(c, ca, (3, 3, 3), **{**MMACTION2_SWITCHES, "drop_path": drop_prob}).double()
    report = load_mmaction_checkpoint(ours, mm.state_dict())
    assert report.ok and len(report.loaded) == 7, report
    return mm, ours


def _run_both(mm, ours, b, t, side, seed):
    c = mm.linear1.in_features
    x = torch.randn(b, t, 1 + side * side, c, dtype=torch.float64)
    grad = torch.randn_like(x)
    x_mm, x_ours = x.clone().requires_grad_(), x.reshape(b * t, -1, c).clone().requires_grad_()
    torch.manual_seed(seed)
    out_mm = mm(x_mm)
    torch.manual_seed(seed)
    out_ours = ours(x_ours, t)
    out_mm.backward(grad)
    out_ours.backward(grad.reshape(b * t, -1, c))
    return x_mm, out_mm, x_ours, out_ours


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_our_stadapter_computes_mmaction2s(mode):
    """Same output and gradients (x and every parameter) after loading MMAction2's state dict,
    in eval mode and in training mode with DropPath (both draw one Bernoulli per clip from
    torch's RNG, so one seed drops the same clips)."""
    side, b, t = 3, 6, 4
    mm, ours = _pair(side=side, drop_prob=0.5)
    mm.train(mode == "train"), ours.train(mode == "train")
    x_mm, out_mm, x_ours, out_ours = _run_both(mm, ours, b, t, side, seed=3)
    torch.testing.assert_close(out_ours, out_mm.reshape(b * t, -1, out_mm.shape[-1]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x_ours.grad, x_mm.grad.reshape(x_ours.shape), rtol=1e-12, atol=1e-12)
    names = {"linear1": "fc1", "conv": "conv", "linear2": "fc2"}
    ours_params = dict(ours.named_parameters())
    for name, p in mm.named_parameters():
        mine = ours_params[".".join([names.get(name.split(".")[0], name.split(".")[0])] + name.split(".")[1:])]
        assert mine.grad is not None and p.grad is not None, name
        torch.testing.assert_close(mine.grad, p.grad, rtol=1e-10, atol=1e-12, msg=lambda m: f"{name}: {m}")
    if mode == "train":  # the seed must drop some clips and keep others, or this proves little
        branch = (out_mm - x_mm).detach().reshape(b, -1).abs().sum(1)
        assert (branch == 0).any() and (branch > 0).any(), branch


def test_fresh_mmaction2_adapter_is_the_identity_after_loading():
    """MMAction2 initialises scale to 0: loaded, our adapter passes x through exactly."""
    torch.manual_seed(1)
    mm = MMAction2STAdapter(input_dim=16, hidden_dim=8, img_size=32, patch_size=16)
    ours = STAdapter(16, 8, (3, 3, 3), **MMACTION2_SWITCHES)
    assert load_mmaction_checkpoint(ours, mm.state_dict()).ok
    assert ours.scale.item() == 0.0
    x = torch.randn(2 * 3, 1 + 4, 16)
    assert torch.equal(ours.eval()(x, 3), x)


def test_single_frame_clips_differ_by_design():
    """MMAction2 skips the adapter for t == 1; ours adapts every clip (documented on
    load_mmaction_checkpoint)."""
    mm, ours = _pair(side=2)
    mm.eval(), ours.eval()
    x = torch.randn(3, 1, 5, 24, dtype=torch.float64)
    assert torch.equal(mm(x), x)
    assert not torch.allclose(ours(x.reshape(3, 5, 24), 1), x.reshape(3, 5, 24))


# ------------------------------------------------------------------------- the key mapping
class _Backbone(nn.Module):
    """A VindLU-like container: blocks.{i} with a temp_model adapter and backbone weights."""

    def __init__(self, adapter_factory, n=2, c=16):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(n):
            block = nn.Module()
            block.attn = nn.Linear(c, c)
            block.temp_model = adapter_factory()
            self.blocks.append(block)


def _mm_state(prefix="blocks", n=2, c=16, ca=8):
    state = {}
    for i in range(n):
        state[f"{prefix}.{i}.attn.weight"] = torch.randn(c, c)
        for k, v in MMAction2STAdapter(input_dim=c, hidden_dim=ca, img_size=32).state_dict().items():
            state[f"{prefix}.{i}.temp_model.{k}"] = v.normal_()
    return state


def test_mapping_renames_and_reports():
    model = _Backbone(lambda: STAdapter(16, 8, (3, 3, 3), **MMACTION2_SWITCHES))
    state = _mm_state()
    mapped, report = map_mmaction_state_dict(state, model)
    assert sorted(report.loaded) == sorted(f"blocks.{i}.temp_model.{n}" for i in range(2) for n in (
        "fc1.weight", "fc1.bias", "conv.weight", "conv.bias", "fc2.weight", "fc2.bias", "scale"))
    assert report.missing_keys == [] and report.mismatched_keys == []
    assert sorted(report.unexpected_keys) == ["blocks.0.attn.weight", "blocks.1.attn.weight"]  # the backbone's
    assert torch.equal(mapped["blocks.1.temp_model.fc2.weight"], state["blocks.1.temp_model.linear2.weight"])
    assert torch.equal(mapped["blocks.0.temp_model.scale"], state["blocks.0.temp_model.scale"])

    # strict loading refuses the backbone keys; strict=False loads the adapters and reports them
    with pytest.raises(ValueError, match="unexpected 2"):
        load_mmaction_checkpoint(model, state)
    report = load_mmaction_checkpoint(model, {"state_dict": {"module." + k: v for k, v in state.items()}},
                                      strict=False)
    assert len(report.loaded) == 14
    assert torch.equal(model.blocks[0].temp_model.fc1.weight, state["blocks.0.temp_model.linear1.weight"])
    assert torch.equal(model.blocks[1].temp_model.conv.bias, state["blocks.1.temp_model.conv.bias"])


def test_mapping_with_module_map_missing_and_mismatched():
    model = _Backbone(lambda: STAdapter(16, 8, (3, 3, 3), **MMACTION2_SWITCHES))
    state = {k: v for k, v in _mm_state(prefix="backbone.layer").items() if "temp_model" in k}
    _, unmapped = map_mmaction_state_dict(state, model)
    assert len(unmapped.unexpected_keys) == 14 and len(unmapped.missing_keys) == 14
    for module_map in ({"backbone.layer": "blocks"}, lambda path: path.replace("backbone.layer", "blocks")):
        _, report = map_mmaction_state_dict(state, model, module_map=module_map)
        assert report.ok and len(report.loaded) == 14, report
    del state["backbone.layer.1.temp_model.scale"]
    _, report = map_mmaction_state_dict(state, model, module_map={"backbone.layer": "blocks"})
    assert report.missing_keys == ["blocks.1.temp_model.scale"]

    # an official-kernel adapter cannot take a (3, 3, 3) conv; one without scale= has no place for it
    official = STAdapter(16, 8)
    single = {k[len("backbone.layer.0.temp_model."):]: v for k, v in state.items() if ".0.temp_model." in k}
    _, report = map_mmaction_state_dict(single, official)
    assert report.unexpected_keys == ["scale"]
    assert len(report.mismatched_keys) == 1 and "conv.weight" in report.mismatched_keys[0]
    assert "(8, 1, 3, 3, 3)" in report.mismatched_keys[0] and "(8, 1, 3, 1, 1)" in report.mismatched_keys[0]
    with pytest.raises(ValueError, match="mismatched 1"):
        load_mmaction_checkpoint(official, single)


def test_loading_into_other_switches_warns():
    single = {k: v for k, v in MMAction2STAdapter(input_dim=16, hidden_dim=8, img_size=32).state_dict().items()}
    plain = STAdapter(16, 8, (3, 3, 3), scale=0.0)  # no ReLU, CLS skipped: not MMAction2's forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_mmaction_checkpoint(plain, single).ok
    msgs = [str(w.message) for w in caught]
    assert any("act_after_conv=None (MMAction2: 'relu')" in m and "prefix_mode='skip'" in m for m in msgs), msgs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right switches load silently
        load_mmaction_checkpoint(STAdapter(16, 8, (3, 3, 3), **MMACTION2_SWITCHES), single)


def test_save_adapters_records_switches_and_inject_refuses_them(tmp_path):
    """inject_st_adapters builds official adapters only: a file saved from variant adapters says
    so, and load_adapters(inject=True) refuses it instead of silently losing activations."""
    import tiny_clip
    from st_adapter_fast.models.checkpoint import load_adapters, save_adapters

    model = tiny_clip.build_model()
    saved = save_adapters(model, tmp_path / "official.pt")["st_adapter_fast"]["adapters"]
    assert saved and all(cfg["switches"] == {} for cfg in saved.values())
    for _, adapter in tiny_clip.adapter_modules(model):  # switches without parameters
        adapter.act_after_conv, adapter.prefix_mode = "relu", "mlp"
    saved = save_adapters(model, tmp_path / "variant.pt")["st_adapter_fast"]["adapters"]
    assert all(cfg["switches"] == {"act_after_conv": "relu", "prefix_mode": "mlp"} for cfg in saved.values())
    plain = tiny_clip.build_model()
    from st_adapter_fast.models.inject import remove_st_adapters

    remove_st_adapters(plain)
    with pytest.raises(ValueError, match="variant switches"):
        load_adapters(plain, tmp_path / "variant.pt", inject=True)
    assert load_adapters(plain, tmp_path / "official.pt", inject=True, backend="reference").ok
