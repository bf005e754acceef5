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

/* The ops of a CANCELK_BACKEND_* number; NULL with errno set if there are none. */
static const struct loop_ops *backend_ops(int backend)
{
	switch (backend) {
	case CANCELK_BACKEND_PIDFD:
#ifdef __linux__
		return &loop_epoll_ops;
#else
		errno = ENOSYS;	/* pidfds are Linux's */
		return NULL;
#endif
	case CANCELK_BACKEND_POSIX:
		return &loop_poll_ops;
	default:
		errno = EINVAL;
		return NULL;
	}
}

struct cancelk_loop *cancelk_loop_new(int backend)
{
	const struct loop_ops *ops = backend_ops(backend);
	struct cancelk_loop *loop;

	if (!ops)
		return NULL;
	loop = calloc(1, sizeof(*loop));
	if (!loop)
		return NULL;
	loop->ops = ops;
	if (ops->open(loop) != 0) {
		int saved = errno;

		cancelk_loop_free(loop);
		errno = saved;
		return NULL;
	}
	return loop;
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

	if (fd < 0 || token < 0) {
		errno = EINVAL;
		return -1;
	}
	if (loop_reserve((void **)&loop->fds, &loop->fds_cap, loop->nfds + 1,
			 sizeof(*loop->fds)) != 0)
		return -1;
	entry = &loop->fds[loop->nfds];
	entry->fd = fd;
	entry->token = token;
	if (loop->ops->add_fd(loop, entry) != 0)
		return -1;
	loop->nfds++;
	return 0;
}

int cancelk_loop_remove_fd(struct cancelk_loop *loop, int fd)
{
	int i;

	for (i = 0; i < loop->nfds; i++) {
		if (loop->fds[i].fd != fd)
			continue;
		if (loop->ops->remove_fd(loop, &loop->fds[i]) != 0)
			return -1;
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
	if (loop_reserve((void **)&loop->children, &loop->children_cap, loop->nchildren + 1,
			 sizeof(*loop->children)) != 0)
		return -1;
	child = &loop->children[loop->nchildren];
	child->pid = pid;
	child->pidfd = -1;
	child->token = token;
	if (loop->ops->add_child(loop, child) != 0)
		return -1;
	loop->nchildren++;
	return 0;
}

int cancelk_loop_remove_child(struct cancelk_loop *loop, int pid)
{
	int i;

	for (i = 0; i < loop->nchildren; i++) {
		if (loop->children[i].pid != pid)
			continue;
		if (loop->ops->remove_child(loop, &loop->children[i]) != 0)
			return -1;
		loop->children[i] = loop->children[--loop->nchildren];
		return 0;
	}
	errno = ENOENT;
	return -1;
}

int cancelk_loop_wait(struct cancelk_loop *loop, int64_t deadline_ns,
		      int64_t *tokens, int max_tokens)
{
	if (max_tokens <= 0) {
		errno = EINVAL;
		return -1;
	}
	return loop->ops->wait(loop, deadline_ns, tokens, max_tokens);
}
