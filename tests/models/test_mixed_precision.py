"""prepare_mixed_precision outside autocast: the prepared model's own forward enters the recipe's
autocast (eval loops), or -- with autocast_forward=False -- fails with an error saying what to do.
The training step itself is tested in test_video.py (test_mixed_precision_recipe)."""

from __future__ import annotations

import pytest
import torch

from st_adapter_fast.models.clip_vit import build_clip_video_model
from st_adapter_fast.models.mixed_precision import prepare_mixed_precision

from test_inject import TINY, randomize_adapters


def prepared_video(dtype, **kwargs):
    torch.manual_seed(0)
    video = build_clip_video_model(TINY, num_classes=3, adapter_channels=8, backend="reference", dropout=0.0)
    randomize_adapters(video)
    return video.eval(), prepare_mixed_precision(video, dtype, device_type="cpu", **kwargs)


def clips(batch: int = 2, num_frames: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, num_frames, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prepared_model_runs_outside_autocast_as_it_does_inside(dtype):
    video, amp = prepared_video(dtype)
    assert video.backbone.conv1.weight.dtype == dtype  # the frozen weights really are half
    x = clips()
    with torch.no_grad():
        plain = video(x)  # an eval loop: no autocast entered by the caller
        with amp.autocast():
            inside = video(x)
    assert not torch.is_autocast_enabled("cpu")  # the hook left the autocast it entered
    assert plain.dtype == inside.dtype == dtype  # outputs in the autocast dtype, as under amp.autocast()
    torch.testing.assert_close(plain, inside, rtol=0, atol=0)
    # a forward that raises leaves no autocast behind either
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        video(x[0])
    assert not torch.is_autocast_enabled("cpu")


def test_without_the_hook_a_plain_forward_fails_with_what_to_do():
    video, amp = prepared_video(torch.float16, autocast_forward=False)
    x = clips()
    with pytest.raises(RuntimeError, match=r"under `with amp.autocast\(\):`.*autocast_forward=True"):
        video(x)
    with amp.autocast():
        assert video(x).shape == (2, 3)
    # preparing again replaces the hooks rather than stacking them
    hooks_before = len(video._forward_pre_hooks), len(video._forward_hooks)
    amp = prepare_mixed_precision(video, torch.float16, device_type="cpu")
    assert (len(video._forward_pre_hooks), len(video._forward_hooks)) == hooks_before
    assert video(x).shape == (2, 3)
    # the hooks are what makes the plain call work: removed, torch's own dtype error comes back
    amp.remove()
    assert (len(video._forward_pre_hooks), len(video._forward_hooks)) == (hooks_before[0] - 1, hooks_before[1] - 1)
    with pytest.raises((RuntimeError, TypeError), match="Half|float16"):  # torch's or the op's dtype check
        video(x)
