/*
 * Private to the event loop: the loop's control struct and the table of
 * operations a backend fills in.
 *
 *   loop.c        the public cancelk_loop_* calls: checks their arguments,
 *                 keeps the fd and child arrays, calls the backend's ops
 *   loop_epoll.c  Linux: epoll + timerfd + one pidfd per child
 *   loop_poll.c   any POSIX system: poll + waitid(WNOHANG | WNOWAIT)
 *
 * Not included by cancelk.h, so none of this reaches the cffi declarations.
 */
#ifndef CANCELK_LOOP_BACKEND_H
#define CANCELK_LOOP_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include "cancelk.h"

struct loop_ops;
struct pollfd;

struct watched_fd {
	int fd;
	int64_t token;
};

struct watched_child {
	int pid;
	int pidfd;		/* epoll backend; -1 in the poll backend */
	int64_t token;
};

/* loop_epoll.c's own state. */
struct epoll_backend {
	int epoll_fd;
	int timer_fd;
	int64_t armed_deadline;	/* what timer_fd is set to; -1: disarmed */
};

/* loop_poll.c's own state: scratch rebuilt from the fd array at each wait. */
struct poll_backend {
	struct pollfd *pollfds;
	int pollfds_cap;
};

struct cancelk_loop {
	const struct loop_ops *ops;
	struct watched_fd *fds;
	int nfds, fds_cap;
	struct watched_child *children;
	int nchildren, children_cap;
	union {
		struct epoll_backend epoll;
		struct poll_backend poll;
	} backend;
};

/*
 * What a backend does.  loop.c has checked the arguments and made room in
 * its arrays before calling; it stores or drops the entry after the op
 * succeeded, so a failed op leaves the loop as it was.  Each returns 0, or
 * the CANCELK_STEP_* that failed with errno as that call left it.  An op
 * left NULL is one the backend has nothing to do for.
 */
struct loop_ops {
	/* Set up the backend's state in a zeroed loop.  On failure close()
	 * still runs, so leave whatever was opened where close() finds it. */
	int (*open)(struct cancelk_loop *loop);
	/* Release the backend's state and every watched child's descriptor. */
	void (*close)(struct cancelk_loop *loop);
	int (*add_fd)(struct cancelk_loop *loop, const struct watched_fd *entry);
	int (*remove_fd)(struct cancelk_loop *loop, const struct watched_fd *entry);
	/* May fill in child->pidfd. */
	int (*add_child)(struct cancelk_loop *loop, struct watched_child *child);
	int (*remove_child)(struct cancelk_loop *loop, struct watched_child *child);
	/* As cancelk_loop_wait (a count, or a step negated), with max_tokens
	 * already checked to be > 0. */
	int (*wait)(struct cancelk_loop *loop, int64_t deadline_ns,
		    int64_t *tokens, int max_tokens);
	/* The same without blocking and without the deadline: what is ready
	 * now (0: nothing). */
	int (*peek)(struct cancelk_loop *loop, int64_t *tokens, int max_tokens);
};

#ifdef __linux__
extern const struct loop_ops loop_epoll_ops;
#endif
extern const struct loop_ops loop_poll_ops;

/* Make room for need items in a realloc'ed array, doubling its capacity:
 * 0, or -1 with errno ENOMEM (callers report CANCELK_STEP_REALLOC). */
int loop_reserve(void **array, int *cap, int need, size_t item_size);

#endif
