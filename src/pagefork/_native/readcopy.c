/* Reading a checkpoint image: one copy from a file into memory with the
 * CRC32C computed over each piece right after it lands, while it is still in the cache; and the
 * CRC32C of two pieces combined, so two threads can each copy and check
 * half of an image. */
#include "pagefork.h"

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

#define POLY 0x82F63B78u      /* CRC32C, reflected */
#define PIECE (256u << 10)    /* fits the L2 cache: checksummed before it is evicted */

/* a * b modulo the CRC polynomial, in the reflected bit order (bit 31 is x^0). */
static uint32_t mult_mod_poly(uint32_t a, uint32_t b)
{
    uint32_t m = 1u << 31, p = 0;
    for (;;) {
        if (a & m) {
            p ^= b;
            if ((a & (m - 1)) == 0)
                break;
        }
        m >>= 1;
        b = b & 1 ? (b >> 1) ^ POLY : b >> 1;
    }
    return p;
}

/* x^(8 * n) modulo the polynomial: the shift of a CRC past n zero bytes. */
static uint32_t x_pow_8n(uint64_t n)
{
    uint32_t result = 1u << 31;  /* x^0 */
    uint32_t square = 1u << 23;  /* x^8 */
    while (n) {
        if (n & 1)
            result = mult_mod_poly(square, result);
        square = mult_mod_poly(square, square);
        n >>= 1;
    }
    return result;
}

uint32_t pf_crc32c_concat(uint32_t crc_a, uint32_t crc_b, uint64_t len_b)
{
    return mult_mod_poly(x_pow_8n(len_b), crc_a) ^ crc_b;
}

/* A Python int that must fit in `bits` bits (<= 64): OverflowError, never
 * silently truncated like the "I" and "K" formats do. */
static int unsigned_arg(PyObject *obj, unsigned bits, uint64_t *out)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (bits < 64 && v >> bits) {
        PyErr_Format(PyExc_OverflowError, "%llu does not fit in %u bits", v, bits);
        return -1;
    }
    *out = v;
    return 0;
}

/* crc32c_combine(crc_a, crc_b, len_b) -> the CRC32C of a + b */
PyObject *pf_crc32c_combine(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *a_obj, *b_obj, *len_obj;
    uint64_t a, b, len_b;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyLong_Type, &a_obj, &PyLong_Type, &b_obj,
                          &PyLong_Type, &len_obj)
        || unsigned_arg(a_obj, 32, &a) < 0 || unsigned_arg(b_obj, 32, &b) < 0
        || unsigned_arg(len_obj, 64, &len_b) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(pf_crc32c_concat((uint32_t)a, (uint32_t)b, len_b));
}

/* pread until n bytes or end of file; -1 with errno on an error. EINTR is
 * retried: this runs without the GIL, a signal is handled when it returns. */
static ssize_t read_full(int fd, uint8_t *to, size_t n, uint64_t at)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, to + got, n - got, (off_t)(at + got));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

/* One part of a copy: pread pieces into dest, each checksummed right after. */
typedef struct {
    int fd;
    uint64_t offset, length;
    uint8_t *dest;
    uint32_t crc;   /* in: the CRC to continue; out: over the bytes copied */
    uint64_t copied;
    int error;      /* errno, or 0 */
} copy_part;

static void *copy_checked(void *arg)
{
    copy_part *p = arg;
    while (p->copied < p->length) {
        uint64_t left = p->length - p->copied;
        size_t n = left < PIECE ? (size_t)left : PIECE;
        uint8_t *to = p->dest + p->copied;
        ssize_t got = read_full(p->fd, to, n, p->offset + p->copied);
        if (got < 0) {
            p->error = errno;
            break;
        }
        p->crc = pf_crc32c_update(p->crc, to, (size_t)got);
        p->copied += (uint64_t)got;
        if ((size_t)got < n)
            break;
    }
    return NULL;
}

/* read_checked(src_fd, src_offset, length, dest, crc=0, threads=1) -> (bytes copied, crc)
 * Copies length bytes of src_fd from src_offset into the writable buffer
 * dest, continuing crc over each piece read back from where it landed.
 * threads=2 copies the second half on a helper pthread, joined before this
 * returns (so no copy outlives the call, whatever signal arrives) and the
 * two CRCs are combined; if the thread cannot start, the caller's thread
 * copies both halves. Fewer bytes copied than asked: src_fd ended. */
PyObject *pf_read_checked(PyObject *self, PyObject *args)
{
    (void)self;
    int src_fd, threads = 1;
    PyObject *offset_obj, *length_obj, *crc_obj = NULL;
    uint64_t src_offset, length, crc64 = 0;
    Py_buffer dest;
    if (!PyArg_ParseTuple(args, "iO!O!w*|O!i", &src_fd, &PyLong_Type, &offset_obj, &PyLong_Type,
                          &length_obj, &dest, &PyLong_Type, &crc_obj, &threads))
        return NULL;
    if (unsigned_arg(offset_obj, 64, &src_offset) < 0 || unsigned_arg(length_obj, 64, &length) < 0
        || (crc_obj && unsigned_arg(crc_obj, 32, &crc64) < 0)) {
        PyBuffer_Release(&dest);
        return NULL;
    }
    if (threads != 1 && threads != 2) {
        PyBuffer_Release(&dest);
        PyErr_Format(PyExc_ValueError, "threads must be 1 or 2, not %d", threads);
        return NULL;
    }
    if (src_offset > INT64_MAX || length > INT64_MAX - src_offset) {
        PyBuffer_Release(&dest);
        PyErr_SetString(PyExc_OverflowError, "offset and length past the largest file offset");
        return NULL;
    }
    if ((unsigned long long)dest.len < length) {
        PyBuffer_Release(&dest);
        PyErr_Format(PyExc_ValueError, "the destination holds %zd bytes, %llu to copy", dest.len,
                     (unsigned long long)length);
        return NULL;
    }
    /* The halves split at a page boundary, so the threads never share a page. */
    uint64_t first = threads == 2 ? length / 2 / pf_page_size * pf_page_size : length;
    copy_part parts[2] = {
        {src_fd, src_offset, first, dest.buf, (uint32_t)crc64, 0, 0},
        {src_fd, src_offset + first, length - first, (uint8_t *)dest.buf + first, 0, 0, 0},
    };
    Py_BEGIN_ALLOW_THREADS
    pthread_t helper;
    int helping = parts[1].length && pthread_create(&helper, NULL, copy_checked, &parts[1]) == 0;
    copy_checked(&parts[0]);
    if (helping)
        pthread_join(helper, NULL);
    else
        copy_checked(&parts[1]);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dest);
    int error = parts[0].error ? parts[0].error : parts[1].error;
    if (error) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    uint64_t copied = parts[0].copied;
    uint32_t crc = parts[0].crc;
    if (copied == parts[0].length && parts[1].copied) {
        copied += parts[1].copied;
        crc = pf_crc32c_concat(crc, parts[1].crc, parts[1].copied);
    }
    return Py_BuildValue("KI", (unsigned long long)copied, (unsigned int)crc);
}
