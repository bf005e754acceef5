/*
 * cancelk C process core: the raw process operations around a fork and a
 * small event loop that waits for children, fds and a deadline without the GIL.
 *
 * Unless said otherwise a function returns -1 and leaves errno set on
 * failure.  Calls that make more than one system call instead return the
 * step that failed (CANCELK_STEP_*), errno still as that call left it.  The
 * Python side (cancelk._core) turns either into OSError saying what was
 * attempted.
 */
#ifndef CANCELK_H
#define CANCELK_H

#include <stddef.h>
#include <stdint.h>

#define CANCELK_BACKEND_PIDFD 1
#define CANCELK_BACKEND_POSIX 2

/* Steps of cancelk_become_job_process, returned when one fails. */
#define CANCELK_STEP_QUERY_SIGNALS 1
#define CANCELK_STEP_OWN_GROUP 2
#define CANCELK_STEP_SUBREAPER 3
#define CANCELK_STEP_DIE_WITH_PARENT 4

/* Steps of the event loop (cancelk_loop_*), returned when one fails;
 * cancelk_loop_wait returns them negated.  Most name the system call.
 * Numbered apart from the steps above, so a number names one step. */
#define CANCELK_STEP_BAD_ARGUMENT 16	/* EINVAL: an fd, pid, token or backend out of range */
#define CANCELK_STEP_NOT_WATCHED 17	/* ENOENT: removing an fd or child never added */
#define CANCELK_STEP_NO_BACKEND 18	/* ENOSYS: the backend is not built for this OS */
#define CANCELK_STEP_CALLOC 19		/* the loop itself */
#define CANCELK_STEP_REALLOC 20		/* growing the fd, child or poll arrays */
#define CANCELK_STEP_EPOLL_CREATE 21
#define CANCELK_STEP_TIMERFD_CREATE 22
#define CANCELK_STEP_EPOLL_ADD_TIMER 23
#define CANCELK_STEP_EPOLL_ADD 24	/* of a watched fd or a child's pidfd */
#define CANCELK_STEP_EPOLL_DEL 25
#define CANCELK_STEP_PIDFD_OPEN 26
#define CANCELK_STEP_WAITID 27		/* waitid(WNOHANG | WNOWAIT) of a child */
#define CANCELK_STEP_TIMERFD_SETTIME 28
#define CANCELK_STEP_EPOLL_WAIT 29
#define CANCELK_STEP_TIMERFD_READ 30
#define CANCELK_STEP_PPOLL 31
#define CANCELK_STEP_POLL 32

/* Steps of cancelk_send_table and cancelk_receive_table. */
#define CANCELK_STEP_LIST_FDS 40	/* /proc/self/fd (or /dev/fd), F_GETFD of each */
#define CANCELK_STEP_SENDMSG 41
#define CANCELK_STEP_RECVMSG 42
#define CANCELK_STEP_PLACE_FDS 43	/* dup3/fcntl putting a received fd at its number */
#define CANCELK_STEP_MALLOC 44
#define CANCELK_STEP_BAD_TABLE 45	/* EPROTO: what arrived is not a table and its fds */

/* Most fds sent with one message (the kernel's SCM_MAX_FD is 253). */
#define CANCELK_FD_CHUNK 250

/* Token reported by cancelk_loop_wait when the deadline has passed. */
#define CANCELK_TOKEN_DEADLINE (-1)

/* backend.c */
int cancelk_pidfd_supported(void);

/* proc.c: process operations */
int64_t cancelk_monotonic_ns(void);
int cancelk_pidfd_open(int pid);
int cancelk_pidfd_send_signal(int pidfd, int sig);
int cancelk_pidfd_signal_group(int pidfd, int sig);
int cancelk_kill_group(int pgid, int sig);
int cancelk_kill_pid(int pid, int sig);
int cancelk_become_group_leader(void);
int cancelk_signal_dispositions(uint64_t *handled, uint64_t *ignored);
int cancelk_set_child_subreaper(void);
int cancelk_become_job_process(int parent, uint64_t *dispositions);
int cancelk_reap(int pid, int nohang, int *status);
int cancelk_has_exited(int pid, int pidfd);
int cancelk_child_unreaped(int pid, int pidfd);
int cancelk_signal_child(int pid, int pidfd, int sig, int group);
int cancelk_wait_stopped(int pid, int pidfd);
int64_t cancelk_word_load(int64_t *word);
void cancelk_word_store(int64_t *word, int64_t value);
int cancelk_word_cas(int64_t *word, int64_t expected, int64_t desired);

/* fdtable.c: a process's fd table, sent with a job to another process and
 * installed there at the same numbers.  cancelk_receive_table: *got is the
 * count of the frame's bytes that came with the table (moved to buf's
 * start), or (size_t)-1 on EOF before the table; keep[] (the caller's own
 * fds) gets the numbers they were moved to, also after a failure. */
int cancelk_open_fds(int dir, int *fds, int *cloexec, int max);
int cancelk_place_fds(int *received, const int *targets, const int *cloexec, int n,
                      int *keep, int nkeep);
int cancelk_send_table(int channel, int dir, const int *exclude, int nexclude,
                       const char *frame, size_t frame_len);
int cancelk_receive_table(int channel, int *keep, int nkeep, char *buf, size_t cap,
                          size_t *got);
/* What a unix socket holds now (MSG_DONTWAIT), up to cap bytes, and the fds
 * that came with it (close-on-exec, in order; at most maxfds in all, a
 * message whose fds do not fit is EPROTO): bytes read, *state one of
 * CANCELK_PENDING_*; -1 on error, no fd kept. */
#define CANCELK_PENDING_DRAINED 0	/* it holds nothing more now */
#define CANCELK_PENDING_EOF 1
#define CANCELK_PENDING_FULL 2		/* buf or fds full: more may be there */
int cancelk_recv_pending(int fd, char *buf, size_t cap, int *fds, int maxfds, int *nfds,
                         int *state);

/* tree.c: process trees (Linux; ENOSYS elsewhere) */
int cancelk_list_children(int parent, int *out, int max);
int cancelk_kill_descendants(int root, int max_rounds);
/* The same for every root at once: one scan of /proc per round serves all. */
int cancelk_kill_trees(const int *roots, int nroots, int max_rounds);
int cancelk_die_with_parent(int parent);
/* Resident memory of each root's whole tree (root and descendants), bytes. */
int cancelk_tree_rss(const int *roots, int nroots, int64_t *rss_bytes);

/* loop.c: wait for the first of several events.  Each call returns 0 or
 * the CANCELK_STEP_* that failed; cancelk_loop_wait returns how many tokens
 * it stored (0: a signal interrupted it) or the failed step negated, and
 * after CANCELK_STEP_WAITID tokens[0] is the token of the child concerned.
 * wake_ahead_ns > 0: the wait for the deadline sleeps until that long
 * before it and then polls, so a deadline that kills is met without a
 * wake-up's latency (at the cost of up to that much CPU; a signal that
 * arrives while it polls is seen when the wait returns). */
struct cancelk_loop;
int cancelk_loop_new(int backend, struct cancelk_loop **out);
void cancelk_loop_free(struct cancelk_loop *loop);
int cancelk_loop_add_fd(struct cancelk_loop *loop, int fd, int64_t token);
int cancelk_loop_remove_fd(struct cancelk_loop *loop, int fd);
int cancelk_loop_add_child(struct cancelk_loop *loop, int pid, int64_t token);
int cancelk_loop_remove_child(struct cancelk_loop *loop, int pid);
int cancelk_loop_wait(struct cancelk_loop *loop, int64_t deadline_ns, int64_t wake_ahead_ns,
                      int64_t *tokens, int max_tokens);

#endif
