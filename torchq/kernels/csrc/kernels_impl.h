// Generic CPU kernels, written once over a vector-traits type `V` (vec_x86.h for AVX2
// and AVX-512, vec_scalar.h) and compiled once per ISA unit (isa_*.cpp). Everything
// here has internal linkage; the unit exports one KernelTable (TQ_TABLE_FN).
//
// Layouts (built in torchq/kernels/cpu_layouts.py). Rows are tiled by 16 (TILE):
//  * int4 ("cpu_int4_tile16"): tile = [Kp/8 chunks][16 rows][4 bytes]; byte b of a row's
//    4-byte lane holds code k=8c+b in its low nibble and k=8c+4+b in its high nibble, so
//    nibble j of the little-endian 32-bit lane is k = 8c + KOFF[j].
//  * int8 weight-only ("cpu_int8_k16"): tile = [Kp][16 rows] int8.
//  * W8A8 ("cpu_int8_k4x16"): tile = [Kp/4][16 rows][4 bytes], then [16 rows][Kp%4].
//  * parameters (scale, zero point): tile = [G][16 rows].
// A partial last tile (N % 16 rows) is handed over zero-padded to 16 rows (tail_*).
//
// Numerics: weight-only kernels compute in fp32. The GEMV path (small M) accumulates
// sum_k u*x per group and applies y += s * acc + zt * sum_k x (u: stored code, zt the
// zero-point term); the GEMM path dequantizes w exactly as dequantize_affine does and
// runs an fp32 FMA micro-kernel. Dynamic-int8 kernels accumulate exactly in int32.

#include "convert.h"
#include "kernel_api.h"

namespace {
using namespace torchq_k;

typedef V::F F;
typedef V::I I;
constexpr int W = V::W;
constexpr int H = TILE / W;  // vectors per tile row block
constexpr int KOFF[8] = {0, 4, 1, 5, 2, 6, 3, 7};

template <int N>
struct IC {
  static constexpr int value = N;
};
// Compile-time loop: f(IC<B>{}), ..., f(IC<E-1>{}).
template <int B, int E, class Fn>
static inline __attribute__((always_inline)) void sfor(Fn&& f) {
  if constexpr (B < E) {
    f(IC<B>{});
    sfor<B + 1, E>(f);
  }
}

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int esize(int dt) { return dt == DT_F32 ? 4 : 2; }
static inline int32_t load4(const void* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

static inline float load1(const void* p, int dt, int64_t i) {
  if (dt == DT_F32) return ((const float*)p)[i];
  if (dt == DT_F16) return tq_f16_to_f32(((const uint16_t*)p)[i]);
  return tq_bf16_to_f32(((const uint16_t*)p)[i]);
}
static inline F loadv(const void* p, int dt, int64_t i) {
  if (dt == DT_F32) return V::load((const float*)p + i);
  if (dt == DT_F16) return V::load_f16((const uint16_t*)p + i);
  return V::load_bf16((const uint16_t*)p + i);
}

// Software prefetch (into all cache levels) of the streamed weight bytes. The GEMV paths
// touch each code byte once, in address order, tile after tile (full tiles are contiguous),
// so they prefetch q.pf_dist bytes ahead of the 64-byte line they load (the parameter
// streams: a 16th of that) - the DRAM stream then overlaps the arithmetic instead of
// waiting on the hardware prefetchers, which stop at every 4 KiB page. Prefetches past the
// end of a buffer are harmless (they never fault).
static inline void pf(const void* p) { __builtin_prefetch(p, 0, 3); }

// ------------------------------------------------------------------ weight tiles
struct TileRef {
  const uint8_t* w;
  const uint8_t* scale;
  const uint8_t* zero;
  int rows;
};

static inline TileRef tile_ref(const QWeight& q, int64_t t) {
  TileRef r;
  if (t < q.n_full) {
    const int64_t pbytes = TILE * q.G;  // parameter elements per tile
    r.w = q.w + t * q.tile_bytes;
    r.scale = q.scale + t * pbytes * esize(q.scale_dt);
    r.zero = q.zero ? q.zero + t * pbytes * (q.zero_kind == ZK_INT ? 1 : esize(q.zero_dt)) : nullptr;
    r.rows = TILE;
  } else {
    r.w = q.tail_w;
    r.scale = q.tail_scale;
    r.zero = q.tail_zero;
    r.rows = (int)(q.N - t * TILE);
  }
  return r;
}

// Prefetch the parameters (scale, zero point) a few groups ahead of group g.
static inline void pf_params(const QWeight& q, const TileRef& tr, int64_t g) {
  const int64_t d = q.pf_dist / 16;
  pf(tr.scale + g * TILE * esize(q.scale_dt) + d);
  if (tr.zero) pf(tr.zero + g * TILE * (q.zero_kind == ZK_INT ? 1 : esize(q.zero_dt)) + d);
}

// Scale s and zero-point term zt of group g for the 16 rows of a tile, such that the
// weight is w = u * s + zt for stored code u (integer code q = u + qmin):
//   none: w = q s             -> zt = qmin s
//   int:  w = (q - z) s       -> zt = (qmin - z) s
//   float: w = q s + m        -> zt = qmin s + m
static inline void group_params(const QWeight& q, const TileRef& tr, int64_t g, F* s, F* zt) {
  const F qm = V::set1((float)q.qmin);
  for (int h = 0; h < H; ++h) {
    const int64_t i = g * TILE + h * W;
    s[h] = loadv(tr.scale, q.scale_dt, i);
    if (q.zero_kind == ZK_NONE) {
      zt[h] = V::mul(s[h], qm);
    } else if (q.zero_kind == ZK_INT) {
      F z = V::cvt(V::s8_to_i32((const int8_t*)tr.zero + i));
      zt[h] = V::mul(V::sub(qm, z), s[h]);
    } else {
      zt[h] = V::add(V::mul(s[h], qm), loadv(tr.zero, q.zero_dt, i));
    }
  }
}

// Dequantization constants of group g in the exact form dequantize_affine uses:
// int/none: w = float(u - off) * s;  float: w = float(u - off) * s + m  (off = -qmin or z - qmin).
struct DeqParams {
  I off[H];
  F s[H];
  F m[H];
};
static inline void deq_params(const QWeight& q, const TileRef& tr, int64_t g, DeqParams& d) {
  for (int h = 0; h < H; ++h) {
    const int64_t i = g * TILE + h * W;
    d.s[h] = loadv(tr.scale, q.scale_dt, i);
    if (q.zero_kind == ZK_INT) {
      d.off[h] = V::subi(V::s8_to_i32((const int8_t*)tr.zero + i), V::set1i(q.qmin));
    } else {
      d.off[h] = V::set1i(-q.qmin);
    }
    d.m[h] = q.zero_kind == ZK_FLOAT ? loadv(tr.zero, q.zero_dt, i) : V::zero();
  }
}

// ------------------------------------------------------------------ output
// y[m, n0 + r] = v[r] * rs + bias[n0 + r] for r < rows, converted to the output dtype.
static inline void store_row(const Out& o, int64_t m, int64_t n0, int rows, const float* v, float rs) {
  const float* b = o.bias ? o.bias + n0 : nullptr;
  float tmp[TILE];
  if (rows == TILE) {
    for (int h = 0; h < H; ++h) {
      F y = V::mul(V::load(v + h * W), V::set1(rs));
      if (b) y = V::add(y, V::load(b + h * W));
      if (o.dt == DT_F32) {
        V::store((float*)o.y + m * o.ldy + n0 + h * W, y);
      } else if (o.dt == DT_F16) {
        V::store_f16((uint16_t*)o.y + m * o.ldy + n0 + h * W, y);
      } else {
        V::store(tmp + h * W, y);
      }
    }
    if (o.dt == DT_BF16) {
      uint16_t* yp = (uint16_t*)o.y + m * o.ldy + n0;
      for (int r = 0; r < TILE; ++r) yp[r] = tq_f32_to_bf16(tmp[r]);
    }
    return;
  }
  for (int r = 0; r < rows; ++r) {
    float y = v[r] * rs;
    if (b) y = y + b[r];
    const int64_t i = m * o.ldy + n0 + r;
    if (o.dt == DT_F32) {
      ((float*)o.y)[i] = y;
    } else if (o.dt == DT_F16) {
      ((uint16_t*)o.y)[i] = tq_f32_to_f16(y);
    } else {
      ((uint16_t*)o.y)[i] = tq_f32_to_bf16(y);
    }
  }
}

// ------------------------------------------------------------------ activation preparation
// Row m of x as fp32 into dst[0:K), zeros in [K, Kp).
static void row_to_f32(const void* x, int32_t dt, int64_t m, int64_t K, int64_t ldx, int64_t Kp, float* dst) {
  const int64_t base = m * ldx;
  int64_t k = 0;
  if (dt == DT_F32) {
    const float* src = (const float*)x + base;
    for (; k + W <= K; k += W) V::store(dst + k, V::load(src + k));
  } else {
    for (; k + W <= K; k += W) V::store(dst + k, loadv(x, dt, base + k));
  }
  for (; k < K; ++k) dst[k] = load1(x, dt, base + k);
  for (; k < Kp; ++k) dst[k] = 0.f;
}

static void prep_f32(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t Kp, int64_t group,
                     float* xf, float* xsum) {
  const int64_t G = group > 0 ? Kp / group : 0;
  for (int64_t m = 0; m < M; ++m) {
    float* row = xf + m * Kp;
    row_to_f32(x, dt, m, K, ldx, Kp, row);
    if (xsum) {
      for (int64_t g = 0; g < G; ++g) {
        float s = 0.f;
        for (int64_t k = g * group; k < (g + 1) * group; ++k) s += row[k];
        xsum[m * G + g] = s;
      }
    }
  }
}

// Activations rounded to bf16 (nearest even; NaN -> quiet NaN), zero padded to ldb.
static void prep_bf16(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t ldb, uint16_t* xb) {
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* row = xb + m * ldb;
    const int64_t base = m * ldx;
    if (dt == DT_BF16) {
      __builtin_memcpy(row, (const uint16_t*)x + base, 2 * K);
    } else {
      for (int64_t k = 0; k < K; ++k) row[k] = tq_f32_to_bf16(load1(x, dt, base + k));
    }
    for (int64_t k = K; k < ldb; ++k) row[k] = 0;
  }
}

// int4 GEMV activations: each row is normalized by a power of two 2^-e (amax in [0.5, 1),
// undone exactly by rscale) and slot j of chunk c holds x[8c + KOFF[j]] * 2^-4j, matching
// the kernel's extraction of nibble j as u * 2^4j (j < 7; nibble 7 is shifted down).
static void prep_int4_gemv(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t Kp, int64_t group,
                           float* xp, float* xsum, float* rscale) {
  const int64_t G = Kp / group;
  for (int64_t m = 0; m < M; ++m) {
    float* row = xp + m * Kp;  // first the plain row, then permuted in place chunk by chunk
    row_to_f32(x, dt, m, K, ldx, Kp, row);
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      float a = __builtin_fabsf(row[k]);
      amax = a > amax ? a : amax;
    }
    int e = 0;
    if (amax > 0.f && amax <= 3.0e38f) {
      int ee = (int)((tq_f2u(amax) >> 23) & 0xFF) - 126;  // amax in [2^(ee-1), 2^ee)
      if (ee > -100 && ee < 100) e = ee;
    }
    const float norm = tq_u2f((uint32_t)(127 - e) << 23);
    rscale[m] = tq_u2f((uint32_t)(127 + e) << 23);
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t c = g * group / 8; c < (g + 1) * group / 8; ++c) {
        float v[8];
        for (int j = 0; j < 8; ++j) {
          v[j] = row[8 * c + j] * norm;
          s += v[j];
        }
        for (int j = 0; j < 8; ++j) {
          const float slot = j < 7 ? tq_u2f((uint32_t)(127 - 4 * j) << 23) : 1.0f;
          row[8 * c + j] = v[KOFF[j]] * slot;
        }
      }
      xsum[m * G + g] = s;
    }
  }
}

// Per-token symmetric int8 quantization, bit-identical to quantize_per_token_int8:
// scale = amax / 127; q = clamp(rne(x / scale), -127, 127) (scale 0 -> divide by 1).
static void quant_act(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t ldq, int64_t group,
                      int8_t* q, uint8_t* qabs, int32_t* qsum, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const int64_t base = m * ldx;
    F vmax = V::zero();
    int64_t k = 0;
    for (; k + W <= K; k += W) vmax = V::max(vmax, V::abs(loadv(x, dt, base + k)));
    float tmpf[W];
    V::store(tmpf, vmax);
    float amax = 0.f;
    for (int l = 0; l < W; ++l) amax = tmpf[l] > amax ? tmpf[l] : amax;
    for (; k < K; ++k) {
      float a = __builtin_fabsf(load1(x, dt, base + k));
      amax = a > amax ? a : amax;
    }
    const float sc = amax / 127.0f;
    scale[m] = sc;
    const float safe = sc == 0.f ? 1.0f : sc;
    const F vs = V::set1(safe), lo = V::set1(-127.f), hi = V::set1(127.f);
    int8_t* qr = q + m * ldq;
    uint8_t* ar = qabs + m * ldq;
    int32_t tmpi[W];
    k = 0;
    for (; k + W <= K; k += W) {
      F v = V::min(V::max(V::rne(V::div(loadv(x, dt, base + k), vs)), lo), hi);
      V::storei(tmpi, V::cvt_f2i(v));
      for (int l = 0; l < W; ++l) qr[k + l] = (int8_t)tmpi[l];
    }
    for (; k < K; ++k) {
      float v = __builtin_nearbyintf(load1(x, dt, base + k) / safe);
      v = v < -127.f ? -127.f : (v > 127.f ? 127.f : v);
      qr[k] = (int8_t)(int32_t)v;
    }
    for (; k < ldq; ++k) qr[k] = 0;
    for (k = 0; k < ldq; ++k) ar[k] = (uint8_t)(qr[k] < 0 ? -qr[k] : qr[k]);
    if (qsum) {
      const int64_t G = ldq / group;
      for (int64_t g = 0; g < G; ++g) {
        int32_t s = 0;
        for (int64_t i = g * group; i < (g + 1) * group; ++i) s += qr[i];
        qsum[m * G + g] = s;
      }
    }
  }
}

// ------------------------------------------------------------------ GEMM micro-kernel
// c[m, 0:16] += sum_k step(x[m, k], wb[k, 0:16]) for MR rows, one k-step per packed weight
// row. S is the arithmetic:
//   StepF32:  x fp32, wb fp32 [kc][16]: one FMA per k;
//   StepBF16: x bf16 pairs, wb bf16 pairs [np][16] (uint32 each): dot2 in vdpbf16ps order.
struct StepF32 {
  using X = float;
  using Wt = float;
  using Wv = F;
  static inline Wv load_w(const Wt* p) { return V::load(p); }
  static inline F broadcast(const X* x, int64_t k) { return V::set1(x[k]); }
  static inline F step(F acc, F xb, Wv w) { return V::fma(w, xb, acc); }
};
struct StepBF16 {
  using X = uint16_t;
  using Wt = uint32_t;
  using Wv = I;
  static inline Wv load_w(const Wt* p) { return V::loadi(p); }
  static inline I broadcast(const X* x, int64_t p) { return V::set1i(load4(x + 2 * p)); }
  static inline F step(F acc, I xb, Wv w) { return V::dot2bf16(acc, xb, w); }
};

template <int MR, class S>
static inline void micro_tile(const typename S::X* x, int64_t ldx, const typename S::Wt* wb, int64_t nk, float* c,
                              int64_t ldc) {
  F acc[MR][H];
  sfor<0, MR>([&](auto mi) {
    constexpr int m = decltype(mi)::value;
    sfor<0, H>([&](auto hi) { acc[m][hi.value] = V::load(c + m * ldc + hi.value * W); });
  });
  for (int64_t k = 0; k < nk; ++k) {
    typename S::Wv w[H];
    sfor<0, H>([&](auto hi) { w[hi.value] = S::load_w(wb + k * TILE + hi.value * W); });
    sfor<0, MR>([&](auto mi) {
      constexpr int m = decltype(mi)::value;
      const auto xb = S::broadcast(x + m * ldx, k);
      sfor<0, H>([&](auto hi) { acc[m][hi.value] = S::step(acc[m][hi.value], xb, w[hi.value]); });
    });
  }
  sfor<0, MR>([&](auto mi) {
    constexpr int m = decltype(mi)::value;
    sfor<0, H>([&](auto hi) { V::store(c + m * ldc + hi.value * W, acc[m][hi.value]); });
  });
}

// micro_tile for a run-time row count mr <= MR.
template <int MR, class S>
static void micro_rows(int mr, const typename S::X* x, int64_t ldx, const typename S::Wt* wb, int64_t nk, float* c,
                       int64_t ldc) {
  if constexpr (MR > 0) {
    if (mr == MR) {
      micro_tile<MR, S>(x, ldx, wb, nk, c, ldc);
    } else {
      micro_rows<MR - 1, S>(mr, x, ldx, wb, nk, c, ldc);
    }
  }
}

// fp32 block wb[k][16] (kc rows) -> bf16 pairs wp[p][16] (low half k = 2p, high half 2p + 1),
// rounded to nearest even; an odd last row pairs with zero.
static inline void block_to_bf16_pairs(const float* wb, int64_t kc, uint32_t* wp) {
  const I one = V::set1i(1), bias = V::set1i(0x7FFF), hi_mask = V::set1i((int32_t)0xFFFF0000u);
  auto rnd = [&](F v) {
    const I u = V::bits(v);
    return V::addi(u, V::addi(bias, V::andi(V::template srli<16>(u), one)));
  };
  for (int64_t p = 0; p < (kc + 1) / 2; ++p) {
    for (int h = 0; h < H; ++h) {
      const F w0 = V::load(wb + (2 * p) * TILE + h * W);
      const F w1 = 2 * p + 1 < kc ? V::load(wb + (2 * p + 1) * TILE + h * W) : V::zero();
      V::storei(wp + p * TILE + h * W, V::ori(V::template srli<16>(rnd(w0)), V::andi(rnd(w1), hi_mask)));
    }
  }
}

// Dequantize codes of tile k-range [k0, k0 + kc) to wb[k - k0][16] (fp32).
typedef void (*DequantFn)(const QWeight&, const TileRef&, int64_t k0, int64_t kc, float* wb);

// A 4-bit tile's k-range: nibble j of lane c is k = 8c + KOFF[j]. D loads a group's
// constants (group) and turns nibble J of every lane of row block h into fp32 weights
// (value<J>); dequant_int4 and the codebooks' dequant_cb4 differ only there.
template <class D>
static inline __attribute__((always_inline)) void dequant_nibbles(const QWeight& q, const TileRef& tr, int64_t k0,
                                                                  int64_t kc, float* wb, D& dec) {
  int64_t gcur = -1;
  for (int64_t c = k0 / 8; c < (k0 + kc + 7) / 8; ++c) {
    const int64_t g = (8 * c) / q.group;
    if (g != gcur) {
      dec.group(g);
      gcur = g;
    }
    float* out = wb + (8 * c - k0) * TILE;
    for (int h = 0; h < H; ++h) {
      const I L = V::loadi(tr.w + c * 64 + h * W * 4);
      sfor<0, 8>([&](auto ji) {
        constexpr int j = decltype(ji)::value;
        V::store(out + KOFF[j] * TILE + h * W, dec.template value<j>(L, h));
      });
    }
  }
}

// int4: w = (u - off) * s [+ m], in dequantize_affine's order.
struct Int4Dequant {
  const QWeight& q;
  const TileRef& tr;
  DeqParams d;
  const I nib = V::set1i(0xF);
  const bool fz = q.zero_kind == ZK_FLOAT;
  inline void group(int64_t g) { deq_params(q, tr, g, d); }
  template <int J>
  inline F value(I L, int h) const {
    const I u = V::andi(V::template srli<4 * J>(L), nib);
    F w = V::mul(V::cvt(V::subi(u, d.off[h])), d.s[h]);
    return fz ? V::add(w, d.m[h]) : w;
  }
};

static void dequant_int4(const QWeight& q, const TileRef& tr, int64_t k0, int64_t kc, float* wb) {
  Int4Dequant dec{q, tr, {}};
  dequant_nibbles(q, tr, k0, kc, wb, dec);
}

static void dequant_int8(const QWeight& q, const TileRef& tr, int64_t k0, int64_t kc, float* wb) {
  DeqParams d;
  int64_t gcur = -1;
  const bool fz = q.zero_kind == ZK_FLOAT;
  for (int64_t k = k0; k < k0 + kc; ++k) {
    const int64_t g = k / q.group;
    if (g != gcur) {
      deq_params(q, tr, g, d);
      gcur = g;
    }
    for (int h = 0; h < H; ++h) {
      const I v = V::s8_to_i32((const int8_t*)tr.w + k * TILE + h * W);
      F w = V::mul(V::cvt(V::subi(v, d.off[h])), d.s[h]);
      if (fz) w = V::add(w, d.m[h]);
      V::store(wb + (k - k0) * TILE + h * W, w);
    }
  }
}

// Blocked dequantize + GEMM over tiles [t0, t1): for each block of MB rows and NB tiles,
// K is walked in KC steps; each tile's KC x 16 slice is dequantized once into wb and
// multiplied with all rows of the block (x block stays in L2). bf16: the slice is rounded
// to bf16 pairs and multiplied with bf16 activations (a.xbf), accumulating in fp32.
static void gemm_blocked(const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1, Scratch s,
                         DequantFn deq, bool bf16) {
  float* wb = s.buf;
  uint32_t* wp = (uint32_t*)(s.buf + GEMM_KC * TILE);
  float* cb = s.buf + 2 * GEMM_KC * TILE;
  const int64_t ldc = GEMM_NB * TILE;
  const int64_t K = q.K;
  for (int64_t mb = 0; mb < a.M; mb += GEMM_MB) {
    const int64_t mbs = imin(GEMM_MB, a.M - mb);
    for (int64_t tb = t0; tb < t1; tb += GEMM_NB) {
      const int64_t nb = imin(GEMM_NB, t1 - tb);
      for (int64_t i = 0; i < mbs * ldc; ++i) cb[i] = 0.f;
      for (int64_t kb = 0; kb < K; kb += GEMM_KC) {
        const int64_t kc = imin(GEMM_KC, K - kb);
        for (int64_t ti = 0; ti < nb; ++ti) {
          const TileRef tr = tile_ref(q, tb + ti);
          deq(q, tr, kb, kc, wb);
          if (bf16) block_to_bf16_pairs(wb, kc, wp);
          for (int64_t m0 = 0; m0 < mbs; m0 += V::GEMM_MR) {
            const int mr = (int)imin(V::GEMM_MR, mbs - m0);
            float* c = cb + m0 * ldc + ti * TILE;
            if (bf16) {
              micro_rows<V::GEMM_MR, StepBF16>(mr, a.xbf + (mb + m0) * a.ldb + kb, a.ldb, wp, (kc + 1) / 2, c, ldc);
            } else {
              micro_rows<V::GEMM_MR, StepF32>(mr, a.x + (mb + m0) * a.ldx + kb, a.ldx, wb, kc, c, ldc);
            }
          }
        }
      }
      for (int64_t ti = 0; ti < nb; ++ti) {
        const TileRef tr = tile_ref(q, tb + ti);
        for (int64_t m = 0; m < mbs; ++m) store_row(o, mb + m, (tb + ti) * TILE, tr.rows, cb + m * ldc + ti * TILE, 1.0f);
      }
    }
  }
}

// ------------------------------------------------------------------ 4-bit GEMV (int4, codebooks)
// MR activation rows against one tile whose 32-bit lanes hold 8 nibbles each. D decodes
// nibble J of every lane to fp32 (weight<J>), names the activation column it multiplies
// (xoff<J>, within the 8-column chunk), loads group g's scale s and zero-point term zt
// (group) and applies them once per group to the group's fp32 sum (apply):
// y += s * sum(w x) [+ zt * sum(x), row_term being the row's sum(x)].
template <int MR, class D>
static inline __attribute__((always_inline)) void nibble_gemv_tile(const QWeight& q, const TileRef& tr, const Acts& a,
                                                                  int64_t m0, float* out, D& dec) {
  constexpr int SA = (8 / (MR * H)) > 1 ? 8 / (MR * H) : 1;  // independent accumulators per row
  const int64_t cpg = q.group / 8;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.x + (m0 + m) * a.ldx;
  F o[MR][H];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < H; ++h) o[m][h] = V::zero();
  for (int64_t g = 0; g < q.G; ++g) {
    F acc[MR][SA][H];
    sfor<0, MR>([&](auto mi) {
      sfor<0, SA>([&](auto si) { sfor<0, H>([&](auto hi) { acc[mi.value][si.value][hi.value] = V::zero(); }); });
    });
    dec.prefetch(g);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      pf(tr.w + c * 64 + q.pf_dist);
      I L[H];
      sfor<0, H>([&](auto hi) { L[hi.value] = V::loadi(tr.w + c * 64 + hi.value * W * 4); });
      sfor<0, 8>([&](auto ji) {
        constexpr int j = decltype(ji)::value;
        F wf[H];
        sfor<0, H>([&](auto hi) { wf[hi.value] = dec.template weight<j>(L[hi.value]); });
        sfor<0, MR>([&](auto mi) {
          constexpr int m = decltype(mi)::value;
          const F xb = V::set1(xr[m][c * 8 + D::template xoff<j>()]);
          sfor<0, H>([&](auto hi) {
            constexpr int h = decltype(hi)::value;
            acc[m][j % SA][h] = V::fma(wf[h], xb, acc[m][j % SA][h]);
          });
        });
      });
    }
    F s[H], zt[H];
    dec.group(g, s, zt);
    sfor<0, MR>([&](auto mi) {
      constexpr int m = decltype(mi)::value;
      const auto rt = dec.row_term(m0 + m, g);
      sfor<0, H>([&](auto hi) {
        constexpr int h = decltype(hi)::value;
        F t = acc[m][0][h];
        sfor<1, SA>([&](auto si) { t = V::add(t, acc[m][si.value][h]); });
        o[m][h] = D::apply(t, s[h], zt[h], rt, o[m][h]);
      });
    });
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < H; ++h) V::store(out + m * TILE + h * W, o[m][h]);
}

// int4 weight-only: nibble j of each lane is extracted as (lane & 0xF << 4j) = u * 2^4j
// and multiplied by the prescaled, reordered x (prep_int4_gemv); y += s acc + zt sum(x).
struct Int4Nibbles {
  const QWeight& q;
  const TileRef& tr;
  const Acts& a;
  template <int J>
  static constexpr int xoff() { return J; }
  template <int J>
  static inline __attribute__((always_inline)) F weight(I L) {
    if constexpr (J < 7) {
      return V::cvt(V::andi(L, V::set1i(0xF << (4 * J))));
    } else {
      return V::cvt(V::template srli<28>(L));
    }
  }
  inline void prefetch(int64_t g) const { pf_params(q, tr, g); }
  inline void group(int64_t g, F* s, F* zt) const { group_params(q, tr, g, s, zt); }
  inline __attribute__((always_inline)) F row_term(int64_t m, int64_t g) const { return V::set1(a.xsum[m * q.G + g]); }
  static inline __attribute__((always_inline)) F apply(F t, F s, F zt, F xs, F o) { return V::fma(zt, xs, V::fma(t, s, o)); }
};

template <int MR>
static void int4_gemv_tile(const QWeight& q, const TileRef& tr, const Acts& a, int64_t m0, float* out) {
  Int4Nibbles dec{q, tr, a};
  nibble_gemv_tile<MR>(q, tr, a, m0, out, dec);
}

// ------------------------------------------------------------------ int8 weight-only GEMV
template <int MR>
static void int8_gemv_tile(const QWeight& q, const TileRef& tr, const Acts& a, int64_t m0, float* out) {
  constexpr int SA = (8 / (MR * H)) > 1 ? 8 / (MR * H) : 1;
  const float* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.x + (m0 + m) * a.ldx;
  const int8_t* w = (const int8_t*)tr.w;
  const bool zterm = !(q.zero_kind == ZK_NONE && q.qmin == 0);
  F o[MR][H];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < H; ++h) o[m][h] = V::zero();
  for (int64_t g = 0; g < q.G; ++g) {
    F acc[MR][SA][H];
    sfor<0, MR>([&](auto mi) {
      sfor<0, SA>([&](auto si) { sfor<0, H>([&](auto hi) { acc[mi.value][si.value][hi.value] = V::zero(); }); });
    });
    const int64_t kend = (g + 1) * q.group;
    int64_t k = g * q.group;
    auto step = [&](int64_t kk, auto si) {
      constexpr int sa = decltype(si)::value;
      F wf[H];
      sfor<0, H>([&](auto hi) { wf[hi.value] = V::cvt(V::s8_to_i32(w + kk * TILE + hi.value * W)); });
      sfor<0, MR>([&](auto mi) {
        constexpr int m = decltype(mi)::value;
        const F xb = V::set1(xr[m][kk]);
        sfor<0, H>([&](auto hi) {
          constexpr int h = decltype(hi)::value;
          acc[m][sa][h] = V::fma(wf[h], xb, acc[m][sa][h]);
        });
      });
    };
    pf_params(q, tr, g);
    for (; k + SA <= kend; k += SA) {
      pf(w + k * TILE + q.pf_dist);
      sfor<0, SA>([&](auto si) { step(k + si.value, si); });
    }
    for (; k < kend; ++k) step(k, IC<0>{});
    F s[H], zt[H];
    group_params(q, tr, g, s, zt);
    sfor<0, MR>([&](auto mi) {
      constexpr int m = decltype(mi)::value;
      sfor<0, H>([&](auto hi) {
        constexpr int h = decltype(hi)::value;
        F t = acc[m][0][h];
        sfor<1, SA>([&](auto si) { t = V::add(t, acc[m][si.value][h]); });
        o[m][h] = V::fma(t, s[h], o[m][h]);
        if (zterm) o[m][h] = V::fma(zt[h], V::set1(a.xsum[(m0 + m) * q.G + g]), o[m][h]);
      });
    });
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < H; ++h) V::store(out + m * TILE + h * W, o[m][h]);
}

typedef void (*GemvTileFn)(const QWeight&, const TileRef&, const Acts&, int64_t, float*);

static void weight_only(const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1, int gemm, Scratch s,
                        GemvTileFn f1, GemvTileFn f2, GemvTileFn f3, GemvTileFn f4, DequantFn deq) {
  if (gemm) {
    gemm_blocked(q, a, o, t0, t1, s, deq, gemm == 2);
    return;
  }
  float out[4 * TILE];
  for (int64_t t = t0; t < t1; ++t) {
    const TileRef tr = tile_ref(q, t);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      const int mr = (int)imin(4, a.M - m0);
      GemvTileFn f = mr == 4 ? f4 : mr == 3 ? f3 : mr == 2 ? f2 : f1;
      f(q, tr, a, m0, out);
      for (int m = 0; m < mr; ++m) {
        store_row(o, m0 + m, t * TILE, tr.rows, out + m * TILE, a.rscale ? a.rscale[m0 + m] : 1.0f);
      }
    }
  }
}

static void int4_wo(const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1, int gemm, Scratch s) {
  weight_only(q, a, o, t0, t1, gemm, s, int4_gemv_tile<1>, int4_gemv_tile<2>, int4_gemv_tile<3>, int4_gemv_tile<4>,
              dequant_int4);
}

static void int8_wo(const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1, int gemm, Scratch s) {
  weight_only(q, a, o, t0, t1, gemm, s, int8_gemv_tile<1>, int8_gemv_tile<2>, int8_gemv_tile<3>, int8_gemv_tile<4>,
              dequant_int8);
}

// ------------------------------------------------------------------ W4A8
// Codes u (0..15) x int8 activations, exact int32 per group, then
// y = xs * sum_g (s * acc + zt * qsum) + bias.
template <int MR>
static void w4a8_tile(const QWeight& q, const TileRef& tr, const Acts& a, int64_t m0, float* out, int32_t* raw,
                      int64_t n0) {
  const int64_t cpg = q.group / 8;
  const I lowmask = V::set1i(0x0F0F0F0F);
  const int8_t* xr[MR];
  for (int m = 0; m < MR; ++m) xr[m] = a.xq + (m0 + m) * a.ldq;
  F o[MR][H];
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < H; ++h) o[m][h] = V::zero();
  for (int64_t g = 0; g < q.G; ++g) {
    I acc[MR][H];
    sfor<0, MR>([&](auto mi) { sfor<0, H>([&](auto hi) { acc[mi.value][hi.value] = V::izero(); }); });
    if (!raw) pf_params(q, tr, g);
    for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
      pf(tr.w + c * 64 + q.pf_dist);
      I lo[H], hi_[H];
      sfor<0, H>([&](auto hi) {
        constexpr int h = decltype(hi)::value;
        const I L = V::loadi(tr.w + c * 64 + h * W * 4);
        lo[h] = V::andi(L, lowmask);
        hi_[h] = V::andi(V::template srli<4>(L), lowmask);
      });
      sfor<0, MR>([&](auto mi) {
        constexpr int m = decltype(mi)::value;
        const I xl = V::set1i(load4(xr[m] + 8 * c));
        const I xh = V::set1i(load4(xr[m] + 8 * c + 4));
        sfor<0, H>([&](auto hi) {
          constexpr int h = decltype(hi)::value;
          acc[m][h] = V::dot4(V::dot4(acc[m][h], lo[h], xl), hi_[h], xh);
        });
      });
    }
    if (raw) {
      int32_t tmp[TILE];
      for (int m = 0; m < MR; ++m) {
        for (int h = 0; h < H; ++h) V::storei(tmp + h * W, acc[m][h]);
        const int32_t qs = a.qsum[(m0 + m) * q.G + g];
        for (int r = 0; r < tr.rows; ++r) {
          int32_t off = q.qmin;
          if (q.zero_kind == ZK_INT) off -= ((const int8_t*)tr.zero)[g * TILE + r];
          raw[((m0 + m) * q.N + n0 + r) * q.G + g] = tmp[r] + off * qs;
        }
      }
      continue;
    }
    F s[H], zt[H];
    group_params(q, tr, g, s, zt);
    sfor<0, MR>([&](auto mi) {
      constexpr int m = decltype(mi)::value;
      const F qs = V::set1((float)a.qsum[(m0 + m) * q.G + g]);
      sfor<0, H>([&](auto hi) {
        constexpr int h = decltype(hi)::value;
        o[m][h] = V::fma(zt[h], qs, V::fma(V::cvt(acc[m][h]), s[h], o[m][h]));
      });
    });
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < H; ++h) V::store(out + m * TILE + h * W, o[m][h]);
}

// ------------------------------------------------------------------ W8A8
// int8 codes x int8 activations via |x| (unsigned) x sign(x) * w (signed): exact int32.
template <int MR>
static void w8a8_tile(const QWeight& q, const TileRef& tr, const Acts& a, int64_t m0, int32_t* acc_out) {
  const int64_t K4 = q.Kp / 4, Kt = q.Kp % 4;
  I acc[MR][H];
  sfor<0, MR>([&](auto mi) { sfor<0, H>([&](auto hi) { acc[mi.value][hi.value] = V::izero(); }); });
  for (int64_t c = 0; c < K4; ++c) {
    pf(tr.w + c * 64 + q.pf_dist);
    I wv[H];
    sfor<0, H>([&](auto hi) { wv[hi.value] = V::loadi(tr.w + c * 64 + hi.value * W * 4); });
    sfor<0, MR>([&](auto mi) {
      constexpr int m = decltype(mi)::value;
      const int64_t xo = (m0 + m) * a.ldq + 4 * c;
      const I xa = V::set1i(load4(a.xabs + xo));
      const I xs = V::set1i(load4(a.xq + xo));
      sfor<0, H>([&](auto hi) {
        constexpr int h = decltype(hi)::value;
        acc[m][h] = V::dot4(acc[m][h], xa, V::sign8(wv[h], xs));
      });
    });
  }
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < H; ++h) V::storei(acc_out + m * TILE + h * W, acc[m][h]);
  if (Kt) {
    const int8_t* wt = (const int8_t*)tr.w + K4 * 64;
    for (int m = 0; m < MR; ++m) {
      const int8_t* xq = a.xq + (m0 + m) * a.ldq + 4 * K4;
      for (int r = 0; r < TILE; ++r) {
        int32_t s = 0;
        for (int64_t i = 0; i < Kt; ++i) s += (int32_t)xq[i] * (int32_t)wt[r * Kt + i];
        acc_out[m * TILE + r] += s;
      }
    }
  }
}

static void w4a8(const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1) {
  float out[4 * TILE];
  for (int64_t t = t0; t < t1; ++t) {
    const TileRef tr = tile_ref(q, t);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      const int mr = (int)imin(4, a.M - m0);
      switch (mr) {
        case 4: w4a8_tile<4>(q, tr, a, m0, out, o.raw, t * TILE); break;
        case 3: w4a8_tile<3>(q, tr, a, m0, out, o.raw, t * TILE); break;
        case 2: w4a8_tile<2>(q, tr, a, m0, out, o.raw, t * TILE); break;
        default: w4a8_tile<1>(q, tr, a, m0, out, o.raw, t * TILE); break;
      }
      if (o.raw) continue;
      for (int m = 0; m < mr; ++m) store_row(o, m0 + m, t * TILE, tr.rows, out + m * TILE, a.rscale[m0 + m]);
    }
  }
}

static void w8a8(const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1) {
  int32_t acc[4 * TILE];
  float out[TILE];
  for (int64_t t = t0; t < t1; ++t) {
    const TileRef tr = tile_ref(q, t);
    for (int64_t m0 = 0; m0 < a.M; m0 += 4) {
      const int mr = (int)imin(4, a.M - m0);
      switch (mr) {
        case 4: w8a8_tile<4>(q, tr, a, m0, acc); break;
        case 3: w8a8_tile<3>(q, tr, a, m0, acc); break;
        case 2: w8a8_tile<2>(q, tr, a, m0, acc); break;
        default: w8a8_tile<1>(q, tr, a, m0, acc); break;
      }
      for (int m = 0; m < mr; ++m) {
        if (o.raw) {
          for (int r = 0; r < tr.rows; ++r) o.raw[(m0 + m) * q.N + t * TILE + r] = acc[m * TILE + r];
          continue;
        }
        const F xs = V::set1(a.rscale[m0 + m]);
        for (int h = 0; h < H; ++h) {
          const F s = loadv(tr.scale, q.scale_dt, h * W);
          V::store(out + h * W, V::mul(V::cvt(V::loadi(acc + m * TILE + h * W)), V::mul(xs, s)));
        }
        store_row(o, m0 + m, t * TILE, tr.rows, out, 1.0f);
      }
    }
  }
}

#include "codebook4_impl.h"
#include "runtime_impl.h"

// ------------------------------------------------------------------ dequantize for a library GEMM
// Weight tiles [t0, t1) dequantized exactly as the GEMM path does (dequant_int4 / _int8 /
// _cb4), written transposed: wt[k][n - 16 t0] for k < K (row stride ldw), fp32 or bf16
// (nearest even). Only the real rows of a partial last tile are written. wb: GEMM_KC * TILE
// floats of scratch.
static void dequant_t(const QWeight& q, int32_t kind, int64_t t0, int64_t t1, int32_t out_dt, void* wt, int64_t ldw,
                      float* wb) {
  const DequantFn deq = kind == WK_INT4 ? dequant_int4 : kind == WK_INT8 ? dequant_int8 : dequant_cb4;
  for (int64_t t = t0; t < t1; ++t) {
    const TileRef tr = tile_ref(q, t);
    const int64_t col = (t - t0) * TILE;
    for (int64_t kb = 0; kb < q.K; kb += GEMM_KC) {
      const int64_t kc = imin(GEMM_KC, q.K - kb);
      deq(q, tr, kb, kc, wb);
      for (int64_t k = 0; k < kc; ++k) {
        const float* src = wb + k * TILE;
        if (tr.rows == TILE) {
          for (int h = 0; h < H; ++h) {
            if (out_dt == DT_F32) {
              V::store((float*)wt + (kb + k) * ldw + col + h * W, V::load(src + h * W));
            } else {
              V::store_bf16((uint16_t*)wt + (kb + k) * ldw + col + h * W, V::load(src + h * W));
            }
          }
        } else if (out_dt == DT_F32) {
          for (int r = 0; r < tr.rows; ++r) ((float*)wt)[(kb + k) * ldw + col + r] = src[r];
        } else {
          for (int r = 0; r < tr.rows; ++r) ((uint16_t*)wt)[(kb + k) * ldw + col + r] = tq_f32_to_bf16(src[r]);
        }
      }
    }
  }
}

const KernelTable kTable = {
    TQ_TABLE_NAME, prep_int4_gemv, prep_bf16, prep_f32, quant_act, int4_wo, int8_wo, w4a8, w8a8, cb4_wo, dequant_t,
    dense_f32,      attend_part,
};

}  // namespace

namespace torchq_k {
const KernelTable* TQ_TABLE_FN() { return &kTable; }
}  // namespace torchq_k
