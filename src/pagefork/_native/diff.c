/* Snapshot.diff: compares memory with the snapshot over dirty pages only,
 * region by region, and emits a DiffBatch.
 *
 * OVERWRITE emits each maximal run of changed bytes (runs join across the
 * pages of one dirty run) in RAW and 1-byte regions; in a region of wider
 * values it emits each maximal run of changed elements, every element
 * carried whole (a float's unchanged sign and exponent bytes never split a
 * run, and a merged element is always one some thread wrote); bytes past
 * the region's last whole element stay byte-exact. Runs never extend
 * across an unchanged element: it would overwrite what an earlier thread
 * merged there. XOR emits mem ^ orig for each dirty range; typed
 * ops compare element by element (bitwise, so an unchanged NaN is unchanged)
 * and emit each run of changed elements with one value per element:
 * SUM u-o, SUBTRACT o-u, PRODUCT u/o, MAX/MIN u. Integer arithmetic wraps.
 */
#include "pagefork.h"
#include "compare.h"

#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t offset; /* of the failing element, when a kernel returns -1 */
    const char *why;
} diff_error;

static inline int emit_run(pf_batch *out, const uint8_t *mem, size_t from, size_t to, int dtype)
{
    uint8_t *dst = pf_batch_add(out, (int64_t)from, to - from, dtype, PF_OVERWRITE);
    if (dst == NULL)
        return -1;
    if (to - from <= 16) /* most runs are short: skip the memcpy call */
        for (size_t i = from; i < to; i++)
            *dst++ = mem[i];
    else
        memcpy(dst, mem + from, to - from);
    return 0;
}

/* Maximal runs of changed bytes in [a, b). Equal stretches are skipped with
 * pf_find_diff; from a difference on, 64 bytes at a time become a bit mask
 * of differing bytes whose transitions are the run edges, so many short runs
 * in a block cost no rescans. */
static int overwrite_runs(pf_batch *out, const uint8_t *mem, const uint8_t *orig, size_t a,
                          size_t b, int dtype)
{
    size_t open_at = SIZE_MAX; /* start of the run in progress */
    for (size_t p = a, n; p < b; p += n) {
        n = b - p < 64 ? b - p : 64;
        uint64_t m;
        if (n == 64) {
            m = pf_diff_mask64(mem + p, orig + p);
        } else {
            m = 0;
            for (size_t i = 0; i < n; i++)
                m |= (uint64_t)(mem[p + i] != orig[p + i]) << i;
        }
        if (m == 0 && open_at == SIZE_MAX) {
            /* An equal block between runs: skip ahead at full speed. */
            size_t next = pf_find_diff(mem, orig, p + n, b);
            n = next - p;
            continue;
        }
        size_t i = 0;
        while (i < n) {
            if (open_at != SIZE_MAX) {
                uint64_t same = ~m >> i; /* bits past n are 0 in m: "same" */
                if (same == 0)
                    break; /* the run goes on into the next block */
                size_t z = (size_t)__builtin_ctzll(same);
                if (i + z >= n)
                    break;
                if (emit_run(out, mem, open_at, p + i + z, dtype) != 0)
                    return -1;
                open_at = SIZE_MAX;
                i += z;
            } else {
                uint64_t rest = m >> i;
                if (rest == 0)
                    break;
                i += (size_t)__builtin_ctzll(rest);
                open_at = p + i;
            }
        }
    }
    if (open_at != SIZE_MAX)
        return emit_run(out, mem, open_at, b, dtype);
    return 0;
}

/* Bit 0 of each k-bit group of a pf_diff_mask64 mask set where any bit of
 * the group is: one bit per k-byte element of a 64-byte block, "changed". */
static inline uint64_t element_bits(uint64_t m, size_t k)
{
    if (k >= 2)
        m |= m >> 1;
    if (k >= 4)
        m |= m >> 2;
    if (k >= 8)
        m |= m >> 4;
    return m & (k == 2 ? 0x5555555555555555ull : k == 4 ? 0x1111111111111111ull
                                                        : 0x0101010101010101ull);
}

/* First element in [e, e1) (of k bytes, k = 2, 4 or 8, counted from base)
 * equal to the original, or e1: 64 bytes at a time, so a long run of
 * changed values costs a few vector compares per 64 bytes. */
static size_t first_same_element(const uint8_t *mem, const uint8_t *orig, size_t base, size_t e,
                                 size_t e1, size_t k)
{
    const size_t per_block = 64 / k;
    while (e + per_block <= e1) {
        uint64_t changed = element_bits(pf_diff_mask64(mem + base + e * k, orig + base + e * k), k);
        uint64_t all = k == 2 ? 0x5555555555555555ull : k == 4 ? 0x1111111111111111ull
                                                               : 0x0101010101010101ull;
        uint64_t same = ~changed & all;
        if (same != 0)
            return e + (size_t)__builtin_ctzll(same) / k;
        e += per_block;
    }
    for (; e < e1; e++)
        if (memcmp(mem + base + e * k, orig + base + e * k, k) == 0)
            break;
    return e;
}

/* OVERWRITE at element granularity over elements [e0, e1) of k bytes at
 * `base`: each maximal run of changed elements (compared bitwise, so an
 * unchanged NaN is unchanged and 0.0 -> -0.0 is a change), carried whole. */
static int overwrite_elements(pf_batch *out, const uint8_t *mem, const uint8_t *orig, size_t base,
                              size_t e0, size_t e1, size_t k, int dtype)
{
    const size_t end = base + e1 * k;
    size_t e = e0;
    while (e < e1) {
        /* Equal stretches at vector speed. */
        size_t d = pf_find_diff(mem, orig, base + e * k, end);
        if (d >= end)
            break;
        size_t r0 = (d - base) / k;
        e = first_same_element(mem, orig, base, r0 + 1, e1, k);
        if (emit_run(out, mem, base + r0 * k, base + e * k, dtype) != 0)
            return -1;
    }
    return 0;
}

static int xor_range(pf_batch *out, const uint8_t *mem, const uint8_t *orig, size_t a, size_t b,
                     int dtype)
{
    uint8_t *dst = pf_batch_add(out, (int64_t)a, b - a, dtype, PF_XOR);
    if (dst == NULL)
        return -1;
    for (size_t i = a; i < b; i++)
        dst[i - a] = mem[i] ^ orig[i];
    return 0;
}

/* One function per element type: elements [e0, e1) of the region at `base`. */
#define TYPED_DIFF(NAME, T, U, IS_FLOAT)                                                      \
    static int NAME(pf_batch *out, const uint8_t *mem, const uint8_t *orig, size_t base,      \
                    size_t e0, size_t e1, int dtype, int op, diff_error *err)                 \
    {                                                                                         \
        const size_t k = sizeof(T);                                                           \
        size_t e = e0;                                                                        \
        while (e < e1) {                                                                      \
            /* Equal stretches at vector speed; then elements compared as words. */           \
            size_t d = pf_find_diff(mem, orig, base + e * k, base + e1 * k);                  \
            if (d >= base + e1 * k)                                                           \
                break;                                                                        \
            e = (d - base) / k;                                                               \
            size_t r0 = e;                                                                    \
            for (; e < e1; e++) {                                                             \
                U x, y;                                                                       \
                memcpy(&x, mem + base + e * k, k);                                            \
                memcpy(&y, orig + base + e * k, k);                                           \
                if (x == y)                                                                   \
                    break;                                                                    \
            }                                                                                 \
            uint8_t *dst = pf_batch_add(out, (int64_t)(base + r0 * k), (e - r0) * k, dtype, op); \
            if (dst == NULL)                                                                  \
                return -1;                                                                    \
            for (size_t i = r0; i < e; i++) {                                                 \
                T u, o, d;                                                                    \
                memcpy(&u, mem + base + i * k, k);                                            \
                memcpy(&o, orig + base + i * k, k);                                           \
                switch (op) {                                                                 \
                case PF_SUM: d = IS_FLOAT ? (T)(u - o) : (T)((U)u - (U)o); break;            \
                case PF_SUBTRACT: d = IS_FLOAT ? (T)(o - u) : (T)((U)o - (U)u); break;       \
                case PF_PRODUCT:                                                              \
                    if (o == 0) {                                                             \
                        err->offset = (int64_t)(base + i * k);                                \
                        err->why = "the original value is zero, so no factor turns it into "  \
                                   "the new one";                                             \
                        return -1;                                                            \
                    }                                                                         \
                    if (IS_FLOAT) {                                                           \
                        d = (T)(u / o);                                                       \
                    } else if ((T)-1 < 0 && o == (T)-1) {                                     \
                        d = (T)((U)0 - (U)u); /* u / -1 without INT_MIN overflow */           \
                    } else if (!IS_FLOAT && (U)(u - (u / o) * o) != 0) {                      \
                        err->offset = (int64_t)(base + i * k);                                \
                        err->why = "the new integer is not a whole multiple of the original"; \
                        return -1;                                                            \
                    } else {                                                                  \
                        d = (T)(u / o);                                                       \
                    }                                                                         \
                    break;                                                                    \
                default: d = u; /* MAX, MIN */                                                \
                }                                                                             \
                memcpy(dst + (i - r0) * k, &d, k);                                            \
            }                                                                                 \
        }                                                                                     \
        return 0;                                                                             \
    }

TYPED_DIFF(diff_i8, int8_t, uint8_t, 0)
TYPED_DIFF(diff_i16, int16_t, uint16_t, 0)
TYPED_DIFF(diff_i32, int32_t, uint32_t, 0)
TYPED_DIFF(diff_i64, int64_t, uint64_t, 0)
TYPED_DIFF(diff_u8, uint8_t, uint8_t, 0)
TYPED_DIFF(diff_u16, uint16_t, uint16_t, 0)
TYPED_DIFF(diff_u32, uint32_t, uint32_t, 0)
TYPED_DIFF(diff_u64, uint64_t, uint64_t, 0)
TYPED_DIFF(diff_f32, float, uint32_t, 1)
TYPED_DIFF(diff_f64, double, uint64_t, 1)

typedef int (*typed_kernel)(pf_batch *, const uint8_t *, const uint8_t *, size_t, size_t, size_t,
                            int, int, diff_error *);

static const typed_kernel typed_kernels[PF_N_DTYPES] = {
    [PF_BOOL] = diff_u8,   [PF_INT8] = diff_i8,     [PF_INT16] = diff_i16,
    [PF_INT32] = diff_i32, [PF_INT64] = diff_i64,   [PF_UINT8] = diff_u8,
    [PF_UINT16] = diff_u16, [PF_UINT32] = diff_u32, [PF_UINT64] = diff_u64,
    [PF_FLOAT32] = diff_f32, [PF_FLOAT64] = diff_f64,
};

/* Diffs [a, b), a dirty range inside the region [start, end). */
static int diff_range(pf_batch *out, const uint8_t *mem, const uint8_t *orig, size_t start,
                      size_t end, size_t a, size_t b, int dtype, int op, diff_error *err)
{
    if (op == PF_XOR)
        return xor_range(out, mem, orig, a, b, dtype);
    size_t k = (size_t)pf_itemsize[dtype];
    if (op == PF_OVERWRITE && k == 1)
        return overwrite_runs(out, mem, orig, a, b, dtype);
    /* The elements overlapping [a, b), compared whole even where one
     * straddles the edge of the dirty range (as typed diffs always did). */
    size_t n_elems = (end - start) / k;
    size_t e0 = (a - start) / k, e1 = (b - start + k - 1) / k;
    if (e1 > n_elems)
        e1 = n_elems;
    if (op != PF_OVERWRITE)
        return typed_kernels[dtype](out, mem, orig, start, e0, e1, dtype, op, err);
    if (e0 < e1 && overwrite_elements(out, mem, orig, start, e0, e1, k, dtype) != 0)
        return -1;
    /* A typed OVERWRITE region need not be whole values: its tail bytes
     * (after the last whole element) are compared byte by byte. */
    size_t whole = start + n_elems * k;
    if (b > whole)
        return overwrite_runs(out, mem, orig, a > whole ? a : whole, b, dtype);
    return 0;
}

/* diff(memory, original, dirty, page_size, starts, ends, dtypes, ops)
 *   -> (offsets, lengths, dtypes, ops, data) as bytes.
 * starts/ends: int64 regions, sorted, disjoint, within both buffers; dirty:
 * one 0/1 byte per page covering every region. */
PyObject *pf_diff(PyObject *self, PyObject *args)
{
    Py_buffer mem, orig, dirty, starts, ends, dtypes, ops;
    Py_ssize_t page_size;
    if (!PyArg_ParseTuple(args, "y*y*y*ny*y*y*y*", &mem, &orig, &dirty, &page_size, &starts, &ends,
                          &dtypes, &ops))
        return NULL;
    PyObject *result = NULL;
    size_t n_regions = (size_t)dtypes.len;
    const int64_t *s = starts.buf, *e = ends.buf;
    const uint8_t *dt = dtypes.buf, *op = ops.buf, *flags = dirty.buf;
    size_t limit = (size_t)(mem.len < orig.len ? mem.len : orig.len);
    size_t ps = (size_t)page_size;
    if (page_size <= 0 || starts.len != (Py_ssize_t)(n_regions * 8) ||
        ends.len != starts.len || ops.len != dtypes.len) {
        PyErr_SetString(PyExc_ValueError, "diff: malformed region columns");
        goto done;
    }
    for (size_t r = 0; r < n_regions; r++) {
        if (s[r] < 0 || e[r] < s[r] || (size_t)e[r] > limit ||
            (size_t)(e[r] + (int64_t)ps - 1) / ps > (size_t)dirty.len ||
            (r > 0 && s[r] < e[r - 1]) || pf_op_valid(dt[r], op[r]) != 0) {
            PyErr_Format(PyExc_ValueError, "diff: region %zu is out of order, out of bounds or "
                         "has an invalid dtype/op", r);
            goto done;
        }
    }

    pf_batch out = {0};
    pf_batch_prepare(&out);
    diff_error err = {0, NULL};
    int rc = 0;
    const uint8_t *m = mem.buf, *o = orig.buf;
    Py_BEGIN_ALLOW_THREADS
    for (size_t r = 0; r < n_regions && rc == 0; r++) {
        if (op[r] == PF_IGNORE || e[r] == s[r])
            continue;
        size_t start = (size_t)s[r], end = (size_t)e[r];
        size_t p = start / ps, last = (end - 1) / ps + 1; /* pages [p, last) */
        while (p < last && rc == 0) {
            const uint8_t *hit = memchr(flags + p, 1, last - p);
            if (hit == NULL)
                break;
            size_t p0 = (size_t)(hit - flags), p1 = p0 + 1;
            while (p1 < last && flags[p1])
                p1++;
            size_t a = p0 * ps > start ? p0 * ps : start;
            size_t b = p1 * ps < end ? p1 * ps : end;
            rc = diff_range(&out, m, o, start, end, a, b, dt[r], op[r], &err);
            p = p1;
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        pf_batch_free(&out);
        if (err.why != NULL)
            PyErr_Format(PyExc_ArithmeticError, "PRODUCT at offset %lld: %s", (long long)err.offset,
                         err.why);
        else
            PyErr_NoMemory();
        goto done;
    }
    result = pf_batch_finish(&out);
done:
    PyBuffer_Release(&mem);
    PyBuffer_Release(&orig);
    PyBuffer_Release(&dirty);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&ends);
    PyBuffer_Release(&dtypes);
    PyBuffer_Release(&ops);
    return result;
}
