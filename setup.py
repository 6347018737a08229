from setuptools import find_packages, setup

setup(
    name="fastddpm",
    version="0.1.0",
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
        "triton; platform_system == 'Linux'",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "scipy", "diffusers", "import-linter"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["fastddpm = fastddpm.cli:main"]},
)
