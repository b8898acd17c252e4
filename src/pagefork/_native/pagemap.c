/* Reading page state from /proc/self/pagemap: the PAGEMAP_SCAN ioctl
 * (Linux 6.7+) returns runs of matching pages in one call; older kernels get
 * the same answer from the 64-bit pagemap entries. */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#define PM_ENTRY_PRESENT (1ULL << 63)
#define PM_ENTRY_SWAPPED (1ULL << 62)
#define PM_ENTRY_FILE (1ULL << 61)
#define PM_ENTRY_UFFD_WP (1ULL << 57)
#define PM_ENTRY_SOFT_DIRTY (1ULL << 55)

static int pagemap_fd = -1;
static pid_t pagemap_pid;
static int scan_state = -1; /* -1 unknown, 0 missing, 1 works */
int pf_pagemap_scan_disabled; /* tests force the fallback path */

/* /proc/self is resolved at open(): a forked child must reopen it. */
static int get_pagemap_fd(void)
{
    pid_t pid = getpid();
    if (pagemap_fd >= 0 && pagemap_pid == pid)
        return pagemap_fd;
    if (pagemap_fd >= 0 && pagemap_pid != pid)
        close(pagemap_fd);
    pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    pagemap_pid = pid;
    return pagemap_fd;
}

ssize_t pf_pagemap_scan(uintptr_t start, uintptr_t end, struct pm_scan_arg *tmpl, uint8_t *out)
{
    int fd = get_pagemap_fd();
    if (fd < 0)
        return -1;
    struct page_region vec[512];
    ssize_t found = 0;
    uintptr_t cursor = start;
    while (cursor < end) {
        struct pm_scan_arg arg = *tmpl;
        arg.size = sizeof arg;
        arg.start = cursor;
        arg.end = end;
        arg.vec = (uintptr_t)vec;
        arg.vec_len = sizeof vec / sizeof vec[0];
        long n = ioctl(fd, PAGEMAP_SCAN, &arg);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        for (long i = 0; i < n; i++) {
            size_t first = (vec[i].start - start) / pf_page_size;
            size_t last = (vec[i].end - start) / pf_page_size;
            if (out != NULL)
                memset(out + first, 1, last - first);
            found += (ssize_t)(last - first);
        }
        /* walk_end says how far the kernel got (it stops early when vec is
         * full); a walk that made no progress would loop forever. */
        if (arg.walk_end <= cursor) {
            errno = EIO;
            return -1;
        }
        cursor = arg.walk_end;
    }
    return found;
}

int pf_pagemap_scan_available(void)
{
    if (pf_pagemap_scan_disabled)
        return 0;
    if (scan_state < 0) {
        struct pm_scan_arg arg;
        memset(&arg, 0, sizeof arg);
        arg.category_anyof_mask = PAGE_IS_PRESENT;
        arg.return_mask = PAGE_IS_PRESENT;
        uint8_t dummy = 0;
        /* An empty range at a page-aligned address exercises the ioctl. */
        uintptr_t here = (uintptr_t)&dummy & ~(uintptr_t)(pf_page_size - 1);
        scan_state = pf_pagemap_scan(here, here + pf_page_size, &arg, NULL) >= 0;
    }
    return scan_state;
}

static ssize_t read_entries(uintptr_t start, size_t n_pages, int kind, uint8_t *out)
{
    int fd = get_pagemap_fd();
    if (fd < 0)
        return -1;
    uint64_t entries[1024];
    ssize_t found = 0;
    size_t done = 0;
    while (done < n_pages) {
        size_t want = n_pages - done;
        if (want > 1024)
            want = 1024;
        off_t where = (off_t)((start / pf_page_size + done) * sizeof(uint64_t));
        ssize_t got = pread(fd, entries, want * sizeof(uint64_t), where);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (got == 0 || got % sizeof(uint64_t) != 0) {
            errno = EIO;
            return -1;
        }
        size_t count = (size_t)got / sizeof(uint64_t);
        for (size_t i = 0; i < count; i++) {
            uint64_t e = entries[i];
            int mapped = (e & (PM_ENTRY_PRESENT | PM_ENTRY_SWAPPED)) != 0;
            int match = 0;
            switch (kind) {
            case PF_PAGEMAP_COW: /* KSM's zero page is not the file's either */
                match = mapped && !(e & PM_ENTRY_FILE);
                break;
            case PF_PAGEMAP_COW_PRESENT:
                match = (e & PM_ENTRY_PRESENT) && !(e & PM_ENTRY_FILE);
                break;
            case PF_PAGEMAP_SOFT_DIRTY:
                match = mapped && (e & PM_ENTRY_SOFT_DIRTY);
                break;
            case PF_PAGEMAP_UNPROTECTED:
                match = !(e & PM_ENTRY_UFFD_WP);
                break;
            case PF_PAGEMAP_ZAPPED:
                match = !mapped && !(e & PM_ENTRY_UFFD_WP);
                break;
            }
            if (match) {
                out[done + i] = 1;
                found++;
            }
        }
        done += count;
    }
    return found;
}

ssize_t pf_pagemap_find(uintptr_t start, size_t n_pages, int kind, uint8_t *out)
{
    if (n_pages == 0)
        return 0;
    if (!pf_pagemap_scan_available())
        return read_entries(start, n_pages, kind, out);
    struct pm_scan_arg arg;
    memset(&arg, 0, sizeof arg);
    switch (kind) {
    case PF_PAGEMAP_COW:
        /* Written = the kernel copied it: mapped and not the file's page. A
         * copy KSM merged into the shared zero page (all zeroes, not the
         * file's page either) shows as PFNZERO without PAGE_IS_FILE, so it
         * counts: reads of a private memfd mapping map the file's pages,
         * never the zero page. */
        arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        arg.category_inverted = PAGE_IS_FILE;
        arg.category_mask = PAGE_IS_FILE;
        arg.return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        break;
    case PF_PAGEMAP_COW_PRESENT:
        /* Under userfaultfd write-protection an unpopulated page of a file
         * mapping holds a marker that reads as swapped and not the file's:
         * only present pages tell a copy from a marker. */
        arg.category_inverted = PAGE_IS_FILE;
        arg.category_mask = PAGE_IS_PRESENT | PAGE_IS_FILE;
        arg.return_mask = PAGE_IS_PRESENT;
        break;
    case PF_PAGEMAP_SOFT_DIRTY:
        arg.category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        arg.category_mask = PAGE_IS_SOFT_DIRTY;
        arg.return_mask = PAGE_IS_SOFT_DIRTY;
        break;
    case PF_PAGEMAP_UNPROTECTED:
        arg.category_mask = PAGE_IS_WRITTEN;
        arg.return_mask = PAGE_IS_WRITTEN;
        break;
    case PF_PAGEMAP_ZAPPED:
        arg.category_inverted = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        arg.category_mask = PAGE_IS_WRITTEN | PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
        arg.return_mask = PAGE_IS_WRITTEN;
        break;
    }
    return pf_pagemap_scan(start, start + n_pages * pf_page_size, &arg, out);
}
