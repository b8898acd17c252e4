/* A worker's thread memory kept mapped across threads: which of its pages
 * are the process's own copies, so they can be put back to the snapshot's
 * bytes instead of being dropped and copied again on the next write.
 */
#define _GNU_SOURCE
#include "pagefork.h"
#include "compare.h"

#include <string.h>

/* private_pages(memory, out, present=False) -> count. `memory`: a
 * page-aligned private mapping of a file; out: one byte per page, set to 1
 * where the page is the process's own copy (written, so copied by the
 * kernel), else 0. `present`: only copies mapped now (under userfaultfd
 * write-protection an unpopulated page holds a marker that reads as a
 * swapped copy). */
PyObject *pf_private_pages(PyObject *self, PyObject *args)
{
    Py_buffer memory, out;
    int present = 0;
    if (!PyArg_ParseTuple(args, "y*w*|p", &memory, &out, &present))
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
    ssize_t found = pf_pagemap_find((uintptr_t)memory.buf, n_pages,
                                    present ? PF_PAGEMAP_COW_PRESENT : PF_PAGEMAP_COW, out.buf);
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
        const uint8_t *hit = memchr(f + p, 1, n_pages - p); /* skip unflagged pages fast */
        if (hit == NULL)
            break;
        p = (size_t)(hit - f);
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

/* ---- fold: a thread's changes merged straight into a worker's partial ----
 *
 * For the order-free reductions (integer SUM, SUBTRACT, MIN, MAX; XOR of
 * anything) a worker keeps `acc`, a copy of the snapshot into which every
 * thread's changes are merged, and ships one diff of it. Folding does what
 * diff-then-apply would do, in one pass and with no diff in between:
 * SUM and SUBTRACT add u - o (wrapping), MIN/MAX take u, XOR xors u ^ o.
 * Each changed element is also put back to the original in the thread's
 * memory (so the next thread on this worker starts from the snapshot
 * without copying those pages again), and the pages holding changes are
 * flagged in `changed`.
 */

#define MARK(at, k)                                                                \
    do {                                                                           \
        changed[(at) / ps] = 1;                                                    \
        changed[((at) + (k) - 1) / ps] = 1;                                        \
    } while (0)

/* Equal stretches are skipped with pf_find_diff (vector speed); the 64
 * bytes of elements from a difference on (not past the element crossing
 * the next page boundary) are folded without a test per element: an
 * unchanged one adds 0, or is no smaller / larger than acc, which only
 * ever moves away from the original in the op's direction. Dense runs
 * vectorize; scattered ones touch one cache line each. Only pages that
 * hold changed elements are written in the thread's memory and flagged.
 *
 * Scattered changes make acc's cache lines the cost (a miss each, acc is
 * not otherwise read): the spans are found first, FOLD_BATCH at a time,
 * with acc's lines prefetched as each is found, then folded, so the misses
 * overlap the scan instead of following one another. A span's search
 * starts where the previous one ends and reads nothing folding writes, so
 * finding ahead finds the same spans. A span starting where the last
 * ended (a dense run) goes on to the page's end: unchanged elements in it
 * fold to nothing, as above, and their page is being written anyway. */
#define FOLD_BATCH 16

#define FOLD_TYPED(NAME, T, U, KIND)                                               \
    static void NAME(uint8_t *acc, uint8_t *mem, const uint8_t *orig, size_t base, \
                     size_t n, uint8_t *changed, size_t ps, int op)                 \
    {                                                                              \
        const size_t k = sizeof(T);                                                \
        size_t end = base + n * k, at = base, prev = end;                          \
        size_t s_at[FOLD_BATCH], s_lim[FOLD_BATCH], s_pb[FOLD_BATCH];              \
        uint8_t s_str[FOLD_BATCH];                                                 \
        for (;;) {                                                                 \
            size_t found = 0;                                                      \
            while (found < FOLD_BATCH && at < end) {                               \
                size_t d = pf_find_diff(mem, orig, at, end);                       \
                if (d >= end) {                                                    \
                    at = end;                                                      \
                    break;                                                         \
                }                                                                  \
                at = base + (d - base) / k * k;                                    \
                size_t pb = (at / ps + 1) * ps; /* the next page boundary */       \
                size_t cross = base + (pb - base + k - 1) / k * k;                 \
                /* A span right after the last one: a dense run, folded to the     \
                 * page's end at once (the hardware prefetches it). */            \
                size_t lim = at == prev ? cross : at + 64 / k * k;                 \
                if (lim > cross)                                                   \
                    lim = cross;                                                   \
                if (lim > end)                                                     \
                    lim = end;                                                     \
                if (at != prev) {                                                  \
                    __builtin_prefetch(acc + at, 1);                               \
                    __builtin_prefetch(acc + lim - 1, 1);                          \
                }                                                                  \
                prev = lim;                                                        \
                s_at[found] = at;                                                  \
                s_lim[found] = lim;                                                \
                s_pb[found] = pb;                                                  \
                s_str[found] = lim > pb && lim - k > at &&                         \
                               memcmp(mem + lim - k, orig + lim - k, k) != 0;      \
                found++;                                                           \
                at = lim;                                                          \
            }                                                                      \
            if (found == 0)                                                        \
                break;                                                             \
            for (size_t f = 0; f < found; f++) {                                   \
                size_t a0 = s_at[f], lim = s_lim[f], pb = s_pb[f];                 \
                for (size_t x = a0; x < lim; x += k) {                             \
                    T u, o, a;                                                     \
                    memcpy(&u, mem + x, k);                                        \
                    memcpy(&o, orig + x, k);                                       \
                    memcpy(&a, acc + x, k);                                        \
                    if (KIND == 0)                                                 \
                        a = (T)((U)a + (U)((U)u - (U)o));                          \
                    else                                                           \
                        a = (op == PF_MAX ? u > a : u < a) ? u : a;                \
                    memcpy(acc + x, &a, k);                                        \
                }                                                                  \
                MARK(a0, k);                                                       \
                if (a0 + k > pb) /* the first element itself crosses the boundary */ \
                    memcpy(mem + a0, orig + a0, k);                                \
                else                                                               \
                    memcpy(mem + a0, orig + a0, (lim < pb ? lim : pb) - a0);      \
                if (s_str[f]) {                                                    \
                    memcpy(mem + pb, orig + pb, lim - pb);                         \
                    changed[pb / ps] = 1;                                          \
                }                                                                  \
            }                                                                      \
        }                                                                          \
    }
FOLD_TYPED(fold_add8, uint8_t, uint8_t, 0)
FOLD_TYPED(fold_add16, uint16_t, uint16_t, 0)
FOLD_TYPED(fold_add32, uint32_t, uint32_t, 0)
FOLD_TYPED(fold_add64, uint64_t, uint64_t, 0)
FOLD_TYPED(fold_mm_i8, int8_t, uint8_t, 1)
FOLD_TYPED(fold_mm_i16, int16_t, uint16_t, 1)
FOLD_TYPED(fold_mm_i32, int32_t, uint32_t, 1)
FOLD_TYPED(fold_mm_i64, int64_t, uint64_t, 1)
FOLD_TYPED(fold_mm_u8, uint8_t, uint8_t, 1)
FOLD_TYPED(fold_mm_u16, uint16_t, uint16_t, 1)
FOLD_TYPED(fold_mm_u32, uint32_t, uint32_t, 1)
FOLD_TYPED(fold_mm_u64, uint64_t, uint64_t, 1)

static void fold_xor(uint8_t *acc, uint8_t *mem, const uint8_t *orig, size_t a, size_t b,
                     uint8_t *changed, size_t ps)
{
    size_t i = a;
    while ((i = pf_find_diff(mem, orig, i, b)) < b) {
        size_t j = pf_find_same(mem, orig, i, b);
        for (size_t p = i / ps; p <= (j - 1) / ps; p++)
            changed[p] = 1;
        for (; i < j; i++) {
            acc[i] ^= (uint8_t)(mem[i] ^ orig[i]);
            mem[i] = orig[i];
        }
    }
}

static int fold_supported(int dtype, int op)
{
    if (op == PF_XOR)
        return dtype >= 0 && dtype < PF_N_DTYPES;
    if (op != PF_SUM && op != PF_SUBTRACT && op != PF_MIN && op != PF_MAX)
        return 0;
    if (dtype == PF_BOOL)
        return op == PF_MIN || op == PF_MAX;
    return dtype >= PF_INT8 && dtype <= PF_UINT64;
}

static void fold_range(uint8_t *acc, uint8_t *mem, const uint8_t *orig, size_t a, size_t b,
                       int dtype, int op, uint8_t *changed, size_t ps)
{
    size_t k = (size_t)pf_itemsize[dtype], n = (b - a) / k;
    if (op == PF_XOR) {
        fold_xor(acc, mem, orig, a, b, changed, ps);
        return;
    }
    if (op == PF_SUM || op == PF_SUBTRACT) {
        switch (k) {
        case 1: fold_add8(acc, mem, orig, a, n, changed, ps, op); break;
        case 2: fold_add16(acc, mem, orig, a, n, changed, ps, op); break;
        case 4: fold_add32(acc, mem, orig, a, n, changed, ps, op); break;
        default: fold_add64(acc, mem, orig, a, n, changed, ps, op); break;
        }
        return;
    }
    switch (dtype) {
    case PF_INT8: fold_mm_i8(acc, mem, orig, a, n, changed, ps, op); break;
    case PF_INT16: fold_mm_i16(acc, mem, orig, a, n, changed, ps, op); break;
    case PF_INT32: fold_mm_i32(acc, mem, orig, a, n, changed, ps, op); break;
    case PF_INT64: fold_mm_i64(acc, mem, orig, a, n, changed, ps, op); break;
    case PF_UINT16: fold_mm_u16(acc, mem, orig, a, n, changed, ps, op); break;
    case PF_UINT32: fold_mm_u32(acc, mem, orig, a, n, changed, ps, op); break;
    case PF_UINT64: fold_mm_u64(acc, mem, orig, a, n, changed, ps, op); break;
    default: fold_mm_u8(acc, mem, orig, a, n, changed, ps, op); break; /* BOOL, UINT8 */
    }
}

/* fold(acc, memory, original, dirty, changed, page_size, starts, ends, dtypes, ops)
 * starts/ends: int64 regions, sorted, disjoint, within all three buffers, each
 * a whole number of elements; dirty: one 0/1 byte per page covering them;
 * changed: as long as dirty, pages with changes get 1 (others untouched). */
PyObject *pf_fold(PyObject *self, PyObject *args)
{
    Py_buffer acc, mem, orig, dirty, changed, starts, ends, dtypes, ops;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "w*w*y*y*w*ny*y*y*y*", &acc, &mem, &orig, &dirty, &changed,
                          &page_size, &starts, &ends, &dtypes, &ops))
        return NULL;
    PyObject *result = NULL;
    size_t n_regions = (size_t)dtypes.len;
    const int64_t *s = starts.buf, *e = ends.buf;
    const uint8_t *dt = dtypes.buf, *op = ops.buf, *flags = dirty.buf;
    size_t limit = (size_t)mem.len;
    if ((size_t)orig.len < limit)
        limit = (size_t)orig.len;
    if ((size_t)acc.len < limit)
        limit = (size_t)acc.len;
    size_t ps = (size_t)page_size;
    if (page_size <= 0 || starts.len != (Py_ssize_t)(n_regions * 8) || ends.len != starts.len ||
        ops.len != dtypes.len || changed.len < dirty.len) {
        PyErr_SetString(PyExc_ValueError, "fold: malformed region columns or flags");
        goto done;
    }
    for (size_t r = 0; r < n_regions; r++) {
        if (s[r] < 0 || e[r] < s[r] || (size_t)e[r] > limit ||
            (size_t)(e[r] + (int64_t)ps - 1) / ps > (size_t)dirty.len || (r > 0 && s[r] < e[r - 1]) ||
            !fold_supported(dt[r], op[r]) || (e[r] - s[r]) % pf_itemsize[dt[r]] != 0) {
            PyErr_Format(PyExc_ValueError, "fold: region %zu is out of order, out of bounds, not "
                         "whole elements or not an order-free reduction", r);
            goto done;
        }
    }
    uint8_t *a = acc.buf, *m = mem.buf, *c = changed.buf;
    const uint8_t *o = orig.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t r = 0; r < n_regions; r++) {
        if (e[r] == s[r])
            continue;
        size_t start = (size_t)s[r], end = (size_t)e[r], k = (size_t)pf_itemsize[dt[r]];
        size_t p = start / ps, last = (end - 1) / ps + 1;
        while (p < last) {
            const uint8_t *hit = memchr(flags + p, 1, last - p);
            if (hit == NULL)
                break;
            size_t p0 = (size_t)(hit - flags), p1 = p0 + 1;
            while (p1 < last && flags[p1])
                p1++;
            /* Whole elements overlapping the dirty pages [p0, p1). */
            size_t lo = p0 * ps > start ? p0 * ps : start;
            size_t hi = p1 * ps < end ? p1 * ps : end;
            lo = start + (lo - start) / k * k;
            hi = start + (hi - start + k - 1) / k * k;
            if (hi > end)
                hi = end;
            fold_range(a, m, o, lo, hi, dt[r], op[r], c, ps);
            p = p1;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&acc);
    PyBuffer_Release(&mem);
    PyBuffer_Release(&orig);
    PyBuffer_Release(&dirty);
    PyBuffer_Release(&changed);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&ends);
    PyBuffer_Release(&dtypes);
    PyBuffer_Release(&ops);
    return result;
}
