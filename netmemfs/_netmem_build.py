"""cffi build (API mode) of netmemfs._netmem_cffi: libnetmem (lib/netmem.c) for Python.

The same C source as the installed libnetmem.so, compiled into this extension so the
Python API needs no library on the system path. Run by the project's install
(setup.py's cffi_modules).
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent

CDEF = """
struct netmem_options {
    const char *server;
    const char *segment;
    size_t size;
    size_t budget;
    unsigned int timeout_ms;
    const char *agent;
    void *addr;
};
void *netmem_map_opts(const struct netmem_options *opts);
int netmem_sync(void *addr);
int netmem_unmap(void *addr);
long netmem_resident(void *addr);
struct netmem_stats {
    uint64_t faults;
    uint64_t fetches;
    uint64_t direct_fetches;
    uint64_t evictions;
    uint64_t evicted;
    uint64_t spilled;
    uint64_t resident;
    uint64_t budget;
};
int netmem_stats(void *addr, struct netmem_stats *out);
int netmem_lock(void *addr, uint64_t start, uint64_t length, int exclusive,
                unsigned int wait_ms, uint64_t *token);
int netmem_unlock(void *addr, uint64_t token, int commit);
const char *netmem_error(void);
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "netmemfs._netmem_cffi",
    '#include "netmem.h"',
    sources=["lib/netmem.c"],  # setup.py runs in the project's root
    include_dirs=[str(ROOT / "include"), str(ROOT / "lib")],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror", "-pthread"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
