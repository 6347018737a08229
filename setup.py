import re

from setuptools import find_packages, setup

# one version, fastddpm.__version__
VERSION = re.search(r'__version__ = "([^"]+)"', open("fastddpm/__init__.py").read()).group(1)

setup(
    name="fastddpm",
    version=VERSION,
    description="Fused Triton kernels for DDPM training and sampling, with a thin PyTorch API",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as fastddpm.kernels (a top-level `kernels` would clash with a PyPI package),
    # benchmarks/ as fastddpm.benchmarks for `fastddpm bench` (not its pytest suites, benchmarks/suites/).
    packages=find_packages(include=["fastddpm", "fastddpm.*"]) + ["fastddpm.kernels", "fastddpm.benchmarks"],
    package_dir={"fastddpm": "fastddpm", "fastddpm.kernels": "kernels", "fastddpm.benchmarks": "benchmarks"},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "einops",
        "tqdm",  # progress bars of sample() and elbo_bpd()
        # tested on 3.2-3.9 (scripts/triton_versions.sh), the versions torch 2.6-2.14 ship; no upper
        # bound, which would make pip downgrade a newer torch
        "triton>=3.2; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "diffusers", "import-linter"],
        "demo": ["scikit-learn", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastddpm = fastddpm.cli:main"]},
)
