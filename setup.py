"""Package list. Metadata lives in pyproject.toml.

Two import packages: `wrag_vllm` (the repository root) and `wrag_kernels` (in `kernels/`, the
folder of the kernel code, which will also hold native sources).
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["wrag_vllm", "wrag_vllm.*"]) + find_packages("kernels"),
      package_dir={"wrag_kernels": "kernels/wrag_kernels"})
