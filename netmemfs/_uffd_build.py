"""cffi build (API mode) of netmemfs._uffd_cffi: the ioctls of userfaultfd, in C, and the
request and reply layouts of /dev/netmem (kmod/).

Run by the project's install (setup.py's cffi_modules). Each helper returns >= 0 on
success and -errno on failure, so Python never sees a raw ioctl number or a struct
layout: those come from include/netmem_uapi.h, the one header shared with kmod/.
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent

CDEF = """
#define UFFD_API ...
#define UFFD_USER_MODE_ONLY ...
#define UFFD_FEATURE_PAGEFAULT_FLAG_WP ...
#define UFFD_FEATURE_EVENT_FORK ...
#define UFFD_FEATURE_EVENT_REMAP ...
#define UFFD_FEATURE_EVENT_REMOVE ...
#define UFFD_FEATURE_EVENT_UNMAP ...
#define UFFD_FEATURE_SIGBUS ...
#define UFFD_FEATURE_THREAD_ID ...
#define UFFD_FEATURE_EXACT_ADDRESS ...
#define UFFD_FEATURE_WP_UNPOPULATED ...
#define UFFD_FEATURE_POISON ...
#define UFFD_FEATURE_WP_ASYNC ...
#define UFFD_FEATURE_MOVE ...
#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_REGISTER_MODE_WP ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_COPY_MODE_WP ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFDIO_WRITEPROTECT_MODE_WP ...
#define UFFDIO_WRITEPROTECT_MODE_DONTWAKE ...
#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_EVENT_FORK ...
#define UFFD_EVENT_REMAP ...
#define UFFD_EVENT_REMOVE ...
#define UFFD_EVENT_UNMAP ...
#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define UFFD_PAGEFAULT_FLAG_WP ...
#define UFFD_MSG_BYTES ...

int nm_uffd_open(int flags, int *dev_errno, int *sys_errno, int *how);
void nm_uffd_explain(char *buf, size_t len, int dev_errno, int sys_errno);
int nm_uffd_api(int fd, uint64_t features, uint64_t *got, uint64_t *ioctls);
int nm_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int nm_uffd_unregister(int fd, uint64_t start, uint64_t len);
int64_t nm_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode);
int64_t nm_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode);
int nm_uffd_wake(int fd, uint64_t start, uint64_t len);
int nm_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int64_t nm_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode);
void *nm_mmap_anon(uint64_t len, int *err);
int nm_munmap(void *addr, uint64_t len);
int nm_madvise(void *addr, uint64_t len, int advice);
#define MADV_DONTNEED ...

/* /dev/netmem (kmod/): the daemon's side, netmemfs/kdoor.py */
#define NETMEM_IOC_PROVIDE ...
#define NETMEM_IOC_ATTACH ...
#define NETMEM_IOC_INVALIDATE ...
#define NETMEM_SEGMENT_MAX ...
#define NETMEM_CHUNK_PAGES ...
#define NETMEM_REPLY_HOLE ...
static const int NETMEM_MSG_OPEN;
static const int NETMEM_MSG_FETCH;
static const int NETMEM_MSG_COMMIT_PAGES;
static const int NETMEM_MSG_COMMIT_END;
static const int NETMEM_MSG_COMMIT_ABORT;
static const int NETMEM_MSG_BYTES;
struct netmem_msg {
    uint32_t type;
    uint32_t count;
    uint64_t id;
    uint64_t area;
    uint64_t page;
    uint64_t size;
    uint64_t commit;
    uint32_t len;
    char segment[64];
    ...;
};
struct netmem_reply {
    uint64_t id;
    int32_t status;
    uint32_t flags;
};
struct netmem_provide {
    char store[64];
};
struct netmem_attach {
    char segment[64];
    uint64_t size;
    uint64_t budget;
};
struct netmem_invalidate {
    uint64_t area;
    uint64_t first;
    uint64_t count;
};
"""

SOURCE = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "netmem_uapi.h"
#include "uffd_open.h"

#define UFFD_MSG_BYTES ((int)sizeof(struct uffd_msg))
static const int NETMEM_MSG_BYTES = (int)NETMEM_MSG_MAX;

int nm_uffd_api(int fd, uint64_t features, uint64_t *got, uint64_t *ioctls)
{
	struct uffdio_api api = { .api = UFFD_API, .features = features };

	if (ioctl(fd, UFFDIO_API, &api) < 0)
		return -errno;
	*got = api.features;
	*ioctls = api.ioctls;
	return 0;
}

int nm_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls)
{
	struct uffdio_register reg = { .range = { start, len }, .mode = mode };

	if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	*ioctls = reg.ioctls;
	return 0;
}

int nm_uffd_unregister(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };

	return ioctl(fd, UFFDIO_UNREGISTER, &range) < 0 ? -errno : 0;
}

/* Bytes copied (all of len, or fewer: the caller retries the rest), or -errno.
 * The kernel stores a negative copy on failure; errno says the same. */
int64_t nm_uffd_copy(int fd, uint64_t dst, const void *src, uint64_t len, uint64_t mode)
{
	struct uffdio_copy c = {
		.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len, .mode = mode,
	};

	if (ioctl(fd, UFFDIO_COPY, &c) < 0)
		return c.copy > 0 ? c.copy : -errno;
	return c.copy;
}

int64_t nm_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_zeropage z = { .range = { start, len }, .mode = mode };

	if (ioctl(fd, UFFDIO_ZEROPAGE, &z) < 0)
		return z.zeropage > 0 ? z.zeropage : -errno;
	return z.zeropage;
}

int nm_uffd_wake(int fd, uint64_t start, uint64_t len)
{
	struct uffdio_range range = { start, len };

	return ioctl(fd, UFFDIO_WAKE, &range) < 0 ? -errno : 0;
}

int nm_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_writeprotect wp = { .range = { start, len }, .mode = mode };

	return ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

int64_t nm_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode)
{
	struct uffdio_poison p = { .range = { start, len }, .mode = mode };

	if (ioctl(fd, UFFDIO_POISON, &p) < 0)
		return p.updated > 0 ? p.updated : -errno;
	return p.updated;
}

/* A private anonymous mapping of len bytes, or NULL with *err set (never MAP_FAILED). */
void *nm_mmap_anon(uint64_t len, int *err)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED) {
		*err = errno;
		return NULL;
	}
	*err = 0;
	return p;
}

int nm_munmap(void *addr, uint64_t len)
{
	return munmap(addr, len) < 0 ? -errno : 0;
}

int nm_madvise(void *addr, uint64_t len, int advice)
{
	return madvise(addr, len, advice) < 0 ? -errno : 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "netmemfs._uffd_cffi",
    SOURCE,
    include_dirs=[str(ROOT / "include"), str(ROOT / "lib")],
    extra_compile_args=["-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
