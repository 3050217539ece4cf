/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * netmem_uapi.h - the one header for kernel interfaces netmemfs uses from C.
 *
 * Shared by kmod/netmem.c, libnetmem (lib/) and the cffi build of netmemfs._uffd_cffi.
 * Debian 12's headers (Linux 6.1) are older than the kernels we run on: every constant
 * or structure they lack is defined here, with the value the kernel's uapi headers give
 * it, guarded so that newer headers win. Whether the running kernel supports a feature
 * is asked at run time (UFFDIO_API), never assumed from these definitions.
 */
#ifndef NETMEM_UAPI_H
#define NETMEM_UAPI_H

#include <linux/types.h>
#include <linux/ioctl.h>

/* ---- /dev/netmem (kmod/netmem.c; docs/kmod.md) -------------------------- */

#define NETMEM_SEGMENT_MAX	64		/* bytes of a segment name, NUL included */
#define NETMEM_MAX_BYTES	(16ULL << 30)	/* the largest area */
#define NETMEM_CHUNK_PAGES	64		/* pages in one COMMIT_PAGES message */
#define NETMEM_PAGE_BYTES	4096

#define NETMEM_MIN_BUDGET	(64 * NETMEM_PAGE_BYTES)	/* smaller budgets are raised to this */

/* NETMEM_IOC_ATTACH: what this file maps (once per open file). */
struct netmem_attach {
	char segment[NETMEM_SEGMENT_MAX];	/* a path, 1..63 bytes, then NUL */
	__u64 size;				/* bytes, a multiple of 4096 */
	/*
	 * Clean pages kept resident, in bytes; beyond it the module drops clean
	 * pages (they fault in again). 0: no budget (memory pressure still
	 * drops them). Dirty pages are kept until a sync commits them.
	 */
	__u64 budget;
};

/*
 * NETMEM_IOC_PROVIDE: this file becomes the page provider, for one store. An
 * area is served only by providers of the store that attached it: a daemon
 * restarted for the same store goes on serving the areas, one for another
 * store never sees them (their faults get SIGBUS, their syncs EIO).
 */
struct netmem_provide {
	char store[NETMEM_SEGMENT_MAX];		/* 1..63 bytes, then NUL */
};

/*
 * From the daemon (the provider's file): another client committed pages
 * first..first+count-1 of the file of area `area`; the module drops those the
 * area holds clean (they fault in again). Dirty pages stay. EBUSY while a sync
 * of the area is under way: ask again after it.
 */
struct netmem_invalidate {
	__u64 area;
	__u64 first;
	__u64 count;
};

#define NETMEM_IOC_MAGIC	0xB7
#define NETMEM_IOC_ATTACH	_IOW(NETMEM_IOC_MAGIC, 1, struct netmem_attach)
#define NETMEM_IOC_PROVIDE	_IOW(NETMEM_IOC_MAGIC, 2, struct netmem_provide)
#define NETMEM_IOC_INVALIDATE	_IOW(NETMEM_IOC_MAGIC, 3, struct netmem_invalidate)

enum netmem_msg_type {
	NETMEM_MSG_OPEN = 1,		/* find or make the file, check its size */
	NETMEM_MSG_FETCH = 2,		/* one page's contents */
	NETMEM_MSG_COMMIT_PAGES = 3,	/* pages of a commit (no reply) */
	NETMEM_MSG_COMMIT_END = 4,	/* commit them all as one transaction */
	NETMEM_MSG_COMMIT_ABORT = 5,	/* the kernel gave up on sync `commit` of
					 * `area` (no reply): drop it if it is not
					 * sent yet; its pages are dirty again */
};

/*
 * One request, as the provider read()s it (its buffer must hold
 * NETMEM_MSG_MAX bytes): this header, then `len` bytes of payload. A
 * COMMIT_PAGES payload is NETMEM_CHUNK_PAGES page numbers (__u64; the first
 * `count` are used), then `count` pages.
 */
struct netmem_msg {
	__u32 type;
	__u32 count;		/* COMMIT_PAGES: pages here; COMMIT_END: in all */
	__u64 id;		/* the reply names it */
	__u64 area;		/* the mapping (unique while the module is loaded) */
	__u64 page;		/* FETCH: the page number */
	__u64 size;		/* the area's size in bytes */
	__u64 commit;		/* COMMIT_*: the commit's number in its area */
	__u32 len;		/* payload bytes */
	__u32 reserved;
	char segment[NETMEM_SEGMENT_MAX];
};

#define NETMEM_MSG_MAX	(sizeof(struct netmem_msg) + \
			 NETMEM_CHUNK_PAGES * (8 + NETMEM_PAGE_BYTES))

/*
 * The provider's answer to OPEN, FETCH and COMMIT_END, one write() each:
 * this header, then for a FETCH that succeeded and is not a hole exactly one
 * page of data.
 */
struct netmem_reply {
	__u64 id;
	__s32 status;		/* 0 or a negative errno */
	__u32 flags;
};

#define NETMEM_REPLY_HOLE	1	/* the page is a hole: zeros, no data */

#ifndef __KERNEL__
#include <linux/userfaultfd.h>
#include <linux/fs.h>
#include <sys/ioctl.h>

/* userfaultfd features added after Linux 6.1 */
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED	(1 << 13)	/* 6.4 */
#endif
#ifndef UFFD_FEATURE_POISON
#define UFFD_FEATURE_POISON		(1 << 14)	/* 6.6 */
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC		(1 << 15)	/* 6.7 */
#endif
#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE		(1 << 16)	/* 6.8 */
#endif

#ifndef UFFDIO_POISON
#define _UFFDIO_POISON			(0x08)
struct uffdio_poison {
	struct uffdio_range range;
#define UFFDIO_POISON_MODE_DONTWAKE	((__u64)1 << 0)
	__u64 mode;
	__s64 updated;
};
#define UFFDIO_POISON	_IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#ifndef UFFDIO_MOVE
#define _UFFDIO_MOVE			(0x05)
struct uffdio_move {
	__u64 dst;
	__u64 src;
	__u64 len;
#define UFFDIO_MOVE_MODE_DONTWAKE		((__u64)1 << 0)
#define UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES	((__u64)1 << 1)
	__u64 mode;
	__s64 move;
};
#define UFFDIO_MOVE	_IOWR(UFFDIO, _UFFDIO_MOVE, struct uffdio_move)	/* 6.8 */
#endif

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC			0xAA
#define USERFAULTFD_IOC_NEW		_IO(USERFAULTFD_IOC, 0x00)	/* /dev/userfaultfd */
#endif

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY		1
#endif

/* PAGEMAP_SCAN on /proc/<pid>/pagemap, Linux 6.7 */
#ifndef PAGEMAP_SCAN
#define PAGE_IS_WPALLOWED	(1 << 0)
#define PAGE_IS_WRITTEN		(1 << 1)
#define PAGE_IS_FILE		(1 << 2)
#define PAGE_IS_PRESENT		(1 << 3)
#define PAGE_IS_SWAPPED		(1 << 4)
#define PAGE_IS_PFNZERO		(1 << 5)
#define PAGE_IS_HUGE		(1 << 6)
#define PAGE_IS_SOFT_DIRTY	(1 << 7)

struct page_region {
	__u64 start;
	__u64 end;
	__u64 categories;
};

#define PM_SCAN_WP_MATCHING	(1 << 0)
#define PM_SCAN_CHECK_WPASYNC	(1 << 1)

struct pm_scan_arg {
	__u64 size;
	__u64 flags;
	__u64 start;
	__u64 end;
	__u64 walk_end;
	__u64 vec;
	__u64 vec_len;
	__u64 max_pages;
	__u64 category_inverted;
	__u64 category_mask;
	__u64 category_anyof_mask;
	__u64 return_mask;
};

#define PAGEMAP_SCAN	_IOWR('f', 16, struct pm_scan_arg)
#endif

#endif /* !__KERNEL__ */

#endif /* NETMEM_UAPI_H */
