"""Install: pip install torch==2.13.0 (or your CUDA build) first, then `pip install -e ".[test]"`.

csrc/ holds optional native extensions; they are built only with TULU_PPO_BUILD_CSRC=1, so a plain
install needs no CUDA compiler.
"""

import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("TULU_PPO_BUILD_CSRC") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(CppExtension("engine._csrc", ["csrc/block_ops.cpp"]))
    cmdclass["build_ext"] = BuildExtension

setup(
    name="tulu-ppo-engine",
    version="0.1.0",
    description="PPO for Llama models with hand-written Triton kernels (Tulu V2.5 PPO recipe)",
    python_requires=">=3.10",
    packages=["engine", "kernels"],
    package_data={"engine": ["assets/tiny/*", "assets/*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "huggingface_hub",  # checkpoints named by Hub id (engine/hub.py); transformers needs it anyway
        "numpy",
    ],
    extras_require={
        # (pytest-xdist: the README's test command spreads the tests over two workers; tensorboard and wandb: the real
        # writer's and W&B's tests)
        "test": ["pytest>=8", "pytest-xdist>=3", "ruff", "tensorboard>=2.14", "wandb>=0.16"],
        "flash": ["flash-attn>=2.6"],
        "wandb": ["wandb>=0.16"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
