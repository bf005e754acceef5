/*
 * Process trees (Linux): list a process's children and kill every
 * descendant of a process, including those that left its process group.
 *
 * There is no system call for "my descendants"; /proc/<pid>/stat gives each
 * process's parent, so a tree is a scan of /proc.  A descendant that daemonizes
 * (setsid, double fork) stays in the tree only if an ancestor is a child
 * subreaper, which cancelk's job processes are.
 *
 * Elsewhere these report ENOSYS and callers fall back to process groups.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cancelk.h"

#ifdef __linux__
/* Linux-only headers: macOS has neither prctl(2) nor getdents64(2). */
#include <sys/prctl.h>
#include <sys/syscall.h>

struct proc_entry {
	int pid;
	int ppid;
	char state;
	int64_t rss_pages;	/* resident set size, field 24 of stat */
};

struct proc_table {
	struct proc_entry *entries;
	int count, cap;
};

static int parse_pid(const char *s)
{
	int n = 0;

	if (*s < '0' || *s > '9')
		return -1;
	while (*s >= '0' && *s <= '9')
		n = n * 10 + (*s++ - '0');
	return *s ? -1 : n;
}

/* Read /proc/<name>/stat, "pid (comm) S ppid ...": comm may hold spaces and
 * parentheses, so the fields after it start at the last ')'.  No malloc or
 * stdio: the parent-death handler below uses it too. */
static int read_stat(int proc_fd, const char *name, struct proc_entry *entry)
{
	char path[64], buf[512], *close_paren = NULL, *p;
	size_t len = 0;
	ssize_t n, i;
	int fd;

	while (name[len] && len < sizeof(path) - sizeof("/stat"))
		path[len] = name[len], len++;
	memcpy(path + len, "/stat", sizeof("/stat"));
	fd = openat(proc_fd, path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	for (i = 0; i < n; i++)
		if (buf[i] == ')')
			close_paren = buf + i;
	if (!close_paren || close_paren[1] != ' ' || !close_paren[2] || close_paren[3] != ' ')
		return -1;
	entry->pid = parse_pid(name);
	entry->state = close_paren[2];
	entry->ppid = 0;
	for (p = close_paren + 4; *p >= '0' && *p <= '9'; p++)
		entry->ppid = entry->ppid * 10 + (*p - '0');
	entry->rss_pages = 0;
	/* From field 4 (ppid) on to field 24 (rss): 20 more separators. */
	for (i = 0; *p && i < 20; p++)
		if (*p == ' ')
			i++;
	for (; *p >= '0' && *p <= '9'; p++)
		entry->rss_pages = entry->rss_pages * 10 + (*p - '0');
	return entry->pid > 0 ? 0 : -1;
}

/* getdents64(2) record: readdir() may allocate, which the parent-death
 * handler below must not. */
struct raw_dirent64 {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

/* Call visit() with every process in /proc, until it returns non-zero.
 * Async-signal-safe (open, getdents64, read, close; no malloc or stdio), so
 * the tree scans and the parent-death handler share it.  Returns visit()'s
 * non-zero result, 0 when all were visited, or -1 with errno set. */
static int walk_proc(int (*visit)(const struct proc_entry *, void *), void *ctx)
{
	char buf[4096];
	long n, off;
	int dir, rc = 0, saved;

	dir = open("/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dir < 0)
		return -1;
	while (rc == 0 && (n = syscall(SYS_getdents64, dir, buf, sizeof(buf))) > 0) {
		for (off = 0; off < n && rc == 0;) {
			struct raw_dirent64 *d = (struct raw_dirent64 *)(buf + off);
			struct proc_entry entry;

			off += d->d_reclen;
			if (d->d_name[0] < '0' || d->d_name[0] > '9')
				continue;
			/* A process may exit between the listing and the read: skip it. */
			if (read_stat(dir, d->d_name, &entry) == 0)
				rc = visit(&entry, ctx);
		}
	}
	if (rc == 0 && n < 0)
		rc = -1;
	saved = errno;
	close(dir);
	errno = saved;
	return rc;
}

static int add_to_table(const struct proc_entry *entry, void *ctx)
{
	struct proc_table *table = ctx;

	if (table->count == table->cap) {
		int cap = table->cap ? table->cap * 2 : 512;
		void *p = realloc(table->entries, (size_t)cap * sizeof(*table->entries));

		if (!p) {
			errno = ENOMEM;
			return -1;
		}
		table->entries = p;
		table->cap = cap;
	}
	table->entries[table->count++] = *entry;
	return 0;
}

static int scan_proc(struct proc_table *table)
{
	table->count = 0;
	return walk_proc(add_to_table, table);
}

static int contains(const int *pids, int n, int pid)
{
	int i;

	for (i = 0; i < n; i++)
		if (pids[i] == pid)
			return 1;
	return 0;
}

/* Resident pages of one process (statm, second field); 0 once it is gone. */
static int64_t statm_pages(int pid)
{
	char path[64], buf[128];
	int64_t pages = 0;
	ssize_t n;
	char *p;
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/statm", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return 0;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 0;
	buf[n] = '\0';
	p = strchr(buf, ' ');
	if (!p)
		return 0;
	for (p++; *p >= '0' && *p <= '9'; p++)
		pages = pages * 10 + (*p - '0');
	return pages;
}

/* Append the children of every thread of pid to tree[] (from /proc/pid/task/
 * <tid>/children); the new count, or -1 with errno ENOSYS when the kernel has
 * no children files.  A child forked meanwhile is found at the next sample. */
static int append_children(int pid, int *tree, int n, int max)
{
	char path[96], buf[4096], *p;
	struct dirent *task;
	ssize_t got;
	DIR *tasks;
	int fd, child, seen = 0;

	snprintf(path, sizeof(path), "/proc/%d/task", pid);
	tasks = opendir(path);
	if (!tasks)
		return n; /* it exited: no children left to count */
	while ((task = readdir(tasks)) != NULL && n < max) {
		int tid = parse_pid(task->d_name);

		if (tid <= 0)
			continue;
		snprintf(path, sizeof(path), "/proc/%d/task/%d/children", pid, tid);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			if (errno == ENOENT && !seen) {
				closedir(tasks);
				errno = ENOSYS;
				return -1;
			}
			continue;
		}
		seen = 1;
		got = read(fd, buf, sizeof(buf) - 1);
		close(fd);
		if (got <= 0)
			continue;
		buf[got] = '\0';
		for (p = buf; *p && n < max;) {
			for (child = 0; *p >= '0' && *p <= '9'; p++)
				child = child * 10 + (*p - '0');
			if (child > 0)
				tree[n++] = child;
			while (*p && (*p < '0' || *p > '9'))
				p++;
		}
	}
	closedir(tasks);
	return n;
}

/* Every descendant of root (not root itself) into tree[], walking down the
 * children files; how many, or -1 (ENOSYS) when the kernel has none.  The
 * files may miss a child forked or reparented while they are read: callers
 * repeat until nothing new turns up, and a subreaper's sweep catches the
 * rest.  The cost follows the size of the tree, not the number of processes
 * on the host, which a scan of /proc pays. */
static int descendants_by_children(int root, int *tree, int max)
{
	int n, i;

	n = append_children(root, tree, 0, max);
	for (i = 0; i < n && n >= 0; i++)
		n = append_children(tree[i], tree, n, max);
	return n;
}

int cancelk_list_children(int parent, int *out, int max)
{
	struct proc_table table = { NULL, 0, 0 };
	int i, n = append_children(parent, out, 0, max);

	if (n >= 0)
		return n;
	n = 0;
	if (scan_proc(&table) != 0) {
		free(table.entries);
		return -1;
	}
	for (i = 0; i < table.count && n < max; i++)
		if (table.entries[i].ppid == parent)
			out[n++] = table.entries[i].pid;
	free(table.entries);
	return n;
}

/* Mark every descendant of root in tree[] (pids in scan order); returns how many. */
static int collect_descendants(const struct proc_table *table, int root, int *tree, int max)
{
	int n = 0, grew = 1, i;

	while (grew) {
		grew = 0;
		for (i = 0; i < table->count; i++) {
			const struct proc_entry *e = &table->entries[i];

			if (e->pid == root || contains(tree, n, e->pid))
				continue;
			if (e->ppid == root || contains(tree, n, e->ppid)) {
				if (n == max)
					return n;
				tree[n++] = e->pid;
				grew = 1;
			}
		}
	}
	return n;
}

static int64_t rss_of(const struct proc_table *table, int pid)
{
	int i;

	for (i = 0; i < table->count; i++)
		if (table->entries[i].pid == pid)
			return table->entries[i].rss_pages;
	return 0; /* exited between the listing and now */
}

/* The whole tree by one scan of /proc: used where children files are missing. */
static int tree_rss_by_scan(const int *roots, int nroots, int64_t *rss_pages)
{
	struct proc_table table = { NULL, 0, 0 };
	int tree[4096];
	int r, i, n;

	if (scan_proc(&table) != 0) {
		free(table.entries);
		return -1;
	}
	for (r = 0; r < nroots; r++) {
		rss_pages[r] = rss_of(&table, roots[r]);
		n = collect_descendants(&table, roots[r], tree, 4096);
		for (i = 0; i < n; i++)
			rss_pages[r] += rss_of(&table, tree[i]);
	}
	free(table.entries);
	return 0;
}

/* Resident memory of each root's tree.  A job's tree is walked down from its
 * root through the children files, so the cost follows the size of the jobs'
 * trees, not the number of processes on the host; without children files,
 * one scan of the whole of /proc serves every root. */
int cancelk_tree_rss(const int *roots, int nroots, int64_t *rss_bytes)
{
	int64_t page = (int64_t)sysconf(_SC_PAGESIZE);
	int tree[4096];
	int r, i, n;

	for (r = 0; r < nroots; r++) {
		n = descendants_by_children(roots[r], tree, 4096);
		if (n < 0)
			break;
		rss_bytes[r] = statm_pages(roots[r]);
		for (i = 0; i < n; i++)
			rss_bytes[r] += statm_pages(tree[i]);
		rss_bytes[r] *= page;
	}
	if (r == nroots)
		return 0;
	if (tree_rss_by_scan(roots, nroots, rss_bytes) != 0)
		return -1;
	for (r = 0; r < nroots; r++)
		rss_bytes[r] *= page;
	return 0;
}

/* Every descendant of every root into tree[]: through the children files,
 * or one scan of /proc for all roots where the kernel has none. */
static int collect_trees(struct proc_table *table, const int *roots, int nroots, int *tree,
			 int max)
{
	int r, n = 0, got;

	for (r = 0; r < nroots && n < max; r++) {
		got = descendants_by_children(roots[r], tree + n, max - n);
		if (got < 0)
			break;
		n += got;
	}
	if (r == nroots || n >= max)
		return n;
	if (scan_proc(table) != 0)
		return -1;
	for (r = 0, n = 0; r < nroots && n < max; r++)
		n += collect_descendants(table, roots[r], tree + n, max - n);
	return n;
}

int cancelk_kill_trees(const int *roots, int nroots, int max_rounds)
{
	struct proc_table table = { NULL, 0, 0 };
	int tree[4096], killed[4096];
	int nkilled = 0, round, n, i, r, fresh;

	for (r = 0; r < nroots; r++) {
		if (roots[r] <= 1) {
			errno = EINVAL;
			return -1;
		}
	}
	/* Each round kills what it finds that was not killed yet.  A process
	 * with SIGKILL pending can no longer fork, so the rounds converge;
	 * children forked just before a kill are found through their parent. */
	for (round = 0; round < max_rounds; round++) {
		n = collect_trees(&table, roots, nroots, tree, 4096);
		if (n < 0) {
			free(table.entries);
			return -1;
		}
		fresh = 0;
		for (i = 0; i < n; i++) {
			if (contains(killed, nkilled, tree[i]))
				continue;
			if (kill(tree[i], SIGKILL) == 0 && nkilled < 4096)
				killed[nkilled++] = tree[i];
			fresh++;
		}
		if (fresh == 0)
			break;
	}
	free(table.entries);
	return nkilled;
}

int cancelk_kill_descendants(int root, int max_rounds)
{
	return cancelk_kill_trees(&root, 1, max_rounds);
}

/*
 * Dying with the parent, tree and all.
 *
 * A job process asks for a signal when its parent (the supervisor, or the
 * host worker of killable_wrapper) dies.  Were that SIGKILL, what the job
 * started would pass to init.  So it is a real-time signal whose handler,
 * which runs in C whatever the job's Python is doing, first kills the job's
 * descendants: the job is a child subreaper, so every orphan of its tree
 * becomes its child; it kills its children, reaps them, and repeats until it
 * has none, then kills itself.
 *
 * The handler never returns and uses only async-signal-safe calls: open,
 * openat, read, close, getdents64, kill, waitpid, nanosleep.
 */
struct my_children {
	int me;
	int found;
};

static int kill_if_my_child(const struct proc_entry *entry, void *ctx)
{
	struct my_children *children = ctx;

	if (entry->ppid == children->me && entry->pid > 1 && entry->pid != children->me) {
		kill(entry->pid, SIGKILL);
		children->found++;
	}
	return 0;
}

/* SIGKILL every child of me, zombies included; how many, or -1. */
static int kill_children_raw(int me)
{
	struct my_children children = { me, 0 };

	int rc = walk_proc(kill_if_my_child, &children);

	/* A scan cut short still killed what it found: another round follows. */
	return children.found > 0 ? children.found : rc;
}

static void kill_tree_then_die(int sig)
{
	const struct timespec pause = { 0, 200000 };
	int me = getpid(), round;

	(void)sig;
	/* Bounded (about a second) in case a child cannot die, e.g. stuck in
	 * uninterruptible I/O: the job must die even then. */
	for (round = 0; round < 5000; round++) {
		int found = kill_children_raw(me);

		while (waitpid(-1, NULL, __WALL | WNOHANG) > 0)
			; /* reaped: its own children are ours now */
		if (found <= 0)
			break;
		nanosleep(&pause, NULL);
	}
	kill(me, SIGKILL);
	_exit(128 + SIGKILL);
}

int cancelk_die_with_parent(int parent)
{
	struct sigaction action;
	sigset_t guard;
	int sig = SIGRTMAX - 2; /* spare: glibc and Python use none of the top ones */

	memset(&action, 0, sizeof(action));
	action.sa_handler = kill_tree_then_die;
	sigfillset(&action.sa_mask);
	if (sigaction(sig, &action, NULL) != 0)
		return -1;
	sigemptyset(&guard);
	sigaddset(&guard, sig);
	if (sigprocmask(SIG_UNBLOCK, &guard, NULL) != 0)
		return -1;
	if (prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0) != 0)
		return -1;
	/* The parent may have died before the prctl: then nobody will signal
	 * us, but we were reparented, which getppid() shows. */
	if (getppid() != parent)
		return raise(sig);
	return 0;
}
#else
int cancelk_die_with_parent(int parent)
{
	(void)parent;
	errno = ENOSYS;
	return -1;
}

int cancelk_list_children(int parent, int *out, int max)
{
	(void)parent;
	(void)out;
	(void)max;
	errno = ENOSYS;
	return -1;
}

int cancelk_kill_trees(const int *roots, int nroots, int max_rounds)
{
	(void)roots;
	(void)nroots;
	(void)max_rounds;
	errno = ENOSYS;
	return -1;
}

int cancelk_kill_descendants(int root, int max_rounds)
{
	(void)root;
	(void)max_rounds;
	errno = ENOSYS;
	return -1;
}

int cancelk_tree_rss(const int *roots, int nroots, int64_t *rss_bytes)
{
	(void)roots;
	(void)nroots;
	(void)rss_bytes;
	errno = ENOSYS;
	return -1;
}
#endif
