"""Builds the runtime's Cython kernels (ext/) into sdc_runtime._kernels; metadata is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

kernels = Extension(
    "sdc_runtime._kernels",
    ["ext/_kernels.pyx"],
    # Bit-exact dithering across platforms: forbid fused multiply-add contraction.
    extra_compile_args=["-O3", "-ffp-contract=off"],
)

setup(
    package_dir={"sdc_runtime": "runtime", "sdc_export": "export", "sdc_bench": "bench", "sdc_serve": "serve",
                 "sdc_peers": "peers"},
    packages=["sdc_runtime", "sdc_export", "sdc_export.int8", "sdc_bench", "sdc_serve", "sdc_peers"],
    ext_modules=cythonize([kernels], compiler_directives={"language_level": 3}),
)
