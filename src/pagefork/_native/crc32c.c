/* CRC32C (Castagnoli), the checksum of the wire and delta formats: the SSE4.2
 * crc32 instruction where the CPU has it, a table elsewhere. */
#include "pagefork.h"

#include <string.h>

static uint32_t table[256];

/* Built when the module loads: built lazily, two threads checksumming
 * without the GIL could see a half-built table and compute wrong CRCs
 * (valid messages refused) on CPUs without SSE4.2. */
__attribute__((constructor)) static void build_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        table[i] = c;
    }
}

static uint32_t crc_table(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n--)
        crc = table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
#include <nmmintrin.h>

/* clang (e.g. zig cc, which builds the manylinux wheels) files the crc32
 * instruction under its own target feature, gcc under sse4.2: name both. */
__attribute__((target("sse4.2,crc32"))) static uint32_t crc_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--)
        c32 = _mm_crc32_u8(c32, *p++);
    return c32;
}
#endif

uint32_t pf_crc32c_update(uint32_t crc, const uint8_t *data, size_t len)
{
    crc = ~crc;
#if defined(__x86_64__)
    if (__builtin_cpu_supports("sse4.2"))
        return ~crc_hw(crc, data, len);
#endif
    return ~crc_table(crc, data, len);
}

/* crc32c(data, crc=0) -> int */
PyObject *pf_crc32c(PyObject *self, PyObject *args)
{
    Py_buffer data;
    unsigned int crc = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &crc))
        return NULL;
    uint32_t out;
    Py_BEGIN_ALLOW_THREADS
    out = pf_crc32c_update(crc, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(out);
}
