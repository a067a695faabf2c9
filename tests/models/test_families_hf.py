"""inject_st_adapters on HF transformers image towers: CLIP (CLIPVisionModel, ...WithProjection,
a CLIPModel's vision tower), SigLIP (P = 0), DINOv2 and DINOv2 with registers -- tiny random
configs on CPU, nothing downloaded. Runs in CI's first stage (.ci/run installs transformers
there); skipped with a reason where transformers is not installed.

Checked per family: identity at init; placement (a forward written here from the library's own
submodules and the reference adapter agrees with random non-zero adapters); only adapters train
and gradients reach every one; VideoClassifier pooling and shapes with T changing between calls;
an adapter-only checkpoint round trip; the self-check refusing a changed layer forward. The
layer forward of the installed release (5.x: Tensor, 4.4x: tuple) is read off its signature.
"""

from __future__ import annotations

import pytest
import torch

from st_adapter_fast.models.checkpoint import load_adapters, load_official_checkpoint, save_adapters
from st_adapter_fast.models.families import hf as hf_family
from st_adapter_fast.models.inject import (
    find_vision_transformer, inject_st_adapters, iter_st_adapters, remove_st_adapters, using_num_frames,
)
from st_adapter_fast.models.video import VideoClassifier

from helpers import fused_device
from test_inject import adapter_ref, frames, randomize_adapters, requires_fused

transformers = pytest.importorskip("transformers", reason="transformers is not installed (.ci/run installs it "
                                                          "in stage 1: pip install transformers)")
MAJOR = int(transformers.__version__.split(".")[0])

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
             patch_size=8)


def build(name: str, seed: int = 0):
    """A tiny random HF model by name; 2 x 2 patch grid."""
    torch.manual_seed(seed)
    if name == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**SMALL))
    if name == "clip_projection":
        return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(projection_dim=24, **SMALL))
    if name == "clip_model":
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                    max_position_embeddings=8)
        return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=SMALL, projection_dim=24))
    if name == "siglip":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SMALL))
    if name == "siglip_no_head":
        return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(vision_use_head=False, **SMALL))
    dino = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=16,
                patch_size=8, layerscale_value=0.5, drop_path_rate=0.1)
    if name == "dinov2":
        return transformers.Dinov2Model(transformers.Dinov2Config(**dino))
    if name == "dinov2_registers":
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=2, **dino)
        return transformers.Dinov2WithRegistersModel(config)
    raise KeyError(name)


FAMILIES = ["clip", "clip_projection", "clip_model", "siglip", "dinov2", "dinov2_registers"]
PREFIX_TOKENS = {"clip": 1, "clip_projection": 1, "clip_model": 1, "siglip": 0, "siglip_no_head": 0, "dinov2": 1,
                 "dinov2_registers": 3}


def tower_of(model):
    return find_vision_transformer(model)[0]


def layers_of(tower):
    encoder = tower.encoder
    return encoder.layers if hasattr(encoder, "layers") else encoder.layer


def encoder_output(tower, images):
    """last_hidden_state of tower.encoder (read with a hook, so the model's own forward runs)."""
    captured = {}
    handle = tower.encoder.register_forward_hook(lambda mod, args, out: captured.update(out=out))
    try:
        tower(pixel_values=images)
    finally:
        handle.remove()
    out = captured["out"]
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def encoder_by_hand(tower, images, num_frames):
    """The encoder with the adapters written in: embeddings (+ CLIP's pre_layrnorm), then per
    layer adapter_pre_attn -> attention residual -> adapter_pre_mlp -> MLP residual, from the
    layer's own submodules and the reference adapter."""
    x = tower.embeddings(images)
    if hasattr(tower, "pre_layrnorm"):
        x = tower.pre_layrnorm(x)
    for layer in layers_of(tower):
        if getattr(layer, "adapter_pre_attn", None) is not None:
            x = adapter_ref(layer.adapter_pre_attn, x, num_frames)
        if hasattr(layer, "layer_norm1"):  # CLIP, SigLIP
            x = x + layer.self_attn(hidden_states=layer.layer_norm1(x))[0]
        else:  # DINOv2: layer scale and drop path
            x = x + layer.drop_path(layer.layer_scale1(layer.attention(layer.norm1(x))[0]))
        if getattr(layer, "adapter_pre_mlp", None) is not None:
            x = adapter_ref(layer.adapter_pre_mlp, x, num_frames)
        if hasattr(layer, "layer_norm2"):
            x = x + layer.mlp(layer.layer_norm2(x))
        else:
            x = x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))
    return x


def clips(batch, num_frames, seed=5):
    return torch.randn(batch, 3, num_frames, 16, 16, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ injection
def test_layer_forward_of_the_installed_release_is_detected():
    """5.x layers take **kwargs and return a Tensor; 4.4x take output_attentions, return a tuple."""
    for cls in (transformers.models.clip.modeling_clip.CLIPEncoderLayer,
                transformers.models.siglip.modeling_siglip.SiglipEncoderLayer,
                transformers.models.dinov2.modeling_dinov2.Dinov2Layer):
        assert hf_family.returns_tuple(cls) == (MAJOR < 5), (cls, transformers.__version__)


@pytest.mark.parametrize("name", FAMILIES)
def test_identity_then_placement_with_random_adapters(name):
    model = build(name).double().eval()
    tower = tower_of(model)
    x = frames(2, 3).double()
    before = encoder_output(tower, x)
    report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                                verbose=False)
    assert report.family == "transformers" and report.num_prefix_tokens == PREFIX_TOKENS[name]
    assert len(report.adapters) == 4 and report.adapters[0].endswith("encoder.layers.0.adapter_pre_attn"
                                                                     if "dinov2" not in name else
                                                                     "encoder.layer.0.adapter_pre_attn")
    with using_num_frames(model, 3):
        assert torch.equal(encoder_output(tower, x), before)  # a fresh adapter is the identity
        randomize_adapters(model)
        got = encoder_output(tower, x)
    torch.testing.assert_close(got, encoder_by_hand(tower, x, 3), rtol=0, atol=1e-12)
    assert (got - before).abs().max() > 1e-3
    # prefix tokens (CLS, registers) pass every adapter unchanged: in layer 0's input they agree
    p = PREFIX_TOKENS[name]
    emb = tower.embeddings(x)
    emb = tower.pre_layrnorm(emb) if hasattr(tower, "pre_layrnorm") else emb
    adapted = adapter_ref(layers_of(tower)[0].adapter_pre_attn, emb, 3)
    assert torch.equal(adapted[:, :p], emb[:, :p]) and not torch.allclose(adapted[:, p:], emb[:, p:])


@pytest.mark.parametrize("name", ["clip_model", "dinov2_registers"])
def test_remove_restores_the_model(name):
    model = build(name).eval()
    tower = tower_of(model)
    x = frames(2, 2)
    before = encoder_output(tower, x)
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), verbose=False)
    randomize_adapters(model)
    with using_num_frames(model, 2):
        assert not torch.allclose(encoder_output(tower, x), before)
    assert remove_st_adapters(model) == 4
    assert list(iter_st_adapters(model)) == [] and "forward" not in layers_of(tower)[0].__dict__
    assert torch.equal(encoder_output(tower, x), before)


def test_clip_model_adapts_its_vision_tower_and_freezes_the_rest():
    model = build("clip_model")
    report = inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    _, prefix = find_vision_transformer(model)
    assert prefix.startswith("vision_model.") and all(n.startswith(prefix) for n in report.adapters)
    assert not any(".adapter_" in n for n, _ in model.text_model.named_parameters())
    assert report.trainable_params == report.adapter_params


@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2_registers"])
def test_only_adapters_train_and_gradients_reach_them(name):
    model = build(name).train()  # DINOv2 drop path on: training mode must work too
    report = inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                                verbose=False)
    randomize_adapters(model)
    adapter_ids = {id(p) for _, a in iter_st_adapters(model) for p in a.parameters()}
    with using_num_frames(model, 2):
        encoder_output(tower_of(model), frames(2, 2)).square().sum().backward()
    for pname, param in model.named_parameters():
        if id(param) in adapter_ids:
            assert param.requires_grad and param.grad is not None and param.grad.abs().max() > 0, pname
        else:
            assert not param.requires_grad and param.grad is None, pname
    assert report.trainable_params == report.adapter_params == sum(p.numel() for p in model.parameters()
                                                                   if id(p) in adapter_ids)


# --------------------------------------------------------------------------- VideoClassifier
@pytest.mark.parametrize("name", FAMILIES + ["siglip_no_head"])
def test_video_classifier_pools_the_models_own_features(name):
    model = build(name)
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    randomize_adapters(model)
    video = VideoClassifier(model, num_classes=4, dropout=0.0).double().eval()
    tower = tower_of(model)
    assert video.family == "transformers" and video.fc.in_features == tower.config.hidden_size
    for t in (2, 3, 1):  # T changes between calls
        x = clips(2, t).double()
        logits = video(x)
        assert logits.shape == (2, 4)
        with using_num_frames(model, t):
            out = tower(pixel_values=x.transpose(1, 2).flatten(0, 1))
        pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)
        if name == "siglip":
            assert out.pooler_output is not None  # the attention-pooling head
        torch.testing.assert_close(logits, video.fc(pooled.view(2, t, -1).mean(1)), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2_registers"])
def test_adapter_only_checkpoint_round_trip(tmp_path, name):
    def video_of(seed):
        model = build(name)
        inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                           verbose=False)
        torch.manual_seed(seed)
        video = VideoClassifier(model, num_classes=3, dropout=0.0).eval()
        randomize_adapters(video, seed=seed)
        return video

    trained, fresh = video_of(1), video_of(2)
    x = clips(1, 2)
    assert not torch.allclose(trained(x), fresh(x))
    saved = save_adapters(trained, tmp_path / "adapters.pt")
    assert all(".adapter_pre_" in k or k.startswith("fc.") for k in saved["model"])
    assert len(saved["model"]) == 4 * 6 + 2
    report = load_adapters(fresh, tmp_path / "adapters.pt")
    assert report.ok and len(report.loaded) == len(saved["model"])
    assert torch.equal(trained(x), fresh(x))
    # re-injection from the file alone, into a plain model (the head stays behind)
    plain = build(name).eval()
    report = load_adapters(plain, tmp_path / "adapters.pt", inject=True, backend="reference")
    assert len(report.injected) == 4 and len(list(iter_st_adapters(plain))) == 4
    images = x.transpose(1, 2).flatten(0, 1)
    with using_num_frames(plain, 2), using_num_frames(trained, 2):
        got, want = encoder_output(tower_of(plain), images), encoder_output(tower_of(trained.backbone), images)
    # float32 CPU matmuls of equal weights in two model instances differed in the last bits here
    # (1.7e-6 on SigLIP, with every parameter torch.equal), so this one compares to float32 noise
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - encoder_output(tower_of(build(name).eval()), images)).abs().max() > 1e-3  # adapters loaded


def test_official_checkpoint_maps_by_block_index():
    model = build("clip")
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                       verbose=False)
    video = VideoClassifier(model, num_classes=3)
    gen = torch.Generator().manual_seed(0)
    official = {}
    for i in range(2):
        for pos in ("adapter_pre_attn", "adapter_pre_mlp"):
            for pname, p in getattr(layers_of(tower_of(model))[i], pos).named_parameters():
                official[f"transformer.resblocks.{i}.{pos}.{pname}"] = torch.randn(p.shape, generator=gen)
    official["fc.weight"], official["fc.bias"] = torch.randn(3, 32, generator=gen), torch.randn(3, generator=gen)
    report = load_official_checkpoint(video, {"model": official})
    assert report.ok and len(report.loaded) == len(official)
    layer1 = layers_of(tower_of(model))[1]
    want = official["transformer.resblocks.1.adapter_pre_mlp.conv.weight"]
    assert torch.equal(layer1.adapter_pre_mlp.conv.weight, want)
    assert torch.equal(video.fc.bias, official["fc.bias"])


# ------------------------------------------------------------------------------ self-check
@pytest.mark.parametrize("name,layer", [
    ("clip", "transformers.models.clip.modeling_clip.CLIPEncoderLayer"),
    ("dinov2", "transformers.models.dinov2.modeling_dinov2.Dinov2Layer"),
])
def test_self_check_catches_a_changed_layer_forward(monkeypatch, name, layer):
    module_name, class_name = layer.rsplit(".", 1)
    cls = getattr(__import__(module_name, fromlist=[class_name]), class_name)
    original = cls.forward

    def changed(self, hidden_states, *args, **kwargs):  # a release that scales its output
        out = original(self, hidden_states, *args, **kwargs)
        return (out[0] * 1.5,) + tuple(out[1:]) if isinstance(out, tuple) else out * 1.5

    model = build(name)
    monkeypatch.setattr(cls, "forward", changed)
    with pytest.raises(TypeError, match=rf"the installed transformers {transformers.__version__} changed "
                                        rf"{class_name}\.forward"):
        inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    assert list(iter_st_adapters(model)) == []  # nothing was put in
    assert all(p.requires_grad for p in model.parameters())  # nor frozen
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False, check=False)
    assert len(list(iter_st_adapters(model))) == 2
    monkeypatch.undo()
    remove_st_adapters(model)
    inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)  # the real one passes


# ------------------------------------------------------------------ training-stack features
def test_gradient_checkpointing_runs_the_adapted_layers():
    """HF's gradient checkpointing wraps the layer's __call__; the instance forward still runs."""
    model = build("clip").train()
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                       verbose=False)
    randomize_adapters(model)
    x = frames(2, 2)
    grads = {}
    for checkpointing in (False, True):
        if checkpointing:  # transformers 5 renames it; 4.4x has only the old name
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable()
            else:  # 4.4x's default reentrant checkpoint drops the grads when the input needs none
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            tower = tower_of(model)  # 5.x flags each layer, 4.4x the encoder
            assert getattr(tower.encoder, "gradient_checkpointing", False) or all(
                getattr(layer, "gradient_checkpointing", False) for layer in layers_of(tower))
        model.zero_grad(set_to_none=True)
        with using_num_frames(model, 2):
            encoder_output(tower_of(model), x).square().sum().backward()
        grads[checkpointing] = [p.grad.clone() for _, a in iter_st_adapters(model) for p in a.parameters()]
    for plain, checkpointed in zip(grads[False], grads[True]):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-6)


@requires_fused
def test_triton_backend_matches_reference_in_an_hf_model():
    """One adapted layer, tiny shapes: the interpreter is slow."""
    device = fused_device()
    x = frames(2, 2).to(device)
    outs = {}
    for backend in ("reference", "triton"):
        model = build("dinov2_registers").eval().to(device)
        inject_st_adapters(model, adapter_channels=8, block_indices=[1], backend=backend, verbose=False)
        randomize_adapters(model)
        with using_num_frames(model, 2):
            outs[backend] = encoder_output(tower_of(model), x).detach()
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-4, atol=1e-5)


def test_self_check_names_a_layer_forward_its_copy_cannot_run(monkeypatch):
    """A release that renames the layer's MLP: the adapted copy (which calls .mlp) fails on it."""
    cls = transformers.models.siglip.modeling_siglip.SiglipEncoderLayer

    def changed(self, hidden_states, attention_mask=None, **kwargs):
        out, _ = self.self_attn(hidden_states=self.layer_norm1(hidden_states), attention_mask=attention_mask)
        hidden_states = hidden_states + out
        return hidden_states + self.ffn(self.layer_norm2(hidden_states))

    model = build("siglip")
    for layer in layers_of(tower_of(model)):
        layer.ffn = layer.mlp
        del layer.mlp
    monkeypatch.setattr(cls, "forward", changed)
    with pytest.raises(TypeError, match=rf"the installed transformers {transformers.__version__} changed "
                                        r"SiglipEncoderLayer\.forward: its adapted copy in st_adapter_fast "
                                        r"fails on it \(AttributeError"):
        inject_st_adapters(model, adapter_channels=8, backend="reference", verbose=False)
    assert list(iter_st_adapters(model)) == []


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_mixed_precision_training_step(name):
    """The official recipe on an HF tower: backbone bf16, adapters and head fp32, autocast."""
    import torch.nn.functional as F

    from st_adapter_fast.models.mixed_precision import prepare_mixed_precision

    model = build(name)
    inject_st_adapters(model, adapter_channels=8, positions=("pre_attn", "pre_mlp"), backend="reference",
                       verbose=False)
    video = VideoClassifier(model, num_classes=2, dropout=0.0)
    randomize_adapters(video)
    amp = prepare_mixed_precision(video, torch.bfloat16, device_type="cpu")
    layer0 = layers_of(tower_of(model))[0]
    assert layer0.self_attn.q_proj.weight.dtype == torch.bfloat16
    assert layer0.adapter_pre_attn.fc1.weight.dtype == torch.float32
    optimizer = torch.optim.SGD([p for p in video.parameters() if p.requires_grad], lr=0.1)
    before = layer0.adapter_pre_attn.conv.weight.detach().clone()
    with amp.autocast():
        loss = F.cross_entropy(video(clips(2, 2)), torch.tensor([0, 1]))
    amp.step(loss, optimizer)
    assert torch.isfinite(loss) and not torch.equal(layer0.adapter_pre_attn.conv.weight, before)
