/*
 * A process's file descriptor table, handed to another process with a job
 * (killable_wrapper's standby runs each job with the host's fds in place):
 * listed and sent over a unix socket on one side, received and installed at
 * the same numbers on the other.
 *
 *   host: cancelk_send_table                 standby: cancelk_receive_table
 *     list /proc/self/fd, F_GETFD each         recvmsg until the table, its fds
 *     sendmsg: table + fds (SCM_RIGHTS)  --->    and a small frame are in
 *              + the job frame if small        place each fd at its number
 *                                              the frame's first bytes -> caller
 *
 * On the wire: a u32 count, then (i32 fd, i32 close-on-exec) per entry, the
 * fds themselves attached in chunks of CANCELK_FD_CHUNK (the kernel takes
 * at most SCM_MAX_FD = 253 per message): the first chunk with the table,
 * each further one with a single '+' byte.  The job frame follows.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cancelk.h"

#ifdef __linux__
#include <sys/syscall.h>
#endif

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0	/* macOS: Python ignores SIGPIPE; EPIPE is what we see */
#endif
#ifndef MSG_CMSG_CLOEXEC
#define MSG_CMSG_CLOEXEC 0	/* then the standby's fds get FD_CLOEXEC when placed */
#endif

#define ENTRY_SIZE 8	/* i32 fd, i32 close-on-exec */
#define COUNT_SIZE 4

/* The caller's open file descriptors, for handing them to another process
 * (killable_wrapper's standby gets the host's fd table with each job):
 * each fd in fds[], 1 in cloexec[] where FD_CLOEXEC is set; at most max.
 * How many, or -1 (ENOBUFS: more than max).  Read from /proc/self/fd (Linux) or /dev/fd.  On Linux
 * dir may be a descriptor of /proc/self/fd kept open by the caller (read
 * again from its start: no path lookup, no open per call); else -1.  The
 * directory's own descriptor is left out. */
static int add_fd(int fd, int skip, int *fds, int *cloexec, int max, int *n)
{
	int flags;

	if (fd == skip)
		return 0;
	flags = fcntl(fd, F_GETFD);
	if (flags < 0)
		return 0;	/* closed meanwhile */
	if (*n == max) {
		errno = ENOBUFS;	/* not EMFILE, which opendir itself can say */
		return -1;
	}
	fds[*n] = fd;
	cloexec[*n] = (flags & FD_CLOEXEC) != 0;
	(*n)++;
	return 0;
}

/* The fd a directory entry of /proc/self/fd (or /dev/fd) names; -1 for
 * "." and "..". */
static int parse_fd(const char *name)
{
	char *end;
	long fd;

	if (*name < '0' || *name > '9')
		return -1;
	fd = strtol(name, &end, 10);
	return *end || fd > INT_MAX ? -1 : (int)fd;
}

int cancelk_open_fds(int dir, int *fds, int *cloexec, int max)
{
#ifdef __linux__
	const char *where = "/proc/self/fd";
#else
	const char *where = "/dev/fd";
#endif
	DIR *listing;
	struct dirent *entry;
	int fd, n = 0, saved;

#ifdef __linux__
	if (dir >= 0) {
		char buf[4096];
		long got, off;

		if (lseek(dir, 0, SEEK_SET) < 0)
			return -1;
		while ((got = syscall(SYS_getdents64, dir, buf, sizeof(buf))) > 0) {
			for (off = 0; off < got;) {
				/* struct linux_dirent64: ino, off, reclen, type, name */
				unsigned short reclen;

				memcpy(&reclen, buf + off + 16, sizeof(reclen));

				fd = parse_fd(buf + off + 19);
				off += reclen;
				if (fd >= 0 && add_fd(fd, dir, fds, cloexec, max, &n) != 0)
					return -1;
			}
		}
		return got < 0 ? -1 : n;
	}
#else
	(void)dir;
#endif
	listing = opendir(where);
	if (!listing)
		return -1;
	errno = 0;
	while ((entry = readdir(listing)) != NULL) {
		fd = parse_fd(entry->d_name);
		if (fd >= 0 && add_fd(fd, dirfd(listing), fds, cloexec, max, &n) != 0) {
			closedir(listing);
			errno = ENOBUFS;
			return -1;
		}
	}
	saved = errno;
	closedir(listing);
	if (saved) {
		errno = saved;
		return -1;
	}
	return n;
}

/* Move fd to a number >= base (close-on-exec), closing the old one; the
 * new number, or -1. */
static int park_fd(int fd, int base)
{
	int moved = fcntl(fd, F_DUPFD_CLOEXEC, base);

	if (moved < 0)
		return -1;
	close(fd);
	return moved;
}

/* dup2 with the close-on-exec flag set as asked, in one call where the OS
 * has dup3. */
static int dup_to(int fd, int target, int cloexec)
{
#ifdef __linux__
	return dup3(fd, target, cloexec ? O_CLOEXEC : 0);
#else
	if (dup2(fd, target) < 0)
		return -1;
	return cloexec ? fcntl(target, F_SETFD, FD_CLOEXEC) : 0;
#endif
}

/* Give this process the file descriptor table it was sent: received[i]
 * (as it arrived) becomes targets[i], close-on-exec as cloexec[i], for i <
 * n; the received copies are closed.  The keep[] fds (the caller's own)
 * that sit on a target's number are first moved above every target (keep[]
 * updated to their new numbers), and so is a received fd on the number the
 * next one goes to: placing one never overwrites another.  0, or -1 with
 * errno set (EMFILE: no room above the targets, checked before anything is
 * moved). */
int cancelk_place_fds(int *received, const int *targets, const int *cloexec, int n,
		      int *keep, int nkeep)
{
	struct rlimit limit;
	int base = 3, i, fd;

	for (i = 0; i < n; i++)
		if (targets[i] >= base)
			base = targets[i] + 1;
	if (getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
	    (rlim_t)base + (rlim_t)n + (rlim_t)nkeep > limit.rlim_cur) {
		errno = EMFILE;
		return -1;
	}
	for (i = 0; i < nkeep; i++) {
		int j = 0;

		while (j < n && targets[j] != keep[i])
			j++;
		if (j == n)
			continue;	/* not in the way */
		if ((fd = park_fd(keep[i], base)) < 0)
			return -1;
		keep[i] = fd;
	}
	/* In order: a target's number is moved out of the way only if a
	 * received fd not placed yet sits on it.  The received fds arrive at
	 * the lowest free numbers, mostly above their targets, so placing them
	 * from the lowest target up seldom moves any. */
	for (i = 0; i < n; i++) {
		int j;

		for (j = i + 1; j < n; j++) {
			if (received[j] != targets[i])
				continue;
			if ((fd = park_fd(received[j], base)) < 0)
				return -1;
			received[j] = fd;
			break;
		}
		if (received[i] == targets[i]) {
			if (fcntl(targets[i], F_SETFD, cloexec[i] ? FD_CLOEXEC : 0) < 0)
				return -1;
			continue;
		}
		if (dup_to(received[i], targets[i], cloexec[i]) < 0)
			return -1;
		close(received[i]);
		received[i] = targets[i];
	}
	return 0;
}

/* ------------------------------------------------------------ sending */

static void put_i32(unsigned char *at, uint32_t value)
{
	at[0] = value & 0xff;
	at[1] = (value >> 8) & 0xff;
	at[2] = (value >> 16) & 0xff;
	at[3] = (value >> 24) & 0xff;
}

static uint32_t get_i32(const unsigned char *at)
{
	return (uint32_t)at[0] | (uint32_t)at[1] << 8 | (uint32_t)at[2] << 16 |
	       (uint32_t)at[3] << 24;
}

static int excluded(int fd, const int *exclude, int nexclude)
{
	int i;

	for (i = 0; i < nexclude; i++)
		if (exclude[i] == fd)
			return 1;
	return 0;
}

/* This process's fds but the excluded ones, as (fds, cloexec) in one
 * malloc'ed block the caller frees (*fds_out); how many, or -1. */
static int list_table(int dir, const int *exclude, int nexclude, int **fds_out, int **cloexec_out)
{
	int max = 256, n, i, kept;
	int *fds, *cloexec;

	for (;;) {
		fds = malloc(sizeof(int) * 2 * (size_t)max);
		if (!fds)
			return -1;
		cloexec = fds + max;
		n = cancelk_open_fds(dir, fds, cloexec, max);
		if (n >= 0)
			break;
		free(fds);
		if (errno != ENOBUFS || max >= 1 << 24)
			return -1;
		max *= 8;
	}
	for (i = 0, kept = 0; i < n; i++) {
		if (excluded(fds[i], exclude, nexclude))
			continue;
		fds[kept] = fds[i];
		cloexec[kept] = cloexec[i];
		kept++;
	}
	*fds_out = fds;
	*cloexec_out = cloexec;
	return kept;
}

/* sendmsg of every byte of iov[] (nfds fds attached to the first byte); a
 * partial send goes on without the fds.  A signal does not stop it: what
 * is sent here is small (a table and a small frame) and its reader waits
 * for it.  0, or -1 with errno (EPIPE: the reader is gone). */
static int send_all(int channel, struct iovec *iov, int niov, const int *fds, int nfds)
{
	union {
		struct cmsghdr align;
		char space[CMSG_SPACE(sizeof(int) * CANCELK_FD_CHUNK)];
	} control;
	struct msghdr msg;
	ssize_t sent;

	memset(&msg, 0, sizeof(msg));
	msg.msg_iov = iov;
	msg.msg_iovlen = niov;
	if (nfds > 0) {
		struct cmsghdr *cmsg;

		memset(&control, 0, sizeof(control));
		msg.msg_control = control.space;
		msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
		cmsg = CMSG_FIRSTHDR(&msg);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
		memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * (size_t)nfds);
	}
	for (;;) {
		sent = sendmsg(channel, &msg, MSG_NOSIGNAL);
		if (sent < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		msg.msg_control = NULL;	/* the fds went with the first byte */
		msg.msg_controllen = 0;
		while (msg.msg_iovlen > 0 && (size_t)sent >= msg.msg_iov->iov_len) {
			sent -= (ssize_t)msg.msg_iov->iov_len;
			msg.msg_iov++;
			msg.msg_iovlen--;
		}
		if (msg.msg_iovlen == 0)
			return 0;
		msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + sent;
		msg.msg_iov->iov_len -= (size_t)sent;
	}
}

int cancelk_send_table(int channel, int dir, const int *exclude, int nexclude,
		       const char *frame, size_t frame_len)
{
	struct iovec iov[2];
	unsigned char *table, plus = '+';
	int *fds, *cloexec, n, i, step = 0;
	size_t table_len;

	n = list_table(dir, exclude, nexclude, &fds, &cloexec);
	if (n < 0)
		return CANCELK_STEP_LIST_FDS;
	table_len = COUNT_SIZE + ENTRY_SIZE * (size_t)n;
	table = malloc(table_len);
	if (!table) {
		free(fds);
		return CANCELK_STEP_MALLOC;
	}
	put_i32(table, (uint32_t)n);
	for (i = 0; i < n; i++) {
		put_i32(table + COUNT_SIZE + ENTRY_SIZE * (size_t)i, (uint32_t)fds[i]);
		put_i32(table + COUNT_SIZE + ENTRY_SIZE * (size_t)i + 4, (uint32_t)cloexec[i]);
	}
	iov[0].iov_base = table;
	iov[0].iov_len = table_len;
	iov[1].iov_base = (void *)frame;
	iov[1].iov_len = frame_len;
	if (n <= CANCELK_FD_CHUNK) {	/* the usual case: one message, one wake-up */
		if (send_all(channel, iov, frame_len ? 2 : 1, fds, n) != 0)
			step = CANCELK_STEP_SENDMSG;
		goto out;
	}
	if (send_all(channel, iov, 1, fds, CANCELK_FD_CHUNK) != 0) {
		step = CANCELK_STEP_SENDMSG;
		goto out;
	}
	for (i = CANCELK_FD_CHUNK; i < n; i += CANCELK_FD_CHUNK) {
		struct iovec one = { &plus, 1 };
		int chunk = n - i < CANCELK_FD_CHUNK ? n - i : CANCELK_FD_CHUNK;

		if (send_all(channel, &one, 1, fds + i, chunk) != 0) {
			step = CANCELK_STEP_SENDMSG;
			goto out;
		}
	}
	if (frame_len && send_all(channel, iov + 1, 1, NULL, 0) != 0)
		step = CANCELK_STEP_SENDMSG;
out:
	free(table);
	free(fds);
	return step;
}

/* ---------------------------------------------------------- receiving */

static void close_all(const int *fds, int n)
{
	int i;

	for (i = 0; i < n; i++)
		close(fds[i]);
}

/* Append the fds a message carried (SCM_RIGHTS) to fds[*nfds..room),
 * close-on-exec (set here where MSG_CMSG_CLOEXEC is missing); 0, or -1
 * with errno EPROTO, every fd of the message closed, if they do not fit. */
static int message_fds(struct msghdr *msg, int *fds, int *nfds, int room)
{
	struct cmsghdr *cmsg;
	int first = *nfds, overflow = 0;

	for (cmsg = CMSG_FIRSTHDR(msg); cmsg; cmsg = CMSG_NXTHDR(msg, cmsg)) {
		size_t count, i;

		if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
			continue;
		count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (i = 0; i < count; i++) {
			int fd;

			memcpy(&fd, CMSG_DATA(cmsg) + sizeof(int) * i, sizeof(int));
			if (*nfds == room) {
				close(fd);
				overflow = 1;
				continue;
			}
			if (!MSG_CMSG_CLOEXEC)
				fcntl(fd, F_SETFD, FD_CLOEXEC);
			fds[(*nfds)++] = fd;
		}
	}
	if (!overflow)
		return 0;
	if (*nfds > first)
		close_all(fds + first, *nfds - first);
	*nfds = first;
	errno = EPROTO;
	return -1;
}

/* The most fds one message of a table brings: a chunk (and slack). */
#define MESSAGE_FDS (CANCELK_FD_CHUNK + 3)

/* One recvmsg (retried on EINTR) into buf[0..len), the fds it brought
 * appended to fds[*nfds..room) close-on-exec: bytes read, 0 on EOF, -1 on
 * error (EAGAIN under MSG_DONTWAIT; EPROTO when its fds did not fit). */
static ssize_t recv_fds(int fd, char *buf, size_t len, int flags, int *fds, int *nfds, int room)
{
	union {
		struct cmsghdr align;
		char space[CMSG_SPACE(sizeof(int) * MESSAGE_FDS)];
	} control;
	struct iovec iov = { buf, len };
	struct msghdr msg;
	ssize_t got;

	do {
		memset(&msg, 0, sizeof(msg));
		msg.msg_iov = &iov;
		msg.msg_iovlen = 1;
		msg.msg_control = control.space;
		msg.msg_controllen = sizeof(control.space);
		got = recvmsg(fd, &msg, flags | MSG_CMSG_CLOEXEC);
	} while (got < 0 && errno == EINTR);
	if (got < 0)
		return -1;
	if (message_fds(&msg, fds, nfds, room) != 0)
		return -1;
	if (msg.msg_flags & MSG_CTRUNC) {
		errno = EPROTO;	/* fds were dropped by the kernel */
		return -1;
	}
	return got;
}

/* One recvmsg into area[have..cap), its fds appended to *fds (grown so
 * that a message's fds fit): as recv_fds. */
static ssize_t receive_some(int channel, char *area, size_t have, size_t cap, int **fds,
			    int *nfds, int *room)
{
	if (*room - *nfds < MESSAGE_FDS) {
		int grown = *room ? *room * 2 + MESSAGE_FDS : MESSAGE_FDS;
		int *bigger = realloc(*fds, sizeof(int) * (size_t)grown);

		if (!bigger)
			return -1;	/* ENOMEM, before anything was received */
		*fds = bigger;
		*room = grown;
	}
	return recv_fds(channel, area + have, cap - have, 0, *fds, nfds, *room);
}

/* Could this process hold count more fds at all?  (A count past it is no
 * table of ours: refused before anything is allocated for it.) */
static int within_fd_limit(uint32_t count)
{
	struct rlimit limit;

	if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY)
		return 1;
	return (rlim_t)count <= limit.rlim_cur;
}

/* Bytes the table takes on the wire for count entries: the table, and a
 * '+' per chunk of fds after the first. */
static size_t table_bytes(uint32_t count)
{
	size_t chunks = ((size_t)count + CANCELK_FD_CHUNK - 1) / CANCELK_FD_CHUNK;

	return COUNT_SIZE + ENTRY_SIZE * (size_t)count + (chunks > 1 ? chunks - 1 : 0);
}

/* Are the bytes between the table's entries and need all '+'? */
static int pluses_at(const unsigned char *area, uint32_t count, size_t need)
{
	size_t at;

	for (at = COUNT_SIZE + ENTRY_SIZE * (size_t)count; at < need; at++)
		if (area[at] != '+')
			return 0;
	return 1;
}

/* Install the table area[0..) describes with the n fds received. */
static int install(const unsigned char *area, int *fds, int n, int *keep, int nkeep)
{
	int *targets, *cloexec, i, rc;

	targets = malloc(sizeof(int) * 2 * (size_t)(n ? n : 1));
	if (!targets)
		return CANCELK_STEP_MALLOC;
	cloexec = targets + n;
	for (i = 0; i < n; i++) {
		targets[i] = (int)get_i32(area + COUNT_SIZE + ENTRY_SIZE * (size_t)i);
		cloexec[i] = get_i32(area + COUNT_SIZE + ENTRY_SIZE * (size_t)i + 4) != 0;
		if (targets[i] < 0) {
			free(targets);
			errno = EPROTO;
			return CANCELK_STEP_BAD_TABLE;
		}
	}
	rc = cancelk_place_fds(fds, targets, cloexec, n, keep, nkeep);
	free(targets);
	return rc == 0 ? 0 : CANCELK_STEP_PLACE_FDS;
}

int cancelk_receive_table(int channel, int *keep, int nkeep, char *buf, size_t cap,
			  size_t *got)
{
	char *area = buf;
	size_t have = 0, need = 0, area_cap = cap;
	int *fds = NULL, nfds = 0, room = 0, step = 0;
	uint32_t count = 0;
	ssize_t rc;

	*got = (size_t)-1;	/* EOF, unless the table arrives */
	for (;;) {
		if (need && have >= need)
			break;
		rc = receive_some(channel, area, have, area_cap, &fds, &nfds, &room);
		if (rc <= 0) {
			step = rc < 0 ? CANCELK_STEP_RECVMSG : 0;
			goto fail;
		}
		have += (size_t)rc;
		if (!need && have >= COUNT_SIZE) {
			count = get_i32((unsigned char *)area);
			if (count > INT_MAX / ENTRY_SIZE || !within_fd_limit(count)) {
				errno = EPROTO;
				step = CANCELK_STEP_BAD_TABLE;
				goto fail;
			}
			need = table_bytes(count);
			if (need > area_cap) {	/* a huge table: read it alone, exactly */
				area = malloc(need);
				if (!area) {
					area = buf;
					step = CANCELK_STEP_MALLOC;
					goto fail;
				}
				memcpy(area, buf, have);
				area_cap = need;
			}
		}
	}
	if ((uint32_t)nfds != count) {
		errno = EPROTO;
		step = CANCELK_STEP_BAD_TABLE;
		goto fail;
	}
	if (!pluses_at((unsigned char *)area, count, need)) {
		errno = EPROTO;
		step = CANCELK_STEP_BAD_TABLE;
		goto fail;
	}
	step = install((unsigned char *)area, fds, nfds, keep, nkeep);
	if (step == CANCELK_STEP_PLACE_FDS)
		goto out;	/* what was not placed stays: this process reports and exits */
	if (step)
		goto fail;	/* nothing was placed */
	*got = have - need;
	if (*got)
		memmove(buf, area + need, *got);
	goto out;
fail:
	close_all(fds, nfds);
out:
	if (area != buf)
		free(area);
	free(fds);
	return step;
}

/* -------------------------------------------- a socket's pending messages */

#define PENDING_FDS_PER_MESSAGE 4	/* room kept for one message's fds */

int cancelk_recv_pending(int fd, char *buf, size_t cap, int *fds, int maxfds, int *nfds,
			 int *state)
{
	size_t have = 0;

	*nfds = 0;
	*state = CANCELK_PENDING_FULL;
	while (have < cap && maxfds - *nfds >= PENDING_FDS_PER_MESSAGE) {
		ssize_t got = recv_fds(fd, buf + have, cap - have, MSG_DONTWAIT, fds, nfds, maxfds);

		if (got < 0) {
			if (errno == EAGAIN || errno == EWOULDBLOCK) {
				*state = CANCELK_PENDING_DRAINED;
				break;
			}
			goto fail;
		}
		if (got == 0) {
			*state = CANCELK_PENDING_EOF;
			break;
		}
		have += (size_t)got;
	}
	return (int)have;
fail:
	close_all(fds, *nfds);
	*nfds = 0;
	return -1;
}
