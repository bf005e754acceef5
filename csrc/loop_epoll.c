/*
 * The pidfd backend of the event loop (Linux >= 5.3).
 *
 * One epoll set holds the watched fds, one pidfd per watched child and a
 * timerfd armed at the absolute deadline, so a wait is a single epoll_wait
 * and the deadline has nanosecond resolution.  A pidfd becomes readable when
 * its process exits, and stays so until the process is reaped, which the
 * loop leaves to its caller.
 *
 * Elsewhere this file is empty and loop.c reports ENOSYS for the backend.
 */
#ifdef __linux__
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include "cancelk.h"
#include "loop_backend.h"

/* epoll data of the timerfd; tokens are >= 0, so no token can look like it. */
#define TIMER_DATA UINT64_MAX
/* How many events one epoll_wait may return. */
#define MAX_EVENTS 64

static int watch(struct epoll_backend *state, int fd, uint64_t data)
{
	struct epoll_event ev;

	memset(&ev, 0, sizeof(ev));
	ev.events = EPOLLIN;
	ev.data.u64 = data;
	return epoll_ctl(state->epoll_fd, EPOLL_CTL_ADD, fd, &ev);
}

static int epoll_open(struct cancelk_loop *loop)
{
	struct epoll_backend *state = &loop->backend.epoll;

	state->epoll_fd = -1;
	state->timer_fd = -1;
	state->armed_deadline = -1;
	state->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
	if (state->epoll_fd < 0)
		return CANCELK_STEP_EPOLL_CREATE;
	state->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK);
	if (state->timer_fd < 0)
		return CANCELK_STEP_TIMERFD_CREATE;
	if (watch(state, state->timer_fd, TIMER_DATA) != 0)
		return CANCELK_STEP_EPOLL_ADD_TIMER;
	return 0;
}

static void epoll_close(struct cancelk_loop *loop)
{
	struct epoll_backend *state = &loop->backend.epoll;
	int i;

	for (i = 0; i < loop->nchildren; i++)
		close(loop->children[i].pidfd);
	if (state->epoll_fd >= 0)
		close(state->epoll_fd);
	if (state->timer_fd >= 0)
		close(state->timer_fd);
}

static int epoll_add_fd(struct cancelk_loop *loop, const struct watched_fd *entry)
{
	if (watch(&loop->backend.epoll, entry->fd, (uint64_t)entry->token) != 0)
		return CANCELK_STEP_EPOLL_ADD;
	return 0;
}

static int epoll_remove_fd(struct cancelk_loop *loop, const struct watched_fd *entry)
{
	/* EBADF: the caller closed the fd first, which took it out of the set. */
	if (epoll_ctl(loop->backend.epoll.epoll_fd, EPOLL_CTL_DEL, entry->fd, NULL) != 0 &&
	    errno != EBADF)
		return CANCELK_STEP_EPOLL_DEL;
	return 0;
}

static int epoll_add_child(struct cancelk_loop *loop, struct watched_child *child)
{
	child->pidfd = cancelk_pidfd_open(child->pid);
	if (child->pidfd < 0)
		return CANCELK_STEP_PIDFD_OPEN;
	if (watch(&loop->backend.epoll, child->pidfd, (uint64_t)child->token) != 0) {
		int saved = errno;	/* epoll_ctl's, not close()'s */

		close(child->pidfd);
		child->pidfd = -1;
		errno = saved;
		return CANCELK_STEP_EPOLL_ADD;
	}
	return 0;
}

static int epoll_remove_child(struct cancelk_loop *loop, struct watched_child *child)
{
	/* Delete explicitly: close() alone leaves the registration alive while
	 * a just-forked child still holds a copy of the pidfd, and it would then
	 * fire again under the old token. */
	if (epoll_ctl(loop->backend.epoll.epoll_fd, EPOLL_CTL_DEL, child->pidfd, NULL) != 0)
		return CANCELK_STEP_EPOLL_DEL;
	close(child->pidfd);
	return 0;
}

static int arm_timer(struct epoll_backend *state, int64_t deadline_ns)
{
	struct itimerspec its;

	if (deadline_ns == state->armed_deadline)
		return 0;
	memset(&its, 0, sizeof(its));
	if (deadline_ns >= 0) {
		/* An all-zero it_value disarms; a deadline at 0 ns means "now". */
		its.it_value.tv_sec = deadline_ns / 1000000000;
		its.it_value.tv_nsec = deadline_ns % 1000000000;
		if (deadline_ns == 0)
			its.it_value.tv_nsec = 1;
	}
	if (timerfd_settime(state->timer_fd, TFD_TIMER_ABSTIME, &its, NULL) != 0)
		return -1;
	state->armed_deadline = deadline_ns;
	return 0;
}

/* One epoll_wait (timeout_ms: -1 blocks): the tokens of what is ready, the
 * timer's as CANCELK_TOKEN_DEADLINE when with_deadline, else dropped. */
static int epoll_collect(struct cancelk_loop *loop, int timeout_ms, int with_deadline,
			 int64_t *tokens, int max_tokens)
{
	struct epoll_backend *state = &loop->backend.epoll;
	struct epoll_event events[MAX_EVENTS];
	int max_events = max_tokens < MAX_EVENTS ? max_tokens : MAX_EVENTS;
	int ready, i, count = 0;
	uint64_t expirations;

	ready = epoll_wait(state->epoll_fd, events, max_events, timeout_ms);
	if (ready < 0)	/* EINTR: a signal; no tokens lets the caller run its handler */
		return errno == EINTR ? 0 : -CANCELK_STEP_EPOLL_WAIT;
	for (i = 0; i < ready; i++) {
		if (events[i].data.u64 != TIMER_DATA) {
			tokens[count++] = (int64_t)events[i].data.u64;
			continue;
		}
		/* Drain the expiry so the level-triggered timer goes quiet. */
		if (read(state->timer_fd, &expirations, sizeof(expirations)) < 0 && errno != EAGAIN)
			return -CANCELK_STEP_TIMERFD_READ;
		state->armed_deadline = -1;
		if (with_deadline)
			tokens[count++] = CANCELK_TOKEN_DEADLINE;
	}
	return count;
}

static int epoll_wait_tokens(struct cancelk_loop *loop, int64_t deadline_ns,
			     int64_t *tokens, int max_tokens)
{
	if (arm_timer(&loop->backend.epoll, deadline_ns) != 0)
		return -CANCELK_STEP_TIMERFD_SETTIME;
	return epoll_collect(loop, -1, 1, tokens, max_tokens);
}

static int epoll_peek_tokens(struct cancelk_loop *loop, int64_t *tokens, int max_tokens)
{
	return epoll_collect(loop, 0, 0, tokens, max_tokens);
}

const struct loop_ops loop_epoll_ops = {
	.open = epoll_open,
	.close = epoll_close,
	.add_fd = epoll_add_fd,
	.remove_fd = epoll_remove_fd,
	.add_child = epoll_add_child,
	.remove_child = epoll_remove_child,
	.wait = epoll_wait_tokens,
	.peek = epoll_peek_tokens,
};
#endif
