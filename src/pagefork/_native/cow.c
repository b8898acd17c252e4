/* `cow` mode: memory mapped MAP_PRIVATE from a memfd (a snapshot). A page the
 * program wrote is one the kernel copied: mapped, and no longer the file's
 * page. Tracking costs nothing beyond the copy itself, and it cannot be
 * re-armed except by mapping the file again, so `arm` only checks that no
 * page has been copied yet.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>

static int cow_attach(pf_range *r)
{
    (void)r;
    return 0;
}

static int cow_arm(pf_range *r, size_t first, size_t count)
{
    ssize_t copied = pf_pagemap_find(r->start + first * pf_page_size, count, PF_PAGEMAP_COW,
                                     r->global + first);
    if (copied < 0) {
        pf_oserror("read(/proc/self/pagemap)");
        return -1;
    }
    if (copied > 0) {
        memset(r->global + first, 0, count); /* the check used the flags as scratch */
        char message[200];
        snprintf(message, sizeof message,
                 "cow: %zd page(s) of this memory are already private copies", copied);
        PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", EBUSY, message);
        if (exc != NULL) {
            PyErr_SetObject(PyExc_OSError, exc);
            Py_DECREF(exc);
        }
        return -1;
    }
    return 0;
}

static int cow_disarm(pf_range *r, size_t first, size_t count)
{
    (void)r;
    (void)first;
    (void)count;
    return 0;
}

static int cow_collect(pf_range *r)
{
    if (pf_pagemap_find(r->start, atomic_load(&r->n_pages), PF_PAGEMAP_COW, r->global) < 0) {
        pf_oserror("read(/proc/self/pagemap)");
        return -1;
    }
    return 0;
}

static int cow_detach(pf_range *r, size_t first, size_t count)
{
    (void)r;
    (void)first;
    (void)count;
    return 0;
}

const pf_mode_ops pf_cow_ops = {
    .attach = cow_attach,
    .arm = cow_arm,
    .disarm = cow_disarm,
    .collect = cow_collect,
    .detach = cow_detach,
};

/* _native.new_mappings_locked() -> bool: whether private memory mapped now
 * is locked and populated as it is mapped (mlockall(MCL_FUTURE) without
 * MCL_ONFAULT). Populating a private writable mapping breaks copy-on-write
 * of every page at once, so a snapshot mapped then is all private copies
 * and cow cannot tell which pages the program writes. One untouched page
 * of fresh anonymous memory is resident only if it was populated. */
PyObject *pf_new_mappings_locked(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    void *p = mmap(NULL, pf_page_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        if (errno == EAGAIN) /* locked, past RLIMIT_MEMLOCK */
            Py_RETURN_TRUE;
        return pf_oserror("mmap");
    }
    unsigned char resident = 0;
    int rc = mincore(p, pf_page_size, &resident);
    int err = errno;
    munmap(p, pf_page_size);
    if (rc != 0)
        return pf_oserror_errno(err, "mincore");
    return PyBool_FromLong(resident & 1);
}
