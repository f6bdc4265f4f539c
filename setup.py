"""megatron-vespo: VESPO reinforcement learning for MoE LLMs on Megatron-Core + SGLang."""
from setuptools import find_packages, setup

# torch is pinned to a range that the local CPU wheel (2.13.0) satisfies, so a CPU install never
# pulls a multi-GB CUDA build. GPU containers bring their own torch; the `gpu` extra only adds
# Transformer Engine and SGLang, which must never be installed on a CPU machine (see docs/dependencies.md).
install_requires = [
    "torch>=2.6,<2.15",
    "megatron-core>=0.16.1,<0.20",
    "numpy>=1.26",
    "pyyaml>=6.0",
    "transformers>=4.56",
    "safetensors>=0.4",
    "aiohttp>=3.9",
    "sglang-router>=0.3.2",
    "psutil>=5.9",
    "einops>=0.7",
]

extras_require = {
    "gpu": [
        "transformer-engine[pytorch]>=2.4",
        "sglang>=0.5",
    ],
    "rl": [
        "math-verify>=0.8",
        "pyarrow>=15",
        "matplotlib>=3.8",
        "ray>=2.40",
        "wandb>=0.18",
        "tensorboard>=2.15",
    ],
    "dev": [
        "pytest>=8",
        "hypothesis>=6.100",
        "pytest-xdist>=3.5",
    ],
}

setup(
    name="megatron-vespo",
    version="0.1.0",
    description="VESPO RL trainer for large MoE language models: Megatron-Core policy, SGLang rollouts",
    packages=find_packages(include=["megatron_vespo*", "rollout_sglang*", "typed_config*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["megatron-vespo=megatron_vespo.cli:main"]},
)
