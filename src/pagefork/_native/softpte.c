/* `softpte` mode: soft-dirty PTE bits. Writing "4" to /proc/self/clear_refs
 * clears the bit on every page of the process (and write-protects the PTEs so
 * the next write sets it again); the bit is read from the pagemap. Clearing is
 * process-wide, so before clearing for one range the bits of every other
 * softpte range are collected into its flags: ranges stay independent, at
 * the cost of one pagemap read each. Needs CONFIG_MEM_SOFT_DIRTY (x86-64,
 * not arm64 before Linux 6.x distributions enable it).
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <fcntl.h>
#include <unistd.h>

static void collect_quietly(pf_range *r)
{
    pf_pagemap_find(r->start, atomic_load(&r->n_pages), PF_PAGEMAP_SOFT_DIRTY, r->global);
}

static int clear_soft_dirty(void)
{
    int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        pf_oserror("open(/proc/self/clear_refs)");
        return -1;
    }
    ssize_t n = write(fd, "4", 1);
    int err = errno;
    close(fd);
    if (n != 1) {
        pf_oserror_errno(n < 0 ? err : EIO, "write(/proc/self/clear_refs)");
        return -1;
    }
    return 0;
}

static int softpte_attach(pf_range *r)
{
    (void)r;
    return 0;
}

static int softpte_arm(pf_range *r, size_t first, size_t count)
{
    (void)count;
    if (first != 0)
        return 0; /* pages added by a resize have never been written */
    pf_registry_foreach(PF_MODE_SOFTPTE, r, collect_quietly);
    return clear_soft_dirty();
}

static int softpte_disarm(pf_range *r, size_t first, size_t count)
{
    (void)r;
    (void)first;
    (void)count;
    return 0;
}

static int softpte_collect(pf_range *r)
{
    if (pf_pagemap_find(r->start, atomic_load(&r->n_pages), PF_PAGEMAP_SOFT_DIRTY, r->global) < 0) {
        pf_oserror("read(/proc/self/pagemap)");
        return -1;
    }
    return 0;
}

static int softpte_detach(pf_range *r, size_t first, size_t count)
{
    (void)r;
    (void)first;
    (void)count;
    return 0;
}

const pf_mode_ops pf_softpte_ops = {
    .attach = softpte_attach,
    .arm = softpte_arm,
    .disarm = softpte_disarm,
    .collect = softpte_collect,
    .detach = softpte_detach,
};
