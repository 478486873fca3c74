"""Prophet: serve MoE models on one GPU from a paged expert buffer.

Pure Python + Triton; the optional native library (csrc/, CMakeLists.txt) is built separately
with CMake and is never required.
"""

from setuptools import find_packages, setup

setup(
    name="prophet-moe",
    version="0.1.0",
    description="Paged expert buffer, prefetcher and Triton kernels for serving MoE models with vLLM",
    python_requires=">=3.10",
    # integration/ (the vLLM plugin and the transformers integration) lives at the repository's top
    # level and installs as prophet_kernels.integration: the wheel has no top-level `integration`.
    packages=find_packages(include=["prophet_kernels", "prophet_kernels.*"]) + ["prophet_kernels.integration"],
    package_dir={"prophet_kernels.integration": "integration"},
    package_data={"prophet_kernels": ["kernels/configs/*.json", "cpu/*.cpp", "routing/traces/data/*.npz",
                                      "routing/traces/data/*.json", "routing/traces/data/*.md"]},
    install_requires=["torch", "triton", "numpy", "nvtx", "matplotlib", "safetensors", "tqdm", "transformers"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["prophet = prophet_kernels.cli:main"],
                  "vllm.general_plugins": ["prophet = prophet_kernels.integration.vllm_plugin:register"]},
)
