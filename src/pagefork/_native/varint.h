/* LEB128 varints, one definition for every encoding that uses them (compact
 * diff tokens, delta records). Decoding accepts only what put writes:
 * minimal (no trailing zero group) and within 64 bits, so one value has
 * exactly one encoding and a sender cannot inflate lengths it controls. */
#ifndef PAGEFORK_VARINT_H
#define PAGEFORK_VARINT_H

#include <stddef.h>
#include <stdint.h>

#define PF_VARINT_MAX 10 /* bytes of the longest (a 64-bit value) */

/* Writes v at p (room for PF_VARINT_MAX bytes); returns the bytes written. */
static inline size_t pf_varint_put(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* Reads the varint at p[*at] (before end) into *out and advances *at;
 * -1 on truncation, a non-minimal encoding or more than 64 bits. */
static inline int pf_varint_get(const uint8_t *p, size_t end, size_t *at, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*at >= end)
            return -1;
        uint8_t b = p[(*at)++];
        if ((shift == 63 && b > 1) || (shift > 0 && b == 0)) /* overflow, or not minimal */
            return -1;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -1;
}

#endif
