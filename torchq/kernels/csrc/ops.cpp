// torchq CPU operators: schemas (TORCH_LIBRARY), CPU implementations, ISA selection and
// threading. The arithmetic lives in the per-ISA units (isa_*.cpp, kernels_impl.h); this
// unit validates arguments, prepares activations, and splits the weight tiles over
// threads with at::parallel_for (built with OpenMP, so torch.set_num_threads governs it).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cpuid.h>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernel_api.h"
#include "ops_internal.h"

namespace {
using namespace torchq_k;

// ------------------------------------------------------------------ ISA detection
// amx: the avx512 kernels, plus the oneDNN route for large M (library GEMMs, which run on
// AMX tiles). torchq issues no tile instruction itself; the path is offered only where
// cpuid has AMX-TILE/BF16/INT8, the OS enables the tile state in XCR0 and Linux grants
// this process the tile data permission (ARCH_REQ_XCOMP_PERM), as oneDNN requires.
enum Isa : int64_t { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AMX = 3 };

// Linux: tile data is usable only after the process asks for it (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); refused -> no amx path.
bool request_amx_permission() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return ((uint64_t)hi << 32) | lo;
}

int64_t detect_supported() {
  int64_t mask = 1 << ISA_SCALAR;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return mask;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!(osxsave && avx)) return mask;
  const uint64_t xcr = xcr0();
  if ((xcr & 0x6) != 0x6) return mask;  // SSE + AVX state enabled by the OS
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return mask;
  const bool avx2 = b & (1u << 5);
  if (avx2 && fma && f16c) mask |= 1 << ISA_AVX2;
  const bool f = b & (1u << 16), dq = b & (1u << 17), bw = b & (1u << 30), vl = b & (1u << 31);
  const bool vnni = c & (1u << 11);
  if ((mask & (1 << ISA_AVX2)) && f && dq && bw && vl && vnni && (xcr & 0xE6) == 0xE6) mask |= 1 << ISA_AVX512;
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25);
  const uint64_t tile_state = (uint64_t(1) << 17) | (uint64_t(1) << 18);  // XTILECFG, XTILEDATA
  if ((mask & (1 << ISA_AVX512)) && amx_bf16 && amx_tile && amx_int8 && (xcr & tile_state) == tile_state &&
      request_amx_permission())
    mask |= 1 << ISA_AMX;
  return mask;
}

bool detect_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return a & (1u << 5);  // AVX512_BF16 (vdpbf16ps)
}

// The x86 features the kernel paths depend on, by name (python -m torchq.kernels).
std::string cpu_features() {
  std::string out;
  auto add = [&](bool on, const char* name) {
    if (!on) return;
    if (!out.empty()) out += ' ';
    out += name;
  };
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return out;
  add(c & (1u << 12), "fma");
  add(c & (1u << 29), "f16c");
  const bool osxsave = c & (1u << 27);
  const uint64_t xcr = osxsave ? xcr0() : 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return out;
  add(b & (1u << 5), "avx2");
  add(b & (1u << 16), "avx512f");
  add(b & (1u << 17), "avx512dq");
  add(b & (1u << 30), "avx512bw");
  add(b & (1u << 31), "avx512vl");
  add(c & (1u << 11), "avx512_vnni");
  add(d & (1u << 23), "avx512_fp16");
  add(d & (1u << 24), "amx_tile");
  add(d & (1u << 22), "amx_bf16");
  add(d & (1u << 25), "amx_int8");
  add((xcr & 0xE6) == 0xE6, "os_zmm_state");
  add((xcr & (3u << 17)) == (3u << 17), "os_tile_state");
  unsigned a1, b1, c1, d1;
  if (__get_cpuid_count(7, 1, &a1, &b1, &c1, &d1)) {
    add(a1 & (1u << 4), "avx_vnni");
    add(a1 & (1u << 5), "avx512_bf16");
  }
  return out;
}

const int64_t kSupported = detect_supported();
const bool kNativeBf16 = (kSupported & (1 << ISA_AVX512)) && detect_bf16();
std::atomic<int64_t> g_isa{(kSupported & (1 << ISA_AMX))      ? ISA_AMX
                           : (kSupported & (1 << ISA_AVX512)) ? ISA_AVX512
                           : (kSupported & (1 << ISA_AVX2))   ? ISA_AVX2
                                                              : ISA_SCALAR};

const KernelTable* table() {
  switch (g_isa.load(std::memory_order_relaxed)) {
    case ISA_AMX:
    case ISA_AVX512: return table_avx512();
    case ISA_AVX2: return table_avx2();
    default: return table_scalar();
  }
}

// Tunables (M thresholds of the dequantize + GEMM paths); -1 restores the default.
// Weight-only kernels get allow_bf16 from the caller (torchq's precision rule: bf16 / fp16
// activations, or torch.get_float32_matmul_precision() "high" / "medium"); without it they
// compute in fp32 at every M on every CPU. With it, from bf16_min_m rows:
//  * amx path: the oneDNN route (weight rows dequantized to bf16 a chunk at a time, at::mm
//    on bf16 activations: oneDNN's AMX GEMM; its bf16 result is widened to the output dtype);
//  * avx512 path of CPUs with AVX512-BF16: torchq's bf16 GEMM (activations and dequantized
//    weights rounded to bf16, fp32 accumulate, vdpbf16ps);
//  * elsewhere there is no bf16 dot product to gain from: fp32. bf16_emulate=1 runs
//    torchq's bf16 GEMM there (tests); onednn_route=1 runs the oneDNN route on any path
//    (tests, benchmarks), 2 never.
constexpr int64_t kBf16MinMDefault = 32;
std::atomic<int64_t> g_int4_gemm_min_m{8};
std::atomic<int64_t> g_int8_gemm_min_m{8};
std::atomic<int64_t> g_bf16_min_m{kBf16MinMDefault};
std::atomic<int64_t> g_bf16_emulate{0};
std::atomic<int64_t> g_onednn_route{0};  // 0: on the amx path, 1: always, 2: never
// Weight bytes (bf16) dequantized per at::mm call of the oneDNN route: fewer, larger calls
// amortize oneDNN's per-call weight packing, smaller ones stay in cache. Tune on AMX hosts.
constexpr int64_t kRouteChunkDefault = int64_t(2) << 20;
std::atomic<int64_t> g_onednn_chunk_bytes{kRouteChunkDefault};
// Software prefetch distance (bytes) of the GEMV code stream; see kernels_impl.h (pf()).
constexpr int64_t kPfDistDefault = 8192;
std::atomic<int64_t> g_pf_dist{kPfDistDefault};

// Which arithmetic a weight-only call of M rows runs (see the tunables above).
enum WoRoute { ROUTE_FP32 = 0, ROUTE_BF16_GEMM = 1, ROUTE_ONEDNN = 2 };

WoRoute wo_route(bool allow_bf16, int64_t M, bool has_runner) {
  if (!allow_bf16 || M < g_bf16_min_m.load()) return ROUTE_FP32;
  const int64_t isa = g_isa.load(), onednn = g_onednn_route.load();
  if (!has_runner && (onednn == 1 || (onednn == 0 && isa == ISA_AMX))) return ROUTE_ONEDNN;
  const bool avx512 = isa == ISA_AVX512 || isa == ISA_AMX;
  if (avx512 && kNativeBf16) return ROUTE_BF16_GEMM;
  if (!g_bf16_emulate.load()) return ROUTE_FP32;
  TORCH_CHECK(!avx512, "torchq: the avx512 ISA path runs bf16 only natively (AVX512-BF16), which this CPU lacks");
  return ROUTE_BF16_GEMM;
}

// The route's name for torchq.explain: what a call of M rows runs now.
std::string route_name(bool allow_bf16, int64_t M) {
  switch (wo_route(allow_bf16, M, false)) {
    case ROUTE_ONEDNN: return "onednn_bf16";
    case ROUTE_BF16_GEMM: return "bf16_gemm";
    default: return "fp32";
  }
}

int64_t supported_isas() { return kSupported; }
bool native_bf16() { return kNativeBf16; }

// How many distinct threads at::parallel_for used for `n` items: 1 for an extension
// built without OpenMP, whatever torch.set_num_threads allows otherwise (tests).
int64_t parallel_threads(int64_t n) {
  std::atomic<int64_t> mask{0};
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    volatile double sink = 0;
    for (int i = 0; i < 200000; ++i) sink = sink + i;  // long enough for every thread to join
    mask.fetch_or(int64_t(1) << (at::get_thread_num() & 63));
  });
  return __builtin_popcountll((unsigned long long)mask.load());
}
int64_t get_isa() { return g_isa.load(); }
void set_isa(int64_t isa) {
  TORCH_CHECK(isa >= 0 && isa <= 3, "torchq: unknown ISA id ", isa);
  TORCH_CHECK(kSupported & (1 << isa), "torchq: this CPU does not support the requested ISA id ", isa,
              " (supported mask ", kSupported, ")");
  g_isa.store(isa);
}
int64_t tune(std::string name, int64_t value) {
  std::atomic<int64_t>* p = nullptr;
  int64_t dflt = 0;
  if (name == "int4_gemm_min_m") {
    p = &g_int4_gemm_min_m;
    dflt = 8;
  } else if (name == "int8_gemm_min_m") {
    p = &g_int8_gemm_min_m;
    dflt = 8;
  } else if (name == "bf16_min_m") {
    p = &g_bf16_min_m;
    dflt = kBf16MinMDefault;
  } else if (name == "bf16_emulate") {
    p = &g_bf16_emulate;
    dflt = 0;
  } else if (name == "prefetch_distance") {
    p = &g_pf_dist;
    dflt = kPfDistDefault;
  } else if (name == "onednn_chunk_bytes") {
    TORCH_CHECK(value < 0 || value >= 4096, "torchq: onednn_chunk_bytes must be at least 4096, got ", value);
    p = &g_onednn_chunk_bytes;
    dflt = kRouteChunkDefault;
  } else if (name == "onednn_route") {
    TORCH_CHECK(value <= 2, "torchq: onednn_route is 0 (amx path), 1 (always) or 2 (never), got ", value);
    p = &g_onednn_route;
    dflt = 0;
  }
  TORCH_CHECK(p, "torchq: unknown tunable '", name,
              "' (known: int4_gemm_min_m, int8_gemm_min_m, bf16_min_m, bf16_emulate, onednn_route, onednn_chunk_bytes, "
              "prefetch_distance)");
  return p->exchange(value < 0 ? dflt : value);
}

// ------------------------------------------------------------------ scratch memory
// Per-thread scratch reused across calls (activation preparation, GEMM blocks), so a call
// allocates only its output. Requests above kMaxCached bytes get a one-off tensor.
constexpr size_t kMaxCached = 64u << 20;

struct ScratchBuf {
  std::vector<uint64_t> mem;
  at::Tensor big;
  void* get(size_t bytes) {
    if (bytes > kMaxCached) {
      big = at::empty({(int64_t)bytes}, at::kByte);
      return big.data_ptr();
    }
    big = at::Tensor();
    const size_t words = (bytes + 7) / 8 + 8;
    if (mem.size() < words) mem.resize(words);
    return mem.data();
  }
};

// Bump allocator over one ScratchBuf: carve aligned pieces for one call.
struct Carver {
  uint8_t* base;
  size_t off = 0;
  template <class T>
  T* take(int64_t n) {
    off = (off + 63) & ~(size_t)63;
    T* p = (T*)(base + off);
    off += sizeof(T) * (size_t)n;
    return p;
  }
};

// Bytes needed for the pieces carved by a Carver (same alignment rule).
struct Sizer {
  size_t off = 0;
  template <class T>
  void add(int64_t n) {
    off = (off + 63) & ~(size_t)63;
    off += sizeof(T) * (size_t)n;
  }
};

thread_local ScratchBuf tl_prep;   // calling thread: prepared activations
thread_local ScratchBuf tl_gemm;   // every thread: GEMM-path blocks
thread_local ScratchBuf tl_dq;     // every thread: decoded double-quantized scales (codebook4)

// ------------------------------------------------------------------ argument helpers
int32_t float_dt(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return DT_F32;
    case at::kHalf: return DT_F16;
    case at::kBFloat16: return DT_BF16;
    default: TORCH_CHECK(false, "torchq: ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DT_F32;
}

// Activations viewed as (M, K) with unit stride along K.
at::Tensor rows_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "torchq: activations need at least one dimension");
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, x.size(-1)});
  if (x2.size(1) > 1 && x2.stride(1) != 1) x2 = x2.contiguous();
  if (x2.size(0) > 1 && x2.stride(0) < x2.size(1)) x2 = x2.contiguous();
  return x2;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> s(x.sizes().begin(), x.sizes().end());
  s.back() = n;
  return s;
}

// Zero-padded 16-row copy of the partial last tile of a tiled tensor whose per-tile block
// is [outer][rows][unit] bytes (plus, for W8A8, a trailing [rows][tail_unit] block).
at::Tensor pad_tail(const uint8_t* base, int64_t n_full, int64_t rows, int64_t outer, int64_t unit,
                    int64_t tail_unit) {
  const int64_t full_block = TILE * (outer * unit + tail_unit);
  at::Tensor out = at::zeros({full_block}, at::kByte);
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint8_t* src = base + n_full * full_block;
  for (int64_t o = 0; o < outer; ++o)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t u = 0; u < unit; ++u) dst[(o * TILE + r) * unit + u] = src[(o * rows + r) * unit + u];
  const uint8_t* st = src + outer * rows * unit;
  uint8_t* dt = dst + outer * TILE * unit;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t u = 0; u < tail_unit; ++u) dt[r * tail_unit + u] = st[r * tail_unit + u];
  return out;
}

using torchq_ops::Prepared;

// Validate and describe a tiled weight. bytes_per_k: code bytes per row per input
// feature times 2 (int4: 1, int8: 2) -> Kp = qdata.size(1) * 2 / bytes_per_k2.
Prepared prepare_weight(const at::Tensor& qdata, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                        int64_t group, int64_t qmin, int64_t K, bool int4, bool k4x16) {
  TORCH_CHECK(qdata.device().is_cpu() && scale.device().is_cpu(), "torchq: CPU kernels need CPU tensors");
  TORCH_CHECK(qdata.dim() == 2 && qdata.is_contiguous(), "torchq: qdata must be a contiguous 2-D tensor");
  TORCH_CHECK(int4 ? qdata.scalar_type() == at::kByte : qdata.scalar_type() == at::kChar,
              "torchq: qdata must be ", int4 ? "uint8 (packed int4)" : "int8", ", got ", qdata.scalar_type());
  TORCH_CHECK(scale.dim() == 2 && scale.is_contiguous(), "torchq: scale must be a contiguous (N, groups) tensor");
  Prepared p;
  QWeight& q = p.q;
  q.N = qdata.size(0);
  q.Kp = int4 ? qdata.size(1) * 2 : qdata.size(1);
  q.G = scale.size(1);
  q.group = group;
  q.K = K;
  TORCH_CHECK(scale.size(0) == q.N, "torchq: scale has ", scale.size(0), " rows, qdata ", q.N);
  TORCH_CHECK(group > 0 && q.G * group == q.Kp, "torchq: groups (", q.G, ") x group_size (", group,
              ") != padded in_features (", q.Kp, ")");
  TORCH_CHECK(K <= q.Kp && q.Kp - K < group, "torchq: input has ", K, " features; the weight holds ", q.Kp,
              " padded features in groups of ", group);
  TORCH_CHECK(!int4 || group % 8 == 0, "torchq: int4 kernels need group_size % 8 == 0, got ", group);
  q.scale_dt = float_dt(scale, "scale");
  q.scale = (const uint8_t*)scale.data_ptr();
  q.qmin = (int32_t)qmin;
  q.zero = nullptr;
  q.zero_kind = ZK_NONE;
  q.zero_dt = DT_F32;
  if (zero.has_value()) {
    const at::Tensor& z = *zero;
    TORCH_CHECK(z.sizes() == scale.sizes() && z.is_contiguous(), "torchq: zero_point must be contiguous like scale");
    if (z.scalar_type() == at::kChar) {
      q.zero_kind = ZK_INT;
    } else {
      q.zero_kind = ZK_FLOAT;
      q.zero_dt = float_dt(z, "float zero_point");
    }
    q.zero = (const uint8_t*)z.data_ptr();
  }
  q.w = (const uint8_t*)qdata.data_ptr();
  q.lut = nullptr;
  q.pf_dist = g_pf_dist.load(std::memory_order_relaxed);
  q.tile_bytes = TILE * qdata.size(1);
  q.n_full = q.N / TILE;
  const int64_t rows = q.N % TILE;
  q.tail_w = q.tail_scale = q.tail_zero = nullptr;
  if (rows) {
    int64_t outer, unit, tail_unit = 0;
    if (int4) {
      outer = q.Kp / 8, unit = 4;
    } else if (k4x16) {
      outer = q.Kp / 4, unit = 4, tail_unit = q.Kp % 4;
    } else {
      outer = q.Kp, unit = 1;
    }
    p.keep.push_back(pad_tail(q.w, q.n_full, rows, outer, unit, tail_unit));
    q.tail_w = p.keep.back().data_ptr<uint8_t>();
    p.keep.push_back(pad_tail(q.scale, q.n_full, rows, q.G, scale.element_size(), 0));
    q.tail_scale = p.keep.back().data_ptr<uint8_t>();
    if (q.zero) {
      p.keep.push_back(pad_tail(q.zero, q.n_full, rows, q.G, zero->element_size(), 0));
      q.tail_zero = p.keep.back().data_ptr<uint8_t>();
    }
  }
  return p;
}

at::Tensor bias_f32(const c10::optional<at::Tensor>& bias, int64_t n) {
  if (!bias.has_value()) return at::Tensor();
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, "torchq: bias must have shape (", n, ")");
  if (bias->scalar_type() == at::kFloat && bias->is_contiguous()) return *bias;
  return bias->to(at::kFloat).contiguous();
}

Out make_out(at::Tensor& y, const at::Tensor& b, int64_t n) {
  Out o;
  o.y = y.data_ptr();
  o.dt = float_dt(y, "output");
  o.ldy = n;
  o.bias = b.defined() ? b.data_ptr<float>() : nullptr;
  o.raw = nullptr;
  return o;
}

// Split the weight tiles over threads; `work` ~ bytes streamed + MACs / 8 of the call.
// Below kSerialWork a parallel region costs more than it saves: run inline.
constexpr int64_t kSerialWork = 48 * 1024;

template <class Fn>
void over_tiles(int64_t n, int64_t work, Fn&& fn) {
  const int64_t tiles = (n + TILE - 1) / TILE;
  const int64_t threads = at::get_num_threads();
  if (work < kSerialWork || tiles == 1 || threads == 1 || at::in_parallel_region()) {
    fn(0, tiles);
    return;
  }
  // Threads take chunks of contiguous tiles from a shared counter (about 8 per thread)
  // instead of one fixed range each: on a busy host a descheduled thread's share is
  // picked up by the others. Each tile is still computed by exactly one thread, so
  // results do not depend on the thread count or the schedule.
  const int64_t nthr = threads < tiles ? threads : tiles;
  const int64_t chunk = std::max<int64_t>(1, tiles / (nthr * 8));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nthr, 1, [&](int64_t, int64_t) {
    for (;;) {
      const int64_t t0 = next.fetch_add(chunk);
      if (t0 >= tiles) break;
      fn(t0, std::min(tiles, t0 + chunk));
    }
  });
}

// ------------------------------------------------------------------ weight-only ops
int64_t call_work(const QWeight& q, int64_t M, bool int4) {
  const int64_t bytes = q.N * q.Kp / (int4 ? 2 : 1);
  return bytes + M * q.N * q.K / 8;
}

// Runs the kernel over weight tiles [t0, t1) (default: the KernelTable entry of the scheme).
using TileRunner = std::function<void(const QWeight&, const Acts&, const Out&, int64_t, int64_t, int, Scratch)>;

// The oneDNN route: rows of the weight, a chunk of about onednn_chunk_bytes at a time, are
// dequantized to bf16 (transposed, [K][rows]) by all threads, then multiplied by at::mm
// with the bf16-rounded activations (oneDNN: AMX or AVX512-BF16 kernels, its own threads).
// Its bf16 result is widened into y's columns; bias is added in fp32 at the end.
void onednn_weight_only(const at::Tensor& x2, at::Tensor& y2, const QWeight& q, int32_t kind, const at::Tensor& b) {
  const KernelTable* kt = table();
  const at::Tensor xb = x2.scalar_type() == at::kBFloat16 ? x2 : x2.to(at::kBFloat16);
  const int64_t tiles = (q.N + TILE - 1) / TILE;
  const int64_t chunk_tiles = std::max<int64_t>(1, g_onednn_chunk_bytes.load() / (q.K * 2 * TILE));
  at::Tensor wt = at::empty({q.K, chunk_tiles * TILE}, x2.options().dtype(at::kBFloat16));
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk_tiles) {
    const int64_t t1 = std::min(tiles, t0 + chunk_tiles);
    const int64_t n0 = t0 * TILE, rows = std::min(q.N, t1 * TILE) - n0;
    at::Tensor wc = wt.narrow(1, 0, rows);
    uint16_t* wp = (uint16_t*)wt.data_ptr();
    const int64_t ldw = wt.stride(0);
    at::parallel_for(t0, t1, 1, [&](int64_t a0, int64_t a1) {
      float* wb = (float*)tl_gemm.get(sizeof(float) * GEMM_KC * TILE);
      kt->dequant_t(q, kind, a0, a1, DT_BF16, wp + (a0 - t0) * TILE, ldw, wb);
    });
    y2.narrow(1, n0, rows).copy_(at::mm(xb, wc));
  }
  if (b.defined()) y2.add_(b.to(y2.scalar_type()));
}

// lut != null: a 4-bit codebook weight (int4-tiled codes, fp32 scales, 16-entry table).
// allow_bf16: the caller's precision rule allows bf16 products (wo_route).
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                              const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias,
                              int64_t group, int64_t qmin, bool int4, bool allow_bf16, const float* lut = nullptr,
                              const TileRunner* runner = nullptr) {
  const int32_t xdt = float_dt(x, "activations");
  at::Tensor x2 = rows_of(x);
  const int64_t M = x2.size(0), K = x2.size(1);
  Prepared p = prepare_weight(qdata, scale, zero, group, qmin, K, int4, false);
  p.q.lut = lut;
  const QWeight& q = p.q;
  at::Tensor y = at::empty(out_shape(x, q.N), x.options());
  if (M == 0) return y;
  at::Tensor b = bias_f32(bias, q.N);
  const WoRoute route = wo_route(allow_bf16, M, runner != nullptr);
  if (route == ROUTE_ONEDNN) {
    at::Tensor y2 = y.view({M, q.N});
    onednn_weight_only(x2, y2, q, lut ? WK_CB4 : int4 ? WK_INT4 : WK_INT8, b);
    return y;
  }
  Out o = make_out(y, b, q.N);
  const KernelTable* kt = table();
  const bool bf16 = route == ROUTE_BF16_GEMM;
  const bool gemm = bf16 || M >= (int4 ? g_int4_gemm_min_m : g_int8_gemm_min_m).load();
  Acts a{};
  a.M = M;
  const bool need_sum = (int4 && !lut) || q.zero_kind != ZK_NONE || q.qmin != 0;
  if (!gemm) {
    Sizer sz;
    sz.add<float>(M * q.Kp);
    sz.add<float>(M * q.G);
    sz.add<float>(M);
    Carver c{(uint8_t*)tl_prep.get(sz.off)};
    float* xp = c.take<float>(M * q.Kp);
    float* xsum = c.take<float>(M * q.G);
    float* rs = c.take<float>(M);
    if (int4 && !lut) {
      kt->prep_int4_gemv(x2.data_ptr(), xdt, M, K, x2.stride(0), q.Kp, group, xp, xsum, rs);
      a.rscale = rs;
    } else {
      kt->prep_f32(x2.data_ptr(), xdt, M, K, x2.stride(0), q.Kp, group, xp, need_sum ? xsum : nullptr);
      a.rscale = nullptr;
    }
    a.x = xp;
    a.ldx = q.Kp;
    a.xsum = xsum;
  } else if (bf16) {
    a.ldb = (K + 1) / 2 * 2;
    uint16_t* xb = (uint16_t*)tl_prep.get(sizeof(uint16_t) * M * a.ldb);
    kt->prep_bf16(x2.data_ptr(), xdt, M, K, x2.stride(0), a.ldb, xb);
    a.xbf = xb;
  } else if (xdt == DT_F32 && (M == 1 || x2.stride(0) >= K)) {
    a.x = x2.data_ptr<float>();
    a.ldx = M == 1 ? K : x2.stride(0);
  } else {
    float* xf = (float*)tl_prep.get(sizeof(float) * M * K);
    const int64_t ldx = x2.stride(0);
    const uint8_t* src = (const uint8_t*)x2.data_ptr();
    const int64_t es = x2.element_size();
    auto conv = [&](int64_t m0, int64_t m1) {
      kt->prep_f32(src + m0 * ldx * es, xdt, m1 - m0, K, ldx, K, 0, xf + m0 * K, nullptr);
    };
    if (M * K >= (1 << 16)) at::parallel_for(0, M, 16, conv); else conv(0, M);
    a.x = xf;
    a.ldx = K;
  }
  const auto wo = lut ? kt->cb4_wo : int4 ? kt->int4_wo : kt->int8_wo;
  over_tiles(q.N, call_work(q, M, int4), [&](int64_t t0, int64_t t1) {
    Scratch s{nullptr, 0};
    if (gemm) s = Scratch{(float*)tl_gemm.get(sizeof(float) * gemm_scratch_floats()), gemm_scratch_floats()};
    const int mode = bf16 ? 2 : gemm ? 1 : 0;
    if (runner) {
      (*runner)(q, a, o, t0, t1, mode, s);
    } else {
      wo(q, a, o, t0, t1, mode, s);
    }
  });
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t group,
                       int64_t qmin, bool allow_bf16) {
  return weight_only_linear(x, qdata, scale, zero, bias, group, qmin, true, allow_bf16);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t group,
                       bool allow_bf16) {
  return weight_only_linear(x, qdata, scale, zero, bias, group, 0, false, allow_bf16);
}

// ------------------------------------------------------------------ 4-bit codebook (NF4 / FP4)
// QLoRA double-quantized scales: scale[n, g] = code[q[n, g]] * absmax2[(n*G + g) / 256] +
// offset, rounded after the product and after the sum as the reference decodes them.
// Rows [n0, n0 + rows) are decoded into the kernels' tiled order dst[g][rows].
void decode_dq_rows(const uint8_t* __restrict qp, const float* __restrict code, const float* __restrict absmax2,
                    float off, int64_t G, int64_t n0, int64_t rows, float* __restrict dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t base = (n0 + r) * G;
    const uint8_t* q = qp + base;
    float* d = dst + r;
    for (int64_t g = 0; g < G;) {
      // the scales [g, end) of this row share one absmax2 block (256 consecutive scales)
      const int64_t blk = (base + g) >> 8;
      const int64_t end = std::min(G, ((blk + 1) << 8) - base);
      const float a = absmax2[blk];
      for (; g < end; ++g) {
#if defined(__FMA__)
        volatile float prod = code[q[g]] * a;  // keep the product rounded (no fused multiply-add)
#else
        const float prod = code[q[g]] * a;  // baseline x86-64: no FMA to contract into
#endif
        d[g * rows] = prod + off;
      }
    }
  }
}

// Double-quantized weights: each thread decodes the scales of a few tiles at a time into an
// L1-sized buffer right before running the kernel on them, so the fp32 scales never go
// through memory (the tail tile is decoded up front: prepare_weight pads it).
at::Tensor cb4_dq_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& sq, const float* lut,
                         const c10::optional<at::Tensor>& bias, int64_t block_size, const at::Tensor& code,
                         const at::Tensor& absmax2, const at::Tensor& offset, bool allow_bf16) {
  TORCH_CHECK(sq.dim() == 2 && sq.scalar_type() == at::kByte && sq.is_contiguous(),
              "torchq: double-quantized scales must be contiguous uint8 (N, groups)");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.numel() == 256 && code.is_contiguous(),
              "torchq: the dynamic code must be 256 contiguous fp32 values");
  TORCH_CHECK(absmax2.scalar_type() == at::kFloat && absmax2.is_contiguous() && offset.scalar_type() == at::kFloat &&
                  offset.numel() == 1, "torchq: scale_absmax / scale_offset must be fp32");
  const int64_t N = sq.size(0), G = sq.size(1);
  TORCH_CHECK(qdata.dim() == 2 && qdata.size(0) == N, "torchq: qdata has ", qdata.size(0), " rows, scales ", N);
  TORCH_CHECK(absmax2.numel() * 256 >= N * G, "torchq: scale_absmax has ", absmax2.numel(), " blocks for ", N * G,
              " scales");
  const uint8_t* qp = sq.data_ptr<uint8_t>();
  const float* cp = code.data_ptr<float>();
  const float* ap = absmax2.data_ptr<float>();
  const float off = offset.item<float>();
  const int64_t n_full = N / TILE;
  if (wo_route(allow_bf16, rows_of(x).size(0), false) == ROUTE_ONEDNN) {
    // large M: decode every scale once (N x G floats, small next to the GEMM), no runner
    at::Tensor all = at::empty({N, G}, sq.options().dtype(at::kFloat));
    float* ap_out = all.data_ptr<float>();
    at::parallel_for(0, n_full + (N % TILE ? 1 : 0), 1, [&](int64_t a0, int64_t a1) {
      for (int64_t t = a0; t < a1; ++t)
        decode_dq_rows(qp, cp, ap, off, G, t * TILE, std::min<int64_t>(TILE, N - t * TILE), ap_out + t * TILE * G);
    });
    return weight_only_linear(x, qdata, all, c10::nullopt, bias, block_size, 0, true, true, lut);
  }
  // Only the partial last tile is written here (uninitialized elsewhere, never read).
  at::Tensor tail = at::empty({N, G}, sq.options().dtype(at::kFloat));
  if (N % TILE) decode_dq_rows(qp, cp, ap, off, G, n_full * TILE, N % TILE, tail.data_ptr<float>() + n_full * TILE * G);
  const KernelTable* kt = table();
  const TileRunner runner = [&](const QWeight& q, const Acts& a, const Out& o, int64_t t0, int64_t t1, int gemm,
                                Scratch s) {
    constexpr int64_t SPAN = GEMM_NB;
    float* dec = (float*)tl_dq.get(sizeof(float) * SPAN * G * TILE);
    const int64_t osize = o.dt == DT_F32 ? 4 : 2;
    for (int64_t tb = t0; tb < t1;) {
      // a span of full tiles, or the tail tile alone, run as a weight of its own
      const int64_t te = tb < n_full ? std::min(std::min(t1, tb + SPAN), n_full) : tb + 1;
      QWeight qt = q;
      qt.w = q.w + tb * q.tile_bytes;
      if (tb < n_full) {
        for (int64_t t = tb; t < te; ++t) decode_dq_rows(qp, cp, ap, off, G, t * TILE, TILE, dec + (t - tb) * TILE * G);
        qt.scale = (const uint8_t*)dec;
        qt.n_full = te - tb;
        qt.N = (te - tb) * TILE;
      } else {
        qt.n_full = 0;
        qt.N = N - tb * TILE;
      }
      Out ot = o;
      ot.y = (uint8_t*)o.y + tb * TILE * osize;
      ot.bias = o.bias ? o.bias + tb * TILE : nullptr;
      kt->cb4_wo(qt, a, ot, 0, te - tb, gemm, s);
      tb = te;
    }
  };
  return weight_only_linear(x, qdata, tail, c10::nullopt, bias, block_size, 0, true, allow_bf16, lut, &runner);
}

at::Tensor cb4_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale, const at::Tensor& lut,
                      const c10::optional<at::Tensor>& bias, int64_t block_size,
                      const c10::optional<at::Tensor>& dq_code, const c10::optional<at::Tensor>& dq_absmax,
                      const c10::optional<at::Tensor>& dq_offset, bool allow_bf16) {
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16 && lut.is_contiguous(),
              "torchq: the codebook must be 16 contiguous fp32 values");
  TORCH_CHECK(qdata.scalar_type() == at::kByte, "torchq: codebook qdata must be uint8 (two codes per byte)");
  if (scale.scalar_type() == at::kByte) {
    TORCH_CHECK(dq_code.has_value() && dq_absmax.has_value() && dq_offset.has_value(),
                "torchq: uint8 (double-quantized) scales need dq_code, dq_absmax and dq_offset");
    return cb4_dq_linear(x, qdata, scale, lut.data_ptr<float>(), bias, block_size, *dq_code, *dq_absmax, *dq_offset,
                         allow_bf16);
  }
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "torchq: codebook block scales must be fp32 (or uint8 double-quantized)");
  return weight_only_linear(x, qdata, scale, c10::nullopt, bias, block_size, 0, true, allow_bf16,
                            lut.data_ptr<float>());
}

// ------------------------------------------------------------------ dynamic int8 ops
struct QuantActs {
  int8_t* q;
  uint8_t* qabs;
  int32_t* qsum;
  float* scale;
};

// Quantize rows of x2 into the calling thread's scratch (q zero-padded to ldq).
QuantActs quantize_acts(const at::Tensor& x2, int64_t ldq, int64_t group, float* scale_out) {
  const int32_t xdt = float_dt(x2, "activations");
  const int64_t M = x2.size(0), K = x2.size(1);
  const int64_t G = group > 0 ? ldq / group : 0;
  Sizer sz;
  sz.add<int8_t>(M * ldq);
  sz.add<uint8_t>(M * ldq);
  sz.add<int32_t>(M * G);
  sz.add<float>(M);
  Carver c{(uint8_t*)tl_prep.get(sz.off)};
  QuantActs r;
  r.q = c.take<int8_t>(M * ldq);
  r.qabs = c.take<uint8_t>(M * ldq);
  r.qsum = G ? c.take<int32_t>(M * G) : nullptr;
  r.scale = scale_out ? scale_out : c.take<float>(M);
  const KernelTable* kt = table();
  const int64_t ldx = x2.stride(0), es = x2.element_size();
  const uint8_t* src = (const uint8_t*)x2.data_ptr();
  auto run = [&](int64_t m0, int64_t m1) {
    kt->quant_act(src + m0 * ldx * es, xdt, m1 - m0, K, ldx, ldq, group, r.q + m0 * ldq, r.qabs + m0 * ldq,
                  r.qsum ? r.qsum + m0 * G : nullptr, r.scale + m0);
  };
  if (M * K >= (1 << 16)) {
    at::parallel_for(0, M, 8, run);
  } else if (M > 0) {
    run(0, M);
  }
  return r;
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_int8(const at::Tensor& x) {
  at::Tensor x2 = rows_of(x);
  const int64_t M = x2.size(0), K = x2.size(1);
  at::Tensor scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  QuantActs r = quantize_acts(x2, K, 0, scale.data_ptr<float>());
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  if (M * K) std::memcpy(q.data_ptr<int8_t>(), r.q, (size_t)(M * K));
  return {q, scale};
}

at::Tensor dynamic_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t group,
                          int64_t qmin, bool int4, bool raw) {
  float_dt(x, "activations");
  at::Tensor x2 = rows_of(x);
  const int64_t M = x2.size(0), K = x2.size(1);
  if (!int4) {
    TORCH_CHECK(scale.dim() == 2 && scale.size(1) == 1, "torchq: W8A8 needs per-channel scales (N, 1)");
    group = qdata.size(1);
  }
  Prepared p = prepare_weight(qdata, scale, zero, group, qmin, K, int4, !int4);
  const QWeight& q = p.q;
  at::Tensor y = raw ? at::empty({M, q.N, q.G}, x.options().dtype(at::kInt)) : at::empty(out_shape(x, q.N), x.options());
  if (M == 0) return y;
  QuantActs qa = quantize_acts(x2, q.Kp, int4 ? group : 0, nullptr);
  Acts a{};
  a.M = M;
  a.xq = qa.q;
  a.xabs = qa.qabs;
  a.ldq = q.Kp;
  a.qsum = qa.qsum;
  a.rscale = qa.scale;
  const KernelTable* kt = table();
  at::Tensor b;
  Out o{};
  if (raw) {
    o.raw = y.data_ptr<int32_t>();
  } else {
    b = bias_f32(bias, q.N);
    o = make_out(y, b, q.N);
  }
  const auto fn = int4 ? kt->w4a8 : kt->w8a8;
  over_tiles(q.N, call_work(q, M, int4) / 2, [&](int64_t t0, int64_t t1) { fn(q, a, o, t0, t1); });
  return y;
}

at::Tensor w4a8_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& bias, int64_t group,
                       int64_t qmin) {
  return dynamic_linear(x, qdata, scale, zero, bias, group, qmin, true, false);
}

at::Tensor w8a8_linear(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(qdata.scalar_type() == at::kChar, "torchq: W8A8 qdata must be int8");
  return dynamic_linear(x, qdata, scale, c10::nullopt, bias, 0, 0, false, false);
}

at::Tensor w4a8_int_acc(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zero, int64_t group, int64_t qmin) {
  return dynamic_linear(x, qdata, scale, zero, c10::nullopt, group, qmin, true, true);
}

at::Tensor w8a8_int_acc(const at::Tensor& x, const at::Tensor& qdata, const at::Tensor& scale) {
  return dynamic_linear(x, qdata, scale, c10::nullopt, c10::nullopt, 0, 0, false, true);
}

// ------------------------------------------------------------------ huge-page placement
// Uninitialized CPU tensors in memory marked MADV_HUGEPAGE before anything touches it, so
// that (with transparent huge pages in "always" or "madvise" mode) the memory is backed by
// 2 MiB pages: a GEMV streaming a packed weight then takes no TLB miss per 4 KiB and the
// hardware prefetchers are not stopped at every 4 KiB boundary.
//  * nbytes >= kHugePage: a mapping of its own, starting on a 2 MiB boundary, exactly the
//    tensor's bytes rounded up to 4 KiB (a tail under 2 MiB stays in small pages);
//  * kArenaMin <= nbytes < kHugePage: carved (64-byte aligned) from a shared 2 MiB-aligned
//    arena chunk of kArenaChunk bytes, so small weights (a 135M model's layers) share huge
//    pages. A chunk is unmapped when the last tensor carved from it is freed and the arena
//    has moved on to a newer chunk (memory of freed tensors is not reused before that);
//  * otherwise (tiny tensors, not Linux, mmap failing): a plain at::empty tensor (the
//    documented fallback: this is only a placement hint).
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kArenaMin = size_t(16) << 10;
constexpr size_t kArenaChunk = size_t(16) << 20;

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// A 2 MiB-aligned anonymous mapping of len bytes (rounded up to 4 KiB) with MADV_HUGEPAGE, or null.
void* map_huge(size_t len) {
  void* raw = mmap(nullptr, len + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t r = (uintptr_t)raw;
  const uintptr_t base = (r + kHugePage - 1) & ~(uintptr_t)(kHugePage - 1);
  if (base > r) munmap(raw, base - r);  // unaligned head
  const uintptr_t end = base + len, rend = r + len + kHugePage;
  if (rend > end) munmap((void*)end, rend - end);  // rest past the tensor
  madvise((void*)base, len, MADV_HUGEPAGE);        // a hint: failure is harmless
  return (void*)base;
}

struct ArenaChunk {
  uint8_t* base;
  size_t len;
  ~ArenaChunk() { munmap(base, len); }
};

struct Arena {
  std::mutex mu;
  std::shared_ptr<ArenaChunk> cur;
  size_t off = 0;
};
Arena& g_arena = *new Arena;  // never destroyed: tensors may outlive static destructors
#endif

at::Tensor empty_huge(at::IntArrayRef sizes, at::ScalarType dtype) {
  const at::TensorOptions opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (int64_t s : sizes) {
    TORCH_CHECK(s >= 0, "torchq: _empty_huge got a negative size ", s);
    numel *= s;
  }
  const size_t nbytes = (size_t)numel * c10::elementSize(dtype);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= kHugePage) {
    const size_t len = (nbytes + 4095) & ~(size_t)4095;
    if (void* p = map_huge(len)) return at::from_blob(p, sizes, [len](void* q) { munmap(q, len); }, opts);
  } else if (nbytes >= kArenaMin) {
    std::shared_ptr<ArenaChunk> chunk;
    uint8_t* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(g_arena.mu);
      const size_t need = (nbytes + 63) & ~(size_t)63;
      if (!g_arena.cur || g_arena.off + need > g_arena.cur->len) {
        void* m = map_huge(kArenaChunk);
        if (m) {
          g_arena.cur = std::shared_ptr<ArenaChunk>(new ArenaChunk{(uint8_t*)m, kArenaChunk});
          g_arena.off = 0;
        } else {
          g_arena.cur.reset();
        }
      }
      if (g_arena.cur) {
        chunk = g_arena.cur;
        p = chunk->base + g_arena.off;
        g_arena.off += need;
      }
    }
    if (p) return at::from_blob(p, sizes, [chunk](void*) mutable { chunk.reset(); }, opts);
  }
#endif
  return at::empty(sizes, opts);
}

}  // namespace

namespace torchq_ops {
const KernelTable* active_table() { return table(); }
int64_t gemm_min_m(bool int4) { return (int4 ? g_int4_gemm_min_m : g_int8_gemm_min_m).load(); }
Prepared prepare_tiled_weight(const at::Tensor& qdata, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                              int64_t group, int64_t qmin, int64_t K, bool int4, bool k4x16) {
  return prepare_weight(qdata, scale, zero, group, qmin, K, int4, k4x16);
}
}  // namespace torchq_ops

TORCH_LIBRARY(torchq, m) {
  m.def("int4_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, Tensor? bias, int group_size, "
        "int quant_min, bool allow_bf16=False) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, Tensor? bias, int group_size, "
        "bool allow_bf16=False) -> Tensor");
  m.def("w4a8_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, Tensor? bias, int group_size, "
        "int quant_min) -> Tensor");
  m.def("w8a8_linear(Tensor x, Tensor qdata, Tensor scale, Tensor? bias) -> Tensor");
  m.def("w4a8_int_acc(Tensor x, Tensor qdata, Tensor scale, Tensor? zero_point, int group_size, int quant_min) -> Tensor");
  m.def("w8a8_int_acc(Tensor x, Tensor qdata, Tensor scale) -> Tensor");
  m.def("quantize_per_token_int8(Tensor x) -> (Tensor, Tensor)");
  m.def("codebook4_linear(Tensor x, Tensor qdata, Tensor scale, Tensor lut, Tensor? bias, int block_size, "
        "Tensor? dq_code=None, Tensor? dq_absmax=None, Tensor? dq_offset=None, bool allow_bf16=False) -> Tensor");
  m.def("_empty_huge(int[] size, ScalarType dtype) -> Tensor", &empty_huge);
  m.def("_supported_isas() -> int", &supported_isas);
  m.def("_native_bf16() -> bool", &native_bf16);
  m.def("_cpu_features() -> str", &cpu_features);
  m.def("_weight_only_route(bool allow_bf16, int m) -> str", &route_name);
  m.def("_get_isa() -> int", &get_isa);
  m.def("_set_isa(int isa) -> ()", &set_isa);
  m.def("_tune(str name, int value) -> int", &tune);
  m.def("_parallel_threads(int n) -> int", &parallel_threads);
}

TORCH_LIBRARY_IMPL(torchq, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("w4a8_linear", &w4a8_linear);
  m.impl("w8a8_linear", &w8a8_linear);
  m.impl("w4a8_int_acc", &w4a8_int_acc);
  m.impl("w8a8_int_acc", &w8a8_int_acc);
  m.impl("quantize_per_token_int8", &quantize_per_token_int8);
  m.impl("codebook4_linear", &cb4_linear);
}
