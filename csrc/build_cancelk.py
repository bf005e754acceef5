"""cffi build script for the cancelk._cancelk_core extension (API mode, abi3)."""

from __future__ import annotations

import pathlib

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
SOURCES = ["backend.c", "proc.c", "tree.c", "loop.c", "loop_epoll.c", "loop_poll.c"]

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define CANCELK_BACKEND_PIDFD 1
    #define CANCELK_BACKEND_POSIX 2
    #define CANCELK_TOKEN_DEADLINE -1
    #define CANCELK_STEP_QUERY_SIGNALS 1
    #define CANCELK_STEP_OWN_GROUP 2
    #define CANCELK_STEP_SUBREAPER 3
    #define CANCELK_STEP_DIE_WITH_PARENT 4

    int cancelk_pidfd_supported(void);

    int64_t cancelk_monotonic_ns(void);
    int cancelk_pidfd_open(int pid);
    int cancelk_pidfd_send_signal(int pidfd, int sig);
    int cancelk_kill_group(int pgid, int sig);
    int cancelk_kill_pid(int pid, int sig);
    int cancelk_become_group_leader(void);
    int cancelk_signal_dispositions(uint64_t *handled, uint64_t *ignored);
    int cancelk_set_child_subreaper(void);
    int cancelk_become_job_process(int parent, uint64_t *dispositions);
    int cancelk_reap(int pid, int nohang, int *status);
    int cancelk_has_exited(int pid);
    int64_t cancelk_word_load(int64_t *word);
    void cancelk_word_store(int64_t *word, int64_t value);
    int cancelk_word_cas(int64_t *word, int64_t expected, int64_t desired);

    int cancelk_list_children(int parent, int *out, int max);
    int cancelk_kill_descendants(int root, int max_rounds);
    int cancelk_die_with_parent(int parent);

    struct cancelk_loop;
    struct cancelk_loop *cancelk_loop_new(int backend);
    void cancelk_loop_free(struct cancelk_loop *loop);
    int cancelk_loop_add_fd(struct cancelk_loop *loop, int fd, int64_t token);
    int cancelk_loop_remove_fd(struct cancelk_loop *loop, int fd);
    int cancelk_loop_add_child(struct cancelk_loop *loop, int pid, int64_t token);
    int cancelk_loop_remove_child(struct cancelk_loop *loop, int pid);
    int cancelk_loop_wait(struct cancelk_loop *loop, int64_t deadline_ns,
                          int64_t *tokens, int max_tokens);
    """
)
ffibuilder.set_source(
    "cancelk._cancelk_core",
    '#include "cancelk.h"',
    sources=[str(HERE / name) for name in SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=["-std=gnu99", "-Wall", "-Wextra", "-O2"],
    py_limited_api=True,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
