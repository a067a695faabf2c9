"""Build for st-adapter-fast.

Installs the Python API (st_adapter_fast/) and the Triton kernels (kernels/, installed as
st_adapter_fast.kernels). torch is required but never pinned here to a CUDA build: install it
first (README). The CUDA extension (csrc/) is built only when a CUDA build of torch and nvcc
are present; see ST_ADAPTER_FAST_SKIP_CUDA_BUILD / ST_ADAPTER_FAST_FORCE_BUILD.

Environment switches (causal-conv1d / flash-attention style):
  ST_ADAPTER_FAST_SKIP_CUDA_BUILD=1  never build the extension (it is JIT-built on first use)
  ST_ADAPTER_FAST_FORCE_BUILD=1      build it or fail loudly (no silent skip)
  ST_ADAPTER_FAST_CUDA_ARCHS="80;90" compute capabilities to compile for (sm_80 at least)
  MAX_JOBS                           parallel nvcc jobs (default: capped by free memory)
"""

import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
CUDA_SOURCES = ["binding.cpp", "down_conv_fwd.cu", "conv_bwd.cu", "up_residual.cu", "wgrad.cu"]

# Initialised before any branch reads them (causal-conv1d #108: a NameError when nvcc is absent).
ext_modules = []
cmdclass = {}
skip_reason = None


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _arch_flags(archs):
    """-gencode for every listed arch, plus PTX of the newest for later GPUs."""
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    if archs:
        flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


def _cap_max_jobs():
    """nvcc needs ~2 GB per job on these templates; cap ninja's parallelism by free memory."""
    if "MAX_JOBS" in os.environ:
        return
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        free_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb // 2), len(CUDA_SOURCES))))


def _wheel_cuda_includes(cuda_home):
    """Header dirs of pip's nvidia-* CUDA wheels when the toolkit at CUDA_HOME lacks the library
    headers torch's headers include (cusparse.h): a bare nvcc next to a pip-installed CUDA torch."""
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import glob
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return [d for root in roots for d in sorted(glob.glob(os.path.join(root, "cu*", "include")))
            if os.path.isfile(os.path.join(d, "cusparse.h"))]


def _cuda_extension():
    """(ext_modules, cmdclass, reason-it-was-skipped-or-None)."""
    if _flag("ST_ADAPTER_FAST_SKIP_CUDA_BUILD") and not _flag("ST_ADAPTER_FAST_FORCE_BUILD"):
        return [], {}, "ST_ADAPTER_FAST_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as err:
        return [], {}, f"torch is not importable in the build environment ({err}); use --no-build-isolation"
    if torch.version.cuda is None:
        return [], {}, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return [], {}, "nvcc was not found (set CUDA_HOME)"
    archs = [a.strip().replace(".", "") for a in os.environ.get("ST_ADAPTER_FAST_CUDA_ARCHS", "80;90").split(";")]
    archs = [a for a in archs if a]
    too_old = [a for a in archs if int(a.rstrip("af")) < 80]
    if too_old:
        raise ValueError(f"ST_ADAPTER_FAST_CUDA_ARCHS lists {too_old}; the kernels need sm_80 or newer")
    _cap_max_jobs()
    flags = ["-O3"]  # the C++ standard is torch's choice (2.14 needs C++20, older torch C++17)
    ext = CUDAExtension(
        name="st_adapter_fast._cuda",
        sources=[os.path.join(CSRC, s) for s in CUDA_SOURCES],
        include_dirs=[os.path.join(HERE, CSRC)] + _wheel_cuda_includes(CUDA_HOME),
        extra_compile_args={"cxx": flags, "nvcc": flags + ["-lineinfo"] + _arch_flags(archs)},
    )
    return [ext], {"build_ext": BuildExtension}, None


ext_modules, cmdclass, skip_reason = _cuda_extension()
if skip_reason is not None:
    if _flag("ST_ADAPTER_FAST_FORCE_BUILD"):
        raise RuntimeError(f"ST_ADAPTER_FAST_FORCE_BUILD is set but the CUDA extension cannot be built: {skip_reason}")
    print(f"st-adapter-fast: skipping the CUDA extension ({skip_reason}); "
          f"backend='cuda' JIT-builds it on first use where a CUDA torch and nvcc exist")

with open(os.path.join(HERE, "README.md"), encoding="utf-8") as readme:
    long_description = readme.read()

setup(
    name="st-adapter-fast",
    version="0.1.0",
    description="Fused Triton and CUDA kernels for ST-Adapter (parameter-efficient video transfer of image ViTs)",
    long_description=long_description,
    long_description_content_type="text/markdown",
    author="the st-adapter-fast authors",
    # as the official ST-Adapter code (linziyi96/st-adapter); an SPDX expression, which
    # setuptools >= 77 prefers to a "License ::" classifier (deprecated there)
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=["st_adapter_fast", "st_adapter_fast.backends", "st_adapter_fast.models", "st_adapter_fast.models.families",
              "st_adapter_fast.bench",
              "st_adapter_fast.kernels"],
    package_dir={"st_adapter_fast": "st_adapter_fast", "st_adapter_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.5", "einops", "numpy"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["triton>=3.6", "pytest", "pytest-benchmark", "pytest-xdist", "numpy"],
        "bench": ["triton>=3.6", "pytest-benchmark", "matplotlib", "tqdm"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
