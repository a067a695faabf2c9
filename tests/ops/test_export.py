"""torch.export of a video model with fused ST-Adapters (inference).

The exported graph must hold the custom op ``st_adapter_fast::fused_adapter`` once per adapter
(opaque, not decomposed into aten ops), and the exported program must give eager's output:
directly, with a dynamic number of clips, after run_decompositions(), and after a
torch.export.save / load round trip.
"""

from __future__ import annotations

import pytest
import torch

from helpers import fused_device, triton_interpreter_on
from tiny_clip import adapter_modules, build_model, make_batch

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_on()),
    reason="the fused op needs a CUDA GPU or the Triton interpreter (TRITON_INTERPRET=1) on CPU",
)

FUSED_OP = torch.ops.st_adapter_fast.fused_adapter.default


def _model_and_video(batch=2):
    device = fused_device()
    model = build_model("triton").to(device).eval()
    video, _ = make_batch(batch, seed=11)
    return model, video.to(device)


def _fused_nodes(graph_module):
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target == FUSED_OP]


def test_export_keeps_the_fused_op_and_matches_eager():
    model, video = _model_and_video()
    with torch.no_grad():
        want = model(video)
        program = torch.export.export(model, (video,))
        got = program.module()(video)
    num_adapters = len(list(adapter_modules(model)))
    nodes = _fused_nodes(program.graph_module)
    assert len(nodes) == num_adapters, (
        f"expected {num_adapters} {FUSED_OP} nodes, graph has {len(nodes)}:\n{program.graph_module.code}"
    )
    # the backend is baked into the graph as a constant argument
    assert all(n.args[9] == "triton" for n in nodes), [n.args for n in nodes]  # (x, 6 params, T, P, backend, ...)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_export_with_dynamic_clip_count():
    model, video = _model_and_video(batch=2)
    clips = torch.export.Dim("clips", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (video,), dynamic_shapes={"clips": {0: clips}})
        assert len(_fused_nodes(program.graph_module)) == len(list(adapter_modules(model)))
        for batch in (1, 3):
            other, _ = make_batch(batch, seed=12 + batch)
            other = other.to(video.device)
            torch.testing.assert_close(program.module()(other), model(other), rtol=0, atol=0)


def test_decompositions_and_save_load_keep_the_op(tmp_path):
    model, video = _model_and_video()
    with torch.no_grad():
        want = model(video)
        program = torch.export.export(model, (video,)).run_decompositions()
        assert len(_fused_nodes(program.graph_module)) == len(list(adapter_modules(model))), (
            "run_decompositions() must not decompose the opaque fused op"
        )
        path = tmp_path / "tiny_video_clip.pt2"
        torch.export.save(program, path)
        loaded = torch.export.load(path)
        assert len(_fused_nodes(loaded.graph_module)) == len(list(adapter_modules(model)))
        # layer_norm / SDPA are decomposed into primitive aten ops: fp32 rounding, not bitwise
        torch.testing.assert_close(loaded.module()(video), want)
