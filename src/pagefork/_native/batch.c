/* pf_batch: the columns of a DiffBatch built in C (offsets, lengths, dtypes,
 * ops and one data buffer), handed to Python as bytes objects. */
#include "pagefork.h"

#include <stdlib.h>
#include <string.h>

const int pf_itemsize[PF_N_DTYPES] = {1, 1, 1, 2, 4, 8, 1, 2, 4, 8, 4, 8};

int pf_op_valid(int dtype, int op)
{
    if (dtype < 0 || dtype >= PF_N_DTYPES || op < 0 || op >= PF_N_OPS)
        return -1;
    switch (op) {
    case PF_OVERWRITE:
    case PF_XOR:
    case PF_IGNORE:
        return 0;
    case PF_MAX:
    case PF_MIN:
        return dtype == PF_RAW ? -1 : 0; /* BOOL compares as 0/1 */
    default:
        return dtype == PF_RAW || dtype == PF_BOOL ? -1 : 0;
    }
}

static int grow(void **p, size_t *cap, size_t need, size_t item)
{
    if (need <= *cap)
        return 0;
    size_t next = *cap ? *cap : 64;
    while (next < need)
        next *= 2;
    void *q = realloc(*p, next * item);
    if (q == NULL)
        return -1;
    *p = q;
    *cap = next;
    return 0;
}

uint8_t *pf_batch_add(pf_batch *b, int64_t offset, size_t length, int dtype, int op)
{
    if (b->n == b->cap) {
        size_t cap = b->cap, want = b->n + 1;
        size_t c1 = cap, c2 = cap, c3 = cap;
        if (grow((void **)&b->offsets, &c1, want, sizeof(int64_t)) ||
            grow((void **)&b->lengths, &c2, want, sizeof(int64_t)) ||
            grow((void **)&b->dtypes, &c3, want, 1) || grow((void **)&b->ops, &cap, want, 1))
            return NULL;
        b->cap = cap;
    }
    if (grow((void **)&b->data, &b->data_cap, b->data_len + length, 1))
        return NULL;
    b->offsets[b->n] = offset;
    b->lengths[b->n] = (int64_t)length;
    b->dtypes[b->n] = (uint8_t)dtype;
    b->ops[b->n] = (uint8_t)op;
    b->n++;
    uint8_t *dst = b->data + b->data_len;
    b->data_len += length;
    return dst;
}

void pf_batch_drop_last(pf_batch *b)
{
    if (b->n == 0)
        return;
    b->n--;
    b->data_len -= (size_t)b->lengths[b->n];
}

void pf_batch_free(pf_batch *b)
{
    free(b->offsets);
    free(b->lengths);
    free(b->dtypes);
    free(b->ops);
    free(b->data);
    memset(b, 0, sizeof *b);
}

PyObject *pf_batch_finish(pf_batch *b)
{
    /* "y#" turns a NULL pointer into None: empty columns need a real one. */
    static const char empty[1];
#define COLUMN(p) ((p) ? (const char *)(p) : empty)
    PyObject *out = Py_BuildValue(
        "(y#y#y#y#y#)", COLUMN(b->offsets), (Py_ssize_t)(b->n * sizeof(int64_t)),
        COLUMN(b->lengths), (Py_ssize_t)(b->n * sizeof(int64_t)), COLUMN(b->dtypes),
        (Py_ssize_t)b->n, COLUMN(b->ops), (Py_ssize_t)b->n, COLUMN(b->data),
        (Py_ssize_t)b->data_len);
#undef COLUMN
    pf_batch_free(b);
    return out;
}
