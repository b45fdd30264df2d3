// Portable 16-lane "vectors" in plain C++ (the compiler vectorizes the loops for the
// baseline ISA). Same interface and semantics as vec_avx2.h / vec_avx512.h, so the
// generic kernels run with 16 lanes on any x86-64 machine and tests exercise the
// 16-lane code structure that the AVX-512 unit uses.
#pragma once
#include <stdint.h>
#include "convert.h"

struct VecScalar {
  static constexpr int W = 16;
  static constexpr int GEMM_MR = 4;
  struct F { float v[16]; };
  struct I { int32_t v[16]; };

#define TQ_LANES for (int l = 0; l < 16; ++l)
  static inline F zero() { F r; TQ_LANES r.v[l] = 0.f; return r; }
  static inline F set1(float a) { F r; TQ_LANES r.v[l] = a; return r; }
  static inline F load(const float* p) { F r; TQ_LANES r.v[l] = p[l]; return r; }
  static inline void store(float* p, F a) { TQ_LANES p[l] = a.v[l]; }
  static inline F fma(F a, F b, F c) { F r; TQ_LANES r.v[l] = a.v[l] * b.v[l] + c.v[l]; return r; }
  static inline F add(F a, F b) { F r; TQ_LANES r.v[l] = a.v[l] + b.v[l]; return r; }
  static inline F sub(F a, F b) { F r; TQ_LANES r.v[l] = a.v[l] - b.v[l]; return r; }
  static inline F mul(F a, F b) { F r; TQ_LANES r.v[l] = a.v[l] * b.v[l]; return r; }
  static inline F div(F a, F b) { F r; TQ_LANES r.v[l] = a.v[l] / b.v[l]; return r; }
  static inline F min(F a, F b) { F r; TQ_LANES r.v[l] = a.v[l] < b.v[l] ? a.v[l] : b.v[l]; return r; }
  static inline F max(F a, F b) { F r; TQ_LANES r.v[l] = a.v[l] > b.v[l] ? a.v[l] : b.v[l]; return r; }
  static inline F abs(F a) { F r; TQ_LANES r.v[l] = __builtin_fabsf(a.v[l]); return r; }
  static inline F rne(F a) { F r; TQ_LANES r.v[l] = __builtin_nearbyintf(a.v[l]); return r; }
  static inline F cvt(I a) { F r; TQ_LANES r.v[l] = (float)a.v[l]; return r; }
  static inline I cvt_f2i(F a) { I r; TQ_LANES r.v[l] = (int32_t)a.v[l]; return r; }
  static inline F load_f16(const uint16_t* p) { F r; TQ_LANES r.v[l] = tq_f16_to_f32(p[l]); return r; }
  static inline F load_bf16(const uint16_t* p) { F r; TQ_LANES r.v[l] = tq_bf16_to_f32(p[l]); return r; }
  static inline void store_f16(uint16_t* p, F a) { TQ_LANES p[l] = tq_f32_to_f16(a.v[l]); }
  static inline void store_bf16(uint16_t* p, F a) { TQ_LANES p[l] = tq_f32_to_bf16(a.v[l]); }

  static inline I izero() { I r; TQ_LANES r.v[l] = 0; return r; }
  static inline I set1i(int32_t a) { I r; TQ_LANES r.v[l] = a; return r; }
  static inline I loadi(const void* p) { I r; __builtin_memcpy(r.v, p, 64); return r; }
  static inline void storei(void* p, I a) { __builtin_memcpy(p, a.v, 64); }
  static inline I andi(I a, I b) { I r; TQ_LANES r.v[l] = a.v[l] & b.v[l]; return r; }
  static inline I addi(I a, I b) { I r; TQ_LANES r.v[l] = (int32_t)((uint32_t)a.v[l] + (uint32_t)b.v[l]); return r; }
  static inline I subi(I a, I b) { I r; TQ_LANES r.v[l] = (int32_t)((uint32_t)a.v[l] - (uint32_t)b.v[l]); return r; }
  template <int S> static inline I srli(I a) { I r; TQ_LANES r.v[l] = (int32_t)((uint32_t)a.v[l] >> S); return r; }
  template <int S> static inline I slli(I a) { I r; TQ_LANES r.v[l] = (int32_t)((uint32_t)a.v[l] << S); return r; }
  static inline I ori(I a, I b) { I r; TQ_LANES r.v[l] = a.v[l] | b.v[l]; return r; }
  static inline I bits(F a) { I r; __builtin_memcpy(r.v, a.v, 64); return r; }
  static inline F fbits(I a) { F r; __builtin_memcpy(r.v, a.v, 64); return r; }
  // vdpbf16ps semantics: odd pair element first, then even; bf16 products are exact in fp32.
  static inline F dot2bf16(F acc, I a, I b) {
    F r;
    TQ_LANES {
      const uint32_t x = (uint32_t)a.v[l], y = (uint32_t)b.v[l];
      float t = acc.v[l] + tq_u2f(x & 0xFFFF0000u) * tq_u2f(y & 0xFFFF0000u);
      r.v[l] = t + tq_u2f(x << 16) * tq_u2f(y << 16);
    }
    return r;
  }
  static inline I s8_to_i32(const int8_t* p) { I r; TQ_LANES r.v[l] = p[l]; return r; }
  static inline I dot4(I acc, I u, I s) {
    I r;
    TQ_LANES {
      uint32_t a = (uint32_t)u.v[l], b = (uint32_t)s.v[l];
      int32_t sum = 0;
      for (int j = 0; j < 4; ++j) sum += (int32_t)(uint8_t)(a >> (8 * j)) * (int32_t)(int8_t)(b >> (8 * j));
      r.v[l] = (int32_t)((uint32_t)acc.v[l] + (uint32_t)sum);
    }
    return r;
  }
  static inline I sign8(I w, I x) {
    I r;
    TQ_LANES {
      uint32_t a = (uint32_t)w.v[l], b = (uint32_t)x.v[l], o = 0;
      for (int j = 0; j < 4; ++j) {
        int8_t wb = (int8_t)(a >> (8 * j)), xb = (int8_t)(b >> (8 * j));
        int8_t v = xb > 0 ? wb : xb < 0 ? (int8_t)(-wb) : (int8_t)0;
        o |= (uint32_t)(uint8_t)v << (8 * j);
      }
      r.v[l] = (int32_t)o;
    }
    return r;
  }
#undef TQ_LANES
};
