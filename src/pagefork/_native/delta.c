/* The body of pagefork.delta: records of changed bytes between two buffers.
 *
 * A record is [varint gap][varint length][length bytes]: the gap counts the
 * unchanged bytes since the previous record's end. The reference is `old`
 * cut or padded with zeros to the new size; bytes past the end of `old` are
 * always covered by records (no gaps there), so a delta can never describe
 * more output than len(old) plus the bytes it carries. With xor, record
 * bytes are new ^ reference instead of new.
 *
 * Decoding accepts only what the encoder writes: every record carries at
 * least one byte and varints are minimal. So a record's gap + length + its
 * varints take at most 3 body bytes per output byte it covers, and the body
 * can never be more than 3 * new_len bytes (the bound delta.py checks before
 * decompressing anything).
 */
#include "pagefork.h"
#include "compare.h"
#include "varint.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} growbuf;

static int reserve(growbuf *g, size_t extra)
{
    if (g->len + extra <= g->cap)
        return 0;
    size_t cap = g->cap ? g->cap : 4096;
    while (cap < g->len + extra)
        cap *= 2;
    uint8_t *p = realloc(g->buf, cap);
    if (p == NULL)
        return -1;
    g->buf = p;
    g->cap = cap;
    return 0;
}

static void put_varint(growbuf *g, uint64_t v)
{
    g->len += pf_varint_put(g->buf + g->len, v);
}

static int add_record(growbuf *g, size_t *prev_end, const uint8_t *old, size_t old_len,
                      const uint8_t *new, size_t from, size_t to, int xor)
{
    if (reserve(g, 20 + (to - from)) != 0)
        return -1;
    put_varint(g, from - *prev_end);
    put_varint(g, to - from);
    uint8_t *dst = g->buf + g->len;
    if (xor) {
        size_t common = to < old_len ? to : old_len;
        size_t i = from;
        for (; i < common; i++)
            dst[i - from] = new[i] ^ old[i];
        for (; i < to; i++)
            dst[i - from] = new[i];
    } else {
        memcpy(dst, new + from, to - from);
    }
    g->len += to - from;
    *prev_end = to;
    return 0;
}

/* delta_encode(old, new, page_size, xor) -> body bytes. page_size 0: byte runs. */
PyObject *pf_delta_encode(PyObject *self, PyObject *args)
{
    Py_buffer old, new;
    Py_ssize_t page_size;
    int xor;
    if (!PyArg_ParseTuple(args, "y*y*np", &old, &new, &page_size, &xor))
        return NULL;
    PyObject *result = NULL;
    if (page_size < 0) {
        PyErr_SetString(PyExc_ValueError, "page_size must be positive");
        goto done;
    }
    const uint8_t *o = old.buf, *n = new.buf;
    size_t old_len = (size_t)old.len, new_len = (size_t)new.len;
    size_t common = old_len < new_len ? old_len : new_len;
    size_t ps = (size_t)page_size;
    growbuf g = {0};
    size_t prev_end = 0;
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    size_t pos = 0;
    while (rc == 0 && pos < common) {
        pos = pf_find_diff(n, o, pos, common);
        if (pos >= common)
            break;
        size_t end;
        if (ps == 0) {
            end = pf_find_same(n, o, pos, common);
        } else {
            /* Whole pages: extend while the next page differs too. */
            pos -= pos % ps;
            end = pos + ps;
            while (end < common && pf_find_diff(n, o, end, end + ps < common ? end + ps : common) <
                                       (end + ps < common ? end + ps : common))
                end += ps;
            if (end > common)
                end = common;
        }
        rc = add_record(&g, &prev_end, o, old_len, n, pos, end, xor);
        pos = end;
    }
    if (rc == 0 && new_len > old_len) /* growth is always sent, zeros included */
        rc = add_record(&g, &prev_end, o, old_len, n, old_len, new_len, xor);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        free(g.buf);
        PyErr_NoMemory();
        goto done;
    }
    result = PyBytes_FromStringAndSize(g.len ? (const char *)g.buf : "", (Py_ssize_t)g.len);
    free(g.buf);
done:
    PyBuffer_Release(&old);
    PyBuffer_Release(&new);
    return result;
}

/* Walks the records; with out != NULL, also applies them. -1: malformed. */
static int walk(const uint8_t *body, size_t body_len, size_t old_len, size_t new_len,
                uint8_t *out, int xor)
{
    size_t at = 0, end = 0;
    while (at < body_len) {
        uint64_t gap, len;
        if (pf_varint_get(body, body_len, &at, &gap) || pf_varint_get(body, body_len, &at, &len))
            return -1;
        if (len == 0 || gap > new_len - end || len > new_len - end - gap || len > body_len - at)
            return -1;
        size_t pos = end + (size_t)gap;
        if (gap > 0 && pos > old_len) /* past old's end every byte must be carried */
            return -1;
        if (out != NULL) {
            if (xor)
                for (size_t i = 0; i < len; i++)
                    out[pos + i] ^= body[at + i];
            else
                memcpy(out + pos, body + at, (size_t)len);
        }
        at += (size_t)len;
        end = pos + (size_t)len;
    }
    if (new_len > old_len && end != new_len)
        return -1;
    return 0;
}

/* delta_apply(old, body, new_len, xor) -> new bytes; ValueError if malformed. */
PyObject *pf_delta_apply(PyObject *self, PyObject *args)
{
    Py_buffer old, body;
    unsigned long long new_len_ull;
    int xor;
    if (!PyArg_ParseTuple(args, "y*y*Kp", &old, &body, &new_len_ull, &xor))
        return NULL;
    PyObject *result = NULL;
    size_t old_len = (size_t)old.len, body_len = (size_t)body.len;
    /* Checked before allocating: output past old's end needs carried bytes.
     * The applying walk checks every record again before writing it (the
     * body may be a buffer another process can change), and a failure
     * there discards the output. */
    if (new_len_ull > (unsigned long long)old_len + body_len ||
        walk(body.buf, body_len, old_len, (size_t)new_len_ull, NULL, xor) != 0) {
        PyErr_SetString(PyExc_ValueError, "malformed delta records");
        goto done;
    }
    size_t new_len = (size_t)new_len_ull;
    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)new_len);
    if (result == NULL)
        goto done;
    uint8_t *out = (uint8_t *)PyBytes_AS_STRING(result);
    size_t keep = old_len < new_len ? old_len : new_len;
    memcpy(out, old.buf, keep);
    memset(out + keep, 0, new_len - keep);
    if (walk(body.buf, body_len, old_len, new_len, out, xor) != 0) {
        Py_CLEAR(result);
        PyErr_SetString(PyExc_ValueError, "delta records changed while being applied");
    }
done:
    PyBuffer_Release(&old);
    PyBuffer_Release(&body);
    return result;
}

/* The records checked piece by piece, for a compressed body decompressed in
 * chunks: a malformed body is refused after the chunk that shows it, never
 * held whole. Same rules as walk(). */
typedef struct {
    uint64_t end;       /* output position after the last complete record */
    uint64_t value;     /* the varint being read */
    uint64_t gap;       /* the record's gap, once read */
    uint64_t remaining; /* record bytes still to skip */
    uint32_t shift;     /* bits of `value` read so far */
    uint32_t phase;     /* 0 reading the gap, 1 the length, 2 skipping bytes */
} check_state;

_Static_assert(sizeof(check_state) == PF_DELTA_CHECK_STATE, "check_state size");

static int check_chunk(check_state *s, const uint8_t *p, size_t n, uint64_t old_len,
                       uint64_t new_len)
{
    size_t i = 0;
    while (i < n) {
        if (s->phase == 2) {
            size_t take = n - i < s->remaining ? n - i : (size_t)s->remaining;
            s->remaining -= take;
            i += take;
            if (s->remaining == 0)
                s->phase = 0;
            continue;
        }
        uint8_t b = p[i++];
        if (s->shift > 63 || (s->shift == 63 && b > 1) || (s->shift > 0 && b == 0))
            return -1; /* overflow, not minimal (or a state the caller damaged) */
        s->value |= (uint64_t)(b & 0x7F) << s->shift;
        if (b & 0x80) {
            s->shift += 7;
            continue;
        }
        uint64_t v = s->value;
        s->value = 0;
        s->shift = 0;
        if (s->phase == 0) {
            s->gap = v;
            s->phase = 1;
            continue;
        }
        uint64_t gap = s->gap, len = v;
        if (len == 0 || gap > new_len - s->end || len > new_len - s->end - gap)
            return -1;
        if (gap > 0 && s->end + gap > old_len) /* past old's end every byte must be carried */
            return -1;
        s->end += gap + len;
        s->remaining = len;
        s->phase = 2;
    }
    return 0;
}

/* delta_check(state, chunk, old_len, new_len, final) -> None; ValueError
 * when malformed. `state`: a zeroed bytearray of DELTA_CHECK_STATE bytes,
 * passed with every chunk in order; `final` after the last one. */
PyObject *pf_delta_check(PyObject *self, PyObject *args)
{
    Py_buffer state, chunk;
    unsigned long long old_len, new_len;
    int final;
    if (!PyArg_ParseTuple(args, "w*y*KKp", &state, &chunk, &old_len, &new_len, &final))
        return NULL;
    int bad = 1;
    if (state.len == (Py_ssize_t)sizeof(check_state)) {
        check_state s;
        memcpy(&s, state.buf, sizeof s);
        bad = check_chunk(&s, chunk.buf, (size_t)chunk.len, old_len, new_len) != 0 ||
              (final && (s.phase != 0 || s.shift != 0 || (new_len > old_len && s.end != new_len)));
        memcpy(state.buf, &s, sizeof s);
    }
    PyBuffer_Release(&state);
    PyBuffer_Release(&chunk);
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "malformed delta records");
        return NULL;
    }
    Py_RETURN_NONE;
}
