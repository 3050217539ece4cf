/* SPDX-License-Identifier: MIT */
/*
 * netmem_wire.h - the messages between libnetmem's fault handler and the
 * netmemfs agent (netmemfs/agent.py mirrors this; docs/anon.md explains).
 *
 * One Unix stream socket per region. Every message is a 32-byte header,
 * little-endian, then `len` bytes of payload. Requests carry an id that the
 * reply repeats; replies to fetches may come out of order, the others come
 * in order. A reply's status is 0 or an errno, and a failed reply's payload
 * is a message in UTF-8.
 */
#ifndef NETMEM_WIRE_H
#define NETMEM_WIRE_H

#include <stdint.h>

struct nm_wire_header {
	uint32_t op;
	uint32_t status;
	uint64_t id;
	uint64_t first;		/* OPEN: the size in bytes; else a page number */
	uint32_t count;		/* OPEN: the timeout in ms; else pages */
	uint32_t len;		/* payload bytes */
} __attribute__((packed));

/* An OPEN's status (a request's is otherwise 0): what the library can read
 * pages from itself. A library without NM_OPEN_READS_RESP is given no
 * connection to Redis (it would speak the server's protocol to it). */
#define NM_OPEN_READS_RESP 1u

enum nm_wire_op {
	NM_OP_OPEN = 1,		/* payload: the file's path; reply: `first`
				 * its inode number, and maybe (SCM_RIGHTS) a
				 * connection for direct reads, its payload
				 * saying what it speaks: empty, the server's
				 * protocol; "resp:<key tag>", RESP to the
				 * Redis node serving the file */
	NM_OP_FETCH = 2,	/* reply: bitmap, then data of set pages */
	NM_OP_STAGE = 3,	/* payload: count pages; replied to only on failure */
	NM_OP_COMMIT = 4,	/* commit all staged pages as one transaction */
	NM_OP_REDIAL = 5,	/* reply: (SCM_RIGHTS) a new connection for
				 * direct reads, its payload as OPEN's; or an
				 * error message */
	NM_OP_INVALIDATE = 6,	/* from the agent, unasked: another client
				 * committed pages first..first+count-1 of
				 * the file; drop them (they fault in again),
				 * keeping what was written here */
	NM_OP_LOCK = 7,		/* first: the first byte; payload: struct
				 * nm_wire_lock; reply: `first` the token,
				 * after any INVALIDATE it brings */
	NM_OP_UNLOCK = 8,	/* first: the token */
	NM_OP_STATUS = 9,	/* a mount daemon's socket only, as the first
				 * message: reply: the daemon's status as
				 * JSON (`netmemfs status --json`); then the
				 * connection ends */
	NM_OP_STATS = 10,	/* from the agent, unasked: reply (its id):
				 * struct nm_wire_stats. An older library
				 * ignores it (the agent asks with a
				 * deadline) */
};

/* NM_OP_STATS's reply: the handler's counts (struct netmem_stats's). */
struct nm_wire_stats {
	uint64_t faults;
	uint64_t fetches;
	uint64_t direct_fetches;
	uint64_t evictions;
	uint64_t evicted;	/* pages */
	uint64_t spilled;	/* pages in the spill file now */
	uint64_t resident;	/* pages */
	uint64_t budget;	/* pages */
} __attribute__((packed));

/* NM_OP_LOCK's payload. */
struct nm_wire_lock {
	uint64_t length;	/* bytes; 0: to any end */
	uint32_t exclusive;
	uint32_t wait_ms;
} __attribute__((packed));

/* On the root of a netmemfs mount: the path of its daemon's socket, where
 * a region can be served instead of by a private agent. */
#define NETMEM_AGENT_XATTR "user.netmemfs.agent"

#define NM_WIRE_HEADER_BYTES 32
#define NM_WIRE_MAX_PAGES 256	/* pages in one FETCH or STAGE */
/* FETCH's reply: one bit per page (set: data follows, clear: a hole),
 * padded to 8-byte words, then the pages with data in order. */
#define NM_WIRE_BITMAP_BYTES(count) ((((count) + 63) / 64) * 8)

#endif /* NETMEM_WIRE_H */
