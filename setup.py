# Only the optional C extension lives here; everything else is in pyproject.toml.
# The extension is optional: if it cannot be built, mithril falls back to numpy, which reads every
# file but writes deltas without the ans codec (larger files) and decodes ans chunks slowly.
from setuptools import Extension, setup

setup(ext_modules=[Extension("mithril_gpu._accel", ["mithril_gpu/_accel.c"],
                             extra_compile_args=["-O3"], optional=True)])
