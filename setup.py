# The C part of the build lives here because pyproject.toml cannot name cffi modules.
from setuptools import setup

setup(
    cffi_modules=[
        "netmemfs/_uffd_build.py:ffibuilder",
        "netmemfs/_netmem_build.py:ffibuilder",
    ]
)
