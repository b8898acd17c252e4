/* `uffd-async` mode: userfaultfd asynchronous write-protect (Linux 6.7+).
 * A write to a protected page is resolved by the kernel itself, which just
 * clears the page's write-protect bit: no signal, no fault thread. Reading
 * the written pages and protecting them again is one PAGEMAP_SCAN call
 * (PM_SCAN_WP_MATCHING), so no write can slip between the two.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

static int async_fd = -1;
static pid_t async_pid;

void pf_uffd_async_forget_after_fork(void)
{
    if (async_fd >= 0)
        close(async_fd);
    async_fd = -1;
}

static int async_descriptor(void)
{
    if (async_fd >= 0 && async_pid == getpid())
        return async_fd;
    int supported = 0, user_mode_only = 0;
    int probe_fd = pf_uffd_open(0, &supported, &user_mode_only);
    if (probe_fd < 0) {
        pf_oserror("userfaultfd");
        return -1;
    }
    close(probe_fd);
    int want = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
               (supported & UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
    int fd = pf_uffd_open(want, NULL, &user_mode_only);
    if (fd < 0) {
        pf_oserror("ioctl(UFFDIO_API, WP_ASYNC)");
        return -1;
    }
    async_fd = fd;
    async_pid = getpid();
    return fd;
}

static int async_attach(pf_range *r)
{
    int fd = async_descriptor();
    if (fd < 0)
        return -1;
    return pf_uffd_register(fd, r, 0, atomic_load(&r->n_pages));
}

static int async_arm(pf_range *r, size_t first, size_t count)
{
    int fd = async_descriptor();
    if (fd < 0)
        return -1;
    if (pf_uffd_register(fd, r, first, count) != 0)
        return -1;
    pf_keep_out_of_ksm(r, first, count);
    return pf_uffd_protect(fd, r, first, count, 1);
}

static int async_arm(pf_range *r, size_t first, size_t count);

/* EPERM from PM_SCAN_CHECK_WPASYNC: part of the range is no longer
 * registered, because something mapped new memory over it behind pagefork's
 * back (mmap MAP_FIXED, mremap). What was written there is unknowable: every
 * page counts as written, and the range is registered and protected again
 * before the flags are read, so later writes are seen. */
static int async_collect(pf_range *r)
{
    size_t n = atomic_load(&r->n_pages);
    struct pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    arg.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC;
    arg.category_mask = PAGE_IS_WRITTEN;
    arg.return_mask = PAGE_IS_WRITTEN;
    if (pf_pagemap_scan(r->start, r->start + n * pf_page_size, &arg, r->global) >= 0)
        return 0;
    if (errno != EPERM) {
        pf_oserror("ioctl(PAGEMAP_SCAN)");
        return -1;
    }
    memset(r->global, 1, n);
    return async_arm(r, 0, n);
}

static int async_disarm(pf_range *r, size_t first, size_t count)
{
    (void)r;
    (void)first;
    (void)count;
    return 0; /* unregistering (detach) drops the protection */
}

static int async_detach(pf_range *r, size_t first, size_t count)
{
    return pf_uffd_unregister(async_fd, r, first, count);
}

const pf_mode_ops pf_uffd_async_ops = {
    .attach = async_attach,
    .arm = async_arm,
    .disarm = async_disarm,
    .collect = async_collect,
    .detach = async_detach,
    .shared_across_fork = 1,
};
