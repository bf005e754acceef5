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
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cancelk.h"

#ifdef __linux__
struct proc_entry {
	int pid;
	int ppid;
	char state;
};

struct proc_table {
	struct proc_entry *entries;
	int count, cap;
};

/* Parse "pid (comm) S ppid ..."; comm may hold spaces and parentheses, so
 * the fields after it start at the last ')'. */
static int read_stat(int dir_fd, const char *name, struct proc_entry *entry)
{
	char path[64], buf[512], *close_paren;
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/stat", name);
	fd = openat(dir_fd, path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	close_paren = strrchr(buf, ')');
	if (!close_paren || close_paren[1] != ' ' || !close_paren[2])
		return -1;
	entry->pid = atoi(buf);
	entry->state = close_paren[2];
	entry->ppid = atoi(close_paren + 4);
	return 0;
}

static int scan_proc(struct proc_table *table)
{
	struct dirent *d;
	DIR *dir;

	table->count = 0;
	dir = opendir("/proc");
	if (!dir)
		return -1;
	while ((d = readdir(dir)) != NULL) {
		if (!isdigit((unsigned char)d->d_name[0]))
			continue;
		if (table->count == table->cap) {
			int cap = table->cap ? table->cap * 2 : 512;
			void *p = realloc(table->entries, (size_t)cap * sizeof(*table->entries));

			if (!p) {
				closedir(dir);
				errno = ENOMEM;
				return -1;
			}
			table->entries = p;
			table->cap = cap;
		}
		/* A process may exit between readdir and open: skip it. */
		if (read_stat(dirfd(dir), d->d_name, &table->entries[table->count]) == 0)
			table->count++;
	}
	closedir(dir);
	return 0;
}

static int contains(const int *pids, int n, int pid)
{
	int i;

	for (i = 0; i < n; i++)
		if (pids[i] == pid)
			return 1;
	return 0;
}

int cancelk_list_children(int parent, int *out, int max)
{
	struct proc_table table = { NULL, 0, 0 };
	int i, n = 0;

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

int cancelk_kill_descendants(int root, int max_rounds)
{
	struct proc_table table = { NULL, 0, 0 };
	int tree[4096], killed[4096];
	int nkilled = 0, round, n, i, fresh;

	if (root <= 1) {
		errno = EINVAL;
		return -1;
	}
	/* Each round kills what it finds that was not killed yet.  A process
	 * with SIGKILL pending can no longer fork, so the rounds converge;
	 * children forked just before a kill are found through their parent. */
	for (round = 0; round < max_rounds; round++) {
		if (scan_proc(&table) != 0) {
			free(table.entries);
			return -1;
		}
		n = collect_descendants(&table, root, tree, 4096);
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
#else
int cancelk_list_children(int parent, int *out, int max)
{
	(void)parent;
	(void)out;
	(void)max;
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
#endif
