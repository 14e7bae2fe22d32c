"""Package list. Metadata lives in pyproject.toml.

The `kernels/` folder installs under the import name `wrag_kernels`: a top-level `kernels` would
collide with the PyPI package of that name.
"""
from setuptools import find_packages, setup

wrag = find_packages(include=["wrag_vllm", "wrag_vllm.*"])
kern = ["wrag_kernels"] + ["wrag_kernels." + p for p in find_packages("kernels")]
setup(packages=wrag + kern, package_dir={"wrag_kernels": "kernels"})
