/* SPDX-License-Identifier: MIT */
/* uffd_open.h - opening a userfaultfd, shared by libnetmem and netmemfs's cffi module. */
#ifndef NETMEM_UFFD_OPEN_H
#define NETMEM_UFFD_OPEN_H

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "netmem_uapi.h"

/*
 * Open a userfaultfd: through /dev/userfaultfd (Linux 6.1+, permission on the device
 * node), else the system call (vm.unprivileged_userfaultfd or CAP_SYS_PTRACE). Each
 * attempt's errno is reported so the caller can say which failed and why.
 */
static inline int nm_uffd_open(int flags, int *dev_errno, int *sys_errno, int *how)
{
	int dev, fd;
	long sfd;

	*dev_errno = 0;
	*sys_errno = 0;
	*how = 0;
	dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
	if (dev >= 0) {
		fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
		*dev_errno = fd < 0 ? errno : 0;
		close(dev);
		if (fd >= 0) {
			*how = 1;
			return fd;
		}
	} else {
		*dev_errno = errno;
	}
	sfd = syscall(SYS_userfaultfd, flags);
	if (sfd >= 0) {
		*how = 2;
		return (int)sfd;
	}
	*sys_errno = errno;
	return -*sys_errno;
}

/* What nm_uffd_open's failure means and how to enable userfaultfd, into buf. */
static inline void nm_uffd_explain(char *buf, size_t len, int dev_errno, int sys_errno)
{
	snprintf(buf, len,
		 "cannot use userfaultfd: /dev/userfaultfd: %s; userfaultfd(2): %s. "
		 "Enable one: give this user access to /dev/userfaultfd (e.g. a udev "
		 "rule or `chmod 0660 /dev/userfaultfd` with a group), or `sysctl "
		 "vm.unprivileged_userfaultfd=1`, or run with CAP_SYS_PTRACE. Container "
		 "policies (seccomp, SELinux) can also forbid it.",
		 dev_errno ? strerror(dev_errno) : "not tried",
		 sys_errno ? strerror(sys_errno) : "not tried");
}

#endif /* NETMEM_UFFD_OPEN_H */
