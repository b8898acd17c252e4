/* pf_batch: the columns of a DiffBatch built in C (offsets, lengths, dtypes,
 * ops and one data buffer), handed to Python as bytes objects. */
#define _GNU_SOURCE
#include "pagefork.h"

#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

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

#define PF_COLUMN_MMAP (256 * 1024)


/* Large column mappings are kept for reuse (their pages are already
 * faulted in): a diff that emits many runs then costs no mmap, no page
 * faults and no page clearing. Only touched with the GIL held. Cached
 * mappings are MADV_FREE'd, so memory pressure can still reclaim them. */
#define PF_CACHED_COLUMNS 10
static pf_column column_cache[PF_CACHED_COLUMNS];
static int n_cached;

static void column_free(pf_column *c)
{
    if (c->mapped && n_cached < PF_CACHED_COLUMNS) {
        madvise(c->p, c->mapped, MADV_FREE);
        column_cache[n_cached++] = *c;
    } else if (c->mapped) {
        munmap(c->p, c->mapped);
    } else {
        free(c->p);
    }
    memset(c, 0, sizeof *c);
}

void pf_batch_prepare(pf_batch *b)
{
    for (int i = 0; i < 5 && n_cached > 0; i++) {
        if (b->col[i].p != NULL)
            continue;
        pf_column *c = &column_cache[--n_cached];
        b->col[i] = *c;
        b->col[i].cap = c->mapped;
    }
    b->n = b->cap = 0; /* pf_batch_reserve sets the pointers on first use */
}

/* Makes room for `need` bytes; 0 or -1. */
static int column_grow(pf_column *c, size_t need)
{
    if (need <= c->cap)
        return 0;
    size_t want = c->cap ? c->cap : 1024;
    while (want < need)
        want *= 2;
    if (want < PF_COLUMN_MMAP) {
        void *q = realloc(c->p, want);
        if (q == NULL)
            return -1;
        c->p = q;
        c->cap = want;
        return 0;
    }
    if (c->mapped == 0 || want > c->mapped) {
        size_t map = want < ((size_t)64 << 20) ? (size_t)64 << 20 : want * 2;
        void *q;
        if (c->mapped) {
            q = mremap(c->p, c->mapped, map, MREMAP_MAYMOVE);
        } else {
            q = mmap(NULL, map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
            /* Huge pages where THP is "madvise" (as numpy asks for its large
             * arrays): a large diff costs a fault per 2 MiB, not per page. */
            if (q != MAP_FAILED)
                madvise(q, map, MADV_HUGEPAGE);
            if (q != MAP_FAILED && c->cap)
                memcpy(q, c->p, c->cap);
        }
        if (q == MAP_FAILED)
            return -1;
        if (!c->mapped)
            free(c->p);
        c->p = q;
        c->mapped = map;
    }
    c->cap = want > c->mapped ? c->mapped : want;
    return 0;
}

int pf_batch_reserve(pf_batch *b, size_t length)
{
    if (b->n == b->cap || b->offsets == NULL) {
        size_t want = (b->n + 1) * 2;
        if (column_grow(&b->col[0], want * sizeof(int64_t)) ||
            column_grow(&b->col[1], want * sizeof(int64_t)) || column_grow(&b->col[2], want) ||
            column_grow(&b->col[3], want))
            return -1;
        b->offsets = (int64_t *)b->col[0].p;
        b->lengths = (int64_t *)b->col[1].p;
        b->dtypes = b->col[2].p;
        b->ops = b->col[3].p;
        size_t cap = b->col[2].cap < b->col[3].cap ? b->col[2].cap : b->col[3].cap;
        if (b->col[0].cap / sizeof(int64_t) < cap)
            cap = b->col[0].cap / sizeof(int64_t);
        if (b->col[1].cap / sizeof(int64_t) < cap)
            cap = b->col[1].cap / sizeof(int64_t);
        b->cap = cap;
    }
    if (column_grow(&b->col[4], b->data_len + length) != 0)
        return -1;
    b->data = b->col[4].p;
    return 0;
}

void pf_batch_free(pf_batch *b)
{
    for (int i = 0; i < 5; i++)
        column_free(&b->col[i]);
    memset(b, 0, sizeof *b);
}

/* _native.Buffer: read-only bytes owned by a malloc'ed block, so a batch's
 * columns reach Python without another copy. */
typedef struct {
    PyObject_HEAD
    pf_column column;
    Py_ssize_t len;
} PfBuffer;

static int buffer_getbuffer(PfBuffer *self, Py_buffer *view, int flags)
{
    static char empty[1];
    return PyBuffer_FillInfo(view, (PyObject *)self, self->column.p ? (void *)self->column.p : empty,
                             self->len, 1, flags);
}

static void buffer_dealloc(PfBuffer *self)
{
    column_free(&self->column);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static Py_ssize_t buffer_length(PfBuffer *self)
{
    return self->len;
}

static PyBufferProcs buffer_as_buffer = {.bf_getbuffer = (getbufferproc)buffer_getbuffer};
static PySequenceMethods buffer_as_sequence = {.sq_length = (lenfunc)buffer_length};

PyTypeObject PfBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pagefork._native.Buffer",
    .tp_basicsize = sizeof(PfBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Read-only bytes made by the native core (a DiffBatch column).",
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_as_buffer = &buffer_as_buffer,
    .tp_as_sequence = &buffer_as_sequence,
};

/* Takes ownership of the column (freed on failure too). A big mapping
 * holding a small column is copied out so the mapping can be reused. */
static PyObject *wrap(pf_column *c, size_t len)
{
    if (c->mapped && len < PF_COLUMN_MMAP) {
        pf_column small = {malloc(len ? len : 1), len, 0};
        if (small.p == NULL) {
            column_free(c);
            return PyErr_NoMemory();
        }
        memcpy(small.p, c->p, len);
        column_free(c);
        *c = small;
    }
    PfBuffer *b = PyObject_New(PfBuffer, &PfBufferType);
    if (b == NULL) {
        column_free(c);
        return NULL;
    }
    b->column = *c;
    b->len = (Py_ssize_t)len;
    memset(c, 0, sizeof *c);
    return (PyObject *)b;
}

PyObject *pf_batch_finish(pf_batch *b)
{
    size_t lens[5] = {b->n * sizeof(int64_t), b->n * sizeof(int64_t), b->n, b->n, b->data_len};
    PyObject *cols[5];
    for (int i = 0; i < 5; i++)
        cols[i] = wrap(&b->col[i], lens[i]);
    pf_batch_free(b);
    PyObject *out = NULL;
    if (cols[0] && cols[1] && cols[2] && cols[3] && cols[4])
        out = PyTuple_Pack(5, cols[0], cols[1], cols[2], cols[3], cols[4]);
    for (int i = 0; i < 5; i++)
        Py_XDECREF(cols[i]);
    return out;
}
