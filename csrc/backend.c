/* Backend detection: is pidfd_open(2) usable on this kernel? */
#define _GNU_SOURCE
#include <errno.h>
#include <unistd.h>

#include "cancelk.h"

#ifdef __linux__
#include <sys/syscall.h>
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

int cancelk_pidfd_supported(void)
{
	/* Opening a pidfd on ourselves is harmless and tells whether the
	 * kernel (>= 5.3) and any seccomp filter allow the syscall. */
	int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);

	if (fd < 0)
		return 0;
	close(fd);
	return 1;
}
#else
int cancelk_pidfd_supported(void)
{
	return 0;
}
#endif
