// torchq::gptq_block_ — GPTQ's column loop inside one block of columns (the part that is
// sequential in the columns). Python ran it as ~15 small tensor ops per column, about
// 0.5 ms per column: 1.7 s per SmolLM2 decoder layer, 15 % of GPTQ's calibration time. Rows are
// independent in GPTQ, so each thread takes whole rows and runs their columns in order.
//
// Arithmetic, per row and column i in [start, stop), in exactly the order of the plain
// PyTorch reference (torchq.kernels.cpu_gptq.gptq_block_reference; built with
// -ffp-contract=off, so the two agree bit for bit):
//   mode 0 (symmetric):  q = clamp(round(x / s), lo, hi);      d = q * s
//   mode 1 (int zero):   q = clamp(round(x / s) + z, lo, hi);  d = (q - z) * s
//   mode 2 (float zero): q = clamp(round((x - z) / s), lo, hi); d = q * s + z
//   mode 3 (codebook):   v = clamp(x / s, lo, hi); q = #{mids < v}; d = levels[q] * s
//   e = (x - d) / u[i, i];  w[j] -= e * u[i, j] for j in [i, B)
// round() is round-half-to-even (std::nearbyint in the default rounding mode, as
// torch.round).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

void check_f32(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.size(0) == rows &&
                  t.size(1) == cols,
              "gptq_block_: ", name, " must be a contiguous float32 tensor of shape (", rows, ", ", cols, "), got ",
              t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

void gptq_block(at::Tensor w, const at::Tensor& u, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                const c10::optional<at::Tensor>& levels, at::Tensor codes, at::Tensor err, int64_t start, int64_t stop,
                int64_t mode, double qmin, double qmax) {
  TORCH_CHECK(w.dim() == 2, "gptq_block_: w must be 2-D (rows, block columns), got ", w.sizes());
  const int64_t n = w.size(0), b = w.size(1);
  check_f32(w, "w", n, b);
  check_f32(u, "u", b, b);
  check_f32(scale, "scale", n, b);
  check_f32(codes, "codes", n, b);
  check_f32(err, "err", n, b);
  TORCH_CHECK(0 <= start && start <= stop && stop <= b, "gptq_block_: need 0 <= start <= stop <= ", b, ", got ",
              start, ", ", stop);
  TORCH_CHECK(mode >= 0 && mode <= 3, "gptq_block_: mode must be 0 (symmetric), 1 (int zero), 2 (float zero) or ",
              "3 (codebook), got ", mode);
  const bool has_zero = mode == 1 || mode == 2;
  TORCH_CHECK(has_zero == zero.has_value(), "gptq_block_: mode ", mode, has_zero ? " needs" : " takes no", " zero");
  if (has_zero) check_f32(*zero, "zero", n, b);
  TORCH_CHECK((mode == 3) == levels.has_value(), "gptq_block_: levels are given exactly in mode 3 (codebook)");
  int64_t n_levels = 0;
  if (mode == 3) {
    TORCH_CHECK(levels->scalar_type() == at::kFloat && levels->is_contiguous() && levels->dim() == 1 &&
                    levels->numel() >= 2 && levels->numel() <= 256,
                "gptq_block_: levels must be a contiguous 1-D float32 tensor of 2..256 sorted values");
    n_levels = levels->numel();
  }
  float* W = w.data_ptr<float>();
  const float* U = u.data_ptr<float>();
  const float* S = scale.data_ptr<float>();
  const float* Z = has_zero ? zero->data_ptr<float>() : nullptr;
  const float* L = mode == 3 ? levels->data_ptr<float>() : nullptr;
  float* Q = codes.data_ptr<float>();
  float* E = err.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  float mids[256];
  for (int64_t k = 0; k + 1 < n_levels; ++k) mids[k] = (L[k] + L[k + 1]) / 2.0f;

  at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* wr = W + r * b;
      for (int64_t i = start; i < stop; ++i) {
        const float x = wr[i], s = S[r * b + i];
        float q, d;
        if (mode == 0) {
          q = std::min(std::max(std::nearbyint(x / s), lo), hi);
          d = q * s;
        } else if (mode == 1) {
          const float z = Z[r * b + i];
          q = std::min(std::max(std::nearbyint(x / s) + z, lo), hi);
          d = (q - z) * s;
        } else if (mode == 2) {
          const float z = Z[r * b + i];
          q = std::min(std::max(std::nearbyint((x - z) / s), lo), hi);
          d = q * s + z;
        } else {
          const float v = std::min(std::max(x / s, lo), hi);
          int64_t k = 0;
          while (k + 1 < n_levels && mids[k] < v) ++k;
          q = static_cast<float>(k);
          d = L[k] * s;
        }
        const float e = (x - d) / U[i * b + i];
        Q[r * b + i] = q;
        E[r * b + i] = e;
        const float* ui = U + i * b;
        for (int64_t j = i; j < b; ++j) wr[j] -= e * ui[j];
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(torchq, m) {
  m.def("gptq_block_(Tensor(a!) w, Tensor u, Tensor scale, Tensor? zero, Tensor? levels, Tensor(b!) codes, "
        "Tensor(c!) err, int start, int stop, int mode, float qmin, float qmax) -> ()");
}

TORCH_LIBRARY_IMPL(torchq, CPU, m) { m.impl("gptq_block_", &gptq_block); }
