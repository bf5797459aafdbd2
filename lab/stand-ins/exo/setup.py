"""exo-rkllama lab stand-in (rkllm.fleet lab only; not exo). Installed with `pip install -e .`."""
from setuptools import find_packages, setup

setup(
    name="exo",
    version="0.0.15a0+rkllm.lab",
    description="Lab stand-in for the exo-rkllama fork (rkllm.fleet); not exo",
    packages=find_packages(),
    python_requires=">=3.12",
    install_requires=[],
)
