// SPDX-License-Identifier: MIT
/*
 * kmod_test.c - maps /dev/netmem inside the qemu guest (tests/kmod_guest.py).
 *
 *   kmod_test read   SEG SIZE GEN EVERY  page n must hold stamp(n, GEN) if
 *                                         n % EVERY == 0, else zeros (a hole)
 *   kmod_test write  SEG SIZE GEN        write stamp(n, GEN) everywhere,
 *                                         msync(MS_SYNC), unmap, close; map
 *                                         again and check every page
 *   kmod_test touch  SEG SIZE PAGE       map, say "mapped", wait for a line on
 *                                         stdin, say "touching", read PAGE (the
 *                                         guest expects SIGBUS)
 *   kmod_test hold   SEG SIZE            map, touch page 0, say "holding",
 *                                         wait for a line on stdin
 *   kmod_test ioctls SEG                 every malformed call gets its errno
 *   kmod_test readonly SEG SIZE GEN EVERY  as read, through a file opened
 *                                         read-only and a PROT_READ MAP_SHARED
 *                                         mapping
 *   kmod_test slowfault SEG SIZE         a thread reads page 1; say "mapped",
 *                                         wait for a line on stdin, mmap
 *                                         anonymous memory, say "mmap done",
 *                                         then "fault done" once the thread has
 *                                         its page
 *   kmod_test stress SEG SIZE ID N       own pages ID*N .. ID*N+N-1: touch them,
 *                                         say "ready", then until a line on
 *                                         stdin: stamp them with the next
 *                                         generation and msync, retrying a
 *                                         failed msync; say "synced GEN" after
 *                                         each success; at the line, sync once
 *                                         more and say "final GEN"
 *   kmod_test forksync SEG SIZE          write every page, say "written", fork:
 *                                         the parent msyncs at once, the child
 *                                         says "child PID", waits for a line
 *                                         on stdin and msyncs the same area
 *   kmod_test reread SEG SIZE GEN        say "mapped", wait for a line; check
 *                                         every page holds stamp(n, GEN), say
 *                                         "pass1", wait for a line; check them
 *                                         all again, say "pass2"
 *   kmod_test dropdirty SEG SIZE N       write pages 0..N-1, unmap and close
 *                                         without a sync
 *   kmod_test follow SEG SIZE GEN        check every page holds stamp(n, GEN),
 *                                         write stamp(0, 99) to page 0 (no
 *                                         sync), say "mapped", wait for a line;
 *                                         then, within 10 s, pages 1.. must
 *                                         show stamp(n, GEN + 1) (another
 *                                         client's commit) and page 0 stay
 *                                         ours; say "followed"
 *
 * $KMOD_TEST_BUDGET: the area's budget in bytes (default 0: none).
 *
 * Exit 0 when everything held, 1 with a line saying what did not.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "netmem_uapi.h"
#include "stamp.h"

#define PS 4096UL
#define DEV "/dev/netmem"

static int attach(const char *seg, uint64_t size)
{
	const char *budget = getenv("KMOD_TEST_BUDGET");
	struct netmem_attach a = { .size = size };
	int fd = open(DEV, O_RDWR | O_CLOEXEC);

	a.budget = budget ? strtoull(budget, NULL, 0) : 0;
	if (fd < 0) {
		printf("open %s: %s\n", DEV, strerror(errno));
		exit(1);
	}
	snprintf(a.segment, sizeof(a.segment), "%s", seg);
	if (ioctl(fd, NETMEM_IOC_ATTACH, &a) < 0) {
		printf("attach %s: %s\n", seg, strerror(errno));
		exit(1);
	}
	return fd;
}

static unsigned char *map(int fd, uint64_t size)
{
	/* Invariant: fd is attached with `size` bytes; the mapping is shared,
	 * as the module requires. */
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);

	if (p == MAP_FAILED) {
		printf("mmap: %s\n", strerror(errno));
		exit(1);
	}
	return p;
}

static int check(const unsigned char *p, uint64_t size, uint64_t gen,
		 uint64_t every)
{
	unsigned char want[PS];
	uint64_t n;

	for (n = 0; n < size / PS; n++) {
		if (gen && n % every == 0)
			stamp(want, n, gen);
		else
			memset(want, 0, PS);
		if (memcmp(p + n * PS, want, PS)) {
			uint64_t have_n, have_gen;

			memcpy(&have_n, p + n * PS, 8);
			memcpy(&have_gen, p + n * PS + 8, 8);
			printf("page %llu: want gen %llu, have page %llu gen %llu\n",
			       (unsigned long long)n,
			       (unsigned long long)(n % every ? 0 : gen),
			       (unsigned long long)have_n,
			       (unsigned long long)have_gen);
			return 1;
		}
	}
	return 0;
}

/* Whether page n holds stamp(n, gen). */
static int holds(const unsigned char *p, uint64_t n, uint64_t gen)
{
	unsigned char want[PS];

	stamp(want, n, gen);
	return !memcmp(p + n * PS, want, PS);
}

/* kmod_test follow: see the head of this file. */
static int follow(unsigned char *p, uint64_t size, uint64_t gen)
{
	char line[16];
	uint64_t n;
	int tries;

	if (check(p, size, gen, 1))
		return 1;
	stamp(p, 0, 99);
	printf("mapped\n");
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	for (tries = 0; tries < 1000; tries++) {
		for (n = 1; n < size / PS && holds(p, n, gen + 1); n++)
			;
		if (n == size / PS)
			break;
		usleep(10000);	/* polled: nothing says when the pages go */
	}
	for (n = 1; n < size / PS; n++) {
		uint64_t have_gen;

		if (holds(p, n, gen + 1))
			continue;
		memcpy(&have_gen, p + n * PS + 8, 8);
		printf("page %llu: want gen %llu after the commit, have gen %llu\n",
		       (unsigned long long)n, (unsigned long long)(gen + 1),
		       (unsigned long long)have_gen);
		return 1;
	}
	if (!holds(p, 0, 99)) {
		printf("page 0: the unsynced write was lost\n");
		return 1;
	}
	printf("followed\n");
	return 0;
}

/* ioctl or mmap gave `got` (0 or an errno), the test wanted `want`. */
static int expect(const char *what, int got, int want)
{
	if (got == want) {
		printf("ok: %s -> %s\n", what, want ? strerror(want) : "0");
		return 0;
	}
	printf("FAILED: %s -> %s, wanted %s\n", what, got ? strerror(got) : "0",
	       want ? strerror(want) : "0");
	return 1;
}

static int try_attach(int fd, const char *seg, size_t seglen, uint64_t size)
{
	struct netmem_attach a = { .size = size };

	memset(a.segment, 'x', sizeof(a.segment));
	memcpy(a.segment, seg, seglen);
	return ioctl(fd, NETMEM_IOC_ATTACH, &a) < 0 ? errno : 0;
}

static int ioctls(const char *seg)
{
	struct netmem_provide store = { .store = "s" }, bad_store = { .store = "a/b" };
	int fd = open(DEV, O_RDWR | O_CLOEXEC), bad = 0;
	char buf[64];
	void *p;

	bad |= expect("mmap before attach",
		      mmap(NULL, PS, PROT_READ, MAP_SHARED, fd, 0) == MAP_FAILED ?
		      errno : 0, EINVAL);
	bad |= expect("attach, size 0", try_attach(fd, seg, strlen(seg) + 1, 0),
		      EINVAL);
	bad |= expect("attach, size not whole pages",
		      try_attach(fd, seg, strlen(seg) + 1, PS + 1), EINVAL);
	bad |= expect("attach, size above the limit",
		      try_attach(fd, seg, strlen(seg) + 1,
				 NETMEM_MAX_BYTES + PS), EINVAL);
	bad |= expect("attach, empty name", try_attach(fd, "", 1, PS), EINVAL);
	bad |= expect("attach, name without its NUL",
		      try_attach(fd, "", 0, PS), EINVAL);
	/* A path: the daemon finds no directory "nodir" (and says so). */
	bad |= expect("attach, a path through a missing directory",
		      try_attach(fd, "nodir/b", 8, PS), ENOENT);
	bad |= expect("attach, name with a control character",
		      try_attach(fd, "a\nb", 4, PS), EINVAL);
	bad |= expect("attach, NULL argument",
		      ioctl(fd, NETMEM_IOC_ATTACH, NULL) < 0 ? errno : 0, EFAULT);
	bad |= expect("attach, argument in unmapped memory",
		      ioctl(fd, NETMEM_IOC_ATTACH, (void *)8) < 0 ? errno : 0,
		      EFAULT);
	bad |= expect("unknown ioctl", ioctl(fd, _IO(NETMEM_IOC_MAGIC, 99)) < 0 ?
		      errno : 0, ENOTTY);
	bad |= expect("provide, store with a slash",
		      ioctl(fd, NETMEM_IOC_PROVIDE, &bad_store) < 0 ? errno : 0,
		      EINVAL);
	bad |= expect("provide, NULL argument",
		      ioctl(fd, NETMEM_IOC_PROVIDE, NULL) < 0 ? errno : 0, EFAULT);
	bad |= expect("provide while the daemon provides",
		      ioctl(fd, NETMEM_IOC_PROVIDE, &store) < 0 ? errno : 0,
		      EBUSY);
	bad |= expect("read by a file that is not the daemon's",
		      read(fd, buf, sizeof(buf)) < 0 ? errno : 0, EINVAL);
	bad |= expect("write by a file that is not the daemon's",
		      write(fd, buf, sizeof(buf)) < 0 ? errno : 0, EINVAL);
	bad |= expect("fsync before attach", fsync(fd) < 0 ? errno : 0, EINVAL);
	bad |= expect("attach", try_attach(fd, seg, strlen(seg) + 1, 4 * PS), 0);
	bad |= expect("attach twice", try_attach(fd, seg, strlen(seg) + 1, 4 * PS),
		      EBUSY);
	bad |= expect("mmap private",
		      mmap(NULL, PS, PROT_READ, MAP_PRIVATE, fd, 0) == MAP_FAILED ?
		      errno : 0, EINVAL);
	bad |= expect("mmap past the end",
		      mmap(NULL, 5 * PS, PROT_READ, MAP_SHARED, fd, 0) == MAP_FAILED ?
		      errno : 0, EINVAL);
	bad |= expect("mmap at an offset past the end",
		      mmap(NULL, PS, PROT_READ, MAP_SHARED, fd, 4 * PS) == MAP_FAILED ?
		      errno : 0, EINVAL);
	p = mmap(NULL, 4 * PS, PROT_READ, MAP_SHARED, fd, 0);
	bad |= expect("mmap", p == MAP_FAILED ? errno : 0, 0);
	bad |= expect("mremap to grow",
		      p != MAP_FAILED && mremap(p, 4 * PS, 8 * PS, MREMAP_MAYMOVE) ==
		      MAP_FAILED ? errno : 0, EFAULT);
	close(fd);
	fd = open(DEV, O_RDWR | O_CLOEXEC);
	bad |= expect("attach with another size than the segment's",
		      try_attach(fd, seg, strlen(seg) + 1, 8 * PS), EINVAL);
	close(fd);
	return bad;
}

static void *touch_page_1(void *p)
{
	return (void *)(uintptr_t)((volatile unsigned char *)p)[PS];
}

/* While a thread waits in a fault on the area, mmap() in another thread of
 * the process must not wait for it (it wants the mmap lock for writing). */
static int slowfault(unsigned char *p)
{
	pthread_t t;
	char line[16];
	void *q;

	if (pthread_create(&t, NULL, touch_page_1, p)) {
		printf("pthread_create failed\n");
		return 1;
	}
	printf("mapped\n");
	if (!fgets(line, sizeof(line), stdin))
		return 1;
	q = mmap(NULL, PS, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	printf("mmap %s\n", q == MAP_FAILED ? strerror(errno) : "done");
	pthread_join(t, NULL);
	printf("fault done\n");
	return 0;
}

static int stdin_has_line(void)
{
	struct pollfd pfd = { .fd = 0, .events = POLLIN };

	return poll(&pfd, 1, 0) > 0;
}

/* Syncs of whole generations while the guest kills and restarts the daemon:
 * each sync either commits all N pages of a generation or fails (and is
 * retried with a newer one); the guest checks the server holds whole ones. */
static int stress(unsigned char *p, uint64_t first, uint64_t n)
{
	uint64_t gen = 0, k, tries = 0;
	int stop = 0;

	for (k = 0; k < n; k++)
		(void)((volatile unsigned char *)p)[(first + k) * PS];
	printf("ready\n");
	while (!stop) {
		stop = stdin_has_line();
		gen++;
		for (k = 0; k < n; k++)
			stamp(p + (first + k) * PS, first + k, gen);
		while (msync(p + first * PS, n * PS, MS_SYNC) < 0) {
			if (++tries > 6000) {	/* a minute */
				printf("msync kept failing: %s\n", strerror(errno));
				return 1;
			}
			usleep(10000);	/* the daemon is being restarted */
		}
		tries = 0;
		printf(stop ? "final %llu\n" : "synced %llu\n",
		       (unsigned long long)gen);
	}
	return 0;
}

/* Both processes sync one area (one open file): the second waits for the
 * first, which the guest's provider holds up. */
static int forksync(int fd, unsigned char *p, uint64_t size)
{
	uint64_t n;
	pid_t pid;

	for (n = 0; n < size / PS; n++)
		stamp(p + n * PS, n, 3);
	printf("written\n");
	pid = fork();
	if (pid < 0) {
		printf("fork: %s\n", strerror(errno));
		return 1;
	}
	if (pid == 0) {
		char line[16];

		printf("child %d\n", (int)getpid());
		if (!fgets(line, sizeof(line), stdin))
			_exit(1);
		_exit(fsync(fd) < 0 ? 1 : 0);
	}
	if (msync(p, size, MS_SYNC) < 0) {
		printf("msync: %s\n", strerror(errno));
		return 1;
	}
	printf("parent synced\n");
	return 0;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 2 ? argv[1] : "", *seg = argc > 2 ? argv[2] : "";
	uint64_t size = argc > 3 ? strtoull(argv[3], NULL, 0) : 0;
	unsigned char *p;
	int fd;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (!strcmp(mode, "ioctls"))
		return ioctls(seg);
	if (argc < 4) {
		fprintf(stderr, "usage: see the head of tests/c/kmod_test.c\n");
		return 2;
	}
	if (!strcmp(mode, "readonly") && argc == 6) {
		struct netmem_attach a = { .size = size };

		fd = open(DEV, O_RDONLY | O_CLOEXEC);
		snprintf(a.segment, sizeof(a.segment), "%s", seg);
		if (fd < 0 || ioctl(fd, NETMEM_IOC_ATTACH, &a) < 0) {
			printf("open/attach read-only: %s\n", strerror(errno));
			return 1;
		}
		/* Invariant: fd is attached with `size` bytes. */
		p = mmap(NULL, size, PROT_READ, MAP_SHARED, fd, 0);
		if (p == MAP_FAILED) {
			printf("mmap read-only shared: %s\n", strerror(errno));
			return 1;
		}
		return check(p, size, strtoull(argv[4], NULL, 0),
			     strtoull(argv[5], NULL, 0));
	}
	fd = attach(seg, size);
	p = map(fd, size);
	if (!strcmp(mode, "read") && argc == 6) {
		return check(p, size, strtoull(argv[4], NULL, 0),
			     strtoull(argv[5], NULL, 0));
	} else if (!strcmp(mode, "write") && argc == 5) {
		uint64_t gen = strtoull(argv[4], NULL, 0), n;

		for (n = 0; n < size / PS; n++)
			stamp(p + n * PS, n, gen);
		if (msync(p, size, MS_SYNC) < 0) {
			printf("msync: %s\n", strerror(errno));
			return 1;
		}
		munmap(p, size);
		close(fd);
		fd = attach(seg, size);
		p = map(fd, size);
		return check(p, size, gen, 1);
	} else if (!strcmp(mode, "touch") && argc == 5) {
		char line[16];

		printf("mapped\n");
		if (!fgets(line, sizeof(line), stdin))
			return 1;
		printf("touching\n");
		return p[strtoull(argv[4], NULL, 0) * PS];	/* SIGBUS */
	} else if (!strcmp(mode, "stress") && argc == 6) {
		uint64_t n = strtoull(argv[5], NULL, 0);

		return stress(p, strtoull(argv[4], NULL, 0) * n, n);
	} else if (!strcmp(mode, "slowfault")) {
		return slowfault(p);
	} else if (!strcmp(mode, "forksync")) {
		return forksync(fd, p, size);
	} else if (!strcmp(mode, "reread") && argc == 5) {
		uint64_t gen = strtoull(argv[4], NULL, 0);
		char line[16];

		printf("mapped\n");
		if (!fgets(line, sizeof(line), stdin) || check(p, size, gen, 1))
			return 1;
		printf("pass1\n");
		if (!fgets(line, sizeof(line), stdin) || check(p, size, gen, 1))
			return 1;
		printf("pass2\n");
		return 0;
	} else if (!strcmp(mode, "dropdirty") && argc == 5) {
		uint64_t n, count = strtoull(argv[4], NULL, 0);

		for (n = 0; n < count; n++)
			stamp(p + n * PS, n, 1);
		munmap(p, size);
		close(fd);
		return 0;
	} else if (!strcmp(mode, "follow") && argc == 5) {
		return follow(p, size, strtoull(argv[4], NULL, 0));
	} else if (!strcmp(mode, "hold")) {
		char line[16];

		printf("holding %d\n", p[0]);
		return fgets(line, sizeof(line), stdin) ? 0 : 1;
	}
	fprintf(stderr, "usage: see the head of tests/c/kmod_test.c\n");
	return 2;
}
