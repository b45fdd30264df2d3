// What ops.cpp shares with the other torch-side units (decode.cpp): the active kernel
// table, weight validation and the dispatcher's tunables. Not part of any public API.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "kernel_api.h"

namespace torchq_ops {

// A validated tiled weight; `keep` holds the zero-padded copies of a partial last tile.
struct Prepared {
  torchq_k::QWeight q;
  std::vector<at::Tensor> keep;
};

// The kernel table of the ISA path in use now (TORCHQ_ISA, torchq.kernels.set_isa).
const torchq_k::KernelTable* active_table();

// Rows from which weight-only calls switch from the GEMV to the dequantize + GEMM path
// (tunables int4_gemm_min_m / int8_gemm_min_m).
int64_t gemm_min_m(bool int4);

// Validate and describe a tiled weight exactly as the linear ops do (int4: packed codes,
// k4x16: the W8A8 layout).
Prepared prepare_tiled_weight(const at::Tensor& qdata, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                              int64_t group, int64_t qmin, int64_t K, bool int4, bool k4x16);

}  // namespace torchq_ops
