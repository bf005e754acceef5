/*
 * The event loop: wait, with the GIL released, for the first of
 *   - a watched child exiting (left unreaped, so its pid stays ours),
 *   - a watched fd becoming readable or hung up,
 *   - a CLOCK_MONOTONIC deadline passing.
 *
 * This file is what the backends share: the public calls, their argument
 * checks, and the arrays of watched fds and children.  How to wait is the
 * backend's business (loop_backend.h): loop_epoll.c on Linux, loop_poll.c
 * anywhere.
 */
#include <errno.h>
#include <stdlib.h>

#include "cancelk.h"
#include "loop_backend.h"

int loop_reserve(void **array, int *cap, int need, size_t item_size)
{
	int new_cap;
	void *grown;

	if (need <= *cap)
		return 0;
	new_cap = *cap ? *cap * 2 : 8;
	while (new_cap < need)
		new_cap *= 2;
	grown = realloc(*array, (size_t)new_cap * item_size);
	if (!grown) {
		errno = ENOMEM;
		return -1;
	}
	*array = grown;
	*cap = new_cap;
	return 0;
}

/* The ops of a CANCELK_BACKEND_* number: 0, or the step that rules it out. */
static int find_backend(int backend, const struct loop_ops **ops)
{
	switch (backend) {
	case CANCELK_BACKEND_PIDFD:
#ifdef __linux__
		*ops = &loop_epoll_ops;
		return 0;
#else
		errno = ENOSYS;	/* pidfds are Linux's */
		return CANCELK_STEP_NO_BACKEND;
#endif
	case CANCELK_BACKEND_POSIX:
		*ops = &loop_poll_ops;
		return 0;
	default:
		errno = EINVAL;
		return CANCELK_STEP_BAD_ARGUMENT;
	}
}

int cancelk_loop_new(int backend, struct cancelk_loop **out)
{
	const struct loop_ops *ops = NULL;
	struct cancelk_loop *loop;
	int step;

	*out = NULL;
	step = find_backend(backend, &ops);
	if (step != 0)
		return step;
	loop = calloc(1, sizeof(*loop));
	if (!loop)
		return CANCELK_STEP_CALLOC;
	loop->ops = ops;
	step = ops->open(loop);
	if (step != 0) {
		int saved = errno;	/* the failed call's, not close()'s */

		cancelk_loop_free(loop);
		errno = saved;
		return step;
	}
	*out = loop;
	return 0;
}

void cancelk_loop_free(struct cancelk_loop *loop)
{
	if (!loop)
		return;
	loop->ops->close(loop);
	free(loop->fds);
	free(loop->children);
	free(loop);
}

int cancelk_loop_add_fd(struct cancelk_loop *loop, int fd, int64_t token)
{
	struct watched_fd *entry;
	int step;

	if (fd < 0 || token < 0) {
		errno = EINVAL;
		return CANCELK_STEP_BAD_ARGUMENT;
	}
	if (loop_reserve((void **)&loop->fds, &loop->fds_cap, loop->nfds + 1,
			 sizeof(*loop->fds)) != 0)
		return CANCELK_STEP_REALLOC;
	entry = &loop->fds[loop->nfds];
	entry->fd = fd;
	entry->token = token;
	step = loop->ops->add_fd ? loop->ops->add_fd(loop, entry) : 0;
	if (step != 0)
		return step;
	loop->nfds++;
	return 0;
}

int cancelk_loop_remove_fd(struct cancelk_loop *loop, int fd)
{
	int i, step;

	for (i = 0; i < loop->nfds; i++) {
		if (loop->fds[i].fd != fd)
			continue;
		step = loop->ops->remove_fd ? loop->ops->remove_fd(loop, &loop->fds[i]) : 0;
		if (step != 0)
			return step;
		loop->fds[i] = loop->fds[--loop->nfds];
		return 0;
	}
	errno = ENOENT;
	return CANCELK_STEP_NOT_WATCHED;
}

int cancelk_loop_add_child(struct cancelk_loop *loop, int pid, int64_t token)
{
	struct watched_child *child;
	int step;

	if (pid <= 0 || token < 0) {
		errno = EINVAL;
		return CANCELK_STEP_BAD_ARGUMENT;
	}
	if (loop_reserve((void **)&loop->children, &loop->children_cap, loop->nchildren + 1,
			 sizeof(*loop->children)) != 0)
		return CANCELK_STEP_REALLOC;
	child = &loop->children[loop->nchildren];
	child->pid = pid;
	child->pidfd = -1;
	child->token = token;
	step = loop->ops->add_child ? loop->ops->add_child(loop, child) : 0;
	if (step != 0)
		return step;
	loop->nchildren++;
	return 0;
}

int cancelk_loop_remove_child(struct cancelk_loop *loop, int pid)
{
	int i, step;

	for (i = 0; i < loop->nchildren; i++) {
		if (loop->children[i].pid != pid)
			continue;
		step = loop->ops->remove_child ?
			loop->ops->remove_child(loop, &loop->children[i]) : 0;
		if (step != 0)
			return step;
		loop->children[i] = loop->children[--loop->nchildren];
		return 0;
	}
	errno = ENOENT;
	return CANCELK_STEP_NOT_WATCHED;
}

/* Drop the deadline tokens of an early wake-up: how many are left. */
static int without_deadline(int64_t *tokens, int count)
{
	int i, kept = 0;

	for (i = 0; i < count; i++)
		if (tokens[i] != CANCELK_TOKEN_DEADLINE)
			tokens[kept++] = tokens[i];
	return kept;
}

int cancelk_loop_wait(struct cancelk_loop *loop, int64_t deadline_ns, int64_t wake_ahead_ns,
		      int64_t *tokens, int max_tokens)
{
	int count;

	if (max_tokens <= 0 || wake_ahead_ns < 0) {
		errno = EINVAL;
		return -CANCELK_STEP_BAD_ARGUMENT;
	}
	if (deadline_ns < 0 || wake_ahead_ns == 0)
		return loop->ops->wait(loop, deadline_ns, tokens, max_tokens);
	/* A thread asleep until its deadline runs again some 0.1-0.3 ms after
	 * it on a VM (the idle vCPU must be scheduled again): sleep until
	 * wake_ahead_ns before it, then watch without sleeping up to it, so
	 * what is due at the deadline happens at the deadline. */
	if (deadline_ns - cancelk_monotonic_ns() > wake_ahead_ns) {
		count = loop->ops->wait(loop, deadline_ns - wake_ahead_ns, tokens, max_tokens);
		if (count <= 0)
			return count;	/* a failure, or a signal to handle */
		count = without_deadline(tokens, count);
		if (count != 0)
			return count;
	}
	for (;;) {
		count = loop->ops->peek(loop, tokens, max_tokens);
		if (count != 0)
			return count;
		if (cancelk_monotonic_ns() >= deadline_ns) {
			tokens[0] = CANCELK_TOKEN_DEADLINE;
			return 1;
		}
	}
}
