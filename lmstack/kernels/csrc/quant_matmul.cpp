// ctypes entry points of the low-bit skinny matmuls (quant_kernels.h) and row-range dequantisation.
// Plain C ABI; OpenMP over output rows (torch's own libgomp, loaded first, is reused).
#include <cstdint>

#include "quant_kernels.h"

using lmstack::Epilogue;

extern "C" {

// All return 0 on success, 1 for an unsupported shape (rows outside 1..8, widths not multiples of 32).
// x: (rows, n_in) fp32; y: (rows, n_out) fp32; bias: (n_out,) or null.

int lmstack_int8_matmul(const float* x, const int8_t* q, const float* scales, const float* bias, float* y,
                        int64_t rows, int64_t n_out, int64_t n_in, int64_t group, int threads) {
  return lmstack::quant::int8_matmul(x, q, scales, bias, y, rows, n_out, n_in, group, threads);
}

int lmstack_int4_matmul(const float* x, const uint8_t* q, const float* scales, const int8_t* zeros, const float* mins,
                        const float* bias, float* y, int64_t rows, int64_t n_out, int64_t n_in, int64_t group,
                        int threads) {
  return lmstack::quant::int4_matmul(x, q, scales, zeros, mins, bias, y, rows, n_out, n_in, group, threads);
}

int lmstack_nf4_matmul(const float* x, const uint8_t* q, const float* levels, const uint8_t* absmax_codes,
                       const float* absmax_code, const float* absmax_scales, float offset, const float* bias, float* y,
                       int64_t rows, int64_t n_out, int64_t n_in, int threads) {
  return lmstack::quant::nf4_matmul(x, q, levels, absmax_codes, absmax_code, absmax_scales, offset, bias, y, rows,
                                    n_out, n_in, threads);
}

// Row-range dequantisation to fp32 (out: (stop - start, n_in)), for the tiled prompt-processing path.
void lmstack_int8_dequant(const int8_t* q, const float* scales, float* out, int64_t start, int64_t stop, int64_t n_in,
                          int64_t group, int threads) {
  const int64_t n_groups = group ? (n_in + group - 1) / group : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = start; j < stop; ++j)
    for (int64_t k = 0; k < n_in; ++k)
      out[(j - start) * n_in + k] = q[j * n_in + k] * scales[j * n_groups + (group ? k / group : 0)];
}

void lmstack_int4_dequant(const uint8_t* q, const float* scales, const int8_t* zeros, const float* mins, float* out,
                          int64_t start, int64_t stop, int64_t n_in, int64_t group, int threads) {
  const int64_t n_groups = (n_in + group - 1) / group;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = start; j < stop; ++j)
    for (int64_t k = 0; k < n_in; k += 2) {
      const uint8_t byte = q[j * (n_in / 2) + k / 2];
      const int64_t g = j * n_groups + k / group;
      const float s = scales[g];
      for (int half = 0; half < 2; ++half) {
        const int code = half ? byte >> 4 : byte & 0x0F;
        out[(j - start) * n_in + k + half] = mins ? static_cast<float>(code) * s + mins[g]
                                                  : (static_cast<float>(code - 8) - zeros[g]) * s;
      }
    }
}

void lmstack_nf4_dequant(const uint8_t* q, const float* levels, const float* absmax, float* out, int64_t start,
                         int64_t stop, int64_t n_in, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = start; j < stop; ++j)
    for (int64_t k = 0; k < n_in; k += 2) {
      const uint8_t byte = q[j * (n_in / 2) + k / 2];
      const float a = absmax[(j * n_in + k) / 64];
      out[(j - start) * n_in + k] = levels[byte >> 4] * a;
      out[(j - start) * n_in + k + 1] = levels[byte & 0x0F] * a;
    }
}

}  // extern "C"
