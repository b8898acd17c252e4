/* A worker's thread memory kept mapped across threads: which of its pages
 * are the process's own copies, so they can be put back to the snapshot's
 * bytes instead of being dropped and copied again on the next write.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <string.h>

/* private_pages(memory, out) -> count. `memory`: a page-aligned private
 * mapping of a file; out: one byte per page, set to 1 where the page is the
 * process's own copy (written, so copied by the kernel), else 0. */
PyObject *pf_private_pages(PyObject *self, PyObject *args)
{
    Py_buffer memory, out;
    if (!PyArg_ParseTuple(args, "y*w*", &memory, &out))
        return NULL;
    PyObject *result = NULL;
    size_t ps = pf_page_size;
    size_t n_pages = ((size_t)memory.len + ps - 1) / ps;
    if ((uintptr_t)memory.buf % ps != 0 || (size_t)out.len < n_pages) {
        PyErr_SetString(PyExc_ValueError, "private_pages: page-aligned memory and one flag per "
                        "page needed");
        goto done;
    }
    memset(out.buf, 0, n_pages);
    ssize_t found = pf_pagemap_find((uintptr_t)memory.buf, n_pages, PF_PAGEMAP_COW, out.buf);
    if (found < 0) {
        PyErr_SetFromErrnoWithFilename(PyExc_OSError, "/proc/self/pagemap");
        goto done;
    }
    result = PyLong_FromSsize_t(found);
done:
    PyBuffer_Release(&memory);
    PyBuffer_Release(&out);
    return result;
}

/* keep_changed(memory, original, flags) -> count: clears the flag of every
 * flagged page whose bytes equal the original's (both clipped to the
 * shorter buffer; a page past it keeps its flag). */
PyObject *pf_keep_changed(PyObject *self, PyObject *args)
{
    Py_buffer memory, original, flags;
    if (!PyArg_ParseTuple(args, "y*y*w*", &memory, &original, &flags))
        return NULL;
    size_t ps = pf_page_size;
    size_t limit = (size_t)(memory.len < original.len ? memory.len : original.len);
    size_t n_pages = (size_t)flags.len, kept = 0;
    const uint8_t *m = memory.buf, *o = original.buf;
    uint8_t *f = flags.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t p = 0; p < n_pages; p++) {
        if (!f[p])
            continue;
        size_t a = p * ps;
        if (a < limit) {
            size_t b = a + ps < limit ? a + ps : limit;
            if (memcmp(m + a, o + a, b - a) == 0 && (b == a + ps || b == (size_t)memory.len)) {
                f[p] = 0;
                continue;
            }
        }
        f[p] = 1;
        kept++;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&memory);
    PyBuffer_Release(&original);
    PyBuffer_Release(&flags);
    return PyLong_FromSize_t(kept);
}
