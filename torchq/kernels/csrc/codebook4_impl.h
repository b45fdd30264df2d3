// 4-bit codebook (NF4 / FP4) weight-only kernels. Included by kernels_impl.h inside its
// anonymous namespace, so it reuses the tile walk (weight_only: GEMV tiles for small M,
// dequantize + fp32 GEMM micro-kernel from GEMM_MIN_M rows), tile_ref, store_row and the
// vector traits V of the including ISA unit.
//
// Layout "cpu_codebook4_tile16" (torchq/kernels/cpu_codebook4.py): the codes are tiled
// exactly like int4 ("cpu_int4_tile16": nibble j of a row's 32-bit lane is k = 8c +
// KOFF[j]), fp32 block scales [G][16] per tile; q.lut holds the 16 fp32 table values.
//
// The table lookup keeps the 16 entries in registers:
//  * AVX-512: one vpermps (16 lanes, 4-bit index) per vector;
//  * AVX2: two 8-entry vpermps (low 3 bits) blended on the code's bit 3 (moved to the
//    lane's sign bit); for a single activation row (decode), vpshufb on the table's four
//    byte planes instead (cb4_gemv_tile_avx2_m1);
//  * portable: an array lookup.
//
// Numerics: GEMV accumulates sum_k table[q] * x per block in fp32 and applies the block
// scale once (y += s * acc); GEMM dequantizes w = table[q] * s exactly as the reference
// (torchq.primitives.codebook.dequantize_codebook) and runs the fp32 micro-kernel.

#define TQ_CB4_ISA_table_scalar 0
#define TQ_CB4_ISA_table_avx2 1
#define TQ_CB4_ISA_table_avx512 2
#define TQ_CB4_CAT(a, b) a##b
#define TQ_CB4_XCAT(a, b) TQ_CB4_CAT(a, b)
#define TQ_CB4_ISA TQ_CB4_XCAT(TQ_CB4_ISA_, TQ_TABLE_FN)

// The 16-entry table held in registers, and the lookup of nibble J of every lane of L.
struct Lut16 {
#if TQ_CB4_ISA == 1
  __m256 lo, hi;
  explicit Lut16(const float* t) : lo(_mm256_loadu_ps(t)), hi(_mm256_loadu_ps(t + 8)) {}
  template <int J>
  inline F get(I L) const {
    const I idx = J == 0 ? L : _mm256_srli_epi32(L, 4 * J);  // vpermps reads the low 3 bits
    const I sel = J == 7 ? L : _mm256_slli_epi32(L, 28 - 4 * J);  // code bit 3 -> sign bit
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                            _mm256_castsi256_ps(sel));
  }
#elif TQ_CB4_ISA == 2
  __m512 t16;
  explicit Lut16(const float* t) : t16(_mm512_loadu_ps(t)) {}
  template <int J>
  inline F get(I L) const {
    return _mm512_permutexvar_ps(J == 0 ? L : _mm512_srli_epi32(L, 4 * J), t16);  // low 4 bits
  }
#else
  const float* t;
  explicit Lut16(const float* tab) : t(tab) {}
  template <int J>
  inline F get(I L) const {
    F r;
    for (int l = 0; l < W; ++l) r.v[l] = t[((uint32_t)L.v[l] >> (4 * J)) & 0xF];
    return r;
  }
#endif
};

#if TQ_CB4_ISA == 1
// AVX2, one activation row: 32 lookups per vpshufb on byte planes. The 16 fp32 table
// values are split into 4 byte planes (one 16-byte pshufb table each); the planes of 32
// codes are interleaved back into fp32 with unpack (8-bit, then 16-bit). For the int4 tile
// layout (a row's 4 bytes per chunk: low nibbles k = 8c+u, high nibbles k = 8c+4+u) the
// result vectors hold (row pair, 4 consecutive k) per 128-bit half, so they multiply a
// 4-wide slice of x and are reduced over k with hadd once per block. ~15 % fewer
// instructions than the vpermps lookup, which matters because M=1 is lookup bound here.
// TWO: the table is bf16-exact (low 16 bits of every value zero, e.g. OCP e2m1), so only
// the two high byte planes are looked up.
template <bool TWO>
static void cb4_gemv_avx2_m1_impl(const QWeight& q, const TileRef& tr, const Acts& a, int64_t m0, float* out,
                                  const __m256i* P) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  const int64_t cpg = q.group / 8;
  const float* x = a.x + m0 * a.ldx;
  __m256 o[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < q.G; ++g) {
    __m256 acc[2][4];
    for (int h = 0; h < 2; ++h)
      for (int v = 0; v < 4; ++v) acc[h][v] = _mm256_setzero_ps();
    pf(tr.scale + (g * TILE) * 4 + q.pf_dist / 16);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      pf(tr.w + c * 64 + q.pf_dist);
      const __m256 xs[2] = {_mm256_broadcast_ps((const __m128*)(x + c * 8)),
                            _mm256_broadcast_ps((const __m128*)(x + c * 8 + 4))};
      sfor<0, 2>([&](auto hi) {
        constexpr int h = decltype(hi)::value;
        const __m256i X = _mm256_loadu_si256((const __m256i*)(tr.w + c * 64 + 32 * h));
        const __m256i C[2] = {_mm256_and_si256(X, m4), _mm256_and_si256(_mm256_srli_epi16(X, 4), m4)};
        sfor<0, 2>([&](auto ni) {
          constexpr int n = decltype(ni)::value;
          const __m256i b2 = _mm256_shuffle_epi8(P[2], C[n]), b3 = _mm256_shuffle_epi8(P[3], C[n]);
          const __m256i c0 = _mm256_unpacklo_epi8(b2, b3), c1 = _mm256_unpackhi_epi8(b2, b3);
          __m256i a0 = zero, a1 = zero;
          if constexpr (!TWO) {
            const __m256i b0 = _mm256_shuffle_epi8(P[0], C[n]), b1 = _mm256_shuffle_epi8(P[1], C[n]);
            a0 = _mm256_unpacklo_epi8(b0, b1);
            a1 = _mm256_unpackhi_epi8(b0, b1);
          }
          acc[h][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(a0, c0)), xs[n], acc[h][0]);
          acc[h][1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(a0, c0)), xs[n], acc[h][1]);
          acc[h][2] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(a1, c1)), xs[n], acc[h][2]);
          acc[h][3] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(a1, c1)), xs[n], acc[h][3]);
        });
      });
    }
    for (int h = 0; h < 2; ++h) {
      // lanes of acc[h][v]: rows 8h+v (low half) and 8h+4+v (high half), 4 k each -> rows 8h..8h+7
      const __m256 rows = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
      o[h] = _mm256_fmadd_ps(rows, _mm256_loadu_ps((const float*)tr.scale + g * TILE + h * 8), o[h]);
    }
  }
  _mm256_storeu_ps(out, o[0]);
  _mm256_storeu_ps(out + 8, o[1]);
}

static void cb4_gemv_tile_avx2_m1(const QWeight& q, const TileRef& tr, const Acts& a, int64_t m0, float* out) {
  uint8_t planes[4][16];
  uint32_t low = 0;
  for (int c = 0; c < 16; ++c) {
    const uint32_t u = tq_f2u(q.lut[c]);
    low |= u & 0xFFFFu;
    for (int i = 0; i < 4; ++i) planes[i][c] = (uint8_t)(u >> (8 * i));
  }
  __m256i P[4];
  for (int i = 0; i < 4; ++i) P[i] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)planes[i]));
  if (low == 0) {
    cb4_gemv_avx2_m1_impl<true>(q, tr, a, m0, out, P);
  } else {
    cb4_gemv_avx2_m1_impl<false>(q, tr, a, m0, out, P);
  }
}
#endif

// The codebook decoder of nibble_gemv_tile: nibble j of a lane is k = 8c + KOFF[j] (the
// int4 tiling, activations in plain order), looked up in the register table; y += s acc.
struct Cb4Nibbles {
  const QWeight& q;
  const TileRef& tr;
  const Lut16 lut;
  template <int J>
  static constexpr int xoff() { return KOFF[J]; }
  template <int J>
  inline __attribute__((always_inline)) F weight(I L) const { return lut.template get<J>(L); }
  inline void prefetch(int64_t g) const { pf(tr.scale + (g * TILE) * 4 + q.pf_dist / 16); }
  inline void group(int64_t g, F* s, F*) const {
    for (int h = 0; h < H; ++h) s[h] = V::load((const float*)tr.scale + g * TILE + h * W);
  }
  inline __attribute__((always_inline)) int row_term(int64_t, int64_t) const { return 0; }
  static inline __attribute__((always_inline)) F apply(F t, F s, F, int, F o) { return V::fma(t, s, o); }
};

// MR activation rows (plain fp32, zero padded to Kp) against one tile of 16 weight rows.
template <int MR>
static void cb4_gemv_tile(const QWeight& q, const TileRef& tr, const Acts& a, int64_t m0, float* out) {
#if TQ_CB4_ISA == 1
  if constexpr (MR == 1) {
    cb4_gemv_tile_avx2_m1(q, tr, a, m0, out);
    return;
  }
#endif
  Cb4Nibbles dec{q, tr, Lut16(q.lut)};
  nibble_gemv_tile<MR>(q, tr, a, m0, out, dec);
}

// Dequantize codes of tile k-range [k0, k0 + kc) to wb[k - k0][16]: table[q] * s (fp32).
struct Cb4Dequant {
  const QWeight& q;
  const TileRef& tr;
  const Lut16 lut;
  F s[H];
  inline void group(int64_t g) {
    for (int h = 0; h < H; ++h) s[h] = V::load((const float*)tr.scale + g * TILE + h * W);
  }
  template <int J>
  inline F value(I L, int h) const { return V::mul(lut.template get<J>(L), s[h]); }
};

static void dequant_cb4(const QWeight& q, const TileRef& tr, int64_t k0, int64_t kc, float* wb) {
  Cb4Dequant dec{q, tr, Lut16(q.lut), {}};
  dequant_nibbles(q, tr, k0, kc, wb, dec);
}

static void cb4_wo(const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1, int gemm, Scratch s) {
  weight_only(q, a, o, t0, t1, gemm, s, cb4_gemv_tile<1>, cb4_gemv_tile<2>, cb4_gemv_tile<3>, cb4_gemv_tile<4>,
              dequant_cb4);
}

#undef TQ_CB4_ISA
#undef TQ_CB4_XCAT
#undef TQ_CB4_CAT
#undef TQ_CB4_ISA_table_avx512
#undef TQ_CB4_ISA_table_avx2
#undef TQ_CB4_ISA_table_scalar
