/* _native._scribble: a native-speed writer for the tracking stress tests.
 * Writes `count` increasing sequence numbers, each into the 8-byte slot
 * `slot` of a pseudo-randomly chosen page, without the GIL, so tests can
 * run writers concurrently with reads at the speed real code writes.
 */
#include "pagefork.h"

#include <errno.h>
#include <time.h>

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

/* _write_sequence(address, count, first, gap_ns, stop) -> writes done:
 * writes first + k into the k-th 8-byte slot from `address`, one after the
 * other, `gap_ns` apart, without the GIL, until `count` are written or the
 * byte `stop` (a writable buffer) is set. A writer that keeps running
 * through whatever other threads do meanwhile; every value it wrote is
 * where it wrote it unless a write was lost. */
PyObject *pf_write_sequence(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long address, count, first;
    long long gap_ns;
    Py_buffer stop;
    if (!PyArg_ParseTuple(args, "KKKLw*", &address, &count, &first, &gap_ns, &stop))
        return NULL;
    if (stop.len < 1 || gap_ns < 0) {
        PyBuffer_Release(&stop);
        PyErr_SetString(PyExc_ValueError, "_write_sequence: a stop byte and a gap >= 0 needed");
        return NULL;
    }
    volatile uint8_t *halt = stop.buf;
    uint64_t k = 0;
    Py_BEGIN_ALLOW_THREADS
    for (; k < count && !*halt; k++) {
        ((volatile uint64_t *)address)[k] = first + k;
        struct timespec gap = {.tv_sec = gap_ns / 1000000000LL, .tv_nsec = gap_ns % 1000000000LL};
        while (gap_ns > 0 && nanosleep(&gap, &gap) != 0 && errno == EINTR)
            ;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&stop);
    return PyLong_FromUnsignedLongLong(k);
}
