// x86 vector operations for kernels_impl.h, one intrinsic each: 8-lane AVX2/FMA/F16C
// (TQ_VEC_BITS 256, struct VecAVX2) or 16-lane AVX-512 F/BW/VL/VNNI (TQ_VEC_BITS 512,
// struct VecAVX512). The ISA unit defines TQ_VEC_BITS and includes this once. Operations
// whose intrinsics differ only in prefix (_mm256_/_mm512_) and integer suffix
// (si256/si512) are written once; the rest per width below.
#include <immintrin.h>
#include <stdint.h>

#define TQ_VCAT_(a, b) a##b
#define TQ_VCAT(a, b) TQ_VCAT_(a, b)
#define TQ_MM TQ_VCAT(TQ_VCAT(_mm, TQ_VEC_BITS), _)
#define TQ_SI TQ_VCAT(si, TQ_VEC_BITS)
#define TQ_V(op) TQ_VCAT(TQ_MM, op)
#define TQ_VI(op) TQ_VCAT(TQ_MM, TQ_VCAT(op, TQ_SI))

#if TQ_VEC_BITS == 256
struct VecAVX2 {
  static constexpr int GEMM_MR = 6;
#elif TQ_VEC_BITS == 512
struct VecAVX512 {
  static constexpr int GEMM_MR = 8;
#else
#error "define TQ_VEC_BITS as 256 or 512 before including vec_x86.h"
#endif
  static constexpr int W = TQ_VEC_BITS / 32;
  using F = TQ_VCAT(__m, TQ_VEC_BITS);
  using I = TQ_VCAT(TQ_VCAT(__m, TQ_VEC_BITS), i);

  static inline F zero() { return TQ_V(setzero_ps)(); }
  static inline F set1(float a) { return TQ_V(set1_ps)(a); }
  static inline F load(const float* p) { return TQ_V(loadu_ps)(p); }
  static inline void store(float* p, F a) { TQ_V(storeu_ps)(p, a); }
  static inline F fma(F a, F b, F c) { return TQ_V(fmadd_ps)(a, b, c); }
  static inline F add(F a, F b) { return TQ_V(add_ps)(a, b); }
  static inline F sub(F a, F b) { return TQ_V(sub_ps)(a, b); }
  static inline F mul(F a, F b) { return TQ_V(mul_ps)(a, b); }
  static inline F div(F a, F b) { return TQ_V(div_ps)(a, b); }
  static inline F min(F a, F b) { return TQ_V(min_ps)(a, b); }
  static inline F max(F a, F b) { return TQ_V(max_ps)(a, b); }
  static inline F cvt(I a) { return TQ_V(cvtepi32_ps)(a); }
  static inline I cvt_f2i(F a) { return TQ_V(cvtps_epi32)(a); }  // inputs already integral

  static inline I izero() { return TQ_VI(setzero_)(); }
  static inline I set1i(int32_t a) { return TQ_V(set1_epi32)(a); }
  static inline I loadi(const void* p) { return TQ_VI(loadu_)((const I*)p); }
  static inline void storei(void* p, I a) { TQ_VI(storeu_)((I*)p, a); }
  static inline I andi(I a, I b) { return TQ_VI(and_)(a, b); }
  static inline I ori(I a, I b) { return TQ_VI(or_)(a, b); }
  static inline I addi(I a, I b) { return TQ_V(add_epi32)(a, b); }
  static inline I subi(I a, I b) { return TQ_V(sub_epi32)(a, b); }
  template <int S> static inline I srli(I a) { return TQ_V(srli_epi32)(a, S); }
  template <int S> static inline I slli(I a) { return TQ_V(slli_epi32)(a, S); }
  static inline I bits(F a) { return TQ_VI(castps_)(a); }
  static inline F fbits(I a) { return TQ_VCAT(TQ_VCAT(TQ_MM, cast), TQ_VCAT(TQ_SI, _ps))(a); }

#if TQ_VEC_BITS == 256
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
#else
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
#endif
};

#undef TQ_VI
#undef TQ_V
#undef TQ_SI
#undef TQ_MM
#undef TQ_VCAT
#undef TQ_VCAT_
