/* SPDX-License-Identifier: MIT */
/*
 * stamp.h - what the C test programs write into page n in generation gen
 * (tests/anon_worker.py's stamp() is the same): the page number and the
 * generation, so a verifier says which page is stale, then a pattern.
 */
#ifndef NETMEM_TEST_STAMP_H
#define NETMEM_TEST_STAMP_H

#include <stdint.h>
#include <string.h>

static inline void stamp(unsigned char *page, uint64_t n, uint64_t gen)
{
	size_t i;

	memcpy(page, &n, 8);
	memcpy(page + 8, &gen, 8);
	for (i = 16; i < 4096; i++)
		page[i] = (unsigned char)(n * 31 + gen * 7 + i);
}

#endif
