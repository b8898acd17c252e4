/* Snapshot.apply: merges a DiffBatch into memory. The whole batch is checked
 * first (codes, bounds, element alignment, PRODUCT over a zero), so a bad
 * diff changes nothing; then every diff is applied in order:
 * OVERWRITE copies, XOR xors, SUM o+d, SUBTRACT o-d, PRODUCT o*d,
 * MAX/MIN like numpy.maximum/minimum (NaN wins), IGNORE does nothing.
 */
#include "pagefork.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define IS_NAN(x) ((x) != (x))
#define PREFETCH_AHEAD 8

#define TYPED_APPLY(NAME, T, U, IS_FLOAT)                                             \
    static void NAME(uint8_t *dst, const uint8_t *src, size_t n, int op)              \
    {                                                                                 \
        for (size_t i = 0; i < n; i++) {                                              \
            T o, d;                                                                   \
            memcpy(&o, dst + i * sizeof(T), sizeof(T));                               \
            memcpy(&d, src + i * sizeof(T), sizeof(T));                               \
            switch (op) {                                                             \
            case PF_SUM: o = IS_FLOAT ? (T)(o + d) : (T)((U)o + (U)d); break;         \
            case PF_SUBTRACT: o = IS_FLOAT ? (T)(o - d) : (T)((U)o - (U)d); break;    \
            /* in uint64_t: uint16_t * uint16_t would be a signed int overflow */     \
            case PF_PRODUCT: o = IS_FLOAT ? (T)(o * d) : (T)((uint64_t)(U)o * (U)d); break; \
            case PF_MAX: o = (o >= d || IS_NAN(o)) ? o : d; break;                    \
            case PF_MIN: o = (o <= d || IS_NAN(o)) ? o : d; break;                    \
            default: break;                                                           \
            }                                                                         \
            memcpy(dst + i * sizeof(T), &o, sizeof(T));                               \
        }                                                                             \
    }                                                                                 \
    static ssize_t NAME##_find_zero(const uint8_t *dst, size_t n)                    \
    {                                                                                 \
        for (size_t i = 0; i < n; i++) {                                              \
            T o;                                                                      \
            memcpy(&o, dst + i * sizeof(T), sizeof(T));                               \
            if (o == 0)                                                               \
                return (ssize_t)i;                                                    \
        }                                                                             \
        return -1;                                                                    \
    }

TYPED_APPLY(apply_i8, int8_t, uint8_t, 0)
TYPED_APPLY(apply_i16, int16_t, uint16_t, 0)
TYPED_APPLY(apply_i32, int32_t, uint32_t, 0)
TYPED_APPLY(apply_i64, int64_t, uint64_t, 0)
TYPED_APPLY(apply_u8, uint8_t, uint8_t, 0)
TYPED_APPLY(apply_u16, uint16_t, uint16_t, 0)
TYPED_APPLY(apply_u32, uint32_t, uint32_t, 0)
TYPED_APPLY(apply_u64, uint64_t, uint64_t, 0)
TYPED_APPLY(apply_f32, float, uint32_t, 1)
TYPED_APPLY(apply_f64, double, uint64_t, 1)

typedef struct {
    void (*apply)(uint8_t *, const uint8_t *, size_t, int);
    ssize_t (*find_zero)(const uint8_t *, size_t);
} typed_ops;

#define OPS(name) {name, name##_find_zero}
static const typed_ops typed[PF_N_DTYPES] = {
    [PF_BOOL] = OPS(apply_u8),    [PF_INT8] = OPS(apply_i8),     [PF_INT16] = OPS(apply_i16),
    [PF_INT32] = OPS(apply_i32),  [PF_INT64] = OPS(apply_i64),   [PF_UINT8] = OPS(apply_u8),
    [PF_UINT16] = OPS(apply_u16), [PF_UINT32] = OPS(apply_u32),  [PF_UINT64] = OPS(apply_u64),
    [PF_FLOAT32] = OPS(apply_f32), [PF_FLOAT64] = OPS(apply_f64),
};

/* Checks every diff of `c` against a target of `size` bytes, of which the
 * first `mapped` can be read at `dst` (a check may allow bytes up to `size`
 * past the mapping: memory about to grow, reading as zero). Returns 0, or
 * PF_MERGE_BAD_INDEX (out of bounds), PF_MERGE_BAD_VALUE (malformed) or
 * PF_MERGE_BAD_PRODUCT (PRODUCT over a zero) with the reason in `why`.
 * Touches no Python object: executor windows check without giving up the
 * GIL (window.c). */
int pf_merge_check(const pf_diff_columns *c, const uint8_t *dst, size_t mapped, size_t size,
                   char *why, size_t why_len)
{
    size_t n = c->n, used = 0;
    const int64_t *off = c->offsets, *len = c->lengths;
    const uint8_t *dt = c->dtypes, *op = c->ops;
    for (size_t i = 0; i < n; i++) {
        if (pf_op_valid(dt[i], op[i]) != 0) {
            snprintf(why, why_len, "diff %zu: invalid dtype/op codes %d/%d", i, dt[i], op[i]);
            return PF_MERGE_BAD_VALUE;
        }
        if (off[i] < 0 || len[i] < 0 || (uint64_t)len[i] > (uint64_t)c->data_len - used ||
            (uint64_t)off[i] > size || (uint64_t)len[i] > size - (uint64_t)off[i]) {
            snprintf(why, why_len, "diff %zu at offset %lld, %lld bytes, is outside the %zu bytes "
                     "it applies to", i, (long long)off[i], (long long)len[i], size);
            return PF_MERGE_BAD_INDEX;
        }
        int typed_op = pf_op_is_typed(op[i]);
        size_t k = (size_t)pf_itemsize[dt[i]];
        if (typed_op && (size_t)len[i] % k != 0) {
            snprintf(why, why_len, "diff %zu: %lld bytes is not a whole number of %zu-byte values", i,
                     (long long)len[i], k);
            return PF_MERGE_BAD_VALUE;
        }
        if (op[i] == PF_PRODUCT && len[i] > 0) {
            size_t in_map = (size_t)off[i] >= mapped ? 0 : mapped - (size_t)off[i];
            if (in_map > (size_t)len[i])
                in_map = (size_t)len[i];
            ssize_t z = typed[dt[i]].find_zero(dst + off[i], in_map / k);
            long long at = z >= 0 ? (long long)(off[i] + z * (ssize_t)k)
                                  : (in_map < (size_t)len[i] ? (long long)(off[i] + (int64_t)in_map) : -1);
            if (at >= 0) { /* bytes past the mapped end read as zero */
                snprintf(why, why_len, "PRODUCT at offset %lld: the value it multiplies is zero", at);
                return PF_MERGE_BAD_PRODUCT;
            }
        }
        used += (size_t)len[i];
    }
    if (used != c->data_len) {
        snprintf(why, why_len, "apply: data length does not match the diff lengths");
        return PF_MERGE_BAD_VALUE;
    }
    return 0;
}

/* Applies the checked diffs of `c` to dst, in order. No Python: callers may
 * run it without the GIL. */
void pf_merge_write(const pf_diff_columns *c, uint8_t *dst)
{
    size_t n = c->n, at = 0;
    const int64_t *off = c->offsets, *len = c->lengths;
    const uint8_t *dt = c->dtypes, *op = c->ops, *src = c->data;
    for (size_t i = 0; i < n; i++) {
        size_t l = (size_t)len[i];
        uint8_t *d = dst + off[i];
        /* Scattered diffs miss the cache one after another: ask ahead
         * (a prefetch never faults, whatever the address). */
        if (i + PREFETCH_AHEAD < n)
            __builtin_prefetch(dst + off[i + PREFETCH_AHEAD], 1);
        switch (op[i]) {
        case PF_OVERWRITE: memmove(d, src + at, l); break; /* data may alias the target */
        case PF_XOR:
            for (size_t j = 0; j < l; j++)
                d[j] ^= src[at + j];
            break;
        case PF_IGNORE: break;
        default: typed[dt[i]].apply(d, src + at, l / (size_t)pf_itemsize[dt[i]], op[i]);
        }
        at += l;
    }
}

/* The columns of buffers as pf_diff_columns; -1 with ValueError when their
 * lengths disagree. */
int pf_diff_columns_of(pf_diff_columns *c, const Py_buffer *offsets, const Py_buffer *lengths,
                       const Py_buffer *dtypes, const Py_buffer *ops, const Py_buffer *data)
{
    size_t n = (size_t)dtypes->len;
    if (offsets->len != (Py_ssize_t)(n * 8) || lengths->len != offsets->len || ops->len != dtypes->len) {
        PyErr_SetString(PyExc_ValueError, "apply: malformed diff columns");
        return -1;
    }
    c->n = n;
    c->offsets = offsets->buf;
    c->lengths = lengths->buf;
    c->dtypes = dtypes->buf;
    c->ops = ops->buf;
    c->data = data->buf;
    c->data_len = (size_t)data->len;
    return 0;
}

/* The exception pf_merge_check's answer stands for. */
PyObject *pf_merge_error_type(int problem)
{
    return problem == PF_MERGE_BAD_INDEX ? PyExc_IndexError
           : problem == PF_MERGE_BAD_PRODUCT ? PyExc_ArithmeticError : PyExc_ValueError;
}

/* apply(target, offsets, lengths, dtypes, ops, data, check_only=False, limit=-1, done=None)
 * Raises IndexError (bounds), ValueError (malformed) or ArithmeticError
 * (PRODUCT over a zero) before writing anything. A check may allow bytes up
 * to `limit` past the target (memory about to grow, reading as zero).
 * `done` (a writable byte) is set to 1 once the diffs are written: the
 * caller's only reliable sign, when a KeyboardInterrupt surfaces around
 * the call, of whether the write happened (nothing can interrupt it
 * half-way: it runs without Python code).
 * The index columns are read twice (checked, then applied with the GIL
 * released): callers pass private copies nobody else can change
 * (Snapshot._apply copies them), so what is checked is what is applied. */
PyObject *pf_apply(PyObject *self, PyObject *args)
{
    Py_buffer target, offsets, lengths, dtypes, ops, data, done = {0};
    int check_only = 0;
    Py_ssize_t limit = -1;
    PyObject *done_obj = Py_None;
    if (!PyArg_ParseTuple(args, "w*y*y*y*y*y*|pnO", &target, &offsets, &lengths, &dtypes, &ops,
                          &data, &check_only, &limit, &done_obj))
        return NULL;
    PyObject *result = NULL;
    if (done_obj != Py_None) {
        if (PyObject_GetBuffer(done_obj, &done, PyBUF_WRITABLE) != 0)
            goto done;
        if (done.len != 1) {
            PyErr_SetString(PyExc_ValueError, "apply: done must be one writable byte");
            goto done;
        }
    }
    pf_diff_columns c;
    if (pf_diff_columns_of(&c, &offsets, &lengths, &dtypes, &ops, &data) != 0)
        goto done;
    uint8_t *dst = target.buf;
    size_t mapped = (size_t)target.len;
    size_t size = check_only && limit > target.len ? (size_t)limit : mapped;
    char why[256];
    int problem = pf_merge_check(&c, dst, mapped, size, why, sizeof why);
    if (problem) {
        PyErr_SetString(pf_merge_error_type(problem), why);
        goto done;
    }
    if (!check_only) {
        Py_BEGIN_ALLOW_THREADS
        pf_merge_write(&c, dst);
        Py_END_ALLOW_THREADS
        if (done.buf != NULL)
            *(uint8_t *)done.buf = 1;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    if (done.obj != NULL)
        PyBuffer_Release(&done);
    PyBuffer_Release(&target);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&dtypes);
    PyBuffer_Release(&ops);
    PyBuffer_Release(&data);
    return result;
}

/* check_columns(offsets, lengths, dtypes, ops, data_len) -> None when the
 * DiffBatch columns are well formed, else (index of the first bad diff, a
 * pf_column_problem). One pass, for the wire and DiffBatch checks. */
PyObject *pf_check_columns(PyObject *self, PyObject *args)
{
    Py_buffer offsets, lengths, dtypes, ops;
    unsigned long long data_len;
    if (!PyArg_ParseTuple(args, "y*y*y*y*K", &offsets, &lengths, &dtypes, &ops, &data_len))
        return NULL;
    PyObject *result = NULL;
    size_t n = (size_t)dtypes.len, i = 0;
    int problem = 0;
    if (offsets.len != (Py_ssize_t)(n * 8) || lengths.len != offsets.len || ops.len != dtypes.len) {
        PyErr_SetString(PyExc_ValueError, "check_columns: columns differ in length");
        goto done;
    }
    const uint8_t *dt = dtypes.buf, *op = ops.buf;
    uint64_t used = 0;
    for (; i < n; i++) {
        int64_t off, len;
        memcpy(&off, (const uint8_t *)offsets.buf + 8 * i, 8);
        memcpy(&len, (const uint8_t *)lengths.buf + 8 * i, 8);
        if (off < 0 || len < 0)
            problem = PF_COLUMN_NEGATIVE;
        else if (off > INT64_MAX - len)
            problem = PF_COLUMN_OVERFLOW;
        else if ((uint64_t)len > data_len - used)
            problem = (uint64_t)len <= data_len ? PF_COLUMN_DATA_LENGTH : PF_COLUMN_PAST_DATA;
        else if (dt[i] >= PF_N_DTYPES || op[i] >= PF_N_OPS)
            problem = PF_COLUMN_UNKNOWN_CODE;
        else if (pf_op_valid(dt[i], op[i]) != 0)
            problem = PF_COLUMN_INVALID_OP;
        else if (pf_op_is_typed(op[i]) &&
                 (uint64_t)len % (uint64_t)pf_itemsize[dt[i]] != 0)
            problem = PF_COLUMN_PARTIAL_VALUE;
        if (problem)
            break;
        used += (uint64_t)len;
    }
    if (problem == 0 && used != data_len)
        problem = PF_COLUMN_DATA_LENGTH;
    if (problem == PF_COLUMN_DATA_LENGTH)
        i = n;
    result = problem ? Py_BuildValue("(ni)", (Py_ssize_t)i, problem) : Py_NewRef(Py_None);
done:
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&dtypes);
    PyBuffer_Release(&ops);
    return result;
}

/* copy_pages(target, source, dirty, page_size) -> bytes copied: copies every
 * page flagged in `dirty` from source to target (both clipped to the shorter). */
PyObject *pf_copy_pages(PyObject *self, PyObject *args)
{
    Py_buffer target, source, dirty;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "w*y*y*n", &target, &source, &dirty, &page_size))
        return NULL;
    size_t limit = (size_t)(target.len < source.len ? target.len : source.len);
    size_t ps = (size_t)page_size, copied = 0;
    if (page_size <= 0 || (size_t)dirty.len < (limit + ps - 1) / ps) {
        PyErr_SetString(PyExc_ValueError, "copy_pages: one flag per page needed");
    } else {
        const uint8_t *flags = dirty.buf;
        size_t n_pages = (limit + ps - 1) / ps;
        Py_BEGIN_ALLOW_THREADS
        for (size_t p = 0; p < n_pages;) {
            const uint8_t *hit = memchr(flags + p, 1, n_pages - p); /* skip clean pages fast */
            if (hit == NULL)
                break;
            p = (size_t)(hit - flags);
            size_t q = p + 1;
            while (q * ps < limit && flags[q])
                q++;
            size_t a = p * ps, b = q * ps < limit ? q * ps : limit;
            memmove((uint8_t *)target.buf + a, (const uint8_t *)source.buf + a, b - a); /* may alias */
            copied += b - a;
            p = q;
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&target);
    PyBuffer_Release(&source);
    PyBuffer_Release(&dirty);
    if (PyErr_Occurred())
        return NULL;
    return PyLong_FromSize_t(copied);
}

/* mark_pages(flags, offsets, lengths, ops, page_size) -> None: sets the
 * flag (one byte per page) of every page a diff changes: IGNORE diffs and
 * empty ones change none. One pass without the GIL, whatever the count of
 * diffs (numpy needed several passes and index arrays as long as the batch). A
 * diff reaching past the flags is a ValueError, before any flag is set. */
PyObject *pf_mark_pages(PyObject *self, PyObject *args)
{
    Py_buffer flags, offsets, lengths, ops;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "w*y*y*y*n", &flags, &offsets, &lengths, &ops, &page_size))
        return NULL;
    size_t n = (size_t)ops.len, ps = (size_t)page_size, n_flags = (size_t)flags.len;
    const int64_t *off = offsets.buf, *len = lengths.buf;
    const uint8_t *op = ops.buf;
    uint8_t *f = flags.buf;
    int bad = page_size <= 0 || offsets.len != (Py_ssize_t)(n * 8) || lengths.len != offsets.len;
    for (size_t i = 0; i < n && !bad; i++)
        if (op[i] != PF_IGNORE && len[i] > 0 &&
            (off[i] < 0 || (uint64_t)off[i] > (uint64_t)INT64_MAX - (uint64_t)len[i] ||
             (uint64_t)(off[i] + len[i] - 1) / ps >= n_flags))
            bad = 1;
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "mark_pages: malformed columns or a diff past the flags");
    } else {
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < n; i++) {
            if (op[i] == PF_IGNORE || len[i] <= 0)
                continue;
            size_t first = (size_t)off[i] / ps, last = (size_t)(off[i] + len[i] - 1) / ps;
            if (first == last)
                f[first] = 1; /* most diffs: a value or a run within one page */
            else
                memset(f + first, 1, last - first + 1);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&flags);
    PyBuffer_Release(&offsets);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&ops);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}
