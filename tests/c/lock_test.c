/*
 * lock_test: add 1 to a 64-bit counter at the start of FILE (a file of a
 * netmemfs mount) N times, each time under an exclusive netmem_lock_file and
 * committed (fsync) before netmem_unlock_file. Prints "done".
 *
 *	lock_test FILE N
 */
#include <err.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <netmem.h>

int main(int argc, char **argv)
{
	uint64_t token;
	int64_t value;
	long i, n;
	int fd;

	if (argc != 3)
		errx(2, "usage: lock_test FILE N");
	n = atol(argv[2]);
	fd = open(argv[1], O_RDWR);
	if (fd < 0)
		err(1, "open %s", argv[1]);
	for (i = 0; i < n; i++) {
		if (netmem_lock_file(argv[1], 0, sizeof(value), 1, 60000, &token))
			errx(1, "%s", netmem_error());
		if (pread(fd, &value, sizeof(value), 0) != sizeof(value))
			err(1, "pread");
		value++;
		if (pwrite(fd, &value, sizeof(value), 0) != sizeof(value))
			err(1, "pwrite");
		if (fsync(fd))
			err(1, "fsync under lock %llu", (unsigned long long)token);
		if (netmem_unlock_file(argv[1], token))
			errx(1, "%s", netmem_error());
	}
	close(fd);
	puts("done");
	return 0;
}
