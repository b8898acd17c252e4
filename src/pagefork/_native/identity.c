/* identity_diff: the diff of an identity-start buffer (App.alloc(...,
 * start="identity")) against its identity, without a reference array.
 *
 * Every element equal (bitwise) to the identity sends nothing; each run of
 * other elements is one diff carrying the elements' own bytes, which is
 * what a diff against the identity sends for every rule that has one: SUM
 * u - 0, PRODUCT u / 1, MAX/MIN u, XOR u ^ 0. Equal stretches are skipped
 * comparing 64 bytes at a time with the identity repeated in a register:
 * one stream from memory instead of two.
 */
#include "pagefork.h"

#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* First byte index in [pos, end) that differs from the identity pattern
 * (`pattern` holds 16 bytes of identities; pos is a multiple of k, and 16
 * is, so every 16-byte load lines up with it), or end. */
static size_t find_other(const uint8_t *m, const uint8_t *pattern, size_t k, size_t pos, size_t end)
{
#if defined(__SSE2__)
    const __m128i p = _mm_loadu_si128((const __m128i *)pattern);
    while (pos + 64 <= end) {
        __m128i e0 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(m + pos)), p);
        __m128i e1 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(m + pos + 16)), p);
        __m128i e2 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(m + pos + 32)), p);
        __m128i e3 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(m + pos + 48)), p);
        __m128i all = _mm_and_si128(_mm_and_si128(e0, e1), _mm_and_si128(e2, e3));
        if (_mm_movemask_epi8(all) != 0xFFFF)
            break;
        pos += 64;
    }
    while (pos + 16 <= end) {
        unsigned eq = (unsigned)_mm_movemask_epi8(
            _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(m + pos)), p));
        if (eq != 0xFFFF)
            return pos + (size_t)__builtin_ctz(~eq & 0xFFFF);
        pos += 16;
    }
#endif
    while (pos < end && m[pos] == pattern[pos % k])
        pos++;
    return pos;
}

/* Whether the k-byte element at a equals the one at b (k: 1, 2, 4 or 8). */
static inline int same_element(const uint8_t *a, const uint8_t *b, size_t k)
{
    switch (k) {
    case 8: {
        uint64_t x, y;
        memcpy(&x, a, 8);
        memcpy(&y, b, 8);
        return x == y;
    }
    case 4: {
        uint32_t x, y;
        memcpy(&x, a, 4);
        memcpy(&y, b, 4);
        return x == y;
    }
    case 2:
        return a[0] == b[0] && a[1] == b[1];
    default:
        return a[0] == b[0];
    }
}

/* identity_diff(memory, identity, dtype, op) -> (offsets, lengths, dtypes, ops, data)
 * identity: one element of 1, 2, 4 or 8 bytes; memory: whole elements. The
 * diffs are labelled dtype/op (a valid pair). */
PyObject *pf_identity_diff(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer mem, id;
    int dtype, op;
    if (!PyArg_ParseTuple(args, "y*y*ii", &mem, &id, &dtype, &op))
        return NULL;
    PyObject *result = NULL;
    size_t k = (size_t)id.len, n = (size_t)mem.len;
    if ((k != 1 && k != 2 && k != 4 && k != 8) || n % k != 0 || dtype < 0 || op < 0 ||
        pf_op_valid(dtype, op) != 0) {
        PyErr_SetString(PyExc_ValueError, "identity_diff: the identity must be 1, 2, 4 or 8 bytes, "
                        "the memory whole elements, and dtype/op a valid pair");
        goto done;
    }
    uint8_t pattern[16];
    for (size_t i = 0; i < 16; i++)
        pattern[i] = ((const uint8_t *)id.buf)[i % k];

    pf_batch out = {0};
    pf_batch_prepare(&out);
    int rc = 0;
    const uint8_t *m = mem.buf;
    Py_BEGIN_ALLOW_THREADS
    size_t pos = 0;
    while (pos < n) {
        size_t d = find_other(m, pattern, k, pos, n);
        if (d >= n)
            break;
        size_t r0 = d / k * k, r1 = r0 + k;
        while (r1 < n && !same_element(m + r1, pattern, k))
            r1 += k;
        uint8_t *dst = pf_batch_add(&out, (int64_t)r0, r1 - r0, dtype, op);
        if (dst == NULL) {
            rc = -1;
            break;
        }
        if (r1 - r0 <= 16) /* most runs are one scattered value: skip the memcpy call */
            for (size_t i = r0; i < r1; i++)
                *dst++ = m[i];
        else
            memcpy(dst, m + r0, r1 - r0);
        pos = r1;
    }
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        pf_batch_free(&out);
        PyErr_NoMemory();
        goto done;
    }
    result = pf_batch_finish(&out);
done:
    PyBuffer_Release(&mem);
    PyBuffer_Release(&id);
    return result;
}
