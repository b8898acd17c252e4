/* _native._scribble: a native-speed writer for the tracking stress tests.
 * Writes `count` increasing sequence numbers, each into the 8-byte slot
 * `slot` of a pseudo-randomly chosen page, without the GIL, so tests can
 * run writers concurrently with reads at the speed real code writes.
 */
#include "pagefork.h"

/* _scribble(address, n_pages, slot, first_seq, count, seed) -> next seed */
PyObject *pf_scribble(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long address, first, count, seed;
    Py_ssize_t n_pages, slot;
    if (!PyArg_ParseTuple(args, "KnnKKK", &address, &n_pages, &slot, &first, &count, &seed))
        return NULL;
    if (n_pages <= 0 || slot < 0 || (size_t)(slot + 1) * 8 > pf_page_size) {
        PyErr_SetString(PyExc_ValueError, "_scribble: n_pages > 0 and slot within a page");
        return NULL;
    }
    uint64_t x = seed | 1;
    Py_BEGIN_ALLOW_THREADS
    for (uint64_t k = 0; k < count; k++) {
        x ^= x << 13; /* xorshift64 */
        x ^= x >> 7;
        x ^= x << 17;
        size_t page = (size_t)(x % (uint64_t)n_pages);
        volatile uint64_t *p = (volatile uint64_t *)(address + page * pf_page_size) + slot;
        *p = first + k;
    }
    Py_END_ALLOW_THREADS
    return PyLong_FromUnsignedLongLong(x);
}
