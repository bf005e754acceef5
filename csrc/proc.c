/*
 * Process operations: pidfds, process groups, parent-death signal,
 * subreaping, reaping, and the shared job words used to decide races
 * between a job finishing and a job being killed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cancelk.h"

#ifdef __linux__
#include <sys/prctl.h>
#include <sys/syscall.h>
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_send_signal
#define SYS_pidfd_send_signal 424
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif
#ifndef PIDFD_SIGNAL_PROCESS_GROUP
#define PIDFD_SIGNAL_PROCESS_GROUP (1U << 2)
#endif
#endif

int64_t cancelk_monotonic_ns(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		return -1;
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int cancelk_pidfd_open(int pid)
{
#ifdef __linux__
	return (int)syscall(SYS_pidfd_open, pid, 0);
#else
	(void)pid;
	errno = ENOSYS;
	return -1;
#endif
}

int cancelk_pidfd_send_signal(int pidfd, int sig)
{
#ifdef __linux__
	return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
#else
	(void)pidfd;
	(void)sig;
	errno = ENOSYS;
	return -1;
#endif
}

/* Signal the process group the pidfd's process leads (Linux 6.9+).  Exact
 * even after that process has exited and been reaped: the group is matched by
 * the pidfd's own struct pid, which a new process never gets, not by a number
 * that may be reused.  1 when sent, 0 when the group is empty, -2 when the
 * kernel does not know the flag (remembered: later calls fail at once), -1 on
 * another error. */
int cancelk_pidfd_signal_group(int pidfd, int sig)
{
#ifdef __linux__
	static int unsupported;

	if (!unsupported) {
		if (syscall(SYS_pidfd_send_signal, pidfd, sig, NULL,
			    PIDFD_SIGNAL_PROCESS_GROUP) == 0)
			return 1;
		if (errno == ESRCH)
			return 0;
		if (errno != EINVAL)
			return -1;
		unsupported = 1;
	}
#else
	(void)pidfd;
	(void)sig;
#endif
	errno = ENOSYS;
	return -2;
}

int cancelk_kill_group(int pgid, int sig)
{
	/* pgid <= 1 would address every process we may signal; refuse. */
	if (pgid <= 1) {
		errno = EINVAL;
		return -1;
	}
	return kill(-pgid, sig);
}

int cancelk_kill_pid(int pid, int sig)
{
	if (pid <= 0) {
		errno = EINVAL;
		return -1;
	}
	return kill(pid, sig);
}

int cancelk_become_group_leader(void)
{
	return setpgid(0, 0);
}

/* Which signals have a handler installed, and which are ignored: bit n-1
 * for signal n (signals above 64 are not reported).  A forked child asks
 * this once instead of querying Python about every signal, each query
 * costing it copy-on-write faults; it then resets only those handlers. */
int cancelk_signal_dispositions(uint64_t *handled, uint64_t *ignored)
{
	struct sigaction current;
	int sig;

	*handled = 0;
	*ignored = 0;
	for (sig = 1; sig < NSIG && sig <= 64; sig++) {
		if (sig == SIGKILL || sig == SIGSTOP)
			continue;
		if (sigaction(sig, NULL, &current) != 0) {
			if (errno == EINVAL)
				continue; /* reserved by the C library (glibc's SIGCANCEL) */
			return -1;
		}
		if (current.sa_handler == SIG_IGN)
			*ignored |= UINT64_C(1) << (sig - 1);
		else if (current.sa_handler != SIG_DFL)
			*handled |= UINT64_C(1) << (sig - 1);
	}
	return 0;
}

/* Everything a freshly forked job process (runner or wrapped job) does
 * before its parent's Python code may run in it, in one call: each Python
 * call in a fork of a large process costs copy-on-write faults, and those
 * dominate killable_wrapper's overhead.  In order: the inherited signal
 * dispositions are read (dispositions[0] handled, [1] ignored, as in
 * cancelk_signal_dispositions) before our own handler is installed; the
 * process leads its own group; it becomes a child subreaper and dies with
 * its parent (Linux; skipped elsewhere).  Returns 0, or the failed step
 * (CANCELK_STEP_*) with errno set. */
int cancelk_become_job_process(int parent, uint64_t *dispositions)
{
	if (cancelk_signal_dispositions(&dispositions[0], &dispositions[1]) != 0)
		return CANCELK_STEP_QUERY_SIGNALS;
	if (setpgid(0, 0) != 0)
		return CANCELK_STEP_OWN_GROUP;
	if (cancelk_set_child_subreaper() != 0 && errno != ENOSYS)
		return CANCELK_STEP_SUBREAPER;
	if (cancelk_die_with_parent(parent) != 0 && errno != ENOSYS)
		return CANCELK_STEP_DIE_WITH_PARENT;
	return 0;
}

int cancelk_set_child_subreaper(void)
{
#ifdef __linux__
	return prctl(PR_SET_CHILD_SUBREAPER, 1UL, 0, 0, 0);
#else
	errno = ENOSYS;
	return -1;
#endif
}

/* waitpid() that retries on EINTR.  Returns the pid, 0 when nohang and the
 * child still runs, -1 on error. */
int cancelk_reap(int pid, int nohang, int *status)
{
	pid_t rc;

	do {
		rc = waitpid((pid_t)pid, status, nohang ? WNOHANG : 0);
	} while (rc < 0 && errno == EINTR);
	return (int)rc;
}


/* waitid() of one child, retried on EINTR: by its pidfd when there is one
 * (exact, Linux >= 5.4), else by pid.  A kernel without P_PIDFD (5.3)
 * refuses it with EINVAL: then by pid. */
static int waitid_child(int pid, int pidfd, siginfo_t *info, int options)
{
	int rc = -1;

	info->si_pid = 0;
#ifdef __linux__
	if (pidfd >= 0) {
		do {
			rc = waitid((idtype_t)P_PIDFD, (id_t)pidfd, info, options);
		} while (rc < 0 && errno == EINTR);
		if (rc == 0 || errno != EINVAL)
			return rc;
		info->si_pid = 0;
	}
#else
	(void)pidfd;
#endif
	do {
		rc = waitid(P_PID, (id_t)pid, info, options);
	} while (rc < 0 && errno == EINTR);
	return rc;
}

/* Has the child exited?  Leaves it unreaped (WNOWAIT) so its pid, and so
 * its process group id, cannot be reused while we still act on it; by its
 * pidfd when pidfd >= 0. */
int cancelk_has_exited(int pid, int pidfd)
{
	siginfo_t info;

	if (waitid_child(pid, pidfd, &info, WEXITED | WNOHANG | WNOWAIT) < 0)
		return -1;
	return info.si_pid != 0;
}

/* waitid_child with WNOWAIT: 1 done, 0 the child is reaped already (ECHILD),
 * -1 on another error. */
static int peek_child(int pid, int pidfd, int options)
{
	siginfo_t info;

	if (waitid_child(pid, pidfd, &info, options | WNOWAIT) == 0)
		return 1;
	return errno == ECHILD ? 0 : -1;
}

/* Is the caller's child still unreaped: running, stopped, or a zombie?
 * While it is, its pid and the id of the group it leads cannot name
 * another process.  1 yes; 0 no, somebody else reaped it (ECHILD: a host's
 * SIGCHLD handler, or SIGCHLD ignored); -1 on another error. */
int cancelk_child_unreaped(int pid, int pidfd)
{
	return peek_child(pid, pidfd, WEXITED | WNOHANG);
}

/* Send sig to the caller's child, or (group != 0) to the process group it
 * leads, only while the child is provably not reaped: a pid somebody else
 * reaped may name another process by now.  To the child itself through its
 * pidfd when there is one (the kernel refuses a reaped process); otherwise
 * after cancelk_child_unreaped said yes, SIGCHLD blocked in this thread
 * between the check and the kill so no handler of this thread reaps it in
 * between.  1 sent; 0 nothing to send it to (reaped by somebody else, or
 * nothing left in the group); -1 on error. */
int cancelk_signal_child(int pid, int pidfd, int sig, int group)
{
	sigset_t block, saved;
	int rc, unreaped, saved_errno;

	if (pid <= 1) {
		errno = EINVAL;
		return -1;
	}
#ifdef __linux__
	if (pidfd >= 0 && !group) {
		if (syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0) == 0)
			return 1;
		return errno == ESRCH ? 0 : -1;
	}
#endif
	sigemptyset(&block);
	sigaddset(&block, SIGCHLD);
	if (sigprocmask(SIG_BLOCK, &block, &saved) != 0)
		return -1;
	unreaped = cancelk_child_unreaped(pid, pidfd);
	rc = unreaped;
	if (unreaped == 1) {
		if ((group ? kill(-pid, sig) : kill(pid, sig)) == 0)
			rc = 1;
		else
			rc = errno == ESRCH ? 0 : -1;
	}
	saved_errno = errno;
	sigprocmask(SIG_SETMASK, &saved, NULL);
	errno = saved_errno;
	return rc;
}

/* Wait until the caller's child has stopped (after a SIGSTOP) or exited,
 * leaving it unreaped.  0 when it has; 0 too when somebody else reaped it
 * (ECHILD: nothing is left to wait for); -1 on another error. */
int cancelk_wait_stopped(int pid, int pidfd)
{
	return peek_child(pid, pidfd, WSTOPPED | WEXITED) < 0 ? -1 : 0;
}

/* The job words live in a MAP_SHARED page seen by the user process, the
 * supervisor and the runners; sequentially consistent atomics make a
 * compare-and-swap the single point that decides "finished" vs "killed". */
int64_t cancelk_word_load(int64_t *word)
{
	return __atomic_load_n(word, __ATOMIC_SEQ_CST);
}

void cancelk_word_store(int64_t *word, int64_t value)
{
	__atomic_store_n(word, value, __ATOMIC_SEQ_CST);
}

int cancelk_word_cas(int64_t *word, int64_t expected, int64_t desired)
{
	return __atomic_compare_exchange_n(word, &expected, desired, 0,
					   __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
