/*
 * counter_test: add 1 to a 64-bit counter at the start of FILE (a file of a
 * netmemfs mount) N times, in one of two ways:
 *
 *	counter_test FILE N lock
 *		each time under an exclusive netmem_lock_file, committed (fsync)
 *		before netmem_unlock_file;
 *	counter_test FILE N optimistic
 *		with no lock: read the version, read, write, netmem_commit_if; on a
 *		conflict (ECANCELED) read again and retry.
 *
 * Prints "done RETRIES" (conflicts retried; 0 with the lock).
 */
#include <err.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <netmem.h>

/* Read the counter and write it back one higher. */
static void add_one(int fd)
{
	int64_t value;

	if (pread(fd, &value, sizeof(value), 0) != sizeof(value))
		err(1, "pread");
	value++;
	if (pwrite(fd, &value, sizeof(value), 0) != sizeof(value))
		err(1, "pwrite");
}

static void locked(const char *path, int fd)
{
	uint64_t token;

	if (netmem_lock_file(path, 0, sizeof(int64_t), 1, 60000, &token))
		errx(1, "%s", netmem_error());
	add_one(fd);
	if (fsync(fd))
		err(1, "fsync under lock %llu", (unsigned long long)token);
	if (netmem_unlock_file(path, token))
		errx(1, "%s", netmem_error());
}

static long optimistic(int fd)
{
	uint64_t version;
	long retries = 0;

	for (;;) {
		if (netmem_file_version(fd, &version))
			errx(1, "%s", netmem_error());
		add_one(fd);
		if (netmem_commit_if(fd, version) == 0)
			return retries;
		if (errno != ECANCELED)
			errx(1, "%s", netmem_error());
		retries++;
	}
}

int main(int argc, char **argv)
{
	long i, n, retries = 0;
	int fd;

	if (argc != 4 || (strcmp(argv[3], "lock") && strcmp(argv[3], "optimistic")))
		errx(2, "usage: counter_test FILE N lock|optimistic");
	n = atol(argv[2]);
	fd = open(argv[1], O_RDWR);
	if (fd < 0)
		err(1, "open %s", argv[1]);
	for (i = 0; i < n; i++) {
		if (!strcmp(argv[3], "lock"))
			locked(argv[1], fd);
		else
			retries += optimistic(fd);
	}
	close(fd);
	printf("done %ld\n", retries);
	return 0;
}
