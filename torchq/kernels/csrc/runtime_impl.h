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

// Row t of a KV cache of dtype kv_dt (fp32 or bf16) as fp32 vectors: dst[0:hd).
static inline void kv_row(const void* base, int32_t kv_dt, int64_t off, int64_t hd, float* dst) {
  int64_t k = 0;
  if (kv_dt == DT_F32) {
    const float* s = (const float*)base + off;
    for (; k < hd; ++k) dst[k] = s[k];
  } else {
    const uint16_t* s = (const uint16_t*)base + off;
    for (; k + W <= hd; k += W) V::store(dst + k, V::load_bf16(s + k));
    for (; k < hd; ++k) dst[k] = tq_bf16_to_f32(s[k]);
  }
}

// One query head q (hd floats) over T cached positions of one KV head (rows of hd values,
// row stride ldkv, fp32 or bf16): out = sum_t softmax_t(scale * q . k_t) v_t.
// scores: T floats of scratch; row: hd floats of scratch (bf16 caches).
static void attend(const float* q, const void* kc, const void* vc, int32_t kv_dt, int64_t ldkv, int64_t T,
                   int64_t hd, float scale, float* scores, float* out) {
  float row[1024];
  float mx = -__builtin_inff();
  for (int64_t t = 0; t < T; ++t) {
    float s;
    if (kv_dt == DT_F32) {
      s = dot_f32(q, (const float*)kc + t * ldkv, hd);
    } else {
      kv_row(kc, kv_dt, t * ldkv, hd, row);
      s = dot_f32(q, row, hd);
    }
    s *= scale;
    scores[t] = s;
    mx = s > mx ? s : mx;
  }
  float sum = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    const float e = __builtin_expf(scores[t] - mx);
    scores[t] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
  int64_t k = 0;
  for (; k + W <= hd; k += W) V::store(out + k, V::zero());
  for (; k < hd; ++k) out[k] = 0.f;
  for (int64_t t = 0; t < T; ++t) {
    const float p = scores[t] * inv;
    const float* v;
    if (kv_dt == DT_F32) {
      v = (const float*)vc + t * ldkv;
    } else {
      kv_row(vc, kv_dt, t * ldkv, hd, row);
      v = row;
    }
    const F pv = V::set1(p);
    for (k = 0; k + W <= hd; k += W) V::store(out + k, V::fma(pv, V::load(v + k), V::load(out + k)));
    for (; k < hd; ++k) out[k] += p * v[k];
  }
}
