"""st-adapter-fast: fused GPU kernels (Triton, CUDA) for ST-Adapter.

    from st_adapter_fast import STAdapter, st_adapter, reference

``import st_adapter_fast`` needs only torch; the Triton backend is imported on first use.
"""

from ._reference import reference
from .backends import available_backends, register_backend
from .module import STAdapter
from .ops import st_adapter

__version__ = "0.1.0"

__all__ = ["STAdapter", "st_adapter", "reference", "available_backends", "register_backend", "__version__"]
