/*
 * The portable POSIX backend of the event loop (macOS, or
 * CANCELK_BACKEND=posix on Linux).
 *
 * poll(2) over the fds and waitid(WNOWAIT) over the children.  Without a
 * descriptor for a child its exit is found by polling in short slices that
 * grow from 1 ms to 16 ms while nothing happens; fds and the deadline are
 * still exact.  Only the caller's own children can be watched.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <time.h>

#include "cancelk.h"
#include "loop_backend.h"

#define SLICE_MIN_NS 1000000LL
#define SLICE_MAX_NS 16000000LL

static int poll_open(struct cancelk_loop *loop)
{
	loop->backend.poll.pollfds = NULL;
	loop->backend.poll.pollfds_cap = 0;
	return 0;
}

static void poll_close(struct cancelk_loop *loop)
{
	free(loop->backend.poll.pollfds);
}

/* The fd array is the watch list: each wait polls what it holds then. */
static int poll_add_fd(struct cancelk_loop *loop, const struct watched_fd *entry)
{
	(void)loop;
	(void)entry;
	return 0;
}

static int poll_remove_fd(struct cancelk_loop *loop, const struct watched_fd *entry)
{
	(void)loop;
	(void)entry;
	return 0;
}

static int poll_add_child(struct cancelk_loop *loop, struct watched_child *child)
{
	(void)loop;
	/* Without a pidfd only our own children can be watched: say so now
	 * (ECHILD) rather than report a stranger as exited later. */
	return cancelk_has_exited(child->pid) < 0 ? -1 : 0;
}

static int poll_remove_child(struct cancelk_loop *loop, struct watched_child *child)
{
	(void)loop;
	(void)child;
	return 0;
}

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
	/* poll(2) counts in milliseconds: round up, never wake before the deadline. */
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

static int poll_wait_tokens(struct cancelk_loop *loop, int64_t deadline_ns,
			    int64_t *tokens, int max_tokens)
{
	struct poll_backend *state = &loop->backend.poll;
	int64_t slice = SLICE_MIN_NS, now, timeout;
	int i, ready, count;

	if (loop_reserve((void **)&state->pollfds, &state->pollfds_cap, loop->nfds,
			 sizeof(*state->pollfds)) != 0)
		return -1;
	for (i = 0; i < loop->nfds; i++) {
		state->pollfds[i].fd = loop->fds[i].fd;
		state->pollfds[i].events = POLLIN;
		state->pollfds[i].revents = 0;
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
		ready = poll_for(state->pollfds, loop->nfds, timeout);
		if (ready < 0)
			return errno == EINTR ? 0 : -1;	/* a signal: let the caller run its handler */
		for (i = 0; i < loop->nfds && count < max_tokens; i++)
			if (state->pollfds[i].revents)
				tokens[count++] = loop->fds[i].token;
		if (count != 0)
			return count;
		if (slice < SLICE_MAX_NS)
			slice *= 2;
	}
}

const struct loop_ops loop_poll_ops = {
	.open = poll_open,
	.close = poll_close,
	.add_fd = poll_add_fd,
	.remove_fd = poll_remove_fd,
	.add_child = poll_add_child,
	.remove_child = poll_remove_child,
	.wait = poll_wait_tokens,
};
