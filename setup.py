"""Build for st-adapter-fast.

Installs the Python API (st_adapter_fast/) and the Triton kernels (kernels/, installed as
st_adapter_fast.kernels). torch is required but never pinned here to a CUDA build: install it
first (README). The CUDA extension (csrc/) is built only when a CUDA build of torch and nvcc
are present; see ST_ADAPTER_FAST_SKIP_CUDA_BUILD / ST_ADAPTER_FAST_FORCE_BUILD.
"""

from setuptools import setup

setup(
    name="st-adapter-fast",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for ST-Adapter (parameter-efficient video transfer of image ViTs)",
    packages=["st_adapter_fast", "st_adapter_fast.kernels"],
    package_dir={"st_adapter_fast": "st_adapter_fast", "st_adapter_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "einops", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["triton>=3.6", "pytest", "pytest-benchmark", "numpy"],
        "bench": ["triton>=3.6", "pytest-benchmark", "matplotlib", "tqdm"],
    },
)
