// SPDX-License-Identifier: MIT
/*
 * netmem.c - anonymous regions whose pages live on a netmemfs server.
 *
 * A region is a private anonymous mapping registered with a userfaultfd. Its
 * faults are served by a native thread of this process (the handler), so a
 * program that faults while holding a lock of its own runtime (Python's GIL)
 * never stalls it. The network stays out of this file: the handler asks the
 * netmemfs agent (netmemfs/agent.py, a process of its own) for pages and hands
 * it written pages, over one Unix socket (netmem_wire.h).
 *
 * Per page the handler keeps a state byte:
 *
 *   MISSING -> FETCHING -> PRESENT -> (evicted) MISSING
 *                      \-> HELD (readahead marker) -> PRESENT on its fault
 *   PRESENT, written since the agent last had it -> (evicted) SPILLED
 *   SPILLED -> PRESENT on its fault; -> MISSING when a sync stages it
 *   any -> POISONED when the agent or the server failed (access: SIGBUS)
 *
 * A page evicted with writes the agent has not seen goes to the spill (at the
 * page's own offset), and comes back from it on its next fault without asking
 * the agent; a sync hands spilled pages to the agent like resident written
 * ones. The spill is an anonymous area of this process in async mode (pages
 * are moved there with UFFDIO_MOVE, no copy, no allocation, and copied back),
 * else an unlinked file (a memfd, or a file in $NETMEM_SPILL_DIR). Without
 * a spill (it could not be made, or a write to it failed) such pages are
 * staged with the agent at eviction instead.
 *
 * Only the handler thread changes page state, installs or evicts pages; an
 * application thread asks it to sync and waits. Dirty tracking has two modes:
 *
 *  async  (UFFD_FEATURE_WP_ASYNC and UFFD_FEATURE_MOVE, Linux 6.8+): the kernel
 *         clears a page's write-protect bit on its first write, without a
 *         fault; a sync finds written pages and protects them again in one
 *         PAGEMAP_SCAN call. Eviction moves pages out with UFFDIO_MOVE (an
 *         atomic unmap), then compares each moved page with the hash of the
 *         last version the agent has: changed pages are staged.
 *  sync   (older kernels, or NETMEM_WP_MODE=sync): the first write to a
 *         protected page faults; the handler marks it dirty and unprotects
 *         it. Eviction protects a run again first, so writers wait.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "netmem.h"
#include "netmem_uapi.h"
#include "netmem_wire.h"
#include "server_wire.h"
#include "uffd_open.h"

extern char **environ;

#define PS 4096UL
#define BATCH 64		/* pages per fetch or eviction */
#define WINDOW (4 * BATCH)	/* pages a sequential reader runs ahead */
#define SLACK (BATCH / 2)	/* pages below the budget an eviction goes */
#define MAX_FETCHES 256		/* fetches in flight */
#define MAX_HELD 16		/* readahead markers held back */
/* A direct connection the server closed (its --idle-timeout, a restart) is
 * asked of the agent again at the next fetch (so an idle region holds no
 * connection), this many times in a row at most without a direct reply in
 * between; after that, reads stay with the agent. */
#define MAX_REDIALS 3
#define DEFAULT_TIMEOUT_MS 30000
#define DEFAULT_SPIN_US 50
#define DEFAULT_SERVER "127.0.0.1:7733"
/* The Redis store's pages per chunk key (its key layout `netmemfs-redis 2`,
 * docs/protocol.md) and the longest hash tag of a file's keys we accept. */
#define REDIS_CHUNK_PAGES 63
#define REDIS_TAG_MAX 96

/* Where the library is installed: an agent installed with it is in
 * NETMEM_PREFIX/bin. */
#ifndef NETMEM_PREFIX
#define NETMEM_PREFIX "/usr/local"
#endif

enum { MISSING, FETCHING, PRESENT, HELD, POISONED, SPILLED };
#define ST_MASK 0x0f
#define WANT_WRITE 0x10		/* a write fault waits for this page */
#define WANTED 0x20		/* some fault waits for this page */

struct fetch {
	uint64_t id;		/* 0: free slot */
	size_t first;
	size_t count;
	uint64_t started_ms;
	bool marker;		/* hold the first page back (readahead) */
	bool direct;		/* asked of the server itself, not the agent */
};

struct held {
	size_t page;		/* (size_t)-1: free */
	unsigned char data[PS];
};

struct region {
	struct region *next;
	char *base;
	size_t size, npages;
	char *scratch;		/* BATCH pages: where eviction moves pages */
	int uffd, pagemap, sock, evfd;
	pid_t agent;
	pthread_t thread;
	bool async;		/* WP_ASYNC + MOVE, else sync write-protect */
	bool borrowed;		/* the caller's mapping: not ours to unmap */
	bool can_poison;
	char segment[256];	/* the file's path, as the caller named it */
	uint64_t ino;		/* its inode, as the agent resolved it at OPEN */
	char agent_name[300];	/* for messages: "the agent", or the daemon's */
	unsigned int timeout_ms;

	/* Owned by the handler thread. */
	unsigned char *state;
	unsigned char *dirty;	/* sync mode: written since the last sync */
	uint64_t *hash;		/* async mode: hash of the agent's version */
	size_t resident, fetching, budget;	/* pages */
	size_t hand;		/* eviction: first in, first out */
	uint64_t next_id;
	struct fetch fetches[MAX_FETCHES];
	size_t nfetches;
	struct held held[MAX_HELD];
	uint64_t invalidated;	/* pages other clients' commits made us drop */
	size_t seq_lo, seq_next, seq_ahead;	/* the sequential stream */
	unsigned char *buf;	/* replies and staging */
	size_t buf_len;
	uint64_t commit_id;
	char stage_error[256];	/* the agent lost staged pages: no sync can be whole */
	/* The direct connection to the server (-1: none; reads go through the
	 * agent). A page handed to the agent since the last whole commit is
	 * newer there than on the server: `journaled` marks it, and it is
	 * always read through the agent. */
	int srv;
	unsigned int srv_gen;	/* bumped whenever srv changes */
	unsigned char *srv_buf;
	size_t srv_fill, srv_cap;
	unsigned int redials;	/* REDIALs since the last direct reply */
	/* The direct connection goes to the Redis node serving the file's
	 * hash slot (the agent's OPEN or REDIAL said "resp:<tag>"), not to a
	 * netmemfs-server: a fetch is one transaction reading the keys
	 * "<tag>:m" and "<tag>:c:<chunk>" (resp_ask), and the replies come
	 * back in the order asked, so the ring resp_asked holds the fetches
	 * asked in that order (resp_count of them from resp_head). */
	bool resp;
	char resp_tag[REDIS_TAG_MAX + 1];
	struct resp_asked {
		uint64_t id;
		size_t first, count;
	} resp_asked[MAX_FETCHES];
	size_t resp_head, resp_count;
	bool redial_wanted;	/* ask for a new one at the next fetch */
	bool redial_asked;	/* a REDIAL awaits its reply */
	unsigned char *journaled;
	uint64_t stages, commit_stages;
	/* Evicted written pages (SPILLED), page p at offset p * PS of the
	 * spill area (async mode) or of the spill file; neither: such pages
	 * are staged at eviction. */
	char *spill_area;
	unsigned char *stale;	/* spill area slots holding an old copy */
	int spill_fd;
	bool spill_full;	/* a write failed: reads only */
	size_t spilled;		/* pages SPILLED */
	unsigned char *spill_buf;	/* one page, read back from the file */
	/* After an event, poll without sleeping for this long before blocking
	 * ($NETMEM_SPIN_US): a thread that sleeps lets its CPU idle, and
	 * waking an idle CPU is most of a fault's cost on some machines. */
	uint64_t spin_ns, last_event_ns;
	/* Counts for netmem_stats(): the handler's alone, read as samples. */
	uint64_t faults, fetches_asked, direct_fetches, evictions, evicted;

	/* Shared with application threads, under mu. */
	pthread_mutex_t mu;
	pthread_cond_t cv;
	bool stop, failed;
	uint64_t sync_asked, sync_done;
	int sync_errno;
	char sync_msg[512];
	char fail_msg[512];
	pthread_mutex_t sync_mu;	/* one sync at a time */
	/* A lock request of an application thread (netmem_lock, netmem_unlock),
	 * sent by the handler; under mu but for lock_mu, which serializes them. */
	pthread_mutex_t lock_mu;
	struct {
		uint32_t op;		/* NM_OP_LOCK or NM_OP_UNLOCK; 0: none */
		uint64_t first;		/* LOCK: the first byte; UNLOCK: the token */
		struct nm_wire_lock args;
		uint64_t id;		/* sent, awaiting its reply; 0: not yet */
		bool done;
		int err;
		uint64_t token;
		char msg[256];
	} lk;
};

static pthread_mutex_t regions_mu = PTHREAD_MUTEX_INITIALIZER;
static struct region *regions;
static __thread char err_buf[1024];
static const unsigned char zero_page[PS] __attribute__((aligned(4096)));

const char *netmem_error(void)
{
	return err_buf[0] ? err_buf : "no error";
}

/* The mount daemon's lock requests (netmemfs/fs.py, "locks"), as getxattr names. */
#define NM_LOCK_XATTR "user.netmemfs.lock."
#define NM_UNLOCK_XATTR "user.netmemfs.unlock."
#define NM_VERSION_XATTR "user.netmemfs.version"
#define NM_EXPECT_XATTR "user.netmemfs.expect."

static int lock_errno(const char *what, const char *path)
{
	int err = errno == ENODATA ? ENOTSUP : errno;

	switch (err) {
	case EAGAIN:
		snprintf(err_buf, sizeof(err_buf),
			 "%s on %s was not granted in time: another client holds it",
			 what, path);
		break;
	case ENOLCK:
		snprintf(err_buf, sizeof(err_buf),
			 "%s on %s is not held by this process (lost or released)",
			 what, path);
		break;
	case ENOTSUP:
		snprintf(err_buf, sizeof(err_buf),
			 "%s: %s is not a file of a netmemfs mount", what, path);
		break;
	default:
		snprintf(err_buf, sizeof(err_buf), "%s on %s failed: %s", what,
			 path, strerror(err));
	}
	errno = err;
	return -1;
}

int netmem_lock_file(const char *path, uint64_t start, uint64_t length,
		     int exclusive, unsigned int wait_ms, uint64_t *token)
{
	char name[128], value[32];
	ssize_t n;

	snprintf(name, sizeof(name), NM_LOCK_XATTR "%s.%llu.%llu.%u",
		 exclusive ? "x" : "s", (unsigned long long)start,
		 (unsigned long long)length, wait_ms);
	/* value is NUL-terminated below: getxattr stores at most size - 1 bytes. */
	n = getxattr(path, name, value, sizeof(value) - 1);
	if (n < 0)
		return lock_errno(exclusive ? "an exclusive lock" : "a shared lock",
				  path);
	value[n] = '\0';
	*token = strtoull(value, NULL, 10);
	return 0;
}

int netmem_file_version(int fd, uint64_t *version)
{
	char value[32];
	ssize_t n;

	/* value is NUL-terminated below: fgetxattr stores at most size - 1 bytes. */
	n = fgetxattr(fd, NM_VERSION_XATTR, value, sizeof(value) - 1);
	if (n < 0)
		return lock_errno("the version", "the file");
	value[n] = '\0';
	*version = strtoull(value, NULL, 10);
	return 0;
}

int netmem_commit_if(int fd, uint64_t based_on)
{
	char name[64], value[8];

	snprintf(name, sizeof(name), NM_EXPECT_XATTR "%llu",
		 (unsigned long long)based_on);
	if (fgetxattr(fd, name, value, sizeof(value)) < 0)
		return lock_errno("the commit", "the file");
	if (fsync(fd) == 0)
		return 0;
	if (errno == ECANCELED)
		snprintf(err_buf, sizeof(err_buf),
			 "commit refused: another commit came after version %llu; the changes are dropped: read the file again and retry",
			 (unsigned long long)based_on);
	else
		snprintf(err_buf, sizeof(err_buf), "commit failed: %s",
			 strerror(errno));
	return -1;
}

int netmem_unlock_file(const char *path, uint64_t token)
{
	char name[64], value[8];

	snprintf(name, sizeof(name), NM_UNLOCK_XATTR "%llu",
		 (unsigned long long)token);
	if (getxattr(path, name, value, sizeof(value)) < 0)
		return lock_errno("the lock", path);
	return 0;
}

__attribute__((format(printf, 2, 3)))
static int fail(int err, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(err_buf, sizeof(err_buf), fmt, ap);
	va_end(ap);
	errno = err;
	return -1;
}

__attribute__((format(printf, 2, 3)))
static void logmsg(struct region *r, const char *fmt, ...)
{
	char line[768];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	fprintf(stderr, "netmem: segment %s: %s\n", r->segment, line);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000 + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* A 64-bit hash of one page: four multiply-xor lanes, each a bijection of
 * its words, so changing any one word always changes the result. */
static uint64_t page_hash(const void *page)
{
	const uint64_t *w = page;
	const uint64_t m = 0x9fb21c651e98df25ULL;
	uint64_t a = 1, b = 2, c = 3, d = 4;
	size_t i;

	for (i = 0; i < PS / 8; i += 4) {
		a = (a ^ w[i]) * m;
		b = (b ^ w[i + 1]) * m;
		c = (c ^ w[i + 2]) * m;
		d = (d ^ w[i + 3]) * m;
	}
	return a ^ (b << 17 | b >> 47) ^ (c << 31 | c >> 33) ^ (d << 47 | d >> 17);
}

static uint64_t zero_hash;

/* ---- the agent's socket ------------------------------------------------ */

static int send_all(int fd, struct iovec *iov, int n)
{
	while (n > 0) {
		struct msghdr mh = { .msg_iov = iov, .msg_iovlen = n };
		ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL);

		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		while (n > 0 && (size_t)w >= iov->iov_len) {
			w -= iov->iov_len;
			iov++;
			n--;
		}
		if (n > 0) {
			iov->iov_base = (char *)iov->iov_base + w;
			iov->iov_len -= w;
		}
	}
	return 0;
}

static int send_msg_status(int fd, uint32_t op, uint32_t status, uint64_t id,
			   uint64_t first, uint32_t count, const void *data,
			   size_t len)
{
	struct nm_wire_header h = {
		.op = op, .status = status, .id = id, .first = first,
		.count = count, .len = (uint32_t)len,
	};
	struct iovec iov[2] = {
		{ &h, sizeof(h) }, { (void *)data, len },
	};

	return send_all(fd, iov, len ? 2 : 1);
}

static int send_msg(int fd, uint32_t op, uint64_t id, uint64_t first,
		    uint32_t count, const void *data, size_t len)
{
	return send_msg_status(fd, op, 0, id, first, count, data, len);
}

static int recv_all(int fd, void *p, size_t len)
{
	char *c = p;

	while (len) {
		ssize_t n = read(fd, c, len);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0)
			return -EPIPE;
		c += n;
		len -= n;
	}
	return 0;
}

/* ---- installing, poisoning, protecting ---------------------------------- */

/* Wake the threads waiting for a fault in [addr, addr+len). */
static void wake(struct region *r, uintptr_t addr, size_t len)
{
	struct uffdio_range w = { addr, len };

	ioctl(r->uffd, UFFDIO_WAKE, &w);
}

/*
 * Install len bytes of src at dst with UFFDIO_COPY. The kernel's answers are
 * outcomes (../shared/UFFD-PITFALLS.md): a partial copy goes on with the
 * rest, EEXIST (someone installed it) still wakes the range, EAGAIN (the
 * address space changes; we ask for no such events, so only a munmap racing
 * with us) is retried a bounded number of times.
 * Invariant: dst lies in the registered region, src in our own memory.
 */
static int install(struct region *r, char *dst, const void *src, size_t len,
		   bool wp)
{
	size_t done = 0;
	int tries;

	for (tries = 0; done < len && tries < 100; tries++) {
		struct uffdio_copy c = {
			.dst = (uintptr_t)dst + done,
			.src = (uintptr_t)src + done,
			.len = len - done,
			.mode = wp ? UFFDIO_COPY_MODE_WP : 0,
		};

		if (ioctl(r->uffd, UFFDIO_COPY, &c) == 0) {
			done += c.copy;
			continue;
		}
		if (c.copy > 0) {
			done += c.copy;
			continue;
		}
		if (errno == EEXIST) {
			wake(r, (uintptr_t)dst, len);
			return 0;
		}
		if (errno != EAGAIN && errno != EINTR) {
			logmsg(r, "UFFDIO_COPY of %zu bytes at %p: %s", len - done,
			       dst + done, strerror(errno));
			return -errno;
		}
	}
	return done < len ? -EAGAIN : 0;
}

/* Make [page, page+n) raise SIGBUS when touched, and wake its waiters.
 * Without UFFDIO_POISON (before 6.6) the pages are made inaccessible
 * instead: a toucher gets SIGSEGV, never a zero page it could mistake for
 * data. */
static void poison(struct region *r, size_t page, size_t n)
{
	char *a = r->base + page * PS;
	struct uffdio_poison p = { .range = { (uintptr_t)a, n * PS } };
	size_t i;

	for (i = page; i < page + n; i++)
		r->state[i] = POISONED;
	if (!r->can_poison ||
	    (ioctl(r->uffd, UFFDIO_POISON, &p) < 0 && errno != EEXIST))
		mprotect(a, n * PS, PROT_NONE);
	wake(r, (uintptr_t)a, n * PS);
}

static int writeprotect(struct region *r, size_t page, size_t n, bool on)
{
	struct uffdio_writeprotect wp = {
		.range = { (uintptr_t)(r->base + page * PS), n * PS },
		.mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
	};

	if (ioctl(r->uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
		logmsg(r, "UFFDIO_WRITEPROTECT of pages %zu..%zu: %s", page,
		       page + n - 1, strerror(errno));
		return -errno;
	}
	return 0;
}

/* ---- failure ------------------------------------------------------------ */

/* The agent is gone or stuck: every page it owes us and every later fault
 * gets SIGBUS; syncs fail with EIO. */
static void fail_region(struct region *r, const char *why)
{
	size_t i;

	pthread_mutex_lock(&r->mu);
	if (r->failed) {
		pthread_mutex_unlock(&r->mu);
		return;
	}
	r->failed = true;
	snprintf(r->fail_msg, sizeof(r->fail_msg), "%s", why);
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
	logmsg(r, "%s; threads touching pages not resident get SIGBUS from now on",
	       why);
	for (i = 0; i < MAX_FETCHES; i++) {
		struct fetch *f = &r->fetches[i];

		if (f->id) {
			poison(r, f->first, f->count);
			r->fetching -= f->count;
			f->id = 0;
		}
	}
	r->nfetches = 0;
	if (r->srv >= 0)
		close(r->srv);
	r->srv = -1;
	r->srv_gen++;
	for (i = 0; i < MAX_HELD; i++) {
		if (r->held[i].page != (size_t)-1)
			r->state[r->held[i].page] = MISSING;	/* poisoned on touch */
		r->held[i].page = (size_t)-1;
	}
}

/* ---- eviction ----------------------------------------------------------- */

static int stage(struct region *r, size_t first, size_t n, const void *data)
{
	int ret = send_msg(r->sock, NM_OP_STAGE, ++r->next_id, first,
			   (uint32_t)n, data, n * PS);

	/* Until a commit covers it, the agent's copy is the newest. */
	memset(r->journaled + first, 1, n);
	r->stages++;

	if (ret < 0) {
		char why[256];

		snprintf(why, sizeof(why),
			 "cannot hand pages %zu..%zu to the agent: %s", first,
			 first + n - 1, strerror(-ret));
		fail_region(r, why);
	}
	return ret;
}

/* Stage the pages of [first, first+n) whose flag is set, from src. */
static void stage_marked(struct region *r, size_t first, size_t n,
			 const unsigned char *marks, const char *src)
{
	size_t i = 0, j;

	while (i < n) {
		if (!marks[i]) {
			i++;
			continue;
		}
		for (j = i; j < n && marks[j]; j++)
			;
		stage(r, first + i, j - i, src + i * PS);
		i = j;
	}
}

/* Keep the pages of [first, first+n) whose flag is set, from src, for their
 * next fault: in the spill file, else with the agent. */
static void keep_marked(struct region *r, size_t first, size_t n,
			const unsigned char *marks, const char *src)
{
	size_t i;

	for (i = 0; i < n && r->spill_fd >= 0 && !r->spill_full; i++) {
		ssize_t w;

		if (!marks[i])
			continue;
		w = pwrite(r->spill_fd, src + i * PS, PS, (off_t)((first + i) * PS));
		if (w != (ssize_t)PS) {
			/* Pages spilled before stay readable; no more go. */
			logmsg(r, "cannot write page %zu to the spill file (%s); "
			       "evicted written pages go to the agent from now on",
			       first + i, w < 0 ? strerror(errno) : "short write");
			r->spill_full = true;
			break;
		}
		r->state[first + i] = SPILLED;
		r->spilled++;
	}
	if (i < n)
		stage_marked(r, first + i, n - i, marks + i, src + i * PS);
}

/* Async mode: keep the marked pages of [first, first+n), which lie in the
 * scratch area at their offsets from first, for their next fault: moved to
 * the spill area (no copy), else in the spill file or with the agent. */
static void keep_moved(struct region *r, size_t first, size_t n,
		       const unsigned char *marks)
{
	size_t i = 0, j;

	while (i < n && r->spill_area && !r->spill_full) {
		struct uffdio_move mv;

		if (!marks[i]) {
			i++;
			continue;
		}
		for (j = i; j < n && marks[j]; j++)
			;
		if (memchr(r->stale + first + i, 1, j - i)) {
			madvise(r->spill_area + (first + i) * PS, (j - i) * PS,
				MADV_DONTNEED);
			memset(r->stale + first + i, 0, j - i);
		}
		/* Invariant: scratch holds these pages (just moved there and
		 * marked present); their slots in the spill area are empty:
		 * a page is SPILLED or PRESENT, never both, and a slot left
		 * holding an old copy (stale) was emptied just above. */
		mv = (struct uffdio_move){
			.dst = (uintptr_t)(r->spill_area + (first + i) * PS),
			.src = (uintptr_t)(r->scratch + i * PS),
			.len = (j - i) * PS,
			.mode = UFFDIO_MOVE_MODE_DONTWAKE,
		};
		if (ioctl(r->uffd, UFFDIO_MOVE, &mv) < 0) {
			size_t moved = mv.move > 0 ? (size_t)mv.move / PS : 0;

			logmsg(r, "UFFDIO_MOVE of pages %zu..%zu to the spill "
			       "area: %s; evicted written pages go to the agent "
			       "from now on", first + i + moved, first + j - 1,
			       strerror(errno));
			r->spill_full = true;
			j = i + moved;
		}
		for (; i < j; i++) {
			r->state[first + i] = SPILLED;
			r->spilled++;
		}
	}
	if (i < n)
		keep_marked(r, first + i, n - i, marks + i, r->scratch + i * PS);
}

/* Evict the PRESENT pages of [first, first+n) (n <= BATCH). In async mode the
 * range may hold pages in any state but POISONED between them: one move
 * takes them all, passing over the others as holes. Return how many pages of
 * the range were dealt with (all n, unless a move stopped short). */
static size_t evict_run(struct region *r, size_t first, size_t n)
{
	unsigned char marks[BATCH], present[BATCH];
	char *a = r->base + first * PS;
	size_t done, gone = 0, i;

	for (i = 0; i < n; i++)
		present[i] = (r->state[first + i] & ST_MASK) == PRESENT;
	if (r->async) {
		struct uffdio_move mv = {
			.dst = (uintptr_t)r->scratch, .src = (uintptr_t)a,
			.len = n * PS,
			.mode = UFFDIO_MOVE_MODE_DONTWAKE |
				UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES,
		};

		/* Invariant: the scratch area is ours, registered with this
		 * uffd and empty; after the move the region's pages are gone
		 * (a toucher faults and waits for us), so what we read from
		 * scratch is exactly what the region held. Only offsets of
		 * PRESENT pages are read: at the others scratch has nothing,
		 * and a read there would fault on this very thread. */
		if (ioctl(r->uffd, UFFDIO_MOVE, &mv) < 0 && mv.move <= 0) {
			logmsg(r, "UFFDIO_MOVE of pages %zu..%zu: %s", first,
			       first + n - 1, strerror(errno));
			return 0;
		}
		done = (size_t)mv.move / PS;
		for (i = 0; i < done; i++)
			marks[i] = present[i] &&
				   page_hash(r->scratch + i * PS) !=
				   r->hash[first + i];
		keep_moved(r, first, done, marks);
		madvise(r->scratch, done * PS, MADV_DONTNEED);
	} else {
		/* Writers now fault and wait for us; the dirty flags are
		 * exact. */
		if (writeprotect(r, first, n, true) < 0)
			return 0;
		keep_marked(r, first, n, r->dirty + first, a);
		madvise(a, n * PS, MADV_DONTNEED);
		memset(r->dirty + first, 0, n);
		done = n;
	}
	for (i = 0; i < done; i++) {
		if (!present[i])
			continue;
		if (r->state[first + i] != SPILLED)
			r->state[first + i] = MISSING;
		gone++;
	}
	r->resident -= gone;
	r->evictions++;
	r->evicted += gone;
	return done;
}

/*
 * Another client committed pages [first, first+count) of the file (the agent's
 * INVALIDATE): drop the resident ones, so that the next touch fetches the new
 * data. evict_run keeps what was written here (in the spill file, or staged
 * with the agent, whose journal then serves it first): the local write wins
 * until its own sync. Readahead pages held back are dropped too. A fetch under way may still
 * install the page it read before the commit (docs/anon.md).
 */
static void invalidate(struct region *r, uint64_t first, uint64_t count)
{
	size_t p, n, end, i;

	if (first >= r->npages)
		return;
	end = count > r->npages - first ? r->npages : first + count;
	for (i = 0; i < MAX_HELD; i++) {
		p = r->held[i].page;
		if (p != (size_t)-1 && p >= first && p < end) {
			r->state[p] = MISSING;
			r->held[i].page = (size_t)-1;
		}
	}
	for (p = first; p < end; p += n ? n : 1) {
		n = 0;
		while (p + n < end && n < BATCH &&
		       (r->state[p + n] & ST_MASK) == PRESENT)
			n++;
		if (n && evict_run(r, p, n) < n)
			n = 1;	/* the rest is tried again, one page on */
	}
	r->invalidated += end - first;
}

/* Make room for `need` more pages under the budget: when it is reached,
 * down to SLACK pages below it, so that evictions go in runs (each move out
 * of the region interrupts every CPU the process runs on) rather than a page
 * per fault. */
static void make_room(struct region *r, size_t need)
{
	size_t scanned = 0, goal = r->budget - SLACK;

	if (r->resident + r->fetching + need <= r->budget)
		return;
	while (r->resident + r->fetching + need > goal &&
	       scanned < r->npages) {
		size_t p = r->hand, n = 0, got = 0;
		size_t over = r->resident + r->fetching + need - goal;

		if ((r->state[p] & ST_MASK) != PRESENT) {
			n = 1;
		} else if (r->async) {
			/* Up to `over` PRESENT pages within a batch, what
			 * lies between them passed over: one move. */
			for (; p + n < r->npages && n < BATCH && got < over; n++) {
				unsigned char st = r->state[p + n] & ST_MASK;

				if (st == POISONED)
					break;
				got += st == PRESENT;
			}
			while ((r->state[p + n - 1] & ST_MASK) != PRESENT)
				n--;
			evict_run(r, p, n);
		} else {
			while (p + n < r->npages && n < BATCH && n < over &&
			       (r->state[p + n] & ST_MASK) == PRESENT)
				n++;
			evict_run(r, p, n);
		}
		scanned += n;
		r->hand = p + n >= r->npages ? 0 : p + n;
	}
}

/* ---- fetching ----------------------------------------------------------- */

static struct fetch *find_fetch(struct region *r, uint64_t id)
{
	size_t i;

	for (i = 0; i < MAX_FETCHES; i++)
		if (r->fetches[i].id == id)
			return &r->fetches[i];
	return NULL;
}

static int process_reply(struct region *r);
static void srv_ask(struct region *r, struct fetch *f);
static int recv_header_fd(int fd, struct nm_wire_header *h, int *passed);
static void on_redial(struct region *r, const struct nm_wire_header *h,
		      int passed);
static void wait_reply(struct region *r);
static void check_timeouts(struct region *r);

/* Ask for [first, first+count) (MISSING pages, count <= BATCH). */
static void fetch(struct region *r, size_t first, size_t count, bool marker)
{
	struct fetch *f;
	size_t i;
	int ret;

	while (r->nfetches >= MAX_FETCHES && !r->failed)
		wait_reply(r);
	if (r->failed) {
		poison(r, first, count);
		return;
	}
	make_room(r, count);
	r->fetches_asked++;
	if (r->redial_wanted && !r->redial_asked && r->srv < 0) {
		/* This fetch goes through the agent; later ones, direct again. */
		r->redial_wanted = false;
		r->redial_asked = send_msg(r->sock, NM_OP_REDIAL, ++r->next_id,
					    0, 0, NULL, 0) == 0;
		r->redials += r->redial_asked;
	}
	f = find_fetch(r, 0);
	f->id = ++r->next_id;
	f->first = first;
	f->count = count;
	f->started_ms = now_ms();
	f->marker = marker;
	f->direct = r->srv >= 0 && !memchr(r->journaled + first, 1, count);
	r->nfetches++;
	r->fetching += count;
	for (i = first; i < first + count; i++)
		r->state[i] = FETCHING | (r->state[i] & (WANTED | WANT_WRITE));
	if (f->direct) {
		srv_ask(r, f);
		return;
	}
	ret = send_msg(r->sock, NM_OP_FETCH, f->id, first, (uint32_t)count,
		       NULL, 0);
	if (ret < 0) {
		char why[256];

		snprintf(why, sizeof(why), "cannot ask the agent for pages: %s",
			 strerror(-ret));
		fail_region(r, why);
	}
}

/* Up to BATCH MISSING pages from first (at least first itself). */
static size_t missing_run(struct region *r, size_t first, size_t max)
{
	size_t n = 0;

	while (first + n < r->npages && n < max &&
	       (r->state[first + n] & ST_MASK) == MISSING)
		n++;
	return n;
}

/* Keep a sequential reader's window full: fetch ahead up to from + WINDOW. */
static void read_ahead(struct region *r, size_t from)
{
	size_t end = from + WINDOW, p;

	if (end > r->npages)
		end = r->npages;
	p = r->seq_ahead > from ? r->seq_ahead : from;
	while (p < end && r->nfetches < MAX_FETCHES / 2 && !r->failed) {
		size_t n = missing_run(r, p, BATCH);

		if (!n) {
			p++;
			continue;
		}
		fetch(r, p, n, true);
		p += n;
	}
	r->seq_ahead = p;
}

static struct held *find_held(struct region *r, size_t page)
{
	size_t i;

	for (i = 0; i < MAX_HELD; i++)
		if (r->held[i].page == page)
			return &r->held[i];
	return NULL;
}

static void on_missing(struct region *r, size_t p, bool write)
{
	bool seq = p == r->seq_next || (p >= r->seq_lo && p < r->seq_ahead);
	size_t n;

	r->state[p] |= WANTED | (write ? WANT_WRITE : 0);
	if (!seq) {
		r->seq_lo = p;
		r->seq_next = p + 1;
		r->seq_ahead = p + 1;
		fetch(r, p, 1, false);
		return;
	}
	n = missing_run(r, p, BATCH);
	r->seq_lo = p;
	r->seq_next = p + n;
	if (r->seq_ahead < p + n)
		r->seq_ahead = p + n;
	fetch(r, p, n, false);
	read_ahead(r, p + n);
}

static void on_held(struct region *r, size_t p, bool write)
{
	struct held *h = find_held(r, p);

	make_room(r, 1);
	r->state[p] = PRESENT;
	r->resident++;
	r->hash[p] = page_hash(h->data);
	if (write && !r->async)
		r->dirty[p] = 1;
	install(r, r->base + p * PS, h->data, PS, !write);
	h->page = (size_t)-1;
	/* The reader reached a marker: keep its window ahead of it. */
	r->seq_lo = p;
	read_ahead(r, p + 1);
}

/* A fault on a page evicted with writes the agent has not seen: back from the
 * spill, writable (written: the next sync stages it), with no agent. */
static void on_spilled(struct region *r, size_t p)
{
	ssize_t n = PS;

	make_room(r, 1);
	if (r->spill_area) {
		/* Copied, not moved back: a move clears the slot's entry and
		 * so flushes other CPUs' TLBs (11 us per fault measured here,
		 * against 5-8 us for the copy). The copy goes through
		 * spill_buf: UFFDIO_COPY straight from the slot took 13-14
		 * us, a memcpy to spill_buf 0.6 us more.
		 * Invariant: the slot holds the page (SPILLED; if it was
		 * swapped out, the memcpy reads it back in, a fault the
		 * kernel serves: the area raises no userfaultfd events). */
		memcpy(r->spill_buf, r->spill_area + p * PS, PS);
		r->stale[p] = 1;
	} else {
		n = pread(r->spill_fd, r->spill_buf, PS, (off_t)(p * PS));
	}
	if (n != (ssize_t)PS) {
		char why[256];

		snprintf(why, sizeof(why), "cannot read page %zu back from the "
			 "spill file: %s", p, n < 0 ? strerror(errno) : "short read");
		fail_region(r, why);
		r->state[p] = MISSING;	/* its writes are lost: no sync succeeds */
		r->spilled--;
		poison(r, p, 1);
		return;
	}
	r->state[p] = PRESENT;
	r->spilled--;
	r->resident++;
	/* r->hash[p] stays that of the agent's version: the page differs. */
	if (!r->async)
		r->dirty[p] = 1;
	/* The spill's copy is stale now, but its space is not given back here
	 * (a hole punched or a slot emptied per fault costs more than the
	 * fault): the page's next eviction writes over it, the next sync
	 * frees it all. */
	install(r, r->base + p * PS, r->spill_buf, PS, false);
}

static void on_fault(struct region *r, const struct uffd_msg *m)
{
	uintptr_t addr = m->arg.pagefault.address & ~(PS - 1);
	bool write = m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WRITE;
	bool wp = m->arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP;
	size_t p;

	r->faults++;
	if (addr < (uintptr_t)r->base || addr >= (uintptr_t)r->base + r->size) {
		logmsg(r, "fault at %#lx outside the region; waking it",
		       (unsigned long)addr);
		wake(r, addr, PS);
		return;
	}
	p = (addr - (uintptr_t)r->base) / PS;
	switch (r->state[p] & ST_MASK) {
	case MISSING:
		if (r->failed)
			poison(r, p, 1);
		else
			on_missing(r, p, write);
		break;
	case FETCHING:
		r->state[p] |= WANTED | (write ? WANT_WRITE : 0);
		break;
	case HELD:
		on_held(r, p, write);
		break;
	case SPILLED:
		on_spilled(r, p);
		break;
	case PRESENT:
		if (wp && !r->async) {
			/* The first write since the last sync or install. */
			r->dirty[p] = 1;
			writeprotect(r, p, 1, false);
		}
		wake(r, addr, PS);
		break;
	default: /* POISONED: the toucher gets SIGBUS */
		wake(r, addr, PS);
		break;
	}
}

/* Install the pages of fetch f: src[i] is page f->first + i, NULL for a
 * hole (a zero page, no transfer). Frees f's slot. */
static void install_fetched(struct region *r, struct fetch *f,
			    const unsigned char *const *srcs)
{
	size_t i;

	for (i = 0; i < f->count; i++) {
		size_t p = f->first + i;
		bool has = srcs[i] != NULL;
		const unsigned char *src = has ? srcs[i] : zero_page;
		unsigned char st = r->state[p];

		if ((st & ST_MASK) != FETCHING)
			continue;
		r->fetching--;
		if (i == 0 && f->marker && !(st & WANTED)) {
			struct held *h = find_held(r, (size_t)-1);

			if (h) {
				h->page = p;
				memcpy(h->data, src, PS);
				r->state[p] = HELD;
				continue;
			}
		}
		r->state[p] = PRESENT;
		r->resident++;
		r->hash[p] = has ? page_hash(src) : zero_hash;
		if ((st & WANT_WRITE) && !r->async)
			r->dirty[p] = 1;
		/* A page a writer waits for is installed writable (and so
		 * counts as written): installing it protected would make
		 * the writer's retry a second fault (UFFD-PITFALLS.md). */
		install(r, r->base + p * PS, src, PS, !(st & WANT_WRITE));
	}
	f->id = 0;
	r->nfetches--;
}

/* Install the pages of one FETCH reply from the agent (payload in r->buf). */
static void on_pages(struct region *r, struct fetch *f, size_t len)
{
	const uint64_t *bits = (const uint64_t *)r->buf;
	const unsigned char *data = r->buf + NM_WIRE_BITMAP_BYTES(f->count);
	const unsigned char *srcs[NM_WIRE_MAX_PAGES];
	size_t i, with_data = 0;

	for (i = 0; i < f->count; i++) {
		bool has = (bits[i / 64] >> (i % 64)) & 1;

		srcs[i] = has ? data + with_data * PS : NULL;
		with_data += has;
	}
	if (NM_WIRE_BITMAP_BYTES(f->count) + with_data * PS != len) {
		fail_region(r, "the agent sent a malformed reply");
		return;
	}
	install_fetched(r, f, srcs);
}

static void finish_sync(struct region *r, int err, const char *msg)
{
	pthread_mutex_lock(&r->mu);
	r->sync_errno = err;
	snprintf(r->sync_msg, sizeof(r->sync_msg), "%s", msg);
	r->sync_done = r->sync_asked;
	r->commit_id = 0;
	pthread_cond_broadcast(&r->cv);
	pthread_mutex_unlock(&r->mu);
}

/* The agent asks what this handler holds (`netmemfs status`): answered from
 * this thread, the only one that sends on r->sock, with the counts this
 * thread keeps. */
static void reply_stats(struct region *r, uint64_t id)
{
	struct nm_wire_stats s = {
		.faults = r->faults,
		.fetches = r->fetches_asked,
		.direct_fetches = r->direct_fetches,
		.evictions = r->evictions,
		.evicted = r->evicted,
		.spilled = r->spilled,
		.resident = r->resident,
		.budget = r->budget,
	};

	if (send_msg(r->sock, NM_OP_STATS, id, 0, 0, &s, sizeof(s)) < 0) {
		char why[512];

		snprintf(why, sizeof(why), "%s went away", r->agent_name);
		fail_region(r, why);
	}
}

/* Read and act on one message from the agent (a REDIAL's reply carries a
 * descriptor). */
static int process_reply(struct region *r)
{
	struct nm_wire_header h;
	struct fetch *f;
	int passed;
	int ret = recv_header_fd(r->sock, &h, &passed);

	if (passed >= 0 && (ret < 0 || h.op != NM_OP_REDIAL)) {
		close(passed);	/* only a REDIAL's reply may carry one */
		passed = -1;
	}
	if (ret == 0 && h.len > r->buf_len) {
		if (passed >= 0)
			close(passed);
		fail_region(r, "the agent sent a message larger than any allowed");
		return -EPROTO;
	}
	if (ret == 0)
		ret = recv_all(r->sock, r->buf, h.len);
	if (ret < 0) {
		char why[512];

		/* A killed agent shows as end of stream, or as a reset when
		 * it died with our requests unread: both mean it is gone. */
		snprintf(why, sizeof(why), "%s went away (%s)", r->agent_name,
			 ret == -EPIPE ? "end of stream" : strerror(-ret));
		if (passed >= 0)
			close(passed);
		fail_region(r, why);
		return ret;
	}
	if (h.op == NM_OP_REDIAL) {
		on_redial(r, &h, passed);
	} else if (h.op == NM_OP_FETCH) {
		f = find_fetch(r, h.id);
		if (!f || f->direct)
			return 0;
		if (h.status) {
			logmsg(r, "fetch of pages %zu..%zu failed: %.*s", f->first,
			       f->first + f->count - 1, (int)h.len, r->buf);
			r->fetching -= f->count;
			poison(r, f->first, f->count);
			f->id = 0;
			r->nfetches--;
		} else {
			on_pages(r, f, h.len);
		}
	} else if (h.op == NM_OP_INVALIDATE) {
		invalidate(r, h.first, h.count);
	} else if (h.op == NM_OP_STATS) {
		reply_stats(r, h.id);
	} else if (h.op == NM_OP_LOCK || h.op == NM_OP_UNLOCK) {
		pthread_mutex_lock(&r->mu);
		if (r->lk.id && h.id == r->lk.id) {	/* else: given up on */
			r->lk.err = (int)h.status;
			r->lk.token = h.first;
			snprintf(r->lk.msg, sizeof(r->lk.msg), "%.*s",
				 (int)h.len, r->buf);
			r->lk.done = true;
			r->lk.id = 0;
			pthread_cond_broadcast(&r->cv);
		}
		pthread_mutex_unlock(&r->mu);
	} else if (h.op == NM_OP_STAGE && h.status) {
		snprintf(r->stage_error, sizeof(r->stage_error), "%.*s",
			 (int)h.len, r->buf);
		logmsg(r, "staging pages failed: %s; syncs of this region fail "
		       "from now on", r->stage_error);
	} else if (h.op == NM_OP_COMMIT && h.id == r->commit_id) {
		char msg[512];

		snprintf(msg, sizeof(msg), "%.*s", (int)h.len, r->buf);
		/* Committed, and nothing handed over since: the server has
		 * the newest version of every page again. */
		if (!h.status && r->stages == r->commit_stages)
			memset(r->journaled, 0, r->npages);
		finish_sync(r, (int)h.status, msg);
	}
	return 0;
}

/* ---- reading from the server directly ------------------------------------ */

/* Ask the agent for f's pages instead (the direct connection is gone, or
 * the server refused the read: the agent retries, reconnects, and turns a
 * lasting failure into an error the program sees as SIGBUS). */
static void reroute(struct region *r, struct fetch *f)
{
	int ret;

	f->direct = false;
	f->started_ms = now_ms();
	ret = send_msg(r->sock, NM_OP_FETCH, f->id, f->first,
		       (uint32_t)f->count, NULL, 0);
	if (ret < 0) {
		char why[256];

		snprintf(why, sizeof(why), "cannot ask the agent for pages: %s",
			 strerror(-ret));
		fail_region(r, why);
	}
}

/* Stop reading from the server directly; what it owes us comes through the
 * agent. With redial (the server closed the connection in good order), the
 * next fetch asks the agent for a new one, which later fetches use. */
static void drop_direct(struct region *r, const char *why, bool redial)
{
	size_t i;

	if (r->srv < 0)
		return;
	close(r->srv);
	r->srv = -1;
	r->srv_gen++;
	r->srv_fill = 0;
	r->resp_head = r->resp_count = 0;
	if (redial && r->redials < MAX_REDIALS)
		r->redial_wanted = true;
	else
		logmsg(r, "direct reads from the server stopped (%s); pages "
		       "come through the agent from now on", why);
	for (i = 0; i < MAX_FETCHES && !r->failed; i++)
		if (r->fetches[i].id && r->fetches[i].direct)
			reroute(r, &r->fetches[i]);
}

/* What a direct connection from the agent speaks, from the payload that
 * came with it: empty, the netmemfs protocol; "resp:<tag>", RESP to the Redis
 * node serving the file's keys, which all begin with <tag>. False if the
 * payload is neither (an agent of another release): no direct reads then. */
static bool set_speaks(struct region *r, const char *payload, size_t len)
{
	if (len == 0) {
		r->resp = false;
		return true;
	}
	if (len <= 5 || len - 5 > REDIS_TAG_MAX || memcmp(payload, "resp:", 5) ||
	    memchr(payload + 5, 0, len - 5))
		return false;
	r->resp = true;
	memcpy(r->resp_tag, payload + 5, len - 5);
	r->resp_tag[len - 5] = 0;
	return true;
}

/* The agent's answer to a REDIAL: the new direct connection (passed, which
 * this takes over), or why there is none (then a later fetch asks again,
 * up to MAX_REDIALS in a row). */
static void on_redial(struct region *r, const struct nm_wire_header *h,
		      int passed)
{
	r->redial_asked = false;
	if (!h->status && passed >= 0 && r->srv < 0 && !r->failed &&
	    set_speaks(r, (const char *)r->buf, h->len) &&
	    fcntl(passed, F_SETFL, O_NONBLOCK) == 0) {
		r->srv = passed;	/* srv_fill is 0 since drop_direct() */
		r->srv_gen++;
		return;
	}
	if (passed >= 0)
		close(passed);
	if (r->redials < MAX_REDIALS)
		r->redial_wanted = true;
	else
		logmsg(r, "direct reads from the server stopped (the server "
		       "closed the connection, and new ones failed: %.*s); pages "
		       "come through the agent from now on",
		       h->status ? (int)h->len : 0, r->buf);
}

/* Append RESP's bulk string for len bytes at arg to out (cap bytes, *at
 * used); false if it does not fit. */
static bool resp_arg(char *out, size_t cap, size_t *at, const char *arg,
		     size_t len)
{
	int n = snprintf(out + *at, cap - *at, "$%zu\r\n", len);

	if (n < 0 || (size_t)n + len + 2 > cap - *at)
		return false;
	*at += (size_t)n;
	memcpy(out + *at, arg, len);
	memcpy(out + *at + len, "\r\n", 2);
	*at += len + 2;
	return true;
}

/* Append the header of a command of n arguments. */
static bool resp_argv(char *out, size_t cap, size_t *at, size_t n)
{
	int k = snprintf(out + *at, cap - *at, "*%zu\r\n", n);

	if (k < 0 || (size_t)k >= cap - *at)
		return false;
	*at += (size_t)k;
	return true;
}

static bool resp_num(char *out, size_t cap, size_t *at, unsigned long long v)
{
	char num[24];
	int n = snprintf(num, sizeof(num), "%llu", v);

	return resp_arg(out, cap, at, num, (size_t)n);
}

/* The chunks a fetch of pages [first, first+count) reads: c0 and how many. */
static size_t resp_chunks(size_t first, size_t count, size_t *c0)
{
	*c0 = first / REDIS_CHUNK_PAGES;
	return (first + count - 1) / REDIS_CHUNK_PAGES - *c0 + 1;
}

/* Chunk c's part of pages [first, first+count): pages lo..hi-1 of it. */
static void resp_span(size_t c, size_t first, size_t count, size_t *lo,
		      size_t *hi)
{
	size_t base = c * REDIS_CHUNK_PAGES;

	*lo = first > base ? first - base : 0;
	*hi = first + count < base + REDIS_CHUNK_PAGES ?
	      first + count - base : REDIS_CHUNK_PAGES;
}

/* f's pages asked of Redis, as the store's own reads do (RedisStore's
 * _read_now; docs/protocol.md): MULTI, HMGET <tag>:m size gone, GETRANGE of
 * each chunk's bytes wanted, EXEC. A transaction, so a commit is seen whole;
 * no Lua function, which would copy the pages through Lua (a 252 KiB chunk:
 * 0.47 ms of Redis's time against 0.08 ms). */
static void resp_ask(struct region *r, struct fetch *f)
{
	char req[2048], key[REDIS_TAG_MAX + 32];
	size_t c0, chunks = resp_chunks(f->first, f->count, &c0), at, c;
	size_t lo, hi;
	bool ok;
	ssize_t n;
	int k;

	/* count <= BATCH < 2 * REDIS_CHUNK_PAGES: two chunks at most, so the
	 * request fits req whatever the tag (REDIS_TAG_MAX). */
	k = snprintf(key, sizeof(key), "%s:m", r->resp_tag);
	at = 0;
	ok = resp_argv(req, sizeof(req), &at, 1) &&
	     resp_arg(req, sizeof(req), &at, "MULTI", 5) &&
	     resp_argv(req, sizeof(req), &at, 4) &&
	     resp_arg(req, sizeof(req), &at, "HMGET", 5) &&
	     resp_arg(req, sizeof(req), &at, key, (size_t)k) &&
	     resp_arg(req, sizeof(req), &at, "size", 4) &&
	     resp_arg(req, sizeof(req), &at, "gone", 4);
	for (c = c0; c < c0 + chunks; c++) {
		resp_span(c, f->first, f->count, &lo, &hi);
		k = snprintf(key, sizeof(key), "%s:c:%zu", r->resp_tag, c);
		ok = ok && resp_argv(req, sizeof(req), &at, 4) &&
		     resp_arg(req, sizeof(req), &at, "GETRANGE", 8) &&
		     resp_arg(req, sizeof(req), &at, key, (size_t)k) &&
		     resp_num(req, sizeof(req), &at, lo * PS) &&
		     resp_num(req, sizeof(req), &at, hi * PS - 1);
	}
	ok = ok && resp_argv(req, sizeof(req), &at, 1) &&
	     resp_arg(req, sizeof(req), &at, "EXEC", 4);
	if (!ok || r->resp_count == MAX_FETCHES) {
		reroute(r, f);
		return;
	}
	r->resp_asked[(r->resp_head + r->resp_count++) % MAX_FETCHES] =
		(struct resp_asked){ f->id, f->first, f->count };
	n = send(r->srv, req, at, MSG_NOSIGNAL | MSG_DONTWAIT);
	r->direct_fetches++;
	if (n != (ssize_t)at)
		drop_direct(r, n < 0 ? strerror(errno) : "a short send",
			    n < 0 && (errno == EPIPE || errno == ECONNRESET));
}

static void srv_ask(struct region *r, struct fetch *f)
{
	unsigned char req[NM_SRV_REQUEST_MAX];
	size_t len;
	ssize_t n;

	if (r->resp) {
		resp_ask(r, f);
		return;
	}
	/* By inode number: the file the agent resolved at OPEN, whatever its
	 * name is now. An agent of before inodes gives 0: then by name. */
	len = r->ino ?
		nm_srv_read_inode(req, f->id, r->ino, f->first, f->count) :
		nm_srv_read_pages(req, f->id, r->segment, f->first, f->count);
	n = send(r->srv, req, len, MSG_NOSIGNAL | MSG_DONTWAIT);
	r->direct_fetches++;
	/* A request is a few dozen bytes and at most MAX_FETCHES are in
	 * flight, so a full socket buffer means the server stopped reading. */
	if (n != (ssize_t)len)
		drop_direct(r, n < 0 ? strerror(errno) : "a short send",
			    n < 0 && (errno == EPIPE || errno == ECONNRESET));
}

/* One frame from the server: a Pages or Error reply to a direct fetch.
 * Return -1 if the connection was dropped. */
static int srv_frame(struct region *r, const unsigned char *body, size_t len)
{
	const unsigned char *srcs[NM_WIRE_MAX_PAGES] = { NULL };
	struct nm_mp m = { body, body + len };
	const unsigned char *s;
	uint64_t n, type, id, first, count, version, nruns, k;
	struct fetch *f;

	if (!nm_mp_array(&m, &n) || n < 2 || !nm_mp_uint(&m, &type) ||
	    !nm_mp_uint(&m, &id))
		goto bad;
	f = find_fetch(r, id);
	if (!id || !f || !f->direct)
		return 0;	/* not ours to install (never sent) */
	if (type == NM_SRV_ERROR) {
		reroute(r, f);	/* the agent turns it into a message */
		return 0;
	}
	if (type != NM_SRV_PAGES || n != 7 || !nm_mp_bytes(&m, false, &s, &k) ||
	    !nm_mp_uint(&m, &first) || !nm_mp_uint(&m, &count) ||
	    !nm_mp_uint(&m, &version) || !nm_mp_array(&m, &nruns) ||
	    first != f->first || count != f->count)
		goto bad;
	while (nruns--) {
		uint64_t rfirst, dlen, i;

		if (!nm_mp_array(&m, &n) || n != 3 ||
		    !nm_mp_bytes(&m, false, &s, &k) ||
		    !nm_mp_uint(&m, &rfirst) || !nm_mp_bytes(&m, true, &s, &dlen) ||
		    dlen % PS || rfirst < first ||
		    rfirst - first + dlen / PS > count)
			goto bad;
		for (i = 0; i < dlen / PS; i++)
			srcs[rfirst - first + i] = s + i * PS;
	}
	r->redials = 0;
	install_fetched(r, f, srcs);
	return 0;
bad:
	drop_direct(r, "the server sent a reply this library cannot read",
		    false);
	return -1;
}

/* One RESP line at *p (before end, at most max bytes): its type byte and
 * the text after it, *p moved past its CRLF. 1: done; 0: not all here yet;
 * -1: not such a line. */
static int resp_line(const unsigned char **p, const unsigned char *end,
		     size_t max, unsigned char *type, const unsigned char **text,
		     size_t *len)
{
	const unsigned char *q = *p, *nl;

	if (q >= end)
		return 0;
	nl = memchr(q, '\n', (size_t)(end - q) < max ? (size_t)(end - q) : max);
	if (!nl)
		return (size_t)(end - q) >= max ? -1 : 0;
	if (nl - q < 2 || nl[-1] != '\r')
		return -1;
	*type = q[0];
	*text = q + 1;
	*len = (size_t)(nl - 1 - (q + 1));
	*p = nl + 1;
	return 1;
}

/* The signed decimal text..text+len, at most 18 digits; false if not one. */
static bool resp_int(const unsigned char *text, size_t len, long long *v)
{
	bool neg = len && text[0] == '-';
	size_t i;

	if (len == neg || len - neg > 18)
		return false;
	for (*v = 0, i = neg; i < len; i++) {
		if (text[i] < '0' || text[i] > '9')
			return false;
		*v = *v * 10 + (text[i] - '0');
	}
	if (neg)
		*v = -*v;
	return true;
}

/* A bulk string at *p (its length line, then the bytes): *data and *blen,
 * or *blen -1 for nil; the bytes are at most max. Returns as resp_line. */
static int resp_bulk(const unsigned char **p, const unsigned char *end,
		     long long max, const unsigned char **data, long long *blen)
{
	const unsigned char *q = *p, *text;
	unsigned char t;
	size_t len;
	int rc = resp_line(&q, end, 32, &t, &text, &len);

	if (rc <= 0)
		return rc;
	if (t != '$' || !resp_int(text, len, blen) || *blen < -1 || *blen > max)
		return -1;
	if (*blen >= 0) {
		if (end - q < *blen + 2)
			return 0;
		if (q[*blen] != '\r' || q[*blen + 1] != '\n')
			return -1;
		*data = q;
		q += *blen + 2;
	}
	*p = q;
	return 1;
}

/* The replies to the oldest transaction asked (resp_asked; resp_ask has the
 * commands) at buf (len bytes); *used is their size. 1: acted on; 0: not
 * all here yet; -1: the connection is not usable any more (dropped here
 * after a MOVED, or replies this library cannot read: the caller drops it).
 * Nothing changes until every reply of the transaction is here. */
static int resp_reply(struct region *r, const unsigned char *buf, size_t len,
		      size_t *used)
{
	const unsigned char *srcs[NM_WIRE_MAX_PAGES] = { NULL };
	const unsigned char *p = buf, *end = buf + len, *text;
	const unsigned char *data[2] = { NULL, NULL }, *field;
	long long n, blen[2] = { 0, 0 }, size = -1, gone = -1;
	struct resp_asked a;
	bool refused = false, moved = false;
	size_t c0, chunks, tlen, k, i;
	unsigned char t;
	struct fetch *f;
	int rc;

	if (!len)
		return 0;
	if (!r->resp_count)
		return -1;	/* a reply to nothing asked */
	a = r->resp_asked[r->resp_head];
	chunks = resp_chunks(a.first, a.count, &c0);
	if (chunks > 2)
		return -1;
	/* MULTI's +OK, then +QUEUED for each command queued, or an error:
	 * MOVED or ASK (the slot has, or is getting, another node), ... */
	for (k = 0; k < 2 + chunks; k++) {
		rc = resp_line(&p, end, 1024, &t, &text, &tlen);
		if (rc <= 0)
			return rc;
		if (t == '-') {
			refused = true;
			moved |= tlen > 6 && !memcmp(text, "MOVED ", 6);
		} else if (t != '+') {
			return -1;
		}
	}
	/* EXEC's: an error (the transaction was refused), or the replies
	 * {{size, gone}, bytes of each chunk asked}. */
	rc = resp_line(&p, end, 1024, &t, &text, &tlen);
	if (rc <= 0)
		return rc;
	if (t == '-') {
		refused = true;
	} else {
		if (t != '*' || !resp_int(text, tlen, &n) ||
		    n != 1 + (long long)chunks)
			return -1;
		rc = resp_line(&p, end, 32, &t, &text, &tlen);
		if (rc <= 0)
			return rc;
		if (t != '*' || !resp_int(text, tlen, &n) || n != 2)
			return -1;
		rc = resp_bulk(&p, end, 32, &field, &size);
		if (rc <= 0)
			return rc;
		rc = resp_bulk(&p, end, 32, &field, &gone);
		if (rc <= 0)
			return rc;
		for (k = 0; k < chunks; k++) {
			rc = resp_bulk(&p, end, REDIS_CHUNK_PAGES * (long long)PS,
				       &data[k], &blen[k]);
			if (rc <= 0)
				return rc;
			if (blen[k] < 0)
				return -1;
		}
	}
	*used = (size_t)(p - buf);
	r->resp_head = (r->resp_head + 1) % MAX_FETCHES;
	r->resp_count--;
	f = find_fetch(r, a.id);
	if (!f || !f->direct)
		return 1;	/* rerouted since: not ours to install */
	if (refused || size < 0 || gone >= 0) {
		/* Refused: the agent's connections follow MOVED, ASK,
		 * TRYAGAIN, LOADING and the rest. No data record (never
		 * committed) or a reaped file: the agent says which. */
		reroute(r, f);
		if (moved) {
			drop_direct(r, "the file's hash slot moved to another "
				    "Redis node", true);
			return -1;
		}
		return 1;
	}
	/* Each chunk's bytes start at the first page asked of it; shorter
	 * than asked, the rest are holes. */
	for (k = 0, i = 0; k < chunks; k++) {
		size_t lo, hi, j;

		resp_span(c0 + k, f->first, f->count, &lo, &hi);
		if ((size_t)blen[k] % PS || (size_t)blen[k] / PS > hi - lo)
			return -1;
		for (j = 0; j < (size_t)blen[k] / PS; j++)
			srcs[i + j] = data[k] + j * PS;
		i += hi - lo;
	}
	r->redials = 0;
	install_fetched(r, f, srcs);
	return 1;
}

/* Act on every whole reply from Redis in srv_buf: the bytes used, or -1 if
 * the connection was dropped. */
static ssize_t resp_consume(struct region *r)
{
	size_t used = 0, k;
	int rc = 1;

	while (used < r->srv_fill) {
		k = 0;
		rc = resp_reply(r, r->srv_buf + used, r->srv_fill - used, &k);
		if (rc <= 0)
			break;
		used += k;
	}
	if (rc < 0 || (!used && r->srv_fill == r->srv_cap)) {
		/* After a MOVED the connection is gone already. */
		drop_direct(r, "Redis sent a reply this library cannot read",
			    false);
		return -1;
	}
	return (ssize_t)used;
}

static uint32_t be32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 |
	       (uint32_t)p[2] << 8 | p[3];
}

/* Act on every whole frame from the server in srv_buf: the bytes used, or
 * -1 if the connection was dropped. */
static ssize_t frames_consume(struct region *r)
{
	size_t used = 0;

	while (r->srv_fill - used >= 4) {
		uint32_t len = be32(r->srv_buf + used);

		if (len > r->srv_cap - 4) {
			drop_direct(r, "the server sent a frame larger than any "
				    "reply to a fetch", false);
			return -1;
		}
		if (r->srv_fill - used < 4 + (size_t)len)
			break;
		if (srv_frame(r, r->srv_buf + used + 4, len) < 0)
			return -1;
		used += 4 + (size_t)len;
	}
	return (ssize_t)used;
}

/* Read what the server (or Redis) sent and act on every whole reply. */
static void srv_readable(struct region *r)
{
	while (r->srv >= 0) {
		ssize_t n = read(r->srv, r->srv_buf + r->srv_fill,
				 r->srv_cap - r->srv_fill);
		ssize_t used;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			/* Closed or reset: the server went away or ended an idle
			 * connection, so a new one may well work. */
			drop_direct(r, n ? strerror(errno) : r->resp ?
				    "Redis closed the connection" :
				    "the server closed the connection", true);
			return;
		}
		r->srv_fill += (size_t)n;
		used = r->resp ? resp_consume(r) : frames_consume(r);
		if (used < 0)
			return;
		memmove(r->srv_buf, r->srv_buf + used,
			r->srv_fill - (size_t)used);
		r->srv_fill -= (size_t)used;
	}
}

/* Every fetch slot is taken: wait for a reply from either side. */
static void wait_reply(struct region *r)
{
	struct pollfd fds[2] = {
		{ r->sock, POLLIN, 0 }, { r->srv, POLLIN, 0 },
	};

	if (poll(fds, 2, 200) < 0 && errno != EINTR) {
		fail_region(r, "poll failed while waiting for pages");
		return;
	}
	if (fds[0].revents)
		process_reply(r);
	if (fds[1].revents)
		srv_readable(r);
	check_timeouts(r);
}

/* ---- sync --------------------------------------------------------------- */

/* Stage the written pages; 0, or -1 after finish_sync() said why. */
static int sync_async_mode(struct region *r)
{
	struct page_region vec[64];
	struct pm_scan_arg a = {
		.size = sizeof(a),
		.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
		.start = (uintptr_t)r->base,
		.end = (uintptr_t)r->base + r->size,
		.vec = (uintptr_t)vec,
		.vec_len = 64,
		/* Present and written: a hole or an evicted page also counts as
		 * "written" (it has no write-protect bit), but it is not ours to
		 * read: touching it would fault on this very thread. */
		.category_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
		.return_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
	};

	while (a.start < a.end && !r->failed) {
		long n = ioctl(r->pagemap, PAGEMAP_SCAN, &a);
		long i;

		if (n < 0) {
			char why[256];

			snprintf(why, sizeof(why), "PAGEMAP_SCAN: %s",
				 strerror(errno));
			finish_sync(r, EIO, why);
			return -1;
		}
		for (i = 0; i < n; i++) {
			size_t p = (vec[i].start - (uintptr_t)r->base) / PS;
			size_t end = (vec[i].end - (uintptr_t)r->base) / PS;

			while (p < end) {
				size_t k = end - p < NM_WIRE_MAX_PAGES ?
					   end - p : NM_WIRE_MAX_PAGES, j;

				for (j = 0; j < k; j++)
					if ((r->state[p + j] & ST_MASK) != PRESENT)
						break;
				if (j == 0) {
					/* Never: only this thread installs
					 * and evicts. Skip, do not touch. */
					logmsg(r, "PAGEMAP_SCAN reported page "
					       "%zu written but it is not "
					       "resident", p);
					p++;
					continue;
				}
				k = j;

				/* A copy, so the hash is of exactly what
				 * the agent gets, even if a writer races. */
				memcpy(r->buf, r->base + p * PS, k * PS);
				for (j = 0; j < k; j++)
					r->hash[p + j] =
						page_hash(r->buf + j * PS);
				stage(r, p, k, r->buf);
				p += k;
			}
		}
		a.start = a.walk_end;
	}
	return 0;
}

/* Hand every SPILLED page to the agent (a sync commits them); they are
 * MISSING and journaled after, as pages staged at eviction are. */
static int stage_spilled(struct region *r)
{
	size_t p = 0, j, k;

	while (r->spilled && p < r->npages && !r->failed) {
		if (r->state[p] != SPILLED) {
			p++;
			continue;
		}
		for (j = p; j < r->npages && r->state[j] == SPILLED &&
		     j - p < NM_WIRE_MAX_PAGES; j++)
			;
		if (r->spill_area) {
			/* Invariant: pages SPILLED are in their slots. */
			stage(r, p, j - p, r->spill_area + p * PS);
			madvise(r->spill_area + p * PS, (j - p) * PS,
				MADV_DONTNEED);
		} else if (pread(r->spill_fd, r->buf, (j - p) * PS,
				 (off_t)(p * PS)) == (ssize_t)((j - p) * PS)) {
			stage(r, p, j - p, r->buf);
		} else {
			char why[256];

			snprintf(why, sizeof(why), "cannot read pages %zu..%zu back "
				 "from the spill file: %s", p, j - 1,
				 strerror(errno ? errno : EIO));
			fail_region(r, why);
			return -1;
		}
		for (k = p; k < j; k++)
			r->state[k] = MISSING;
		r->spilled -= j - p;
		p = j;
	}
	/* Nothing in the spill is needed now (pages faulted back left stale
	 * copies too): give all its space back at once. */
	if (r->spill_area && !r->spilled && !r->failed) {
		madvise(r->spill_area, r->size, MADV_DONTNEED);
		memset(r->stale, 0, r->npages);
	}
	if (r->spill_fd >= 0 && !r->spilled && !r->failed)
		fallocate(r->spill_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			  0, (off_t)r->size);
	return 0;
}

static void sync_sync_mode(struct region *r)
{
	size_t p = 0, j;

	while (p < r->npages && !r->failed) {
		if (!r->dirty[p]) {
			p++;
			continue;
		}
		for (j = p; j < r->npages && r->dirty[j] &&
		     j - p < NM_WIRE_MAX_PAGES; j++)
			r->dirty[j] = 0;
		/* Protect first: a write after this faults and marks the
		 * page dirty again, for the next sync. */
		writeprotect(r, p, j - p, true);
		stage(r, p, j - p, r->base + p * PS);
		p = j;
	}
}

static void start_sync(struct region *r)
{
	int ret;

	if (r->failed) {
		finish_sync(r, EIO, r->fail_msg);
		return;
	}
	if (r->stage_error[0]) {
		char why[512];

		snprintf(why, sizeof(why), "the agent lost pages handed to it "
			 "(%s), so no commit of this region can be whole; unmap "
			 "it and map it again", r->stage_error);
		finish_sync(r, EIO, why);
		return;
	}
	if (stage_spilled(r) < 0) {
		finish_sync(r, EIO, r->fail_msg);
		return;
	}
	if (r->async) {
		/* A failed scan staged only some pages: committing them
		 * would not be the whole sync. */
		if (sync_async_mode(r) < 0)
			return;
	} else {
		sync_sync_mode(r);
	}
	if (r->failed) {
		finish_sync(r, EIO, r->fail_msg);
		return;
	}
	r->commit_id = ++r->next_id;
	r->commit_stages = r->stages;
	ret = send_msg(r->sock, NM_OP_COMMIT, r->commit_id, 0, 0, NULL, 0);
	if (ret < 0) {
		char why[512];

		snprintf(why, sizeof(why), "%s went away during a sync",
			 r->agent_name);
		fail_region(r, why);
	}
}

/* ---- the handler thread ------------------------------------------------- */

static void check_timeouts(struct region *r)
{
	uint64_t now = now_ms(), limit = r->timeout_ms + 5000;
	size_t i;

	for (i = 0; i < MAX_FETCHES; i++) {
		struct fetch *f = &r->fetches[i];

		if (f->id && f->direct && now - f->started_ms > r->timeout_ms) {
			/* As the agent would after its timeout: these pages
			 * fail, later ones go through the agent. */
			logmsg(r, "fetch of pages %zu..%zu failed: the server "
			       "did not answer within %u ms", f->first,
			       f->first + f->count - 1, r->timeout_ms);
			r->fetching -= f->count;
			poison(r, f->first, f->count);
			f->id = 0;
			r->nfetches--;
			drop_direct(r, "the server stalled", false);
			continue;
		}
		if (f->id && now - f->started_ms > limit) {
			char why[512];

			snprintf(why, sizeof(why),
				 "%s did not answer a fetch of pages "
				 "%zu..%zu within %u ms", r->agent_name, f->first,
				 f->first + f->count - 1, (unsigned)limit);
			fail_region(r, why);
			return;
		}
	}
}

/* Send the application's lock request, if one waits and is not sent yet. */
static void send_lock_request(struct region *r)
{
	uint32_t op;
	uint64_t first, id;
	struct nm_wire_lock args;

	pthread_mutex_lock(&r->mu);
	op = r->lk.op;
	first = r->lk.first;
	args = r->lk.args;
	id = 0;
	if (op && !r->lk.id && !r->lk.done)
		id = r->lk.id = ++r->next_id;
	pthread_mutex_unlock(&r->mu);
	if (!id)
		return;
	if (send_msg(r->sock, op, id, first, 0, &args,
		     op == NM_OP_LOCK ? sizeof(args) : 0) < 0) {
		char why[512];

		snprintf(why, sizeof(why), "%s went away during a lock request",
			 r->agent_name);
		fail_region(r, why);
	}
}

/* $NETMEM_SPIN_US: microseconds, 0 (never spin) to 10000; else the default. */
static uint64_t spin_us(void)
{
	const char *v = getenv("NETMEM_SPIN_US");
	char *end;
	unsigned long us;

	if (!v || !*v)
		return DEFAULT_SPIN_US;
	errno = 0;
	us = strtoul(v, &end, 10);
	if (errno || *end || us > 10000) {
		fprintf(stderr, "netmem: NETMEM_SPIN_US=%s is not a number of "
			"microseconds from 0 to 10000; using %d\n", v,
			DEFAULT_SPIN_US);
		return DEFAULT_SPIN_US;
	}
	return us;
}

/* The handler's descriptors, in one epoll set registered once, rather than
 * a poll() that sets up and tears down four wait queues at every wake: the
 * handler's CPU per fault of bench/anon.py's walk went from 18-19 us to
 * 15-18 us (no spinning, one CPU; two runs each). */
enum { EV_UFFD, EV_SOCK, EV_EVFD, EV_SRV, EV_COUNT };

struct watch {
	int ep;
	bool sock;		/* sock is in the set (not once the region failed) */
	int srv;		/* the direct connection in the set, or -1 */
	unsigned int srv_gen;	/* r->srv_gen when srv was added */
};

static int watch_add(struct watch *w, int fd, uint32_t tag)
{
	struct epoll_event ev = { .events = EPOLLIN, .data.u32 = tag };

	return epoll_ctl(w->ep, EPOLL_CTL_ADD, fd, &ev);
}

static int watch_open(struct watch *w, struct region *r)
{
	w->ep = epoll_create1(EPOLL_CLOEXEC);
	w->sock = true;
	w->srv = -1;
	w->srv_gen = r->srv_gen - 1;	/* srv is added by watch_update */
	if (w->ep < 0 || watch_add(w, r->uffd, EV_UFFD) < 0 ||
	    watch_add(w, r->sock, EV_SOCK) < 0 ||
	    watch_add(w, r->evfd, EV_EVFD) < 0) {
		logmsg(r, "cannot watch the handler's descriptors with epoll: %s",
		       strerror(errno));
		if (w->ep >= 0)
			close(w->ep);
		w->ep = -1;
		return -1;
	}
	return 0;
}

/* Follow the region: the agent's socket leaves the set once the region has
 * failed (it may stay readable at EOF), the direct connection is replaced
 * whenever srv_gen moves. A closed descriptor has left the set by itself,
 * so a DEL that finds nothing is expected. */
static void watch_update(struct watch *w, struct region *r)
{
	if (r->failed && w->sock) {
		epoll_ctl(w->ep, EPOLL_CTL_DEL, r->sock, NULL);
		w->sock = false;
	}
	if (w->srv_gen == r->srv_gen)
		return;
	if (w->srv >= 0)
		epoll_ctl(w->ep, EPOLL_CTL_DEL, w->srv, NULL);
	w->srv = -1;
	if (r->srv >= 0 && watch_add(w, r->srv, EV_SRV) == 0)
		w->srv = r->srv;
	else if (r->srv >= 0)
		drop_direct(r, "it could not be watched with epoll", false);
	w->srv_gen = r->srv_gen;
}

/* Wait for the handler's descriptors; ready[tag] says which are readable (or
 * at an error or hang-up). Without sleeping while the last event is less
 * than spin_ns old (yielding the CPU to any thread that wants it), then
 * blocking for up to 200 ms (timeouts are checked that often). */
static int wait_events(struct region *r, struct watch *w, bool ready[EV_COUNT])
{
	uint64_t until = r->last_event_ns + r->spin_ns;
	struct epoll_event evs[EV_COUNT];
	int n, i;

	memset(ready, 0, EV_COUNT * sizeof(ready[0]));
	for (;;) {
		bool spin = r->spin_ns && now_ns() < until;

		n = epoll_wait(w->ep, evs, EV_COUNT, spin ? 0 : 200);
		if (n != 0 || !spin)
			break;
		sched_yield();
	}
	for (i = 0; i < n; i++)
		if (evs[i].data.u32 < EV_COUNT)
			ready[evs[i].data.u32] = true;
	return n;
}

static void *handler_main(void *arg)
{
	struct region *r = arg;
	struct uffd_msg msgs[32];
	struct watch w;
	bool ready[EV_COUNT];
	sigset_t all;

	/* Signals are the application's business, not this thread's. */
	sigfillset(&all);
	pthread_sigmask(SIG_BLOCK, &all, NULL);
	if (watch_open(&w, r) < 0) {
		fail_region(r, "the fault handler cannot wait for its events");
		/* Faults still come: each is answered (SIGBUS) every 10 ms. */
	}
	for (;;) {
		bool stop, want_sync;
		ssize_t n;
		int i;

		pthread_mutex_lock(&r->mu);
		stop = r->stop;
		want_sync = r->sync_asked != r->sync_done && !r->commit_id;
		pthread_mutex_unlock(&r->mu);
		if (stop)
			break;
		if (want_sync)
			start_sync(r);
		send_lock_request(r);
		if (w.ep >= 0) {
			watch_update(&w, r);
			if (wait_events(r, &w, ready) < 0 && errno != EINTR)
				break;
		} else {
			memset(ready, 1, sizeof(ready));
			ready[EV_SOCK] = ready[EV_SRV] = false;
			usleep(10000);
		}
		if (ready[EV_EVFD]) {
			uint64_t v;

			if (read(r->evfd, &v, sizeof(v)) < 0 && errno != EAGAIN)
				break;
		}
		if (ready[EV_SOCK])
			process_reply(r);
		if (ready[EV_SRV] && r->srv >= 0)
			srv_readable(r);
		if (ready[EV_UFFD]) {
			n = read(r->uffd, msgs, sizeof(msgs));
			for (i = 0; n > 0 && i < n / (ssize_t)sizeof(msgs[0]); i++)
				if (msgs[i].event == UFFD_EVENT_PAGEFAULT)
					on_fault(r, &msgs[i]);
		}
		if (r->nfetches)
			check_timeouts(r);
		/* Spin from when the work is done, not from when it came. */
		if (ready[EV_UFFD] || ready[EV_SOCK] || ready[EV_SRV])
			r->last_event_ns = now_ns();
	}
	if (w.ep >= 0)
		close(w.ep);
	return NULL;
}

static void kick(struct region *r)
{
	uint64_t one = 1;

	if (write(r->evfd, &one, sizeof(one)) < 0) {
		/* The counter cannot overflow in practice; the handler also
		 * polls every 200 ms. */
	}
}

/* ---- connecting to the agent -------------------------------------------- */

/* Whether PATH has an executable `name`, as posix_spawnp would find it. */
static bool on_path(const char *name)
{
	const char *path = getenv("PATH");
	char buf[PATH_MAX];

	while (path && *path) {
		const char *end = strchrnul(path, ':');
		int n = (int)(end - path);

		if (snprintf(buf, sizeof(buf), "%.*s/%s", n ? n : 1,
			     n ? path : ".", name) < (int)sizeof(buf) &&
		    access(buf, X_OK) == 0)
			return true;
		path = *end ? end + 1 : end;
	}
	return false;
}

/* The agent program: the caller's, else $NETMEMFS_BIN, else `netmemfs` on
 * PATH, else the one installed beside this library. Never a path of the
 * checkout that built the library (that checkout may be gone). buf holds the
 * last case. */
static const char *agent_program(const struct netmem_options *o, char *buf,
				 size_t len)
{
	const char *prog = o->agent;

	if (!prog || !*prog)
		prog = getenv("NETMEMFS_BIN");
	if (prog && *prog)
		return prog;
	if (on_path("netmemfs"))
		return "netmemfs";
	snprintf(buf, len, "%s/bin/netmemfs", NETMEM_PREFIX);
	return buf;
}

static int spawn_agent(struct region *r, const struct netmem_options *o,
		       const char *server)
{
	char installed[PATH_MAX];
	const char *prog = agent_program(o, installed, sizeof(installed));
	char timeout[32];
	posix_spawn_file_actions_t fa;
	int sv[2], child_fd, ret;

	snprintf(timeout, sizeof(timeout), "%u", r->timeout_ms);
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return fail(errno, "socketpair: %s", strerror(errno));
	/* Move the child's end above 3 so dup2 onto 3 always clears its
	 * close-on-exec flag. */
	child_fd = fcntl(sv[1], F_DUPFD_CLOEXEC, 10);
	close(sv[1]);
	if (child_fd < 0) {
		close(sv[0]);
		return fail(errno, "fcntl: %s", strerror(errno));
	}
	{
		char *argv[] = {
			(char *)prog, "agent", "--server", (char *)server,
			"--fd", "3", "--timeout-ms", timeout, NULL,
		};

		posix_spawn_file_actions_init(&fa);
		posix_spawn_file_actions_adddup2(&fa, child_fd, 3);
		ret = posix_spawnp(&r->agent, prog, &fa, NULL, argv, environ);
		posix_spawn_file_actions_destroy(&fa);
	}
	close(child_fd);
	if (ret) {
		close(sv[0]);
		return fail(ret,
			    "cannot start the netmemfs agent `%s`: %s; put the "
			    "`netmemfs` program on PATH (pip install netmemfs, "
			    "or a checkout's .venv/bin after scripts/setup) or "
			    "set NETMEMFS_BIN to it", prog, strerror(ret));
	}
	r->sock = sv[0];
	return 0;
}

/* Read a header that may carry a file descriptor (SCM_RIGHTS); *passed is
 * that descriptor, or -1. */
static int recv_header_fd(int fd, struct nm_wire_header *h, int *passed)
{
	union {
		struct cmsghdr align;
		char buf[CMSG_SPACE(sizeof(int))];
	} cm;
	struct iovec iov = { h, sizeof(*h) };
	struct msghdr mh = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = cm.buf, .msg_controllen = sizeof(cm.buf),
	};
	struct cmsghdr *c;
	ssize_t n;

	*passed = -1;
	do {
		n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
	} while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	if (n == 0)
		return -EPIPE;
	c = CMSG_FIRSTHDR(&mh);
	if (c && c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS &&
	    c->cmsg_len == CMSG_LEN(sizeof(int)))
		memcpy(passed, CMSG_DATA(c), sizeof(int));
	if ((size_t)n < sizeof(*h))
		return recv_all(fd, (char *)h + n, sizeof(*h) - (size_t)n);
	return 0;
}

/* Use the daemon of the netmemfs mount at `mountpoint` as the agent: its
 * mount root names the daemon's socket in an extended attribute. */
static int attach_daemon(struct region *r, const char *mountpoint)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	socklen_t len = sizeof(sa);
	ssize_t n = getxattr(mountpoint, NETMEM_AGENT_XATTR, sa.sun_path,
			     sizeof(sa.sun_path) - 1);

	if (n < 0 && (errno == ENODATA || errno == ENOTSUP))
		return fail(EINVAL, "%s is not the root of a netmemfs mount (it "
			    "has no %s attribute): mount one there with "
			    "`netmemfs mount %s --server HOST`, or name a server "
			    "as HOST:PORT", mountpoint, NETMEM_AGENT_XATTR,
			    mountpoint);
	if (n < 0)
		return fail(errno, "cannot ask %s for its netmemfs daemon: %s",
			    mountpoint, strerror(errno));
	/* "@name": a socket in the abstract namespace (no file; its address
	 * is exactly the name after a NUL byte). */
	if (n > 0 && sa.sun_path[0] == '@') {
		sa.sun_path[0] = 0;
		len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
	}
	r->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (r->sock < 0)
		return fail(errno, "socket: %s", strerror(errno));
	if (connect(r->sock, (struct sockaddr *)&sa, len) < 0)
		return fail(ECONNREFUSED, "cannot reach the netmemfs daemon of "
			    "%s: %s; is the mount still running?", mountpoint,
			    strerror(errno));
	return 0;
}

/* OPEN: the agent connects to the server and creates or checks the segment.
 * Its reply may carry a second connection to the server, ready for reads. */
static int open_segment(struct region *r)
{
	struct nm_wire_header h;
	char msg[512];
	struct pollfd pfd = { r->sock, POLLIN, 0 };
	const char *direct = getenv("NETMEM_DIRECT");
	int ret, srv = -1;

	ret = send_msg_status(r->sock, NM_OP_OPEN, NM_OPEN_READS_RESP,
			      ++r->next_id, r->size, r->timeout_ms,
			      r->segment, strlen(r->segment));
	if (ret == 0) {
		ret = poll(&pfd, 1, (int)r->timeout_ms + 10000);
		if (ret == 0)
			return fail(ETIMEDOUT, "the netmemfs agent did not answer "
				    "within %u ms", r->timeout_ms + 10000);
		ret = ret < 0 ? -errno : recv_header_fd(r->sock, &h, &srv);
	}
	if (ret == 0 && (h.len >= sizeof(msg) ||
			 recv_all(r->sock, msg, h.len) < 0))
		ret = -EPROTO;
	if (ret < 0 || h.status || (direct && !strcmp(direct, "0"))) {
		if (srv >= 0)
			close(srv);
		srv = -1;
	}
	if (ret == -EPROTO)
		return fail(EPROTO, "the netmemfs agent sent a malformed reply");
	if (ret < 0)
		return fail(EIO, "the netmemfs agent went away before it "
			    "answered (%s); its error is above", strerror(-ret));
	msg[h.len] = 0;
	if (h.status)
		return fail((int)h.status, "%s", msg);
	/* Invariant: srv is a connected, handshaken socket to the server that
	 * only this handler uses from now on. */
	if (srv >= 0 && fcntl(srv, F_SETFL, O_NONBLOCK) < 0) {
		close(srv);
		srv = -1;
	}
	if (srv >= 0 && !set_speaks(r, msg, h.len)) {
		logmsg(r, "the agent's connection for direct reads speaks "
		       "\"%.40s\", which this library does not: pages come "
		       "through the agent", msg);
		close(srv);
		srv = -1;
	}
	r->srv = srv;
	r->ino = h.first;
	return 0;
}

/* ---- the API ------------------------------------------------------------ */

/* The spill area (async mode): a private anonymous mapping as large as the
 * region, registered with the region's userfaultfd so that UFFDIO_MOVE may
 * put pages there (write-protect mode only, with WP_ASYNC: touching it never
 * raises an event, so the handler cannot wait on itself). Memory, swapped
 * like the process's own. False if it cannot be made. */
static bool open_spill_area(struct region *r)
{
	struct uffdio_register reg;
	char *a;

	r->stale = calloc(r->npages, 1);
	a = mmap(NULL, r->size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (!r->stale || a == MAP_FAILED) {
		logmsg(r, "no spill area (%s)", strerror(errno));
		if (a != MAP_FAILED)
			munmap(a, r->size);
		free(r->stale);
		r->stale = NULL;
		return false;
	}
	/* A forked child has no business with it; a huge page there could
	 * not be moved out a page at a time. */
	madvise(a, r->size, MADV_DONTFORK);
	madvise(a, r->size, MADV_NOHUGEPAGE);
	reg = (struct uffdio_register){
		.range = { (uintptr_t)a, r->size },
		.mode = UFFDIO_REGISTER_MODE_WP,
	};
	if (ioctl(r->uffd, UFFDIO_REGISTER, &reg) < 0) {
		logmsg(r, "no spill area (UFFDIO_REGISTER: %s)", strerror(errno));
		munmap(a, r->size);
		free(r->stale);
		r->stale = NULL;
		return false;
	}
	r->spill_area = a;
	return true;
}

/* The spill: in async mode the spill area unless $NETMEM_SPILL_DIR is set;
 * else the spill file: a memfd (memory, swapped like the process's own), or
 * an unlinked file in $NETMEM_SPILL_DIR (a disk: spilled pages can leave
 * memory, at the cost of the disk's writeback; measured here, a slow disk's
 * writeback held a sequential read of the region to 16 MB/s). Without
 * either, evicted written pages are staged with the agent. */
static void open_spill(struct region *r)
{
	const char *dir = getenv("NETMEM_SPILL_DIR");

	if (r->async && !(dir && dir[0]) && open_spill_area(r))
		return;
	if (dir && dir[0]) {
		r->spill_fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
		if (r->spill_fd < 0)
			logmsg(r, "no spill file in NETMEM_SPILL_DIR %s (%s); "
			       "spilling to memory", dir, strerror(errno));
	}
	if (r->spill_fd < 0)
		r->spill_fd = memfd_create("netmem-spill", MFD_CLOEXEC);
	if (r->spill_fd < 0) {
		logmsg(r, "no spill file (%s); evicted written pages go to the "
		       "agent", strerror(errno));
		return;
	}
	/* Sparse: blocks only for pages spilled, each at its own offset. */
	if (ftruncate(r->spill_fd, (off_t)r->size) < 0) {
		logmsg(r, "cannot size the spill file: %s; evicted written "
		       "pages go to the agent", strerror(errno));
		close(r->spill_fd);
		r->spill_fd = -1;
	}
}

static void destroy(struct region *r)
{
	if (r->thread) {
		pthread_mutex_lock(&r->mu);
		r->stop = true;
		pthread_mutex_unlock(&r->mu);
		kick(r);
		pthread_join(r->thread, NULL);
	}
	if (r->sock >= 0)
		close(r->sock);
	if (r->srv >= 0)
		close(r->srv);
	if (r->agent > 0) {
		int i, status;

		/* The agent exits when its socket closes; give it 5 s. */
		for (i = 0; i < 500; i++) {
			if (waitpid(r->agent, &status, WNOHANG) != 0)
				break;
			usleep(10000);
		}
		if (i == 500) {
			kill(r->agent, SIGKILL);
			waitpid(r->agent, &status, 0);
		}
	}
	if (r->pagemap >= 0)
		close(r->pagemap);
	if (r->spill_fd >= 0)
		close(r->spill_fd);
	if (r->spill_area)
		munmap(r->spill_area, r->size);
	free(r->stale);
	if (r->evfd >= 0)
		close(r->evfd);
	if (r->base && r->uffd >= 0) {
		/* Hand the range back as plain memory; a borrowed mapping
		 * outlives us. */
		struct uffdio_range range = { (uintptr_t)r->base, r->size };

		ioctl(r->uffd, UFFDIO_UNREGISTER, &range);
	}
	if (r->uffd >= 0)
		close(r->uffd);
	if (r->base && !r->borrowed)
		munmap(r->base, r->size);
	if (r->scratch)
		munmap(r->scratch, BATCH * PS);
	free(r->state);
	free(r->dirty);
	free(r->hash);
	free(r->buf);
	free(r->srv_buf);
	free(r->journaled);
	free(r->spill_buf);
	pthread_mutex_destroy(&r->mu);
	pthread_cond_destroy(&r->cv);
	pthread_mutex_destroy(&r->sync_mu);
	pthread_mutex_destroy(&r->lock_mu);
	free(r);
}

static int setup_uffd(struct region *r)
{
	int dev_errno, sys_errno, how;
	uint64_t want = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_POISON |
			UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_MOVE;
	const char *mode = getenv("NETMEM_WP_MODE");
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;

	r->uffd = nm_uffd_open(O_CLOEXEC | O_NONBLOCK, &dev_errno, &sys_errno,
			       &how);
	if (r->uffd < 0) {
		nm_uffd_explain(err_buf, sizeof(err_buf), dev_errno, sys_errno);
		errno = EPERM;
		return -1;
	}
	/* Ask for what this kernel offers of what we want: a first handshake
	 * on a throwaway uffd tells (the API call can be made only once). */
	{
		int probe = nm_uffd_open(O_CLOEXEC, &dev_errno, &sys_errno,
					 &how);

		if (probe >= 0) {
			if (ioctl(probe, UFFDIO_API, &api) == 0)
				want &= api.features;
			close(probe);
		}
	}
	if (!(want & UFFD_FEATURE_PAGEFAULT_FLAG_WP))
		return fail(ENOTSUP, "this kernel's userfaultfd cannot "
			    "write-protect anonymous memory (Linux 5.7+ needed)");
	r->async = (want & UFFD_FEATURE_WP_ASYNC) && (want & UFFD_FEATURE_MOVE);
	if (mode && !strcmp(mode, "sync"))
		r->async = false;
	if (!r->async)
		want &= ~(uint64_t)UFFD_FEATURE_WP_ASYNC;
	r->can_poison = want & UFFD_FEATURE_POISON;
	api = (struct uffdio_api){ .api = UFFD_API, .features = want };
	if (ioctl(r->uffd, UFFDIO_API, &api) < 0)
		return fail(errno, "UFFDIO_API: %s", strerror(errno));
	reg = (struct uffdio_register){
		.range = { (uintptr_t)r->base, r->size },
		.mode = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
	};
	if (ioctl(r->uffd, UFFDIO_REGISTER, &reg) < 0)
		return fail(errno, "UFFDIO_REGISTER of %zu bytes: %s", r->size,
			    strerror(errno));
	reg = (struct uffdio_register){
		.range = { (uintptr_t)r->scratch, BATCH * PS },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(r->uffd, UFFDIO_REGISTER, &reg) < 0)
		return fail(errno, "UFFDIO_REGISTER of the scratch area: %s",
			    strerror(errno));
	return 0;
}

void *netmem_map_opts(const struct netmem_options *o)
{
	const char *server = o->server ? o->server : getenv("NETMEM_SERVER");
	struct region *r;
	int e;

	err_buf[0] = 0;
	if (!server)
		server = DEFAULT_SERVER;
	if (!o->segment || !o->segment[0] || strlen(o->segment) > 255) {
		fail(EINVAL, "the segment (a file's path from the root of the "
		     "server's tree) must be 1 to 255 bytes");
		return NULL;
	}
	if (!o->size || o->size % PS || sysconf(_SC_PAGESIZE) != (long)PS) {
		fail(EINVAL, "size %zu is not a positive multiple of %lu",
		     o->size, PS);
		return NULL;
	}
	if (o->budget && o->budget < 2 * BATCH * PS) {
		fail(EINVAL, "budget %zu is below the smallest, %lu bytes",
		     o->budget, 2 * BATCH * PS);
		return NULL;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		fail(ENOMEM, "out of memory");
		return NULL;
	}
	r->uffd = r->pagemap = r->sock = r->evfd = r->srv = r->spill_fd = -1;
	pthread_mutex_init(&r->mu, NULL);
	pthread_cond_init(&r->cv, NULL);
	pthread_mutex_init(&r->sync_mu, NULL);
	pthread_mutex_init(&r->lock_mu, NULL);
	snprintf(r->segment, sizeof(r->segment), "%s", o->segment);
	r->size = o->size;
	r->npages = o->size / PS;
	r->budget = (o->budget && o->budget < o->size ? o->budget : o->size) / PS;
	r->timeout_ms = o->timeout_ms ? o->timeout_ms : DEFAULT_TIMEOUT_MS;
	r->spin_ns = spin_us() * 1000;
	r->buf_len = NM_WIRE_BITMAP_BYTES(NM_WIRE_MAX_PAGES) +
		     NM_WIRE_MAX_PAGES * PS;
	r->state = calloc(r->npages, 1);
	r->dirty = calloc(r->npages, 1);
	r->hash = calloc(r->npages, sizeof(*r->hash));
	r->buf = malloc(r->buf_len);
	/* A Pages reply to a fetch of BATCH pages: the data, and per run (at
	 * most one per two pages) an array, the segment name and two
	 * integers. */
	r->srv_cap = BATCH * PS + (BATCH / 2 + 1) * 300 + 1024;
	r->srv_buf = malloc(r->srv_cap);
	r->journaled = calloc(r->npages, 1);
	r->spill_buf = malloc(PS);
	for (e = 0; e < MAX_HELD; e++)
		r->held[e].page = (size_t)-1;
	if (!r->state || !r->dirty || !r->hash || !r->buf || !r->srv_buf ||
	    !r->journaled || !r->spill_buf) {
		fail(ENOMEM, "out of memory for the state of %zu pages",
		     r->npages);
		goto out;
	}
	zero_hash = page_hash(zero_page);
	r->borrowed = o->addr != NULL;
	if (o->addr && (uintptr_t)o->addr % PS) {
		fail(EINVAL, "address %p is not page-aligned", o->addr);
		goto out;
	}
	/* Invariant for a borrowed mapping: the caller made it private,
	 * anonymous and `size` bytes long, and keeps it until netmem_unmap;
	 * registering anything else fails with EINVAL below. */
	r->base = o->addr ? o->addr :
		  mmap(NULL, r->size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	r->scratch = mmap(NULL, BATCH * PS, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (r->base == MAP_FAILED || r->scratch == MAP_FAILED) {
		fail(errno, "mmap of %zu bytes: %s", r->size, strerror(errno));
		if (r->base == MAP_FAILED)
			r->base = NULL;
		if (r->scratch == MAP_FAILED)
			r->scratch = NULL;
		goto out;
	}
	/* Start empty, so every page the program touches faults to us. */
	if (r->borrowed)
		madvise(r->base, r->size, MADV_DONTNEED);
	/* A forked child must not see the region: its copy would not be
	 * registered, and its faults would read zero pages. */
	madvise(r->base, r->size, MADV_DONTFORK);
	madvise(r->scratch, BATCH * PS, MADV_DONTFORK);
	if (setup_uffd(r) < 0)
		goto out;
	if (r->budget < r->npages)
		open_spill(r);
	r->pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (r->async && r->pagemap < 0) {
		fail(errno, "cannot open /proc/self/pagemap: %s",
		     strerror(errno));
		goto out;
	}
	r->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (r->evfd < 0) {
		fail(errno, "eventfd: %s", strerror(errno));
		goto out;
	}
	snprintf(r->agent_name, sizeof(r->agent_name), server[0] == '/' ?
		 "the netmemfs daemon of %.255s" : "the agent", server);
	if (server[0] == '/' ? attach_daemon(r, server) < 0 :
	    spawn_agent(r, o, server) < 0)
		goto out;
	if (open_segment(r) < 0)
		goto out;
	e = pthread_create(&r->thread, NULL, handler_main, r);
	if (e) {
		r->thread = 0;
		fail(e, "cannot start the fault handler thread: %s",
		     strerror(e));
		goto out;
	}
	pthread_mutex_lock(&regions_mu);
	r->next = regions;
	regions = r;
	pthread_mutex_unlock(&regions_mu);
	return r->base;
out:
	e = errno;
	destroy(r);
	errno = e;
	return NULL;
}

void *netmem_map(const char *server, const char *segment, size_t size,
		 size_t budget)
{
	struct netmem_options o = {
		.server = server, .segment = segment, .size = size,
		.budget = budget,
	};

	return netmem_map_opts(&o);
}

static struct region *lookup(void *addr, bool unlink)
{
	struct region **pp, *r = NULL;

	pthread_mutex_lock(&regions_mu);
	for (pp = &regions; *pp; pp = &(*pp)->next) {
		if ((*pp)->base == addr) {
			r = *pp;
			if (unlink)
				*pp = r->next;
			break;
		}
	}
	pthread_mutex_unlock(&regions_mu);
	if (!r)
		fail(EINVAL, "%p is not the start of a netmem region", addr);
	return r;
}

int netmem_sync(void *addr)
{
	struct region *r = lookup(addr, false);
	struct timespec deadline;
	uint64_t ticket;
	int ret = 0;

	if (!r)
		return -1;
	pthread_mutex_lock(&r->sync_mu);
	pthread_mutex_lock(&r->mu);
	ticket = ++r->sync_asked;
	pthread_mutex_unlock(&r->mu);
	kick(r);
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += 2 * r->timeout_ms / 1000 + 10;
	pthread_mutex_lock(&r->mu);
	while (r->sync_done < ticket && !r->failed && ret == 0)
		ret = pthread_cond_timedwait(&r->cv, &r->mu, &deadline);
	if (r->failed) {
		ret = fail(EIO, "sync of segment %s failed: %s", r->segment,
			   r->fail_msg);
	} else if (ret) {
		ret = fail(EIO, "sync of segment %s: the agent did not answer "
			   "in time; the pages stay dirty", r->segment);
	} else if (r->sync_errno == ESTALE) {
		/* The file was removed or replaced: the agent dropped them. */
		ret = fail(ESTALE, "sync of segment %s failed: %s", r->segment,
			   r->sync_msg);
	} else if (r->sync_errno) {
		ret = fail(r->sync_errno, "sync of segment %s failed: %s; the "
			   "pages stay staged for the next sync", r->segment,
			   r->sync_msg);
	}
	pthread_mutex_unlock(&r->mu);
	pthread_mutex_unlock(&r->sync_mu);
	return ret;
}

/* Ask the handler for op, wait for the agent's answer; 0 or -1 (errno). */
static int lock_request(struct region *r, uint32_t op, uint64_t first,
			const struct nm_wire_lock *args, uint64_t *token)
{
	struct timespec deadline;
	int ret = 0, err;

	pthread_mutex_lock(&r->lock_mu);
	pthread_mutex_lock(&r->mu);
	r->lk.op = op;
	r->lk.first = first;
	if (args)
		r->lk.args = *args;
	r->lk.id = 0;
	r->lk.done = false;
	pthread_mutex_unlock(&r->mu);
	kick(r);
	clock_gettime(CLOCK_REALTIME, &deadline);
	deadline.tv_sec += (args ? args->wait_ms : 0) / 1000 +
			   2 * r->timeout_ms / 1000 + 10;
	pthread_mutex_lock(&r->mu);
	while (!r->lk.done && !r->failed && ret == 0)
		ret = pthread_cond_timedwait(&r->cv, &r->mu, &deadline);
	err = r->lk.done ? r->lk.err : 0;
	if (r->failed) {
		ret = fail(EIO, "lock request on segment %s failed: %s",
			   r->segment, r->fail_msg);
	} else if (ret) {
		ret = fail(EIO, "lock request on segment %s: the agent did not "
			   "answer in time", r->segment);
	} else if (err) {
		ret = fail(err, "%s", r->lk.msg);
	} else if (token) {
		*token = r->lk.token;
	}
	r->lk.op = 0;
	r->lk.id = 0;
	pthread_mutex_unlock(&r->mu);
	pthread_mutex_unlock(&r->lock_mu);
	return ret;
}

int netmem_lock(void *addr, uint64_t start, uint64_t length, int exclusive,
		unsigned int wait_ms, uint64_t *token)
{
	struct region *r = lookup(addr, false);
	struct nm_wire_lock args = {
		.length = length, .exclusive = !!exclusive, .wait_ms = wait_ms,
	};

	if (!r)
		return -1;
	return lock_request(r, NM_OP_LOCK, start, &args, token);
}

int netmem_unlock(void *addr, uint64_t token, int commit)
{
	struct region *r = lookup(addr, false);
	int ret = 0;

	if (!r)
		return -1;
	if (commit)
		ret = netmem_sync(addr);
	/* Released even when the commit failed: the lock is not kept. */
	if (lock_request(r, NM_OP_UNLOCK, token, NULL, NULL) < 0 && !ret)
		ret = -1;
	return ret;
}

int netmem_unmap(void *addr)
{
	struct region *r = lookup(addr, true);

	if (!r)
		return -1;
	destroy(r);
	return 0;
}

int netmem_stats(void *addr, struct netmem_stats *out)
{
	struct region *r = lookup(addr, false);

	if (!r) {
		errno = EINVAL;
		return -1;
	}
	/* The handler thread owns the counts; relaxed reads are samples. */
	out->faults = __atomic_load_n(&r->faults, __ATOMIC_RELAXED);
	out->fetches = __atomic_load_n(&r->fetches_asked, __ATOMIC_RELAXED);
	out->direct_fetches = __atomic_load_n(&r->direct_fetches,
					      __ATOMIC_RELAXED);
	out->evictions = __atomic_load_n(&r->evictions, __ATOMIC_RELAXED);
	out->evicted = __atomic_load_n(&r->evicted, __ATOMIC_RELAXED);
	out->spilled = __atomic_load_n(&r->spilled, __ATOMIC_RELAXED);
	out->resident = __atomic_load_n(&r->resident, __ATOMIC_RELAXED);
	out->budget = r->budget;
	return 0;
}

long netmem_resident(void *addr)
{
	struct region *r = lookup(addr, false);
	long n;

	if (!r)
		return -1;
	/* The handler thread owns the count; a relaxed read is a sample. */
	n = (long)(__atomic_load_n(&r->resident, __ATOMIC_RELAXED) * PS);
	return n;
}
