// Fused decoder step of Llama-family models (torchq.runtime): every decoder layer, the final
// norm and the LM head of one step (M new tokens at positions pos .. pos+M-1) run inside ONE
// OpenMP parallel region, with a spin-then-yield barrier between dependent stages.
//
// Given token ids, stage 0 looks up their embedding rows (fp32, or the row's weight tile
// dequantized as the eager lookup does). Per layer (6 barriers; the KV cache holds keys
// blocked by 16 positions, positions in vector lanes, and values as rows: runtime_impl.h):
//
//   1. each thread: RMSNorm of the residual stream and the activation preparation of q|k|v
//      (redundantly: O(M*H), negligible next to the GEMVs, and no barrier);
//      q|k|v weight tiles, as one virtual concatenation, taken in chunks from a counter;
//   2. RoPE on q and k, k and v written into the static KV cache;
//   3. attention: items (row, KV head, chunk of positions), the KV head's query heads
//      together so each key and value is read once (GQA); a decode row's positions are split
//      into chunks whose online-softmax partials every thread then merges for itself;
//   4. o_proj tiles, each chunk added into the residual stream by the thread that computed it;
//   5. RMSNorm, gate and up tiles paired so SiLU(gate)*up is formed in the same chunk;
//   6. down_proj tiles plus residual.
// Then the final norm and the LM head on the last row only.
//
// The linear layers run the scheme's own kernels (KernelTable of the active ISA path) with
// the preparation and path choice of the torchq.* linear ops (GEMV below gemm_min_m rows,
// dequantize + fp32 GEMM from there), so each projection is bit-identical to the eager
// layer's output; norms, RoPE, attention and SiLU differ from PyTorch's only by rounding
// order. Work items are claimed from shared counters (about 4 chunks per thread): a thread
// descheduled by another process delays its chunk, not a fixed share, and every output
// element is still computed by exactly one thread in one order, so results do not depend
// on the thread count or the schedule. Weights are the model's own tensors (no copy).
// Thread 0 stamps the wall time of every stage (_decoder_profile).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <omp.h>
#include <sched.h>
#include <xmmintrin.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kernel_api.h"
#include "ops_internal.h"

namespace {
using namespace torchq_k;

// Weight kinds of a decoder linear (torchq/runtime/plan.py keeps the same numbers).
enum LinKind : int64_t { LK_DENSE = 0, LK_INT4 = 1, LK_INT8 = 2, LK_W4A8 = 3, LK_W8A8 = 4, LK_CB4 = 5 };
enum LinFlag : int64_t { LF_ZERO = 1, LF_BIAS = 2, LF_LUT = 4, LF_ACT_SCALE = 8, LF_PERM = 16 };
constexpr int64_t kSpecVersion = 1;
constexpr int64_t kLinearsPerLayer = 7;  // q k v o gate up down
constexpr int64_t kMaxHeadDim = 1024;    // rope()'s row buffer

struct Linear {
  int64_t kind = LK_DENSE;
  int64_t N = 0, K_in = 0, Kp = 0, group = 0;
  int64_t K = 0;  // features the kernel sees: Kp after an act_scale / perm transform, else K_in
  torchq_ops::Prepared prep;
  const float* dense = nullptr;      // LK_DENSE: (N, K_in) fp32 row-major
  const float* bias = nullptr;       // fp32 (N) or null
  const float* act_scale = nullptr;  // fp32 (K_in) divisor or null
  const int64_t* perm = nullptr;     // int64 (K_in) column order or null
  int64_t tiles() const { return (N + TILE - 1) / TILE; }
  bool int4_like() const { return kind == LK_INT4 || kind == LK_CB4 || kind == LK_W4A8; }
};

struct Layer {
  const float* in_norm;
  const float* post_norm;
  Linear lin[kLinearsPerLayer];
};
enum { LQ = 0, LK = 1, LV = 2, LO = 3, LG = 4, LU = 5, LD = 6 };

// Spin-then-yield barrier for one parallel region: pause-spins for a few microseconds,
// then sched_yield()s, so a team whose thread lost its core to another process hands the
// core back instead of burning it.
struct SpinBarrier {
  std::atomic<int> arrived{0};
  std::atomic<int> phase{0};
  std::atomic<int> n{1};
  void wait() {
    const int team = n.load(std::memory_order_relaxed);
    if (team == 1) return;
    const int ph = phase.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
      arrived.store(0, std::memory_order_relaxed);
      phase.store(ph + 1, std::memory_order_release);
      return;
    }
    for (int spin = 0; phase.load(std::memory_order_acquire) == ph; ++spin) {
      if (spin < 2000) {
        _mm_pause();
      } else {
        sched_yield();
      }
    }
  }
};

// Per-thread buffers (grown on demand before the region, never inside it).
struct ThreadBufs {
  std::vector<float> h;        // normed rows (M, max K)
  std::vector<float> xt[3];    // act_scale / perm transformed rows (M, Kp)
  std::vector<float> xp[3];    // prepared fp32 activations (M, Kp)
  std::vector<float> xsum[3];  // (M, G)
  std::vector<float> rs[3];    // (M)
  std::vector<int8_t> xq[3];   // (M, Kp)
  std::vector<uint8_t> xabs[3];
  std::vector<int32_t> qsum[3];
  std::vector<float> gemm;     // gemm_scratch_floats()
  std::vector<float> scores;   // attention scores of one item
  std::vector<int64_t> tlim;   // per-query position limits of one item
  std::vector<float> att;      // merged attention output (M, heads * hd)
  std::vector<float> emb;      // one dequantized weight tile (hidden, 16): embedding lookups
};

struct Decoder {
  int64_t L = 0, H = 0, nh = 0, nkv = 0, hd = 0, I = 0, vocab = 0, max_len = 0;
  float eps = 1e-6f, scale = 1.f;
  const float* cos = nullptr;  // (max_len, hd)
  const float* sin = nullptr;
  std::vector<Layer> layers;
  const float* final_norm = nullptr;
  Linear head;
  // Token embedding looked up here (decoder_step given token ids): none (the caller passes
  // hidden states), the LM head's own weight (tied), or a weight of its own.
  int64_t embed_mode = 0;
  Linear embed;
  const Linear* embed_w() const { return embed_mode == 1 ? &head : &embed; }
  std::vector<at::Tensor> keep;  // the model's tensors (and fp32 views), alive with the decoder
  std::mutex mu;                 // one step at a time per decoder
  std::array<double, 8> prof{};  // seconds per stage kind, thread 0's view (_decoder_profile)
  // shared step buffers
  std::vector<float> x, q, k, v, tmp, g, u, act;
  std::vector<float> part_out, part_mx, part_sum;  // attention partials (M, kv heads, chunks, group)
  std::vector<ThreadBufs> tb;
  int64_t max_kp = 0, max_g = 0;
  bool any_transform = false, any_dynamic = false, any_weight_only = false;  // which prep buffers exist
};

std::mutex g_registry_mu;
std::unordered_map<int64_t, std::shared_ptr<Decoder>> g_registry;
int64_t g_next_id = 1;

// ------------------------------------------------------------------ creation
struct SpecReader {
  const std::vector<at::Tensor>& ts;
  c10::IntArrayRef ints;
  size_t ti = 0, ii = 0;
  int64_t next_int() {
    TORCH_CHECK(ii < ints.size(), "torchq: decoder spec is too short (", ints.size(), " integers)");
    return ints[ii++];
  }
  const at::Tensor& next_tensor(const char* what) {
    TORCH_CHECK(ti < ts.size(), "torchq: decoder spec names more tensors than given (", ts.size(), "); missing ", what);
    return ts[ti++];
  }
};

const float* f32_vector(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              "torchq: decoder ", what, " must be a contiguous fp32 CPU tensor of ", n, " elements, got ",
              t.scalar_type(), " ", t.sizes());
  return t.data_ptr<float>();
}

Linear read_linear(SpecReader& r, int64_t n_out, int64_t k_in, const char* name) {
  Linear l;
  l.kind = r.next_int();
  l.K_in = r.next_int();
  l.Kp = r.next_int();
  l.group = r.next_int();
  const int64_t qmin = r.next_int();
  const int64_t flags = r.next_int();
  l.N = n_out;
  TORCH_CHECK(l.kind >= LK_DENSE && l.kind <= LK_CB4, "torchq: decoder ", name, ": unknown weight kind ", l.kind);
  TORCH_CHECK(l.K_in == k_in, "torchq: decoder ", name, " takes ", l.K_in, " input features, the model has ", k_in);
  const bool transform = flags & (LF_ACT_SCALE | LF_PERM);
  l.K = transform ? l.Kp : l.K_in;
  const at::Tensor& w = r.next_tensor(name);
  if (l.kind == LK_DENSE) {
    TORCH_CHECK(!transform && !(flags & (LF_ZERO | LF_LUT)), "torchq: decoder ", name, ": a dense weight has no ",
                "zero point, table, act_scale or perm");
    TORCH_CHECK(w.dim() == 2 && w.size(0) == n_out && w.size(1) == k_in, "torchq: decoder ", name,
                ": dense weight must be (", n_out, ", ", k_in, "), got ", w.sizes());
    l.dense = f32_vector(w, n_out * k_in, name);
    l.Kp = l.K = k_in;
  } else {
    const at::Tensor& scale = r.next_tensor(name);
    c10::optional<at::Tensor> zero;
    if (flags & LF_ZERO) zero = r.next_tensor(name);
    const bool int4 = l.kind == LK_INT4 || l.kind == LK_W4A8 || l.kind == LK_CB4;
    const int64_t group = l.kind == LK_W8A8 ? w.size(1) : l.group;
    l.prep = torchq_ops::prepare_tiled_weight(w, scale, zero, group, qmin, l.K, int4, l.kind == LK_W8A8);
    TORCH_CHECK(l.prep.q.N == n_out, "torchq: decoder ", name, " has ", l.prep.q.N, " output rows, the model ", n_out);
    TORCH_CHECK(l.prep.q.Kp == l.Kp, "torchq: decoder ", name, ": padded features ", l.prep.q.Kp, " != spec ", l.Kp);
    l.group = l.prep.q.group;
  }
  if (flags & LF_BIAS) l.bias = f32_vector(r.next_tensor(name), n_out, "bias");
  if (flags & LF_LUT) {
    TORCH_CHECK(l.kind == LK_CB4, "torchq: decoder ", name, ": only codebook weights have a table");
    l.prep.q.lut = f32_vector(r.next_tensor(name), 16, "codebook table");
  }
  TORCH_CHECK((l.kind == LK_CB4) == bool(flags & LF_LUT), "torchq: decoder ", name, ": codebook weights need a table");
  if (flags & LF_ACT_SCALE) l.act_scale = f32_vector(r.next_tensor(name), k_in, "act_scale");
  if (flags & LF_PERM) {
    const at::Tensor& p = r.next_tensor(name);
    TORCH_CHECK(p.scalar_type() == at::kLong && p.is_contiguous() && p.numel() == k_in, "torchq: decoder ", name,
                ": perm must be contiguous int64 of ", k_in, " elements");
    const int64_t* pp = p.data_ptr<int64_t>();
    for (int64_t i = 0; i < k_in; ++i)
      TORCH_CHECK(pp[i] >= 0 && pp[i] < k_in, "torchq: decoder ", name, ": perm entry ", pp[i], " out of range");
    l.perm = pp;
  }
  return l;
}

int64_t decoder_create(const std::vector<at::Tensor>& tensors, c10::IntArrayRef ints, c10::ArrayRef<double> floats) {
  auto d = std::make_shared<Decoder>();
  d->keep = tensors;
  SpecReader r{d->keep, ints};
  const int64_t version = r.next_int();
  TORCH_CHECK(version == kSpecVersion, "torchq: decoder spec version ", version, " (this build reads ", kSpecVersion,
              "); torchq's Python and C++ parts disagree: rebuild the extension");
  d->L = r.next_int();
  d->H = r.next_int();
  d->nh = r.next_int();
  d->nkv = r.next_int();
  d->hd = r.next_int();
  d->I = r.next_int();
  d->vocab = r.next_int();
  d->max_len = r.next_int();
  TORCH_CHECK(floats.size() == 2, "torchq: decoder spec needs 2 floats (eps, attention scale)");
  d->eps = (float)floats[0];
  d->scale = (float)floats[1];
  TORCH_CHECK(d->L > 0 && d->H > 0 && d->nh > 0 && d->nkv > 0 && d->nh % d->nkv == 0 && d->hd > 0 &&
                  d->hd <= kMaxHeadDim && d->hd % 2 == 0 && d->I > 0 && d->vocab > 0 && d->max_len > 0,
              "torchq: decoder spec has inconsistent sizes (layers ", d->L, ", hidden ", d->H, ", heads ", d->nh,
              ", kv heads ", d->nkv, ", head dim ", d->hd, ")");
  d->cos = f32_vector(r.next_tensor("rope cos"), d->max_len * d->hd, "rope cos table");
  d->sin = f32_vector(r.next_tensor("rope sin"), d->max_len * d->hd, "rope sin table");
  const int64_t qd = d->nh * d->hd, kvd = d->nkv * d->hd;
  for (int64_t l = 0; l < d->L; ++l) {
    Layer ly;
    ly.in_norm = f32_vector(r.next_tensor("input norm"), d->H, "input_layernorm weight");
    ly.post_norm = f32_vector(r.next_tensor("post norm"), d->H, "post_attention_layernorm weight");
    ly.lin[LQ] = read_linear(r, qd, d->H, "q_proj");
    ly.lin[LK] = read_linear(r, kvd, d->H, "k_proj");
    ly.lin[LV] = read_linear(r, kvd, d->H, "v_proj");
    ly.lin[LO] = read_linear(r, d->H, qd, "o_proj");
    ly.lin[LG] = read_linear(r, d->I, d->H, "gate_proj");
    ly.lin[LU] = read_linear(r, d->I, d->H, "up_proj");
    ly.lin[LD] = read_linear(r, d->H, d->I, "down_proj");
    d->layers.push_back(std::move(ly));
  }
  d->final_norm = f32_vector(r.next_tensor("final norm"), d->H, "final norm weight");
  d->head = read_linear(r, d->vocab, d->H, "lm_head");
  d->embed_mode = r.next_int();
  TORCH_CHECK(d->embed_mode >= 0 && d->embed_mode <= 2, "torchq: decoder embedding mode ", d->embed_mode);
  if (d->embed_mode == 2) d->embed = read_linear(r, d->vocab, d->H, "embed_tokens");
  if (d->embed_mode) {
    const Linear& e = *d->embed_w();
    TORCH_CHECK(e.kind != LK_W8A8 && !e.act_scale && !e.perm && e.K_in == d->H,
                "torchq: decoder embedding must be fp32, int4, int8 or codebook rows without act_scale / perm");
  }
  TORCH_CHECK(r.ii == ints.size() && r.ti == tensors.size(), "torchq: decoder spec has ", ints.size() - r.ii,
              " integers and ", tensors.size() - r.ti, " tensors left over");
  auto track = [&](const Linear& l) {
    d->max_kp = std::max(d->max_kp, std::max(l.Kp, l.K_in));
    if (l.group > 0) d->max_g = std::max(d->max_g, (l.Kp + l.group - 1) / l.group);
    d->any_transform |= l.act_scale || l.perm;
    d->any_dynamic |= l.kind == LK_W4A8 || l.kind == LK_W8A8;
    d->any_weight_only |= l.kind == LK_INT4 || l.kind == LK_INT8 || l.kind == LK_CB4;
  };
  for (const Layer& ly : d->layers)
    for (const Linear& l : ly.lin) track(l);
  track(d->head);
  std::lock_guard<std::mutex> lock(g_registry_mu);
  const int64_t id = g_next_id++;
  g_registry[id] = d;
  return id;
}

void decoder_free(int64_t id) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  g_registry.erase(id);
}

std::shared_ptr<Decoder> lookup(int64_t id) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto it = g_registry.find(id);
  TORCH_CHECK(it != g_registry.end(), "torchq: no decoder with id ", id, " (freed, or from another process)");
  return it->second;
}

// ------------------------------------------------------------------ stage helpers
template <class T>
T* grow(std::vector<T>& v, int64_t n) {
  if ((int64_t)v.size() < n) v.resize(n);
  return v.data();
}

// h[m] = x[m] * rsqrt(mean(x[m]^2) + eps) * w (LlamaRMSNorm in fp32).
void rmsnorm_rows(const float* x, int64_t M, int64_t n, const float* w, float eps, float* h) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * n;
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) ss += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / (float)n + eps);
    float* hr = h + m * n;
    for (int64_t i = 0; i < n; ++i) hr[i] = w[i] * (xr[i] * r);
  }
}

// What a linear needs to know about its activations, prepared by each thread for itself.
struct Prepped {
  Acts a;
  int mode;  // 0 GEMV, 1 dequantize + fp32 GEMM (weight-only kinds)
};

bool same_prep(const Linear& a, const Linear& b) {
  const bool a_f = a.kind == LK_INT8 || a.kind == LK_CB4, b_f = b.kind == LK_INT8 || b.kind == LK_CB4;
  const bool kinds = a.kind == b.kind || (a_f && b_f);
  return kinds && a.Kp == b.Kp && a.K == b.K && a.group == b.group && a.act_scale == b.act_scale &&
         a.perm == b.perm && a.K_in == b.K_in;
}

// Prepare activations x (M, K_in), row stride ldx, for linear l in buffer slot s of tb.
Prepped prep_acts(const KernelTable* kt, const Linear& l, const float* x, int64_t M, int64_t ldx, ThreadBufs& tb,
                  int s) {
  int64_t K = l.K_in;
  if (l.act_scale || l.perm) {  // weight.prepare_input: divide, permute, zero-pad to Kp
    float* xt = grow(tb.xt[s], M * l.Kp);
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float* d = xt + m * l.Kp;
      for (int64_t j = 0; j < l.K_in; ++j) {
        const int64_t c = l.perm ? l.perm[j] : j;
        d[j] = l.act_scale ? xr[c] / l.act_scale[c] : xr[c];
      }
      for (int64_t j = l.K_in; j < l.Kp; ++j) d[j] = 0.f;
    }
    x = xt;
    ldx = l.Kp;
    K = l.Kp;
  }
  Prepped p{};
  Acts& a = p.a;
  a.M = M;
  p.mode = 0;
  if (l.kind == LK_DENSE) {
    a.x = x;
    a.ldx = ldx;
    return p;
  }
  const QWeight& q = l.prep.q;
  const int64_t G = q.G;
  if (l.kind == LK_W4A8 || l.kind == LK_W8A8) {
    const bool w4 = l.kind == LK_W4A8;
    int8_t* xq = grow(tb.xq[s], M * q.Kp);
    uint8_t* xabs = grow(tb.xabs[s], M * q.Kp);
    int32_t* qsum = w4 ? grow(tb.qsum[s], M * G) : nullptr;
    float* sc = grow(tb.rs[s], M);
    kt->quant_act(x, DT_F32, M, K, ldx, q.Kp, w4 ? q.group : 0, xq, xabs, qsum, sc);
    a.xq = xq;
    a.xabs = xabs;
    a.ldq = q.Kp;
    a.qsum = qsum;
    a.rscale = sc;
    return p;
  }
  if (M >= torchq_ops::gemm_min_m(l.int4_like())) {
    p.mode = 1;
    a.x = x;
    a.ldx = ldx;
    return p;
  }
  float* xp = grow(tb.xp[s], M * q.Kp);
  float* xsum = grow(tb.xsum[s], M * G);
  if (l.kind == LK_INT4) {
    float* rs = grow(tb.rs[s], M);
    kt->prep_int4_gemv(x, DT_F32, M, K, ldx, q.Kp, q.group, xp, xsum, rs);
    a.rscale = rs;
  } else {
    kt->prep_f32(x, DT_F32, M, K, ldx, q.Kp, q.group, xp, xsum);
    a.rscale = nullptr;
  }
  a.x = xp;
  a.ldx = q.Kp;
  a.xsum = xsum;
  return p;
}

// Weight tiles [t0, t1) of linear l: y (M, ldy) fp32 columns 16*t0 ...
void run_tiles(const KernelTable* kt, const Linear& l, const Prepped& p, float* y, int64_t ldy, int64_t t0,
               int64_t t1, ThreadBufs& tb) {
  if (l.kind == LK_DENSE) {
    kt->dense_f32(l.dense, l.K_in, t0 * TILE, std::min(l.N, t1 * TILE), p.a.x, p.a.M, p.a.ldx, l.bias, y, ldy);
    return;
  }
  Out o{};
  o.y = y;
  o.dt = DT_F32;
  o.ldy = ldy;
  o.bias = l.bias;
  o.raw = nullptr;
  Scratch s{nullptr, 0};
  if (p.mode == 1) s = Scratch{tb.gemm.data(), gemm_scratch_floats()};
  switch (l.kind) {
    case LK_INT4: kt->int4_wo(l.prep.q, p.a, o, t0, t1, p.mode, s); break;
    case LK_INT8: kt->int8_wo(l.prep.q, p.a, o, t0, t1, p.mode, s); break;
    case LK_CB4: kt->cb4_wo(l.prep.q, p.a, o, t0, t1, p.mode, s); break;
    case LK_W4A8: kt->w4a8(l.prep.q, p.a, o, t0, t1); break;
    default: kt->w8a8(l.prep.q, p.a, o, t0, t1); break;
  }
}

// Claim chunks [a, b) of n items from counter c until none are left.
template <class Fn>
void for_chunks(std::atomic<int64_t>& c, int64_t n, int64_t chunk, Fn&& fn) {
  for (;;) {
    const int64_t a = c.fetch_add(chunk, std::memory_order_relaxed);
    if (a >= n) return;
    fn(a, std::min(n, a + chunk));
  }
}

int64_t chunk_for(int64_t n, int team) { return std::max<int64_t>(1, n / (int64_t(team) * 4)); }

void rope(float* v, const float* c, const float* s, int64_t hd) {
  const int64_t h2 = hd / 2;
  float t[kMaxHeadDim];
  for (int64_t i = 0; i < hd; ++i) {
    const float rot = i < h2 ? -v[i + h2] : v[i - h2];
    t[i] = v[i] * c[i] + rot * s[i];
  }
  std::memcpy(v, t, sizeof(float) * hd);
}

uint16_t f32_to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

// ------------------------------------------------------------------ the step
at::Tensor decoder_step(int64_t id, const at::Tensor& x_in, at::Tensor& k_cache, at::Tensor& v_cache, int64_t pos) {
  std::shared_ptr<Decoder> dp = lookup(id);
  Decoder& d = *dp;
  std::lock_guard<std::mutex> lock(d.mu);
  const bool ids_in = x_in.scalar_type() == at::kLong;
  TORCH_CHECK(ids_in ? (x_in.dim() == 1 && x_in.size(0) > 0) : (x_in.dim() == 2 && x_in.size(1) == d.H && x_in.size(0) > 0),
              "torchq: decoder_step takes token ids (M,) int64 or hidden states (M, ", d.H, "), got ", x_in.scalar_type(),
              " ", x_in.sizes());
  TORCH_CHECK(!ids_in || d.embed_mode, "torchq: this decoder has no embedding: pass hidden states");
  const int64_t M = x_in.size(0);
  const int64_t cache_len = k_cache.dim() == 4 ? k_cache.size(2) : 0;
  TORCH_CHECK(cache_len <= d.max_len, "torchq: a KV cache of ", cache_len, " positions is longer than the rotary table (",
              d.max_len, " positions)");
  TORCH_CHECK(cache_len % KV_BLOCK == 0, "torchq: the KV cache length must be a multiple of ", KV_BLOCK, ", got ",
              cache_len);
  TORCH_CHECK(pos >= 0 && pos + M <= cache_len, "torchq: positions ", pos, "..", pos + M - 1,
              " do not fit the KV cache of ", cache_len, " positions");
  const std::vector<int64_t> cache_shape{d.L, d.nkv, cache_len, d.hd};
  for (const at::Tensor* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->sizes() == c10::IntArrayRef(cache_shape) && c->is_contiguous() && c->device().is_cpu() &&
                    (c->scalar_type() == at::kFloat || c->scalar_type() == at::kBFloat16) &&
                    c->scalar_type() == k_cache.scalar_type(),
                "torchq: KV caches must be contiguous fp32 or bf16 CPU tensors of shape ", c10::IntArrayRef(cache_shape));
  const int32_t kv_dt = k_cache.scalar_type() == at::kFloat ? DT_F32 : DT_BF16;
  const int64_t H = d.H, qd = d.nh * d.hd, kvd = d.nkv * d.hd, I = d.I, hd = d.hd;
  float* x = grow(d.x, M * H);
  at::Tensor ids;
  if (ids_in) {
    ids = x_in.contiguous();
    const int64_t* ip = ids.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m)
      TORCH_CHECK(ip[m] >= 0 && ip[m] < d.vocab, "torchq: token id ", ip[m], " outside the vocabulary of ", d.vocab);
  } else {
    const at::Tensor xf = x_in.to(at::kFloat).contiguous();
    std::memcpy(x, xf.data_ptr<float>(), sizeof(float) * M * H);
  }
  const int64_t* id_ptr = ids_in ? ids.data_ptr<int64_t>() : nullptr;
  float* qb = grow(d.q, M * qd);
  float* kb = grow(d.k, M * kvd);
  float* vb = grow(d.v, M * kvd);
  const int64_t G = d.nh / d.nkv;
  // attention items: one decode row splits its positions into chunks (online-softmax partials
  // merged afterwards) so that every thread has work; prefill rows are items of their own
  const int nt_req = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  int64_t chunk_len = cache_len, n_chunks = 1;
  if (M == 1) {
    const int64_t T = pos + 1;
    const int64_t want = std::max<int64_t>(1, (4 * nt_req + d.nkv - 1) / d.nkv);
    n_chunks = std::min<int64_t>(want, (T + 63) / 64);
    chunk_len = ((T + n_chunks - 1) / n_chunks + KV_BLOCK - 1) / KV_BLOCK * KV_BLOCK;
    n_chunks = (T + chunk_len - 1) / chunk_len;
  }
  float* part_out = grow(d.part_out, M * d.nkv * n_chunks * G * d.hd);
  float* part_mx = grow(d.part_mx, M * d.nkv * n_chunks * G);
  float* part_sum = grow(d.part_sum, M * d.nkv * n_chunks * G);
  float* tmp = grow(d.tmp, M * H);
  float* gb = grow(d.g, M * I);
  float* ub = grow(d.u, M * I);
  float* act = grow(d.act, M * I);
  at::Tensor logits = at::empty({d.vocab}, at::TensorOptions().dtype(at::kFloat));
  float* lg = logits.data_ptr<float>();

  const int nt = nt_req;
  if ((int)d.tb.size() < nt) d.tb.resize(nt);
  const int64_t kmax = std::max(std::max(H, I), std::max(qd, d.max_kp));
  for (int t = 0; t < nt; ++t) {
    ThreadBufs& b = d.tb[t];
    grow(b.h, M * kmax);
    grow(b.gemm, gemm_scratch_floats());
    grow(b.scores, G * (std::min(chunk_len, cache_len) + KV_BLOCK));
    grow(b.tlim, G);
    grow(b.att, M * qd);
    if (ids_in && d.embed_w()->kind != LK_DENSE) grow(b.emb, TILE * H);
    // the region must not allocate: size every slot it can use now (and only those: a
    // 256-row prefill on the GEMM path needs no prepared copies of its activations)
    const bool gemv = M < std::max(torchq_ops::gemm_min_m(true), torchq_ops::gemm_min_m(false));
    const int64_t kp = M * d.max_kp, gs = M * std::max<int64_t>(1, d.max_g);
    for (int s = 0; s < 3; ++s) {
      if (d.any_transform) grow(b.xt[s], kp);
      if (d.any_weight_only && gemv) {
        grow(b.xp[s], kp);
        grow(b.xsum[s], gs);
      }
      grow(b.rs[s], M);
      if (d.any_dynamic) {
        grow(b.xq[s], kp);
        grow(b.xabs[s], kp);
        grow(b.qsum[s], gs);
      }
    }
  }
  const int64_t n_counters = d.L * 8 + 8;
  std::unique_ptr<std::atomic<int64_t>[]> ctr(new std::atomic<int64_t>[n_counters]);
  for (int64_t i = 0; i < n_counters; ++i) ctr[i].store(0, std::memory_order_relaxed);
  SpinBarrier bar;
  const KernelTable* kt = torchq_ops::active_table();
  uint8_t* kc_base = (uint8_t*)k_cache.data_ptr();
  uint8_t* vc_base = (uint8_t*)v_cache.data_ptr();
  const int64_t kv_es = kv_dt == DT_F32 ? 4 : 2;

#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num();
    const int team = omp_get_num_threads();
    bar.n.store(team, std::memory_order_relaxed);
    ThreadBufs& tb = d.tb[tid];
    // thread 0 adds the wall time up to each barrier to its stage kind (about 20 ns a stamp)
    auto last = std::chrono::steady_clock::now();
    auto stamp = [&](int kind) {
      if (tid != 0) return;
      const auto now = std::chrono::steady_clock::now();
      d.prof[kind] += std::chrono::duration<double>(now - last).count();
      last = now;
    };
    float* h = tb.h.data();
    float* att = tb.att.data();
    int64_t ci = 0;  // counter index: every thread walks the same sequence of stages
    // x += in (M rows, row stride ld) @ l^T: the tiles of l in chunks, each chunk's columns added
    // into the residual stream by the thread that computed them (o_proj, down_proj)
    auto project_add = [&](const Linear& l, const float* in, int64_t ld, std::atomic<int64_t>& counter) {
      const Prepped p = prep_acts(kt, l, in, M, ld, tb, 0);
      for_chunks(counter, l.tiles(), chunk_for(l.tiles(), team), [&](int64_t a, int64_t b) {
        run_tiles(kt, l, p, tmp, H, a, b, tb);
        const int64_t n1 = std::min(H, b * TILE);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = a * TILE; n < n1; ++n) x[m * H + n] += tmp[m * H + n];
      });
    };
    if (id_ptr) {  // 0. embedding rows (quantized: the row's tile dequantized as the GEMM path does)
      const Linear& e = *d.embed_w();
      for_chunks(ctr[ci], M, 1, [&](int64_t a, int64_t b) {
        for (int64_t m = a; m < b; ++m) {
          const int64_t row = id_ptr[m];
          if (e.kind == LK_DENSE) {
            std::memcpy(x + m * H, e.dense + row * H, sizeof(float) * H);
            continue;
          }
          const int32_t wk = e.kind == LK_INT8 ? WK_INT8 : e.kind == LK_CB4 ? WK_CB4 : WK_INT4;
          const int64_t t = row / TILE;
          kt->dequant_t(e.prep.q, wk, t, t + 1, DT_F32, tb.emb.data(), TILE, tb.gemm.data());
          for (int64_t k = 0; k < H; ++k) x[m * H + k] = tb.emb[k * TILE + row % TILE];
        }
      });
      ++ci;
      bar.wait();
      stamp(0);
    }
    for (int64_t l = 0; l < d.L; ++l) {
      const Layer& ly = d.layers[l];
      // 1. norm, prepare, q|k|v tiles
      rmsnorm_rows(x, M, H, ly.in_norm, d.eps, h);
      Prepped pp[3];
      for (int s = 0; s < 3; ++s) {
        const Linear& lin = ly.lin[LQ + s];
        pp[s] = (s > 0 && same_prep(lin, ly.lin[LQ])) ? pp[0] : prep_acts(kt, lin, h, M, H, tb, s);
      }
      {
        const int64_t tq = ly.lin[LQ].tiles(), tk = ly.lin[LK].tiles(), tv = ly.lin[LV].tiles();
        const int64_t total = tq + tk + tv;
        float* outs[3] = {qb, kb, vb};
        const int64_t ld[3] = {qd, kvd, kvd};
        const int64_t starts[4] = {0, tq, tq + tk, total};
        for_chunks(ctr[ci], total, chunk_for(total, team), [&](int64_t a, int64_t b) {
          for (int s = 0; s < 3; ++s) {
            const int64_t lo = std::max(a, starts[s]), hi = std::min(b, starts[s + 1]);
            if (lo < hi) run_tiles(kt, ly.lin[LQ + s], pp[s], outs[s], ld[s], lo - starts[s], hi - starts[s], tb);
          }
        });
      }
      ++ci;
      bar.wait();
      stamp(1);
      // 2. RoPE; k and v into the cache. Items: (row, head) over query heads then KV heads.
      {
        const int64_t per_row = d.nh + d.nkv, total = M * per_row;
        for_chunks(ctr[ci], total, chunk_for(total, team), [&](int64_t a, int64_t b) {
          for (int64_t it = a; it < b; ++it) {
            const int64_t m = it / per_row, hh = it % per_row, p = pos + m;
            const float* c = d.cos + p * hd;
            const float* s = d.sin + p * hd;
            if (hh < d.nh) {
              rope(qb + m * qd + hh * hd, c, s, hd);
              continue;
            }
            const int64_t j = hh - d.nh;
            float* kr = kb + m * kvd + j * hd;
            const float* vr = vb + m * kvd + j * hd;
            rope(kr, c, s, hd);
            const int64_t head = ((l * d.nkv) + j) * cache_len * hd;
            const int64_t voff = head + p * hd;  // values: rows
            const int64_t koff = head + (p / KV_BLOCK) * hd * KV_BLOCK + p % KV_BLOCK;  // keys: blocked
            if (kv_dt == DT_F32) {
              for (int64_t i = 0; i < hd; ++i) ((float*)kc_base)[koff + i * KV_BLOCK] = kr[i];
              std::memcpy((float*)vc_base + voff, vr, sizeof(float) * hd);
            } else {
              for (int64_t i = 0; i < hd; ++i) {
                ((uint16_t*)kc_base)[koff + i * KV_BLOCK] = f32_to_bf16(kr[i]);
                ((uint16_t*)vc_base)[voff + i] = f32_to_bf16(vr[i]);
              }
            }
          }
        });
      }
      ++ci;
      bar.wait();
      stamp(2);
      // 3. attention: items (row, KV head, position chunk); the group's query heads share
      // every key and value read
      {
        const int64_t total = M * d.nkv * n_chunks;
        for_chunks(ctr[ci], total, 1, [&](int64_t a, int64_t b) {
          for (int64_t it = a; it < b; ++it) {
            const int64_t c = it % n_chunks, j = (it / n_chunks) % d.nkv, m = it / (n_chunks * d.nkv);
            const int64_t T = pos + m + 1, t0 = c * chunk_len, t1 = std::min(T, t0 + chunk_len);
            const int64_t base = ((l * d.nkv) + j) * cache_len * hd * kv_es;
            for (int64_t g = 0; g < G; ++g) tb.tlim[g] = T;
            const int64_t slot = ((m * d.nkv + j) * n_chunks + c) * G;
            kt->attend_part(qb + m * qd + j * G * hd, hd, (int)G, tb.tlim.data(), kc_base + base, vc_base + base,
                            kv_dt, hd, t0, t1, d.scale, tb.scores.data(), part_out + slot * hd, hd, part_mx + slot,
                            part_sum + slot);
          }
        });
      }
      ++ci;
      bar.wait();
      stamp(3);
      // every thread merges the partials into its own copy of the attention output
      for (int64_t m = 0; m < M; ++m)
        for (int64_t hh = 0; hh < d.nh; ++hh) {
          const int64_t j = hh / G, g = hh % G;
          float mxall = -INFINITY;
          for (int64_t c = 0; c < n_chunks; ++c) {
            const int64_t slot = ((m * d.nkv + j) * n_chunks + c) * G + g;
            if (part_sum[slot] > 0.f) mxall = std::max(mxall, part_mx[slot]);
          }
          float* o = att + m * qd + hh * hd;
          float denom = 0.f;
          for (int64_t i = 0; i < hd; ++i) o[i] = 0.f;
          for (int64_t c = 0; c < n_chunks; ++c) {
            const int64_t slot = ((m * d.nkv + j) * n_chunks + c) * G + g;
            if (!(part_sum[slot] > 0.f)) continue;
            const float w = n_chunks == 1 ? 1.f : std::exp(part_mx[slot] - mxall);
            denom += w * part_sum[slot];
            const float* po = part_out + slot * hd;
            for (int64_t i = 0; i < hd; ++i) o[i] += w * po[i];
          }
          const float inv = 1.f / denom;
          for (int64_t i = 0; i < hd; ++i) o[i] *= inv;
        }
      // 4. o_proj + residual
      project_add(ly.lin[LO], att, qd, ctr[ci]);  // att: this thread's merged copy
      ++ci;
      bar.wait();
      stamp(4);
      // 5. norm, gate and up tiles in pairs, SiLU(gate) * up
      rmsnorm_rows(x, M, H, ly.post_norm, d.eps, h);
      {
        const Linear& lg_ = ly.lin[LG];
        const Linear& lu = ly.lin[LU];
        const Prepped pg = prep_acts(kt, lg_, h, M, H, tb, 0);
        const Prepped pu = same_prep(lu, lg_) ? pg : prep_acts(kt, lu, h, M, H, tb, 1);
        for_chunks(ctr[ci], lg_.tiles(), chunk_for(lg_.tiles(), team), [&](int64_t a, int64_t b) {
          run_tiles(kt, lg_, pg, gb, I, a, b, tb);
          run_tiles(kt, lu, pu, ub, I, a, b, tb);
          const int64_t n1 = std::min(I, b * TILE);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = a * TILE; n < n1; ++n) {
              const float gv = gb[m * I + n];
              act[m * I + n] = gv / (1.f + std::exp(-gv)) * ub[m * I + n];
            }
        });
      }
      ++ci;
      bar.wait();
      stamp(5);
      // 6. down_proj + residual
      project_add(ly.lin[LD], act, I, ctr[ci]);
      ++ci;
      bar.wait();
      stamp(6);
    }
    // final norm and LM head, last row only
    rmsnorm_rows(x + (M - 1) * H, 1, H, d.final_norm, d.eps, h);
    const Prepped ph = prep_acts(kt, d.head, h, 1, H, tb, 0);
    for_chunks(ctr[ci], d.head.tiles(), chunk_for(d.head.tiles(), team),
               [&](int64_t a, int64_t b) { run_tiles(kt, d.head, ph, lg, d.vocab, a, b, tb); });
#pragma omp barrier
    stamp(7);
  }
  return logits;
}

// Seconds spent per stage kind since the last call (thread 0's wall time, barriers included):
// embedding, q|k|v, RoPE + cache, attention, o_proj, gate|up, down_proj, final norm + LM head.
std::vector<double> decoder_profile(int64_t id) {
  std::shared_ptr<Decoder> dp = lookup(id);
  std::lock_guard<std::mutex> lock(dp->mu);
  std::vector<double> out(dp->prof.begin(), dp->prof.end());
  dp->prof.fill(0.0);
  return out;
}

// Threads a step's region ran with (tests: torch.set_num_threads governs the team).
int64_t decoder_team_size() {
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  int team = 1;
#pragma omp parallel num_threads(nt)
  {
#pragma omp single
    team = omp_get_num_threads();
  }
  return team;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchq, m) {
  m.def("_decoder_create(Tensor[] tensors, int[] spec, float[] fspec) -> int", &decoder_create);
  m.def("_decoder_free(int decoder) -> ()", &decoder_free);
  m.def("_decoder_team_size() -> int", &decoder_team_size);
  m.def("_decoder_profile(int decoder) -> float[]", &decoder_profile);
  m.def("decoder_step(int decoder, Tensor x, Tensor(a!) k_cache, Tensor(b!) v_cache, int pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(torchq, CPU, m) { m.impl("decoder_step", &decoder_step); }
