/* SPDX-License-Identifier: MIT */
/*
 * netmem.h - anonymous regions backed by a netmemfs server segment.
 *
 *	char *p = netmem_map("127.0.0.1:7733", "seg0", 256 << 20, 32 << 20);
 *	if (!p)
 *		errx(1, "%s", netmem_error());
 *	p[0] = 1;			// faults are served from the server
 *	if (netmem_sync(p) < 0)		// commits every page written, all or nothing
 *		errx(1, "%s", netmem_error());
 *	netmem_unmap(p);		// changes not synced are dropped
 *
 * Link with -lnetmem (it uses threads: -pthread). See docs/anon.md.
 */
#ifndef NETMEM_H
#define NETMEM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

struct netmem_options {
	/*
	 * Where pages come from: "HOST:PORT" of a netmemfs-server (a private
	 * agent process is started for the region), or the mount point of a
	 * running `netmemfs mount` ("/mnt/nm": that mount's daemon serves the
	 * region, with its server and token). NULL: $NETMEM_SERVER, else
	 * 127.0.0.1:7733.
	 */
	const char *server;
	const char *segment;	/* created with `size` bytes if missing */
	size_t size;		/* bytes, a multiple of the page size */
	size_t budget;		/* resident bytes at most; 0: size */
	unsigned int timeout_ms; /* then a fault gets SIGBUS; 0: 30000 */
	/* The netmemfs program run as the agent; NULL: $NETMEMFS_BIN, else
	 * `netmemfs` in PATH, else the one installed with this library
	 * (PREFIX/bin/netmemfs). */
	const char *agent;
	/* An existing private anonymous mapping of `size` bytes to serve (the
	 * caller unmaps it after netmem_unmap); NULL: the library maps one. */
	void *addr;
};

/* Map a region; NULL with errno set (and netmem_error()) on failure. */
void *netmem_map(const char *server, const char *segment, size_t size,
		 size_t budget);
void *netmem_map_opts(const struct netmem_options *opts);

/*
 * Commit every page written since the last sync as one transaction. 0, or
 * -1 with errno set: EIO (the server or agent failed; the pages stay dirty
 * and the next sync tries again), ENOSPC (the server is full), EINVAL (not
 * a region).
 */
int netmem_sync(void *addr);

/* Unmap the region; changes not synced are dropped. 0 or -1 (EINVAL). */
int netmem_unmap(void *addr);

/* Bytes of the region resident in this process (what the budget caps). */
long netmem_resident(void *addr);

/* What a region's fault thread has done since the map (counts), and holds
 * now (pages), each read as a sample while it works. */
struct netmem_stats {
	uint64_t faults;	/* page faults it answered */
	uint64_t fetches;	/* runs of pages it asked for */
	uint64_t direct_fetches;	/* of those, read from the server itself */
	uint64_t evictions;	/* runs of pages it evicted */
	uint64_t evicted;	/* pages it evicted */
	uint64_t spilled;	/* pages in the spill file now */
	uint64_t resident;	/* pages resident now */
	uint64_t budget;	/* pages the budget allows */
};

/* Fill *out; 0, or -1 with errno EINVAL (not a region). */
int netmem_stats(void *addr, struct netmem_stats *out);

/*
 * Locks across machines on a file of a netmemfs mount (docs/semantics.md,
 * "Locks across machines"). netmem_lock_file takes a shared (exclusive 0) or
 * exclusive lock on bytes start..start+length-1 of the file at path (length
 * 0: to any end), waiting up to wait_ms (0: try once), and stores its fencing
 * token in *token. When it returns, this machine's view of the file shows
 * every commit made under the locks before. fsync a descriptor of the file
 * before netmem_unlock_file to commit under the lock. The lock is the calling
 * process's and ends when it exits. 0, or -1 with errno set: EAGAIN (not
 * granted within wait_ms), ENOLCK (unlock: not held by this process, or
 * lost), ENOTSUP (not a file of a netmemfs mount).
 */
int netmem_lock_file(const char *path, uint64_t start, uint64_t length,
		     int exclusive, unsigned int wait_ms, uint64_t *token);
int netmem_unlock_file(const char *path, uint64_t token);

/*
 * Locks on a region's file (the same locks as netmem_lock_file takes through a
 * mount; every client of the server sees them). netmem_lock takes a shared or
 * exclusive lock on bytes start..start+length-1 of the file (length 0: to any
 * end), waiting up to wait_ms, and first drops the region's pages that other
 * clients changed under the locks before (entry consistency). netmem_unlock
 * releases it, after a netmem_sync if commit (the sync lands under the lock,
 * and is refused if the lock was lost). A region's locks end with it. 0, or -1
 * with errno: EAGAIN (not granted in time), ESTALE (unlock with commit: the
 * lock was lost, the commit refused), ENOLCK (not held), EIO.
 */
int netmem_lock(void *addr, uint64_t start, uint64_t length, int exclusive,
		unsigned int wait_ms, uint64_t *token);
int netmem_unlock(void *addr, uint64_t token, int commit);

/*
 * Optimistic commits on a file of a netmemfs mount (docs/semantics.md,
 * "Optimistic commits"). netmem_file_version stores in *version the version
 * of the file that this machine's view of it shows. netmem_commit_if commits
 * the file's changes (as fsync(fd) does) only if no other commit came since
 * based_on. 0, or -1 with errno set: ECANCELED (another commit came first: the
 * changes are dropped and the file shows the current contents; read it again
 * and retry), or fsync's errors.
 */
int netmem_file_version(int fd, uint64_t *version);
int netmem_commit_if(int fd, uint64_t based_on);

/* The last error of this thread, in words: what failed and what to do. */
const char *netmem_error(void);

#ifdef __cplusplus
}
#endif

#endif /* NETMEM_H */
