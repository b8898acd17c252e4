/* Byte-run search shared by the diff and delta kernels: where two buffers
 * start to differ and where they agree again. SSE2 (x86-64 baseline)
 * compares 16 bytes per instruction; other targets compare 8-byte words. */
#ifndef PAGEFORK_COMPARE_H
#define PAGEFORK_COMPARE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h>

/* Bit i set where a[i] != b[i], for the 64 bytes at a and b. */
static inline uint64_t pf_diff_mask64(const uint8_t *a, const uint8_t *b)
{
    uint64_t eq = 0;
    for (int i = 0; i < 4; i++) {
        __m128i e = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + 16 * i)),
                                   _mm_loadu_si128((const __m128i *)(b + 16 * i)));
        eq |= (uint64_t)(unsigned)_mm_movemask_epi8(e) << (16 * i);
    }
    return ~eq;
}

/* First index in [pos, end) where a and b differ, or end. */
static inline size_t pf_find_diff(const uint8_t *a, const uint8_t *b, size_t pos, size_t end)
{
    while (pos + 64 <= end) {
        __m128i e0 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + pos)),
                                    _mm_loadu_si128((const __m128i *)(b + pos)));
        __m128i e1 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + pos + 16)),
                                    _mm_loadu_si128((const __m128i *)(b + pos + 16)));
        __m128i e2 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + pos + 32)),
                                    _mm_loadu_si128((const __m128i *)(b + pos + 32)));
        __m128i e3 = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(a + pos + 48)),
                                    _mm_loadu_si128((const __m128i *)(b + pos + 48)));
        __m128i all = _mm_and_si128(_mm_and_si128(e0, e1), _mm_and_si128(e2, e3));
        if (_mm_movemask_epi8(all) != 0xFFFF)
            break;
        pos += 64;
    }
    while (pos + 16 <= end) {
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(
            _mm_loadu_si128((const __m128i *)(a + pos)), _mm_loadu_si128((const __m128i *)(b + pos))));
        if (m != 0xFFFF)
            return pos + (size_t)__builtin_ctz(~m & 0xFFFF);
        pos += 16;
    }
    while (pos < end && a[pos] == b[pos])
        pos++;
    return pos;
}

/* First index in [pos, end) where a and b are equal, or end. */
static inline size_t pf_find_same(const uint8_t *a, const uint8_t *b, size_t pos, size_t end)
{
    while (pos + 16 <= end) {
        unsigned m = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(
            _mm_loadu_si128((const __m128i *)(a + pos)), _mm_loadu_si128((const __m128i *)(b + pos))));
        if (m != 0)
            return pos + (size_t)__builtin_ctz(m);
        pos += 16;
    }
    while (pos < end && a[pos] != b[pos])
        pos++;
    return pos;
}

#else

static inline uint64_t pf_diff_mask64(const uint8_t *a, const uint8_t *b)
{
    uint64_t m = 0;
    for (int i = 0; i < 64; i++)
        m |= (uint64_t)(a[i] != b[i]) << i;
    return m;
}

static inline uint64_t pf_load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline size_t pf_find_diff(const uint8_t *a, const uint8_t *b, size_t pos, size_t end)
{
    while (pos + 8 <= end) {
        uint64_t x = pf_load64(a + pos) ^ pf_load64(b + pos);
        if (x != 0) {
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
            return pos + (size_t)(__builtin_ctzll(x) / 8);
#else
            return pos + (size_t)(__builtin_clzll(x) / 8);
#endif
        }
        pos += 8;
    }
    while (pos < end && a[pos] == b[pos])
        pos++;
    return pos;
}

static inline size_t pf_find_same(const uint8_t *a, const uint8_t *b, size_t pos, size_t end)
{
    while (pos < end && a[pos] != b[pos])
        pos++;
    return pos;
}

#endif
#endif
