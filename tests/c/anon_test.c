// SPDX-License-Identifier: MIT
/*
 * anon_test.c - the C side of tests/test_70_anon.py, linked with -lnetmem.
 *
 *   anon_test write   SERVER SEGMENT SIZE BUDGET GEN  map, stamp every page, sync, unmap
 *   anon_test verify  SERVER SEGMENT SIZE BUDGET GEN  map, check every page, unmap
 *   anon_test threads SERVER SEGMENT SIZE BUDGET GEN  verify in 4 threads at once
 *
 * It prints "mapped 0x<address>" first (the test samples the region's resident memory).
 * A page's stamp is its number and GEN in its first 16 bytes and a byte pattern
 * derived from both in the rest. Prints "ok" and exits 0, or says what differed.
 */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <netmem.h>

#include "stamp.h"

#define PS 4096

struct job {
	unsigned char *p;
	size_t n, start;
	uint64_t gen;
	int bad;
};

/* Check every page, from start on and around: four of these fault on the same
 * pages at once. */
static int verify(unsigned char *p, size_t n, size_t start, uint64_t gen)
{
	unsigned char want[PS];
	size_t k, i;

	for (k = 0; k < n; k++) {
		i = (start + k) % n;
		stamp(want, i, gen);
		if (memcmp(p + i * PS, want, PS)) {
			uint64_t got_n, got_gen;

			memcpy(&got_n, p + i * PS, 8);
			memcpy(&got_gen, p + i * PS + 8, 8);
			fprintf(stderr, "page %zu: want gen %llu, have page %llu gen %llu\n",
				i, (unsigned long long)gen, (unsigned long long)got_n,
				(unsigned long long)got_gen);
			return 1;
		}
	}
	return 0;
}

static void *verify_job(void *arg)
{
	struct job *j = arg;

	j->bad = verify(j->p, j->n, j->start, j->gen);
	return NULL;
}

int main(int argc, char **argv)
{
	size_t size, budget, n, i;
	uint64_t gen;
	unsigned char *p;

	if (argc != 7 || (strcmp(argv[1], "write") && strcmp(argv[1], "verify") &&
			  strcmp(argv[1], "threads"))) {
		fprintf(stderr, "usage: %s write|verify|threads SERVER SEGMENT SIZE BUDGET GEN\n",
			argv[0]);
		return 2;
	}
	size = strtoull(argv[4], NULL, 0);
	budget = strtoull(argv[5], NULL, 0);
	gen = strtoull(argv[6], NULL, 0);
	p = netmem_map(argv[2], argv[3], size, budget);
	if (!p) {
		fprintf(stderr, "netmem_map: %s (errno %d)\n", netmem_error(), errno);
		return 1;
	}
	printf("mapped %p\n", (void *)p);
	fflush(stdout);
	n = size / PS;
	if (!strcmp(argv[1], "write")) {
		for (i = 0; i < n; i++)
			stamp(p + i * PS, i, gen);
		if (netmem_sync(p) < 0) {
			fprintf(stderr, "netmem_sync: %s\n", netmem_error());
			return 1;
		}
	} else if (!strcmp(argv[1], "verify")) {
		if (verify(p, n, 0, gen))
			return 1;
	} else {
		struct job jobs[4];
		pthread_t t[4];

		for (i = 0; i < 4; i++) {
			jobs[i] = (struct job){ p, n, i * 7, gen, 0 };
			if (pthread_create(&t[i], NULL, verify_job, &jobs[i]))
				return 1;
		}
		for (i = 0; i < 4; i++) {
			pthread_join(t[i], NULL);
			if (jobs[i].bad)
				return 1;
		}
	}
	if (netmem_unmap(p) < 0) {
		fprintf(stderr, "netmem_unmap: %s\n", netmem_error());
		return 1;
	}
	puts("ok");
	return 0;
}
