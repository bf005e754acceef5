from setuptools import setup

setup(cffi_modules=["csrc/build_cancelk.py:ffibuilder"])
