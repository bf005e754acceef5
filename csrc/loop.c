/*
 * The event loop: wait, with the GIL released, for the first of
 *   - a watched child exiting (left unreaped, so its pid stays ours),
 *   - a watched fd becoming readable or hung up,
 *   - a CLOCK_MONOTONIC deadline passing.
 *
 * pidfd backend (Linux >= 5.3): one epoll set holding the fds, one pidfd per
 * child and a timerfd armed at the absolute deadline, so a wait is a single
 * epoll_wait and the deadline has nanosecond resolution.
 *
 * posix backend (macOS, or CANCELK_BACKEND=posix): poll(2) over the fds and
 * waitid(WNOWAIT) over the children.  Without a descriptor for a child its
 * exit is found by polling in short slices that grow from 1 ms to 16 ms
 * while nothing happens; fds and the deadline are still exact.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cancelk.h"

#ifdef __linux__
#include <sys/epoll.h>
#include <sys/timerfd.h>
#endif

#define SLICE_MIN_NS 1000000LL
#define SLICE_MAX_NS 16000000LL
#define TIMER_DATA UINT64_MAX

struct watched_fd {
	int fd;
	int64_t token;
};

struct watched_child {
	int pid;
	int pidfd;		/* -1 in the posix backend */
	int64_t token;
};

struct cancelk_loop {
	int backend;
	int epoll_fd;		/* pidfd backend only */
	int timer_fd;		/* pidfd backend only */
	int64_t armed_deadline;	/* what timer_fd is set to; -1: disarmed */
	struct watched_fd *fds;
	int nfds, fds_cap;
	struct watched_child *children;
	int nchildren, children_cap;
	struct pollfd *pollfds;	/* posix backend scratch */
	int pollfds_cap;
};

static int grow(void **array, int *cap, int need, size_t item_size)
{
	int new_cap;
	void *p;

	if (need <= *cap)
		return 0;
	new_cap = *cap ? *cap * 2 : 8;
	while (new_cap < need)
		new_cap *= 2;
	p = realloc(*array, (size_t)new_cap * item_size);
	if (!p) {
		errno = ENOMEM;
		return -1;
	}
	*array = p;
	*cap = new_cap;
	return 0;
}

#ifdef __linux__
static int epoll_watch(struct cancelk_loop *loop, int fd, uint64_t data)
{
	struct epoll_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN;
	ev.data.u64 = data;
	return epoll_ctl(loop->epoll_fd, EPOLL_CTL_ADD, fd, &ev);
}

static int open_epoll_backend(struct cancelk_loop *loop)
{
	loop->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	if (loop->epoll_fd < 0)
		return -1;
	loop->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (loop->timer_fd < 0)
		return -1;
	return epoll_watch(loop, loop->timer_fd, TIMER_DATA);
}

static int arm_timer(struct cancelk_loop *loop, int64_t deadline_ns)
{
	struct itimerspec its;

	if (deadline_ns == loop->armed_deadline)
		return 0;
	memset(&its, 0, sizeof(its));
	if (deadline_ns >= 0) {
		/* An all-zero it_value disarms; a deadline at 0 ns means "now". */
		its.it_value.tv_sec = deadline_ns / 1000000000;
		its.it_value.tv_nsec = deadline_ns % 1000000000;
		if (deadline_ns == 0)
			its.it_value.tv_nsec = 1;
	}
	if (timerfd_settime(loop->timer_fd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
		return -1;
	loop->armed_deadline = deadline_ns;
	return 0;
}
#endif

struct cancelk_loop *cancelk_loop_new(int backend)
{
	struct cancelk_loop *loop;

	if (backend != CANCELK_BACKEND_PIDFD && backend != CANCELK_BACKEND_POSIX) {
		errno = EINVAL;
		return NULL;
	}
	loop = calloc(1, sizeof(*loop));
	if (!loop)
		return NULL;
	loop->backend = backend;
	loop->epoll_fd = -1;
	loop->timer_fd = -1;
	loop->armed_deadline = -1;
	if (backend == CANCELK_BACKEND_PIDFD) {
#ifdef __linux__
		if (open_epoll_backend(loop) != 0) {
			int saved = errno;

			cancelk_loop_free(loop);
			errno = saved;
			return NULL;
		}
#else
		free(loop);
		errno = ENOSYS;
		return NULL;
#endif
	}
	return loop;
}

void cancelk_loop_free(struct cancelk_loop *loop)
{
	int i;

	if (!loop)
		return;
	for (i = 0; i < loop->nchildren; i++)
		if (loop->children[i].pidfd >= 0)
			close(loop->children[i].pidfd);
	if (loop->epoll_fd >= 0)
		close(loop->epoll_fd);
	if (loop->timer_fd >= 0)
		close(loop->timer_fd);
	free(loop->fds);
	free(loop->children);
	free(loop->pollfds);
	free(loop);
}

int cancelk_loop_add_fd(struct cancelk_loop *loop, int fd, int64_t token)
{
	if (fd < 0 || token < 0) {
		errno = EINVAL;
		return -1;
	}
	if (grow((void **)&loop->fds, &loop->fds_cap, loop->nfds + 1, sizeof(*loop->fds)) != 0)
		return -1;
#ifdef __linux__
	if (loop->backend == CANCELK_BACKEND_PIDFD && epoll_watch(loop, fd, (uint64_t)token) != 0)
		return -1;
#endif
	loop->fds[loop->nfds].fd = fd;
	loop->fds[loop->nfds].token = token;
	loop->nfds++;
	return 0;
}

int cancelk_loop_remove_fd(struct cancelk_loop *loop, int fd)
{
	int i;

	for (i = 0; i < loop->nfds; i++) {
		if (loop->fds[i].fd != fd)
			continue;
#ifdef __linux__
		if (loop->backend == CANCELK_BACKEND_PIDFD &&
		    epoll_ctl(loop->epoll_fd, EPOLL_CTL_DEL, fd, NULL) != 0 && errno != EBADF)
			return -1;
#endif
		loop->fds[i] = loop->fds[--loop->nfds];
		return 0;
	}
	errno = ENOENT;
	return -1;
}

int cancelk_loop_add_child(struct cancelk_loop *loop, int pid, int64_t token)
{
	struct watched_child *child;

	if (pid <= 0 || token < 0) {
		errno = EINVAL;
		return -1;
	}
	if (grow((void **)&loop->children, &loop->children_cap, loop->nchildren + 1,
		 sizeof(*loop->children)) != 0)
		return -1;
	child = &loop->children[loop->nchildren];
	child->pid = pid;
	child->pidfd = -1;
	child->token = token;
	if (loop->backend == CANCELK_BACKEND_POSIX) {
		/* Without a pidfd only our own children can be watched: say so
		 * now (ECHILD) rather than report a stranger as exited later. */
		if (cancelk_has_exited(pid) < 0)
			return -1;
	}
	if (loop->backend == CANCELK_BACKEND_PIDFD) {
#ifdef __linux__
		child->pidfd = cancelk_pidfd_open(pid);
		if (child->pidfd < 0)
			return -1;
		if (epoll_watch(loop, child->pidfd, (uint64_t)token) != 0) {
			int saved = errno;

			close(child->pidfd);
			errno = saved;
			return -1;
		}
#endif
	}
	loop->nchildren++;
	return 0;
}

int cancelk_loop_remove_child(struct cancelk_loop *loop, int pid)
{
	int i;

	for (i = 0; i < loop->nchildren; i++) {
		if (loop->children[i].pid != pid)
			continue;
		if (loop->children[i].pidfd >= 0) {
#ifdef __linux__
			/* Delete explicitly: close() alone leaves the registration
			 * alive while a just-forked child still holds a copy of the
			 * pidfd, and it would then fire again under the old token. */
			if (epoll_ctl(loop->epoll_fd, EPOLL_CTL_DEL, loop->children[i].pidfd,
				      NULL) != 0)
				return -1;
#endif
			close(loop->children[i].pidfd);
		}
		loop->children[i] = loop->children[--loop->nchildren];
		return 0;
	}
	errno = ENOENT;
	return -1;
}

#ifdef __linux__
static int wait_epoll(struct cancelk_loop *loop, int64_t deadline_ns,
		      int64_t *tokens, int max_tokens)
{
	struct epoll_event events[64];
	int n, i, count = 0;
	int max = max_tokens < 64 ? max_tokens : 64;
	uint64_t expirations;

	if (arm_timer(loop, deadline_ns) != 0)
		return -1;
	n = epoll_wait(loop->epoll_fd, events, max, -1);
	if (n < 0)
		return errno == EINTR ? 0 : -1;
	for (i = 0; i < n; i++) {
		if (events[i].data.u64 != TIMER_DATA) {
			tokens[count++] = (int64_t)events[i].data.u64;
			continue;
		}
		/* Drain the expiry so the level-triggered timer goes quiet. */
		if (read(loop->timer_fd, &expirations, sizeof(expirations)) < 0 && errno != EAGAIN)
			return -1;
		loop->armed_deadline = -1;
		tokens[count++] = CANCELK_TOKEN_DEADLINE;
	}
	return count;
}
#endif

static int poll_for(struct pollfd *pfds, int n, int64_t timeout_ns)
{
#ifdef __linux__
	struct timespec ts;

	if (timeout_ns < 0)
		return ppoll(pfds, (nfds_t)n, NULL, NULL);
	ts.tv_sec = timeout_ns / 1000000000;
	ts.tv_nsec = timeout_ns % 1000000000;
	return ppoll(pfds, (nfds_t)n, &ts, NULL);
#else
	int ms = timeout_ns < 0 ? -1 : (int)((timeout_ns + 999999) / 1000000);

	return poll(pfds, (nfds_t)n, ms);
#endif
}

static int collect_exited_children(struct cancelk_loop *loop, int64_t *tokens, int max_tokens)
{
	int i, exited, count = 0;

	for (i = 0; i < loop->nchildren && count < max_tokens; i++) {
		exited = cancelk_has_exited(loop->children[i].pid);
		/* ECHILD: somebody reaped it already, so it has exited. */
		if (exited < 0 && errno == ECHILD)
			exited = 1;
		if (exited < 0)
			return -1;
		if (exited)
			tokens[count++] = loop->children[i].token;
	}
	return count;
}

static int wait_poll(struct cancelk_loop *loop, int64_t deadline_ns,
		     int64_t *tokens, int max_tokens)
{
	int64_t slice = SLICE_MIN_NS, now, timeout;
	int i, n, count;

	if (grow((void **)&loop->pollfds, &loop->pollfds_cap, loop->nfds,
		 sizeof(*loop->pollfds)) != 0)
		return -1;
	for (i = 0; i < loop->nfds; i++) {
		loop->pollfds[i].fd = loop->fds[i].fd;
		loop->pollfds[i].events = POLLIN;
		loop->pollfds[i].revents = 0;
	}
	for (;;) {
		count = collect_exited_children(loop, tokens, max_tokens);
		if (count != 0)
			return count;
		now = cancelk_monotonic_ns();
		if (deadline_ns >= 0 && now >= deadline_ns) {
			tokens[0] = CANCELK_TOKEN_DEADLINE;
			return 1;
		}
		timeout = deadline_ns >= 0 ? deadline_ns - now : -1;
		if (loop->nchildren > 0 && (timeout < 0 || timeout > slice))
			timeout = slice;
		n = poll_for(loop->pollfds, loop->nfds, timeout);
		if (n < 0)
			return errno == EINTR ? 0 : -1;
		for (i = 0; i < loop->nfds && count < max_tokens; i++)
			if (loop->pollfds[i].revents)
				tokens[count++] = loop->fds[i].token;
		if (count != 0)
			return count;
		if (slice < SLICE_MAX_NS)
			slice *= 2;
	}
}

int cancelk_loop_wait(struct cancelk_loop *loop, int64_t deadline_ns,
		      int64_t *tokens, int max_tokens)
{
	if (max_tokens <= 0) {
		errno = EINVAL;
		return -1;
	}
#ifdef __linux__
	if (loop->backend == CANCELK_BACKEND_PIDFD)
		return wait_epoll(loop, deadline_ns, tokens, max_tokens);
#endif
	return wait_poll(loop, deadline_ns, tokens, max_tokens);
}
