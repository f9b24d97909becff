# The C kernels are compiled at install time by cffi (API mode); see native/build_native.py.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
