# The C part of the build lives here because pyproject.toml cannot name cffi modules, nor
# a plain shared library: libnetmem for C programs, built into the package
# (netmemfs/_lib/: libnetmem.so, its soname libnetmem.so.1, include/netmem.h), found
# with `netmemfs config --cflags --libs`. scripts/setup installs it system-wide too.
from __future__ import annotations

import shlex
import subprocess
import sysconfig
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
LIB_SOURCES = [ROOT / "lib" / "netmem.c"]
LIB_HEADER = ROOT / "lib" / "netmem.h"


class BuildPyWithLibnetmem(build_py):
    """build_py, then libnetmem into netmemfs/_lib/ (in the source tree for an
    editable install, as the cffi modules are)."""

    def run(self) -> None:
        super().run()
        editable = getattr(self, "editable_mode", False)
        out = (ROOT if editable else Path(self.build_lib)) / "netmemfs" / "_lib"
        build_libnetmem(out)


def build_libnetmem(out: Path) -> None:
    (out / "include").mkdir(parents=True, exist_ok=True)
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    obj = out / "netmem.o"
    flags = ["-O2", "-g", "-std=gnu11", "-Wall", "-Wextra", "-fPIC", "-pthread"]
    includes = ["-I", str(ROOT / "include"), "-I", str(ROOT / "lib")]
    subprocess.run(
        [*cc, *flags, *includes, "-c", "-o", str(obj), *map(str, LIB_SOURCES)], check=True
    )
    so = out / "libnetmem.so.1"
    subprocess.run(
        [*cc, "-shared", "-pthread", "-Wl,-soname,libnetmem.so.1", "-o", str(so), str(obj)],
        check=True,
    )
    obj.unlink()
    # A wheel holds no symbolic links: -lnetmem's name is a copy.
    (out / "libnetmem.so").write_bytes(so.read_bytes())
    (out / "include" / "netmem.h").write_bytes(LIB_HEADER.read_bytes())


setup(
    cffi_modules=[
        "netmemfs/_uffd_build.py:ffibuilder",
        "netmemfs/_netmem_build.py:ffibuilder",
    ],
    cmdclass={"build_py": BuildPyWithLibnetmem},
)
