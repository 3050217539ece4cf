// SPDX-License-Identifier: MIT
/*
 * uffd_floor.c - the least a userfaultfd page store can do per fault on this
 * machine, for bench/stores.py: a region served by one thread that answers
 * each fault with one GETRANGE of 4 KiB from a Redis and a UFFDIO_COPY, and a
 * main thread that loads one byte of a random page, again and again, timing
 * each load.
 *
 *     uffd_floor PORT PAGES OPS SPIN_US
 *
 * No budget, no eviction, no version check, no error recovery: each fault
 * costs the kernel's fault path, two wake-ups and one Redis round trip, which
 * is what a region through Redis cannot go below. The fault thread waits as
 * libnetmem's does: it polls without sleeping for SPIN_US microseconds after
 * each fault, then sleeps in poll(). Prints "p50_us p99_us" on one line.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PS 4096
#define CHUNK_PAGES 64
#define KEY "netmemfs-bench-floor"

static int uffd, rfd;
static uint64_t spin_ns;
/* The reply to one GETRANGE: "$4096\r\n", the page, "\r\n". */
static char reply[PS + 16];

static uint64_t now_ns(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

static void send_all(const char *p, size_t n)
{
	while (n) {
		ssize_t k = write(rfd, p, n);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			die("write to redis");
		p += k;
		n -= (size_t)k;
	}
}

/* Read exactly n bytes of Redis's reply into reply[] (n <= sizeof(reply)),
 * without sleeping for the first spin_ns (yielding the CPU meanwhile). */
static void read_reply(size_t n)
{
	uint64_t until = now_ns() + spin_ns;
	size_t got = 0;

	while (got < n) {
		int flags = spin_ns && now_ns() < until ? MSG_DONTWAIT : 0;
		ssize_t k = recv(rfd, reply + got, n - got, flags);

		if (k < 0 && (errno == EAGAIN || errno == EINTR)) {
			sched_yield();
			continue;
		}
		if (k <= 0)
			die("read from redis");
		got += (size_t)k;
	}
}

static void *fault_thread(void *arg)
{
	uint64_t last = 0;
	char req[160];

	(void)arg;
	for (;;) {
		struct uffd_msg m;
		struct uffdio_copy copy;
		uint64_t page;
		ssize_t n = read(uffd, &m, sizeof(m));
		int len;

		if (n < 0 && errno == EAGAIN) {
			struct pollfd p = { .fd = uffd, .events = POLLIN };

			if (now_ns() - last < spin_ns) {
				sched_yield();
				continue;
			}
			if (poll(&p, 1, -1) < 0 && errno != EINTR)
				die("poll");
			continue;
		}
		if (n != (ssize_t)sizeof(m))
			die("read of the userfaultfd");
		if (m.event != UFFD_EVENT_PAGEFAULT)
			continue;
		page = m.arg.pagefault.address / PS % CHUNK_PAGES;
		len = snprintf(req, sizeof(req),
			       "*4\r\n$8\r\nGETRANGE\r\n$%zu\r\n%s\r\n$%d\r\n%llu\r\n$%d\r\n%llu\r\n",
			       strlen(KEY), KEY,
			       snprintf(NULL, 0, "%llu", (unsigned long long)(page * PS)),
			       (unsigned long long)(page * PS),
			       snprintf(NULL, 0, "%llu", (unsigned long long)(page * PS + PS - 1)),
			       (unsigned long long)(page * PS + PS - 1));
		send_all(req, (size_t)len);
		read_reply(PS + 9);
		if (memcmp(reply, "$4096\r\n", 7))
			die("redis's reply is not 4096 bytes");
		/*
		 * reply + 7 holds the page (checked above); dst is the faulting
		 * page, inside the registered region, and len one page: the copy
		 * stays within both.
		 */
		copy = (struct uffdio_copy){
			.dst = m.arg.pagefault.address & ~(uint64_t)(PS - 1),
			.src = (uint64_t)(uintptr_t)(reply + 7),
			.len = PS,
		};
		if (ioctl(uffd, UFFDIO_COPY, &copy) && errno != EEXIST)
			die("UFFDIO_COPY");
		last = now_ns();
	}
	return NULL;
}

static int cmp(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
	struct sockaddr_in addr = { .sin_family = AF_INET };
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg;
	static char chunk[CHUNK_PAGES * PS];
	char head[96];
	size_t pages, ops, i;
	uint64_t *lat, seed = 1;
	volatile char *region;
	pthread_t t;
	int one = 1, len;

	if (argc != 5) {
		fprintf(stderr, "usage: %s PORT PAGES OPS SPIN_US\n", argv[0]);
		return 2;
	}
	pages = strtoull(argv[2], NULL, 10);
	ops = strtoull(argv[3], NULL, 10);
	spin_ns = strtoull(argv[4], NULL, 10) * 1000;
	if (!pages || !ops)
		return 2;
	addr.sin_port = htons((uint16_t)atoi(argv[1]));
	addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	rfd = socket(AF_INET, SOCK_STREAM, 0);
	if (rfd < 0 || connect(rfd, (struct sockaddr *)&addr, sizeof(addr)))
		die("connect to redis");
	setsockopt(rfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memset(chunk, 'p', sizeof(chunk));
	len = snprintf(head, sizeof(head), "*3\r\n$3\r\nSET\r\n$%zu\r\n%s\r\n$%zu\r\n",
		       strlen(KEY), KEY, sizeof(chunk));
	send_all(head, (size_t)len);
	send_all(chunk, sizeof(chunk));
	send_all("\r\n", 2);
	read_reply(5);
	if (memcmp(reply, "+OK\r\n", 5))
		die("SET refused");

	uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0 || ioctl(uffd, UFFDIO_API, &api))
		die("userfaultfd");
	region = mmap(NULL, pages * PS, PROT_READ | PROT_WRITE,
		      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (region == MAP_FAILED)
		die("mmap");
	reg = (struct uffdio_register){
		.range = { .start = (uint64_t)(uintptr_t)region, .len = pages * PS },
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	if (pthread_create(&t, NULL, fault_thread, NULL))
		die("pthread_create");

	lat = calloc(ops, sizeof(*lat));
	if (!lat)
		die("calloc");
	for (i = 0; i < ops; i++) {
		uint64_t t0, p;

		seed = seed * 6364136223846793005u + 1442695040888963407u;
		p = (seed >> 33) % pages;
		t0 = now_ns();
		if (region[p * PS] != 'p') {
			fprintf(stderr, "page %llu reads %d\n", (unsigned long long)p, region[p * PS]);
			return 1;
		}
		lat[i] = now_ns() - t0;
		/* Give the page back, so a later load of it faults again. */
		if (madvise((void *)(region + p * PS), PS, MADV_DONTNEED))
			die("madvise");
	}
	qsort(lat, ops, sizeof(*lat), cmp);
	printf("%.1f %.1f\n", lat[ops / 2] / 1000.0, lat[ops * 99 / 100] / 1000.0);
	return 0;
}
