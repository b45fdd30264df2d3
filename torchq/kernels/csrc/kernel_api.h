// Plain-C++ interface between the dispatcher (ops.cpp, compiled with torch headers and
// default flags) and the per-ISA kernel translation units (isa_*.cpp, compiled with
// `#pragma GCC target(...)`). This header must stay free of torch and std headers: the ISA
// units include it after their target pragma, and inline functions from such headers
// would be emitted with ISA-specific code under names shared with other units.
#pragma once
#include <stdint.h>

namespace torchq_k {

enum DType : int32_t { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum ZeroKind : int32_t { ZK_NONE = 0, ZK_INT = 1, ZK_FLOAT = 2 };
enum WeightKind : int32_t { WK_INT4 = 0, WK_INT8 = 1, WK_CB4 = 2 };
constexpr int TILE = 16;  // output rows per weight tile (one zmm / two ymm of fp32 lanes)
constexpr int KV_BLOCK = 16;  // positions per key block of the decoder's KV cache (runtime_impl.h)

// A quantized weight in a tiled kernel layout (see torchq/kernels/cpu_layouts.py).
// Rows are grouped in tiles of 16; the last tile may be partial (`tail_*` point to a
// zero-padded 16-row copy of it). Parameters are tiled [tile][group][16].
struct QWeight {
  const uint8_t* w;        // codes
  int64_t tile_bytes;      // bytes of one full tile of codes
  const uint8_t* scale;    // (N, G) tiled
  int32_t scale_dt;        // DType
  const uint8_t* zero;     // (N, G) tiled; int8 (ZK_INT) or float (ZK_FLOAT) or null
  int32_t zero_kind;       // ZeroKind
  int32_t zero_dt;         // DType when ZK_FLOAT
  int32_t qmin;            // stored code u means integer q = u + qmin (int4); 0 for int8 codes
  int64_t N, K, Kp, G, group;
  int64_t n_full;          // number of full tiles
  const uint8_t* tail_w;   // padded copies of the partial last tile (or null)
  const uint8_t* tail_scale;
  const uint8_t* tail_zero;
  const float* lut;        // 4-bit codebook kernels: the 16 fp32 table values (else unused)
  int64_t pf_dist;         // GEMV paths: software prefetch of the code stream this many bytes ahead (0: off)
};

// Prepared activations (which fields are used depends on the kernel and path).
struct Acts {
  int64_t M;
  const float* x;       // fp32 activations, row stride ldx
  int64_t ldx;
  const float* xsum;    // (M, G) per-group sums of x (zero-point term), row stride G
  const float* rscale;  // (M) per-row output multiplier
  const int8_t* xq;     // (M, ldq) int8 codes (dynamic schemes)
  const uint8_t* xabs;  // (M, ldq) |codes|
  int64_t ldq;
  const int32_t* qsum;  // (M, G) per-group sums of codes
  const uint16_t* xbf;  // (M, ldb) bf16-rounded activations (bf16 GEMM path), zero padded to even K
  int64_t ldb;
};

struct Out {
  void* y;              // (M, ldy) output of dtype dt
  int32_t dt;
  int64_t ldy;
  const float* bias;    // fp32 (N) or null
  int32_t* raw;         // optional (M, N, G) raw integer accumulators (tests); y unused then
};

// Per-thread scratch for the GEMM paths (floats).
struct Scratch {
  float* buf;
  int64_t n;
};

struct KernelTable {
  const char* name;
  // x (M, K) of dtype dt with row stride ldx -> xp (M, Kp) slot-prescaled, normalized
  // activations for the int4 GEMV path, xsum (M, G), rscale (M).
  void (*prep_int4_gemv)(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t Kp,
                         int64_t group, float* xp, float* xsum, float* rscale);
  // x -> bf16 (round to nearest even, like Tensor.bfloat16()) (M, ldb), zero padded.
  void (*prep_bf16)(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t ldb, uint16_t* xb);
  // x -> fp32 (M, Kp) zero padded, and optionally xsum (M, G).
  void (*prep_f32)(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t Kp,
                   int64_t group, float* xf, float* xsum);
  // Per-token symmetric int8 quantization (torchq/primitives/activation.py, bit exact):
  // q (M, ldq) zero padded to ldq, |q|, per-group code sums (M, Kp/group) when qsum, scale (M).
  void (*quant_act)(const void* x, int32_t dt, int64_t M, int64_t K, int64_t ldx, int64_t ldq,
                    int64_t group, int8_t* q, uint8_t* qabs, int32_t* qsum, float* scale);
  // Linear kernels over weight tiles [t0, t1). gemm: 0 GEMV, 1 dequantize + fp32 GEMM,
  // 2 dequantize + bf16 GEMM (weights and activations rounded to bf16, fp32 accumulate).
  void (*int4_wo)(const QWeight&, const Acts&, const Out&, int64_t t0, int64_t t1, int gemm, Scratch s);
  void (*int8_wo)(const QWeight&, const Acts&, const Out&, int64_t t0, int64_t t1, int gemm, Scratch s);
  void (*w4a8)(const QWeight&, const Acts&, const Out&, int64_t t0, int64_t t1);
  void (*w8a8)(const QWeight&, const Acts&, const Out&, int64_t t0, int64_t t1);
  // 4-bit codebook (NF4 / FP4) weight-only, int4-tiled codes + q.lut (codebook4_impl.h).
  void (*cb4_wo)(const QWeight&, const Acts&, const Out&, int64_t t0, int64_t t1, int gemm, Scratch s);
  // Weight tiles [t0, t1) of kind WeightKind dequantized (exactly as the GEMM paths do) and
  // written transposed, wt[k][n - 16 t0] (row stride ldw), as fp32 or bf16 (out_dt): the
  // operand of a library GEMM (the oneDNN route of the amx path). wb: GEMM_KC * TILE floats.
  void (*dequant_t)(const QWeight&, int32_t kind, int64_t t0, int64_t t1, int32_t out_dt, void* wt, int64_t ldw,
                    float* wb);
  // Fused decoder step (runtime_impl.h). Rows [n0, n1) of a row-major fp32 weight (N, K):
  // y[m][n] = x[m] . w[n] (+ bias[n]) for m < M.
  void (*dense_f32)(const float* w, int64_t K, int64_t n0, int64_t n1, const float* x, int64_t M, int64_t ldx,
                    const float* bias, float* y, int64_t ldy);
  // Partial attention of nq queries over cached positions [t0, t1) of one KV head (keys
  // blocked by KV_BLOCK positions, values as rows; fp32 or bf16), query i limited to t < tlim[i]:
  // unnormalized out, max and exp-sum per query (online-softmax partials).
  void (*attend_part)(const float* q, int64_t ldq, int nq, const int64_t* tlim, const void* kc, const void* vc,
                      int32_t kv_dt, int64_t hd, int64_t t0, int64_t t1, float scale, float* s, float* out,
                      int64_t ldo, float* mx, float* sum);
};

const KernelTable* table_scalar();
const KernelTable* table_avx2();
const KernelTable* table_avx512();

// GEMM-path blocking shared by dispatcher (scratch sizing) and kernels.
constexpr int64_t GEMM_KC = 256;   // k per dequantized weight block (multiple of 8)
constexpr int64_t GEMM_NB = 4;     // tiles per output block
constexpr int64_t GEMM_MB = 256;   // rows per output block
inline int64_t gemm_scratch_floats() { return 2 * GEMM_KC * TILE + GEMM_MB * GEMM_NB * TILE + 64; }

}  // namespace torchq_k
