// Scalar fp16 / bf16 <-> fp32 conversions (round to nearest even), internal linkage so
// every ISA unit keeps its own copy.
#pragma once
#include <stdint.h>

static inline uint32_t tq_f2u(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
static inline float tq_u2f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }

static inline float tq_bf16_to_f32(uint16_t h) { return tq_u2f((uint32_t)h << 16); }

static inline uint16_t tq_f32_to_bf16(float f) {
  uint32_t u = tq_f2u(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float tq_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) {  // zero or subnormal: m * 2^-24
    float v = (float)m * 5.9604644775390625e-8f;
    return tq_u2f(tq_f2u(v) | sign);
  }
  if (e == 31) return tq_u2f(sign | 0x7F800000u | (m << 13));
  return tq_u2f(sign | ((e + 112u) << 23) | (m << 13));
}

static inline uint16_t tq_f32_to_f16(float f) {
  uint32_t u = tq_f2u(f);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return sign | 0x7E00;              // NaN
  if (a >= 0x477FF000u) return sign | 0x7C00;             // >= 65520 rounds to inf
  if (a < 0x38800000u) {                                  // below 2^-14: subnormal half
    float r = __builtin_nearbyintf(tq_u2f(a) * 16777216.0f);  // units of 2^-24, exact scaling
    return sign | (uint16_t)r;
  }
  uint32_t m = a - 0x38000000u;                           // rebias exponent 127 -> 15
  m += 0xFFFu + ((m >> 13) & 1u);                         // round 23 -> 10 mantissa bits
  return sign | (uint16_t)(m >> 13);
}
