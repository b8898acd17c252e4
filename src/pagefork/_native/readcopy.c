/* Reading a checkpoint image: one copy from a file into memory with the
 * CRC32C computed over each piece right after it lands, while it is still in the cache; and the
 * CRC32C of two pieces combined, so two threads can each copy and check
 * half of an image. */
#include "pagefork.h"

#include <errno.h>
#include <stdlib.h>
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

/* read_checked(src_fd, src_offset, length, dest, crc=0) -> (bytes copied, crc)
 * Copies length bytes of src_fd from src_offset into the writable buffer
 * dest, continuing crc over each piece read back from where it landed.
 * Fewer bytes copied than asked: src_fd ended. */
PyObject *pf_read_checked(PyObject *self, PyObject *args)
{
    (void)self;
    int src_fd;
    PyObject *offset_obj, *length_obj, *crc_obj = NULL;
    uint64_t src_offset, length, crc64 = 0;
    Py_buffer dest;
    if (!PyArg_ParseTuple(args, "iO!O!w*|O!", &src_fd, &PyLong_Type, &offset_obj, &PyLong_Type,
                          &length_obj, &dest, &PyLong_Type, &crc_obj))
        return NULL;
    if (unsigned_arg(offset_obj, 64, &src_offset) < 0 || unsigned_arg(length_obj, 64, &length) < 0
        || (crc_obj && unsigned_arg(crc_obj, 32, &crc64) < 0)) {
        PyBuffer_Release(&dest);
        return NULL;
    }
    uint32_t crc = (uint32_t)crc64;
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
    uint64_t copied = 0;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    while (copied < length) {
        size_t n = length - copied < PIECE ? (size_t)(length - copied) : PIECE;
        uint8_t *to = (uint8_t *)dest.buf + copied;
        ssize_t got = read_full(src_fd, to, n, src_offset + copied);
        if (got < 0) {
            failed = errno;
            break;
        }
        crc = pf_crc32c_update(crc, to, (size_t)got);
        copied += (uint64_t)got;
        if ((size_t)got < n)
            break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&dest);
    if (failed) {
        errno = failed;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("KI", (unsigned long long)copied, (unsigned int)crc);
}
