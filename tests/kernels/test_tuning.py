"""kernels/tuning.py: the sweep's candidates, forced configs, and the tuned table the dispatch reads."""

import json

import pytest
import torch

from st_adapter_fast.kernels import tuning
from st_adapter_fast.kernels._common import TileConfig


@pytest.fixture(autouse=True)
def _fresh_table(monkeypatch):
    monkeypatch.delenv("ST_ADAPTER_FAST_TUNED_CONFIGS", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


@pytest.mark.parametrize("kernel", sorted(tuning.KERNELS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_candidates_start_with_the_default_and_are_distinct(kernel, dtype):
    cands = tuning.candidate_configs(kernel, kt=3, compute_dtype=dtype, arch=90)
    assert cands[0] == tuning.default_config(kernel, kt=3, compute_dtype=dtype, arch=90)
    assert len(cands) == len(set(cands)) >= 4
    assert all(min(c.BLOCK_M, c.BLOCK_N, c.BLOCK_K) >= 16 for c in cands)


def test_config_for_prefers_forced_then_tuned_then_default(tmp_path, monkeypatch):
    default = tuning.default_config("down_conv", kt=3, compute_dtype=torch.bfloat16, arch=90)
    absent = tmp_path / "none.json"
    monkeypatch.setenv("ST_ADAPTER_FAST_TUNED_CONFIGS", str(tmp_path / "tuned.json"))
    tuned = TileConfig(128, 64, 64, num_warps=8, num_stages=4)
    (tmp_path / "tuned.json").write_text(json.dumps({
        "version": tuning.TUNED_TABLE_VERSION,
        "configs": {tuning.config_key("down_conv", 3, torch.bfloat16, 90): tuned.__dict__},
    }))
    assert tuning.config_for("down_conv", kt=3, compute_dtype=torch.bfloat16, arch=90) == tuned
    # other keys keep their defaults
    assert tuning.config_for("down_conv", kt=5, compute_dtype=torch.bfloat16, arch=90) == \
        tuning.default_config("down_conv", kt=5, compute_dtype=torch.bfloat16, arch=90)
    forced = TileConfig(32, 32, 32, num_warps=4, num_stages=2)
    with tuning.forced_config("down_conv", forced):
        assert tuning.config_for("down_conv", kt=3, compute_dtype=torch.bfloat16, arch=90) == forced
    assert tuning.config_for("down_conv", kt=3, compute_dtype=torch.bfloat16, arch=90) == tuned
    # a table asked for by name must exist: no silent fallback to the defaults
    monkeypatch.setenv("ST_ADAPTER_FAST_TUNED_CONFIGS", str(absent))
    with pytest.raises(FileNotFoundError):
        tuning.config_for("down_conv", kt=3, compute_dtype=torch.bfloat16, arch=90)
    assert tuned != default


@pytest.mark.parametrize("entry, match", [
    ({"BLOCK_M": 48, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}, "power of two"),
    ({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3, "bogus": 1}, "unknown fields"),
])
def test_a_bad_tuned_entry_is_an_error_not_a_fallback(tmp_path, monkeypatch, entry, match):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"version": 1, "configs": {"wgrad|sm90|bf16|kt1": entry}}))
    monkeypatch.setenv("ST_ADAPTER_FAST_TUNED_CONFIGS", str(path))
    with pytest.raises(ValueError, match=match):
        tuning.config_for("wgrad", kt=1, compute_dtype=torch.bfloat16, arch=90)


def test_unknown_kernel_names_the_known_ones():
    with pytest.raises(ValueError, match="down_conv"):
        tuning.candidate_configs("nope", kt=3, compute_dtype=torch.bfloat16, arch=90)


def test_forced_config_changes_what_the_launcher_runs():
    """The sweep's switch reaches the kernel: a forced config with a different tile still
    computes the same adapter (interpreter on CPU, compiled on GPU)."""
    from helpers import fused_device, triton_interpreter_on

    if fused_device() == "cpu" and not triton_interpreter_on():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    import st_adapter_fast

    dev = fused_device()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * 3, 1 + 9, 24, generator=g).to(dev)
    params = [torch.randn(16, 24, generator=g) * 0.2, torch.randn(16, generator=g) * 0.1,
              torch.randn(16, 1, 3, 1, 1, generator=g) * 0.3, torch.randn(16, generator=g) * 0.1,
              torch.randn(24, 16, generator=g) * 0.2, torch.randn(24, generator=g) * 0.1]
    params = [p.to(dev) for p in params]
    want = st_adapter_fast.st_adapter(x, 3, *params, backend="triton")
    with tuning.forced_config("down_conv", TileConfig(16, 16, 16, num_warps=4, num_stages=1)), \
         tuning.forced_config("up_residual", TileConfig(16, 16, 16, num_warps=4, num_stages=1)):
        got = st_adapter_fast.st_adapter(x, 3, *params, backend="triton")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
