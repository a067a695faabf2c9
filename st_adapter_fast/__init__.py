"""st-adapter-fast: fused GPU kernels (Triton, CUDA) for ST-Adapter.

    from st_adapter_fast import STAdapter, st_adapter, reference

``import st_adapter_fast`` needs only torch; the Triton backend is imported on first use.
"""

from .reference import reference
from .backends import available_backends, backend_status, register_backend
from .module import STAdapter
from .ops import st_adapter
# eager, not lazy: the submodule has the function's name, and importing the submodule would
# otherwise rebind st_adapter_fast.verify_model to the module (it needs only torch, like the above)
from .verify_model import verify_model

__version__ = "0.1.0"

# Helpers with heavier imports load on first use: `import st_adapter_fast` stays torch-only.
_LAZY = {
    "inject_st_adapters": "st_adapter_fast.models.inject",
    "set_num_frames": "st_adapter_fast.models.inject",
    "using_num_frames": "st_adapter_fast.models.inject",
    "remove_st_adapters": "st_adapter_fast.models.inject",
    "VideoClassifier": "st_adapter_fast.models.video",
    "CLIPVisionTransformer": "st_adapter_fast.models.clip_vit",
    "load_openai_clip_visual": "st_adapter_fast.models.clip_vit",
    "build_clip_video_model": "st_adapter_fast.models.clip_vit",
    "save_adapters": "st_adapter_fast.models.checkpoint",
    "load_adapters": "st_adapter_fast.models.checkpoint",
    "load_official_checkpoint": "st_adapter_fast.models.checkpoint",
    "load_mmaction_checkpoint": "st_adapter_fast.models.checkpoint",
    "prepare_mixed_precision": "st_adapter_fast.models.mixed_precision",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'st_adapter_fast' has no attribute {name!r}")


__all__ = ["STAdapter", "st_adapter", "reference", "available_backends", "backend_status", "register_backend",
           "verify_model", "__version__", *_LAZY]
