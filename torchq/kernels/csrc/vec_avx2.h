// 8-lane AVX2/FMA/F16C vector operations for kernels_impl.h (one intrinsic each).
#pragma once
#include <immintrin.h>
#include <stdint.h>

struct VecAVX2 {
  static constexpr int W = 8;
  static constexpr int GEMM_MR = 6;
  using F = __m256;
  using I = __m256i;

#define TQ_MM _mm256_
#define TQ_SI si256
#include "vec_x86_common.h"
  static inline F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static inline F rne(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline F load_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static inline F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static inline void store_f16(uint16_t* p, F a) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // bf16 rounded to nearest even (no NaN quieting: dequantized weights are finite)
  static inline void store_bf16(uint16_t* p, F a) {
    const __m256i u = _mm256_castps_si256(a);
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                                      _mm256_set1_epi32(1)))), 16);
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }

  // acc + a.bf16[2i+1] * b.bf16[2i+1] + a.bf16[2i] * b.bf16[2i] per lane, in the order of
  // vdpbf16ps (bf16 products are exact in fp32, so each step rounds once like it does).
  static inline F dot2bf16(F acc, I a, I b) {
    const I hi = _mm256_set1_epi32((int)0xFFFF0000u);
    acc = _mm256_fmadd_ps(fbits(_mm256_and_si256(a, hi)), fbits(_mm256_and_si256(b, hi)), acc);
    return _mm256_fmadd_ps(fbits(_mm256_slli_epi32(a, 16)), fbits(_mm256_slli_epi32(b, 16)), acc);
  }
  // W signed bytes -> W int32 lanes.
  static inline I s8_to_i32(const int8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  // acc + sum over each lane's 4 byte products u8 * s8. Precondition: the sum of each
  // adjacent byte pair's products fits int16 (vpmaddubsw saturates).
  static inline I dot4(I acc, I u, I s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  // w * sign(x) per byte (0 where x == 0).
  static inline I sign8(I w, I x) { return _mm256_sign_epi8(w, x); }
};
