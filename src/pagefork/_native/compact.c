/* Compact diff columns and run gathering, for the per-batch reduction path.
 *
 * compact_encode turns a DiffBatch's offsets, lengths, dtypes and ops into a
 * short token stream (the data travels unchanged beside it). Diffs are cut
 * into segments of one dtype/op whose offsets ascend; inside a segment each
 * diff costs one varint, (gap << 1 | has_length), counted in units of the
 * element size for typed ops, plus a length varint only when the diff is not
 * exactly one unit. An isolated int64 at a 1% density costs about 1.5 bytes
 * beside its 8 data bytes (a plain column layout costs 18).
 *
 *   segment := dtype | op << 4 (u8), shift (u8), count (varint >= 1),
 *              first offset (varint), count x diff
 *   diff    := varint (gap_units << 1 | has_length) [, varint length_units]
 *
 * compact_decode checks every varint, count and sum against the input before
 * and while building the columns; it allocates at most 18 bytes per token
 * byte, so a hostile stream cannot make it allocate more than its size
 * describes.
 *
 * gather(source, starts, lengths) copies byte runs out of a buffer into one
 * bytes object: Snapshot.tracked_changes without a per-byte index.
 */
#include "pagefork.h"
#include "varint.h"

#include <limits.h>
#include <string.h>

static int shift_of(int dtype, int op)
{
    if (!pf_op_is_typed(op))
        return 0;
    switch (pf_itemsize[dtype]) {
    case 2: return 1;
    case 4: return 2;
    case 8: return 3;
    default: return 0;
    }
}

/* Whether diff i continues a segment of dtype/op/shift that ended at `end`. */
static inline int continues(const int64_t *off, const int64_t *len, const uint8_t *dt,
                            const uint8_t *op, size_t i, int dtype, int opc, int shift, int64_t end)
{
    int64_t unit = (int64_t)1 << shift;
    return dt[i] == dtype && op[i] == opc && off[i] >= end && ((off[i] - end) & (unit - 1)) == 0 &&
           (len[i] & (unit - 1)) == 0;
}

/* compact_encode(offsets, lengths, dtypes, ops) -> bytes (the token stream). */
PyObject *pf_compact_encode(PyObject *self, PyObject *args)
{
    Py_buffer offsets, lengths, dtypes, ops;
    if (!PyArg_ParseTuple(args, "y*y*y*y*", &offsets, &lengths, &dtypes, &ops))
        return NULL;
    PyObject *out = NULL;
    size_t n = (size_t)dtypes.len;
    const int64_t *off = offsets.buf, *len = lengths.buf;
    const uint8_t *dt = dtypes.buf, *op = ops.buf;
    if (offsets.len != (Py_ssize_t)(n * 8) || lengths.len != offsets.len || ops.len != dtypes.len) {
        PyErr_SetString(PyExc_ValueError, "compact_encode: malformed diff columns");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        if (off[i] < 0 || len[i] < 0 || off[i] > INT64_MAX - len[i] || pf_op_valid(dt[i], op[i]) != 0) {
            PyErr_Format(PyExc_ValueError, "compact_encode: diff %zu has a negative offset or "
                         "length, an end past 2**63, or invalid dtype/op codes", i);
            goto done;
        }
    }
    /* Worst case per diff: a segment header (2 + 2 varints) and 2 varints. */
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * (2 + 4 * PF_VARINT_MAX)));
    if (out == NULL)
        goto done;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
    size_t w = 0;
    Py_BEGIN_ALLOW_THREADS
    size_t i = 0;
    while (i < n) {
        int dtype = dt[i], opc = op[i];
        int shift = shift_of(dtype, opc);
        if ((len[i] & (((int64_t)1 << shift) - 1)) != 0)
            shift = 0; /* not whole elements: count in bytes */
        size_t j = i + 1;
        int64_t end = off[i] + len[i];
        while (j < n && continues(off, len, dt, op, j, dtype, opc, shift, end)) {
            end = off[j] + len[j];
            j++;
        }
        p[w++] = (uint8_t)(dtype | opc << 4);
        p[w++] = (uint8_t)shift;
        w += pf_varint_put(p + w, j - i);
        w += pf_varint_put(p + w, (uint64_t)off[i]);
        end = off[i];
        for (size_t k = i; k < j; k++) {
            uint64_t gap = (uint64_t)(off[k] - end) >> shift;
            uint64_t units = (uint64_t)len[k] >> shift;
            int has_length = units != 1;
            w += pf_varint_put(p + w, gap << 1 | (uint64_t)has_length);
            if (has_length)
                w += pf_varint_put(p + w, units);
            end = off[k] + len[k];
        }
        i = j;
    }
    Py_END_ALLOW_THREADS
    if (_PyBytes_Resize(&out, (Py_ssize_t)w) != 0)
        out = NULL;
done:
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&dtypes);
    PyBuffer_Release(&ops);
    return out;
}

/* compact_decode(tokens, count, data_len) -> (offsets, lengths, dtypes, ops)
 * as bytes. Raises ValueError on any inconsistency. */
PyObject *pf_compact_decode(PyObject *self, PyObject *args)
{
    Py_buffer tokens;
    unsigned long long count, data_len;
    if (!PyArg_ParseTuple(args, "y*KK", &tokens, &count, &data_len))
        return NULL;
    PyObject *cols[4] = {NULL, NULL, NULL, NULL}, *result = NULL;
    const char *why = NULL;
    if (count > (unsigned long long)tokens.len) { /* every diff takes a token byte */
        PyErr_Format(PyExc_ValueError, "compact stream of %zd bytes cannot hold %llu diffs",
                     tokens.len, count);
        goto done;
    }
    size_t n = (size_t)count;
    cols[0] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8));
    cols[1] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8));
    cols[2] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    cols[3] = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (!cols[0] || !cols[1] || !cols[2] || !cols[3])
        goto done;
    int64_t *off = (int64_t *)PyBytes_AS_STRING(cols[0]), *len = (int64_t *)PyBytes_AS_STRING(cols[1]);
    uint8_t *dt = (uint8_t *)PyBytes_AS_STRING(cols[2]), *op = (uint8_t *)PyBytes_AS_STRING(cols[3]);
    const uint8_t *p = tokens.buf;
    size_t end_at = (size_t)tokens.len;
    Py_BEGIN_ALLOW_THREADS
    size_t at = 0, i = 0;
    uint64_t total = 0;
    while (why == NULL && at < end_at) {
        if (end_at - at < 2) {
            why = "truncated segment header";
            break;
        }
        int dtype = p[at] & 0x0f, opc = p[at] >> 4, shift = p[at + 1];
        at += 2;
        uint64_t seg_n, first;
        if (pf_op_valid(dtype, opc) != 0 || shift > 3) {
            why = "segment with invalid dtype/op codes or unit";
            break;
        }
        if (pf_varint_get(p, end_at, &at, &seg_n) != 0 || pf_varint_get(p, end_at, &at, &first) != 0 ||
            seg_n == 0 || seg_n > n - i || first > (uint64_t)INT64_MAX) {
            why = "segment with a bad count or offset";
            break;
        }
        uint64_t pos = first; /* end of the previous diff, in bytes */
        int64_t k = pf_itemsize[dtype];
        for (uint64_t s = 0; s < seg_n; s++, i++) {
            uint64_t token, units = 1;
            if (pf_varint_get(p, end_at, &at, &token) != 0 ||
                ((token & 1) && pf_varint_get(p, end_at, &at, &units) != 0)) {
                why = "truncated or overlong varint";
                break;
            }
            uint64_t gap = token >> 1;
            if (gap > ((uint64_t)INT64_MAX >> shift) || units > ((uint64_t)INT64_MAX >> shift)) {
                why = "diff offset or length overflows";
                break;
            }
            gap <<= shift;
            units <<= shift;
            if (gap > (uint64_t)INT64_MAX - pos || units > (uint64_t)INT64_MAX - (pos + gap)) {
                why = "diff end overflows";
                break;
            }
            if (pf_op_is_typed(opc) && units % (uint64_t)k != 0) {
                why = "typed diff that is not a whole number of values";
                break;
            }
            off[i] = (int64_t)(pos + gap);
            len[i] = (int64_t)units;
            dt[i] = (uint8_t)dtype;
            op[i] = (uint8_t)opc;
            pos += gap + units;
            total += units;
            if (total > data_len) {
                why = "diff lengths exceed the data";
                break;
            }
        }
    }
    if (why == NULL && i != n)
        why = "fewer diffs than the header says";
    if (why == NULL && total != data_len)
        why = "diff lengths do not add up to the data length";
    Py_END_ALLOW_THREADS
    if (why != NULL) {
        PyErr_Format(PyExc_ValueError, "compact stream: %s", why);
        goto done;
    }
    result = PyTuple_Pack(4, cols[0], cols[1], cols[2], cols[3]);
done:
    for (int c = 0; c < 4; c++)
        Py_XDECREF(cols[c]);
    PyBuffer_Release(&tokens);
    return result;
}

/* gather(source, starts, lengths) -> bytes: the runs, concatenated. */
PyObject *pf_gather(PyObject *self, PyObject *args)
{
    Py_buffer source, starts, lengths;
    if (!PyArg_ParseTuple(args, "y*y*y*", &source, &starts, &lengths))
        return NULL;
    PyObject *out = NULL;
    size_t n = (size_t)starts.len / 8;
    const int64_t *s = starts.buf, *l = lengths.buf;
    size_t size = (size_t)source.len, total = 0;
    if (starts.len % 8 != 0 || lengths.len != starts.len) {
        PyErr_SetString(PyExc_ValueError, "gather: malformed run columns");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0 || l[i] < 0 || (uint64_t)s[i] > size || (uint64_t)l[i] > size - (uint64_t)s[i] ||
            (uint64_t)l[i] > (uint64_t)PY_SSIZE_T_MAX - total) {
            PyErr_Format(PyExc_IndexError, "gather: run %zu (%lld bytes at %lld) is outside the "
                         "%zu-byte source", i, (long long)l[i], (long long)s[i], size);
            goto done;
        }
        total += (size_t)l[i];
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL)
        goto done;
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *src = source.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0, at = 0; i < n; i++) {
        memcpy(dst + at, src + s[i], (size_t)l[i]);
        at += (size_t)l[i];
    }
    Py_END_ALLOW_THREADS
done:
    PyBuffer_Release(&source);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&lengths);
    return out;
}
