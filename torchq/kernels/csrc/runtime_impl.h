// Kernels of the fused decoder step (csrc/decode.cpp, torchq.runtime) that are not weight
// formats: dense fp32 weight rows (float layers, an unquantized LM head) and attention of one
// query head over a KV cache. Included by kernels_impl.h, so they are compiled once per ISA
// unit over the same vector traits `V`.

// Sum of the lanes of a vector.
static inline float hsum(F a) {
  float t[W];
  V::store(t, a);
  float s = 0.f;
  for (int l = 0; l < W; ++l) s += t[l];
  return s;
}

// x . w over n floats (W-lane partial sums, then the lanes, then a scalar tail).
static inline float dot_f32(const float* __restrict x, const float* __restrict w, int64_t n) {
  F a0 = V::zero(), a1 = V::zero();
  int64_t k = 0;
  for (; k + 2 * W <= n; k += 2 * W) {
    a0 = V::fma(V::load(x + k), V::load(w + k), a0);
    a1 = V::fma(V::load(x + k + W), V::load(w + k + W), a1);
  }
  for (; k + W <= n; k += W) a0 = V::fma(V::load(x + k), V::load(w + k), a0);
  float s = hsum(V::add(a0, a1));
  for (; k < n; ++k) s += x[k] * w[k];
  return s;
}

// Rows [n0, n1) of a row-major fp32 weight w (N, K): y[m][n] = x[m] . w[n] (+ bias[n]).
// Four weight rows at a time stay in L1 while the M activation rows stream past them.
static void dense_f32(const float* w, int64_t K, int64_t n0, int64_t n1, const float* x, int64_t M, int64_t ldx,
                      const float* bias, float* y, int64_t ldy) {
  for (int64_t nb = n0; nb < n1; nb += 4) {
    const int64_t ne = imin(n1, nb + 4);
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      for (int64_t n = nb; n < ne; ++n) y[m * ldy + n] = dot_f32(xr, w + n * K, K) + (bias ? bias[n] : 0.f);
    }
  }
}

// e^x per lane (Cephes expf: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial; relative
// error about 2e-7), for softmax. Inputs below -87.3 give ~1e-38, not 0: callers zero masked
// lanes themselves.
static inline F vexp(F x) {
  x = V::max(V::min(x, V::set1(88.37f)), V::set1(-87.33f));
  const F n = V::rne(V::mul(x, V::set1(1.44269504088896341f)));
  F r = V::fma(n, V::set1(-0.693359375f), x);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  F p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  p = V::fma(V::mul(p, r), r, V::add(r, V::set1(1.f)));
  const I e = V::slli<23>(V::addi(V::cvt_f2i(n), V::set1i(127)));
  return V::mul(p, V::fbits(e));
}

// KV cache of one KV head (csrc/decode.cpp): keys blocked by KV_BLOCK positions with the
// positions in lanes, k[t][d] at ((t / 16) * hd + d) * 16 + t % 16, so the scores of 16
// positions are hd vector FMAs with no horizontal sums; values as rows, v[t][d] at t * hd + d.
static inline F kv_load(const void* base, int32_t dt, int64_t off) {
  return dt == DT_F32 ? V::load((const float*)base + off) : V::load_bf16((const uint16_t*)base + off);
}

// Partial attention of nq query vectors (q + i * ldq, hd floats each) over positions
// [t0, t1) of one KV head (t0 a multiple of KV_BLOCK); query i sees positions t < tlim[i]
// only. Per query: mx[i] = max score, sum[i] = sum_t e^(s_t - mx), out[i] = sum_t e^(s_t - mx)
// v_t (not normalized: partials over position ranges merge exactly in the online-softmax
// way). A query that sees none of the range gets sum 0. s: nq * (t1 - t0 + KV_BLOCK) floats.
static void attend_part(const float* q, int64_t ldq, int nq, const int64_t* tlim, const void* kc, const void* vc,
                        int32_t kv_dt, int64_t hd, int64_t t0, int64_t t1, float scale, float* s, float* out,
                        int64_t ldo, float* mx, float* sum) {
  constexpr int KB = KV_BLOCK, HB = KV_BLOCK / W;
  const int64_t span = (t1 - t0 + KB - 1) / KB * KB;
  for (int i = 0; i < nq; ++i) {
    const float* qi = q + i * ldq;
    float* si = s + i * span;
    const int64_t lim = imin(t1, tlim[i]);
    float m = -__builtin_inff();
    for (int64_t tb = t0; tb < lim; tb += KB) {
      const int64_t kb = (tb / KB) * hd * KB;
      F acc[HB], acc2[HB];  // two FMA chains per vector (even / odd d): latency, not throughput, binds
      for (int h = 0; h < HB; ++h) acc[h] = acc2[h] = V::zero();
      int64_t d = 0;
      for (; d + 2 <= hd; d += 2) {
        const F q0 = V::set1(qi[d]), q1 = V::set1(qi[d + 1]);
        for (int h = 0; h < HB; ++h) {
          acc[h] = V::fma(q0, kv_load(kc, kv_dt, kb + d * KB + h * W), acc[h]);
          acc2[h] = V::fma(q1, kv_load(kc, kv_dt, kb + (d + 1) * KB + h * W), acc2[h]);
        }
      }
      for (; d < hd; ++d)
        for (int h = 0; h < HB; ++h) acc[h] = V::fma(V::set1(qi[d]), kv_load(kc, kv_dt, kb + d * KB + h * W), acc[h]);
      for (int h = 0; h < HB; ++h) V::store(si + (tb - t0) + h * W, V::mul(V::add(acc[h], acc2[h]), V::set1(scale)));
      const int64_t n = imin(KB, lim - tb);
      for (int64_t j = 0; j < n; ++j) m = si[tb - t0 + j] > m ? si[tb - t0 + j] : m;
    }
    float* oi = out + i * ldo;
    for (int64_t d = 0; d < hd; ++d) oi[d] = 0.f;
    mx[i] = m;
    if (lim <= t0) {
      sum[i] = 0.f;
      continue;
    }
    const int64_t cnt = lim - t0;
    const F mv = V::set1(m);
    F tot = V::zero();
    int64_t j = 0;
    for (; j + W <= cnt; j += W) {
      const F e = vexp(V::sub(V::load(si + j), mv));
      V::store(si + j, e);
      tot = V::add(tot, e);
    }
    float total = hsum(tot);
    for (; j < cnt; ++j) {
      float e[W], in[W];
      for (int l = 0; l < W; ++l) in[l] = l == 0 ? si[j] - m : 0.f;
      V::store(e, vexp(V::load(in)));
      si[j] = e[0];
      total += e[0];
    }
    sum[i] = total;
    int64_t d = 0;
    for (; d + 4 * W <= hd; d += 4 * W) {  // four output vectors at a time, positions inner
      F a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
      for (int64_t t = 0; t < cnt; ++t) {
        const F p = V::set1(si[t]);
        const int64_t vo = (t0 + t) * hd + d;
        a0 = V::fma(p, kv_load(vc, kv_dt, vo), a0);
        a1 = V::fma(p, kv_load(vc, kv_dt, vo + W), a1);
        a2 = V::fma(p, kv_load(vc, kv_dt, vo + 2 * W), a2);
        a3 = V::fma(p, kv_load(vc, kv_dt, vo + 3 * W), a3);
      }
      V::store(oi + d, a0);
      V::store(oi + d + W, a1);
      V::store(oi + d + 2 * W, a2);
      V::store(oi + d + 3 * W, a3);
    }
    for (; d + W <= hd; d += W) {
      F a0 = V::zero();
      for (int64_t t = 0; t < cnt; ++t) a0 = V::fma(V::set1(si[t]), kv_load(vc, kv_dt, (t0 + t) * hd + d), a0);
      V::store(oi + d, a0);
    }
    for (; d < hd; ++d) {
      float a0 = 0.f;
      for (int64_t t = 0; t < cnt; ++t) {
        const int64_t vo = (t0 + t) * hd + d;
        a0 += si[t] * (kv_dt == DT_F32 ? ((const float*)vc)[vo] : tq_bf16_to_f32(((const uint16_t*)vc)[vo]));
      }
      oi[d] = a0;
    }
  }
}
