// 16-lane AVX-512 (F, BW, VL, VNNI) vector operations for kernels_impl.h (one intrinsic each).
#pragma once
#include <immintrin.h>
#include <stdint.h>

struct VecAVX512 {
  static constexpr int W = 16;
  static constexpr int GEMM_MR = 8;
  using F = __m512;
  using I = __m512i;

#define TQ_MM _mm512_
#define TQ_SI si512
#include "vec_x86_common.h"
  static inline F abs(F a) { return _mm512_abs_ps(a); }
  static inline F rne(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline F load_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static inline F load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static inline void store_f16(uint16_t* p, F a) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // bf16 rounded to nearest even (no NaN quieting: dequantized weights are finite)
  static inline void store_bf16(uint16_t* p, F a) {
    const __m512i u = _mm512_castps_si512(a);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                           _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }

  // Native vdpbf16ps (AVX512-BF16). Only reached on CPUs that have it (ops.cpp checks).
  static inline F dot2bf16(F acc, I a, I b) { return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b); }
  static inline I s8_to_i32(const int8_t* p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  // VNNI: exact int32 accumulation of the 4 byte products per lane (no saturation).
  static inline I dot4(I acc, I u, I s) { return _mm512_dpbusd_epi32(acc, u, s); }
  static inline I sign8(I w, I x) {
    return _mm512_mask_sub_epi8(w, _mm512_movepi8_mask(x), _mm512_setzero_si512(), w);
  }
};
