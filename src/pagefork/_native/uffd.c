/* `uffd` mode: userfaultfd synchronous write-protect. One native thread per
 * process reads fault events, marks the page for the process and for the
 * faulting thread (UFFD_FEATURE_THREAD_ID), then un-protects the page, which
 * wakes the faulting thread. Kernel writes into tracked memory fault like
 * user writes and are handled the same way, except under UFFD_USER_MODE_ONLY
 * (used when the process may not handle kernel faults), where they fail with
 * EFAULT. Also holds the descriptor helpers shared with uffd_async.c.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static int open_raw(int *user_mode_only)
{
    *user_mode_only = 0;
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == EPERM) {
        /* vm.unprivileged_userfaultfd=0: unprivileged processes may still
         * handle faults raised in user mode. */
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
        *user_mode_only = fd >= 0;
    }
    return fd;
}

/* Features pagefork may use; tests clear bits to act like older kernels. */
int pf_uffd_feature_mask = ~0;

int pf_uffd_open(int features, int *got_features, int *user_mode_only)
{
    int fd = open_raw(user_mode_only);
    if (fd < 0)
        return -1;
    struct uffdio_api api = {.api = UFFD_API, .features = (__u64)features};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    if (got_features != NULL) /* UFFDIO_API reports every feature the kernel has */
        *got_features = (int)api.features & pf_uffd_feature_mask;
    return fd;
}

/* _native.uffd_probe() -> (errno, supported_features, user_mode_only) */
PyObject *pf_uffd_probe(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    int user_mode_only = 0, features = 0;
    int fd = pf_uffd_open(0, &features, &user_mode_only);
    if (fd < 0)
        return Py_BuildValue("(iii)", errno, 0, user_mode_only);
    close(fd);
    return Py_BuildValue("(iii)", 0, features, user_mode_only);
}

int pf_uffd_register(int fd, pf_range *r, size_t first, size_t count)
{
    if (count == 0)
        return 0;
    struct uffdio_register reg = {
        .range = {.start = r->start + first * pf_page_size, .len = count * pf_page_size},
        .mode = UFFDIO_REGISTER_MODE_WP,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0) {
        pf_oserror("ioctl(UFFDIO_REGISTER)");
        return -1;
    }
    return 0;
}

int pf_uffd_unregister(int fd, pf_range *r, size_t first, size_t count)
{
    if (count == 0 || fd < 0)
        return 0;
    struct uffdio_range range = {.start = r->start + first * pf_page_size, .len = count * pf_page_size};
    if (ioctl(fd, UFFDIO_UNREGISTER, &range) != 0) {
        pf_oserror("ioctl(UFFDIO_UNREGISTER)");
        return -1;
    }
    return 0;
}

int pf_uffd_protect(int fd, pf_range *r, size_t first, size_t count, int protect)
{
    if (count == 0)
        return 0;
    struct uffdio_writeprotect wp = {
        .range = {.start = r->start + first * pf_page_size, .len = count * pf_page_size},
        .mode = protect ? UFFDIO_WRITEPROTECT_MODE_WP : 0,
    };
    for (;;) {
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN) /* EAGAIN: raced with a page-table change */
            break;
    }
    pf_oserror("ioctl(UFFDIO_WRITEPROTECT)");
    return -1;
}

/* ---- the synchronous mode ------------------------------------------------ */

static int sync_fd = -1;
static pid_t sync_pid;
static int sync_features;
static int sync_user_mode_only;

static void *fault_thread(void *arg)
{
    int fd = (int)(intptr_t)arg;
    struct uffd_msg msgs[64];
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        ssize_t n = read(fd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            return NULL;
        }
        for (size_t i = 0; i < (size_t)n / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uintptr_t addr = (uintptr_t)msgs[i].arg.pagefault.address;
            uintptr_t page = addr & ~(uintptr_t)(pf_page_size - 1);
            pf_range *r = pf_registry_acquire(addr, PF_MODE_UFFD);
            if (r != NULL)
                pf_range_mark(r, addr, (pid_t)msgs[i].arg.pagefault.feat.ptid);
            struct uffdio_writeprotect wp = {.range = {.start = page, .len = pf_page_size}, .mode = 0};
            while (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) != 0 && errno == EAGAIN)
                ;
            /* Whatever happened (the range may be gone), never leave the
             * faulting thread asleep. */
            struct uffdio_range wake = {.start = page, .len = pf_page_size};
            ioctl(fd, UFFDIO_WAKE, &wake);
            if (r != NULL)
                pf_registry_release(r);
        }
    }
}

/* In a forked child the descriptors are the parent's userfaultfd: every
 * ioctl on them would act on the parent's memory. Drop the child's copies
 * (the parent keeps its own); the child opens its own when it tracks. */
void pf_uffd_forget_after_fork(void)
{
    if (sync_fd >= 0)
        close(sync_fd);
    sync_fd = -1;
}

static int sync_descriptor(void)
{
    if (sync_fd >= 0 && sync_pid == getpid())
        return sync_fd;
    int supported = 0, user_mode_only = 0;
    int probe_fd = pf_uffd_open(0, &supported, &user_mode_only);
    if (probe_fd < 0) {
        pf_oserror("userfaultfd");
        return -1;
    }
    close(probe_fd);
    int want = UFFD_FEATURE_THREAD_ID |
               (supported & (UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM));
    int fd = pf_uffd_open(want, NULL, &user_mode_only);
    if (fd < 0) {
        pf_oserror("ioctl(UFFDIO_API)");
        return -1;
    }
    /* The thread must never take a signal meant for Python code. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_t thread;
    int err = pthread_create(&thread, NULL, fault_thread, (void *)(intptr_t)fd);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        close(fd);
        pf_oserror_errno(err, "pthread_create");
        return -1;
    }
    pthread_detach(thread);
    sync_features = want; /* what this descriptor was opened with */
    sync_user_mode_only = user_mode_only;
    sync_fd = fd;
    sync_pid = getpid();
    return fd;
}

int pf_uffd_kernel_writes_fail(void)
{
    return sync_fd >= 0 && sync_pid == getpid() && sync_user_mode_only;
}

static int uffd_attach(pf_range *r)
{
    int fd = sync_descriptor();
    if (fd < 0)
        return -1;
    return pf_uffd_register(fd, r, 0, atomic_load(&r->n_pages));
}

/* KSM merging a page replaces its PTE without the write-protect bit: keep
 * tracked memory out of KSM (a no-op unless it was made mergeable). */
void pf_keep_out_of_ksm(pf_range *r, size_t first, size_t count)
{
    if (count > 0)
        madvise((void *)(r->start + first * pf_page_size), count * pf_page_size, MADV_UNMERGEABLE);
}

static int uffd_arm(pf_range *r, size_t first, size_t count)
{
    int fd = sync_descriptor();
    if (fd < 0)
        return -1;
    if (pf_uffd_register(fd, r, first, count) != 0)
        return -1;
    pf_keep_out_of_ksm(r, first, count);
    if (!(sync_features & UFFD_FEATURE_WP_UNPOPULATED) && !r->shared && count > 0) {
        /* Without WP_UNPOPULATED a never-touched page has no PTE to protect:
         * map the zero page everywhere first (Linux 5.14+). */
        madvise((void *)(r->start + first * pf_page_size), count * pf_page_size, MADV_POPULATE_READ);
    }
    return pf_uffd_protect(fd, r, first, count, 1);
}

static int uffd_disarm(pf_range *r, size_t first, size_t count)
{
    /* Registered first: a hole left unprotected (exempt.c) in memory mapped
     * afresh was never registered, and un-protecting needs it. Registering
     * a registered range again is a no-op. */
    if (pf_uffd_register(sync_fd, r, first, count) != 0)
        return -1;
    return pf_uffd_protect(sync_fd, r, first, count, 0);
}

/* Pages can lose their protection without a fault: MADV_DONTNEED (or
 * MADV_FREE then reclaim) on anonymous memory drops the PTE and its
 * write-protect bit together, so the next write populates the page
 * unprotected and unseen. Such pages read as unprotected in the pagemap:
 * for the process scope every unprotected page is a written (or zeroed) one,
 * since the fault handler marks each page it un-protects. A thread cannot be
 * told apart: pages still unpopulated are added to every tracked thread
 * (they changed: they read as zeroes now); pages written meanwhile only to
 * the process scope (documented). */
static int uffd_collect(pf_range *r)
{
    size_t n = atomic_load(&r->n_pages);
    if (atomic_load(&r->global_active) &&
        pf_pagemap_find(r->start, n, PF_PAGEMAP_UNPROTECTED, r->global) < 0) {
        pf_oserror("read(/proc/self/pagemap)");
        return -1;
    }
    if (atomic_load(&r->threads_active) == 0 || n == 0)
        return 0;
    uint8_t *zapped = calloc(n, 1);
    if (zapped == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    ssize_t found = pf_pagemap_find(r->start, n, PF_PAGEMAP_ZAPPED, zapped);
    if (found < 0) {
        free(zapped);
        pf_oserror("read(/proc/self/pagemap)");
        return -1;
    }
    for (int i = 0; found > 0 && i < PF_MAX_THREADS; i++) {
        pf_thread_slot *s = &r->threads[i];
        if (atomic_load(&s->tid) != 0 && atomic_load(&s->active))
            for (size_t p = 0; p < n; p++)
                s->flags[p] |= zapped[p];
    }
    free(zapped);
    return 0;
}

static int uffd_detach(pf_range *r, size_t first, size_t count)
{
    return pf_uffd_unregister(sync_fd, r, first, count);
}

const pf_mode_ops pf_uffd_ops = {
    .attach = uffd_attach,
    .arm = uffd_arm,
    .disarm = uffd_disarm,
    .collect = uffd_collect,
    .detach = uffd_detach,
    .shared_across_fork = 1,
};
