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

static int poll_add_child(struct cancelk_loop *loop, struct watched_child *child)
{
	(void)loop;
	/* Without a pidfd only our own children can be watched: say so now
	 * (ECHILD) rather than report a stranger as exited later. */
	if (cancelk_has_exited(child->pid, -1) < 0)
		return CANCELK_STEP_WAITID;
	return 0;
}

/* The step poll_for's call is reported as when it fails. */
#ifdef __linux__
#define POLL_STEP CANCELK_STEP_PPOLL
#else
#define POLL_STEP CANCELK_STEP_POLL
#endif

static int poll_for(struct pollfd *pfds, int n, int64_t timeout_ns)
{
#ifdef __linux__
	/* ppoll: the nanosecond timeout keeps the deadline exact. */
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

/* Store the tokens of the children that have exited: how many, or
 * -CANCELK_STEP_WAITID with tokens[0] the token of the child it failed on. */
static int collect_exited_children(struct cancelk_loop *loop, int64_t *tokens, int max_tokens)
{
	int i, exited, count = 0;

	for (i = 0; i < loop->nchildren && count < max_tokens; i++) {
		exited = cancelk_has_exited(loop->children[i].pid, -1);
		/* ECHILD: somebody reaped it already, so it has exited. */
		if (exited < 0 && errno == ECHILD)
			exited = 1;
		if (exited < 0) {
			tokens[0] = loop->children[i].token;
			return -CANCELK_STEP_WAITID;
		}
		if (exited)
			tokens[count++] = loop->children[i].token;
	}
	return count;
}

/* The poll array from the loop's fds: 0, or -1 (ENOMEM). */
static int fill_pollfds(struct cancelk_loop *loop)
{
	struct poll_backend *state = &loop->backend.poll;
	int i;

	if (loop_reserve((void **)&state->pollfds, &state->pollfds_cap, loop->nfds,
			 sizeof(*state->pollfds)) != 0)
		return -1;
	for (i = 0; i < loop->nfds; i++) {
		state->pollfds[i].fd = loop->fds[i].fd;
		state->pollfds[i].events = POLLIN;
		state->pollfds[i].revents = 0;
	}
	return 0;
}

static int poll_peek_tokens(struct cancelk_loop *loop, int64_t *tokens, int max_tokens)
{
	struct poll_backend *state = &loop->backend.poll;
	int i, ready, count;

	if (fill_pollfds(loop) != 0)
		return -CANCELK_STEP_REALLOC;
	count = collect_exited_children(loop, tokens, max_tokens);
	if (count != 0)
		return count;
	ready = poll_for(state->pollfds, loop->nfds, 0);
	if (ready < 0)
		return errno == EINTR ? 0 : -POLL_STEP;
	for (i = 0; i < loop->nfds && count < max_tokens; i++)
		if (state->pollfds[i].revents)
			tokens[count++] = loop->fds[i].token;
	return count;
}

static int poll_wait_tokens(struct cancelk_loop *loop, int64_t deadline_ns,
			    int64_t *tokens, int max_tokens)
{
	struct poll_backend *state = &loop->backend.poll;
	int64_t slice = SLICE_MIN_NS, now, timeout;
	int i, ready, count;

	if (fill_pollfds(loop) != 0)
		return -CANCELK_STEP_REALLOC;
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
		if (ready < 0)	/* EINTR: a signal; no tokens lets the caller run its handler */
			return errno == EINTR ? 0 : -POLL_STEP;
		for (i = 0; i < loop->nfds && count < max_tokens; i++)
			if (state->pollfds[i].revents)
				tokens[count++] = loop->fds[i].token;
		if (count != 0)
			return count;
		if (slice < SLICE_MAX_NS)
			slice *= 2;
	}
}

/* No add_fd, remove_fd or remove_child: the loop's fd and child arrays are
 * the whole watch list, read afresh at each wait. */
const struct loop_ops loop_poll_ops = {
	.open = poll_open,
	.close = poll_close,
	.add_child = poll_add_child,
	.wait = poll_wait_tokens,
	.peek = poll_peek_tokens,
};
