"""The one thing pyproject.toml cannot say: the optional C extension of the weights pass.

audit/weights/pair_kernels.c is built at install time into audit/weights/_pair_kernels (a plain shared library that
audit/weights/native.py loads with ctypes). ``optional=True``: where no C compiler works, the install still
succeeds and the audit takes its torch path, which gives the same numbers more slowly.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("audit.weights._pair_kernels", sources=["audit/weights/pair_kernels.c"], optional=True,
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-strict-aliasing"])])
