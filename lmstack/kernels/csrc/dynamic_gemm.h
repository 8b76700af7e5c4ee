// Prompt matmuls (many rows of x) of int8 or int4 weights with dynamically quantized int8 activations: the GEMM
// twin of dynamic_kernels.h's skinny matmuls, with the same arithmetic (x rounded to int8 per block, the exact
// integer dot of each block, scaled in fp32). AVX-512 VNNI only: elsewhere QuantizedLinear multiplies prompts
// over dequantised fp32 tiles.
//
// Why: vpdpbusd does 64 byte products per instruction, four times the multiply-adds of an fp32 FMA of the same
// width, so prompts of low-bit weights can run faster than fp32 instead of at its speed (llama.cpp's Q4_0
// prompt processing multiplies in int8 the same way).
//
// Shape of the work. The weight is taken a *panel* of 32 output columns at a time; a thread repacks its panel
// into VNNI order, one int32 lane per (column, 4 consecutive inputs):
//     int4: per step of 4 inputs, 64 bytes = [16 columns][4 inputs]; byte (n, i) holds the code of column n in
//           its low nibble and of column n + 16 in its high nibble (so one load and two masks give both halves);
//     int8: per step, 128 bytes = [32 columns][4 inputs] of w ^ 0x80 = w + 128 (vpdpbusd's unsigned side).
// A micro tile is kTileRows rows of x by the panel's 32 columns, as two zmm of 16 lanes per row: per step, two
// weight vectors, and per row one broadcast of its 4 x codes and two vpdpbusd. At the end of each block of the
// activations (= weight group), the tile's integer dots are scaled into fp32 accumulators:
//     acc += float(idot) * (w_scale * x_scale) + offset * (x_scale * isum)
// where isum is the block's sum of x codes and offset is int4's w_scale * -(8 + zero) or Q4_1's min. int8's
// w + 128 is corrected in integers before the conversion (idot -= 128 * isum), so it stays exact.
// Items of work are (panel, chunk of kChunkRows rows), panel-major, shared statically among the threads: a
// thread packs each panel once for its consecutive chunks, and a chunk of x stays in cache across a panel.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "dynamic_kernels.h"

namespace lmstack {
namespace quant {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define LMSTACK_DYNAMIC_GEMM 1

constexpr int kPanel = 32;         // output columns per panel: two zmm of 16 int32 lanes
constexpr int kTileRows = 6;       // rows of x per micro tile: 12 integer + 12 float accumulators of 32 registers
constexpr int64_t kChunkRows = 96;  // rows of x per item of work (a multiple of kTileRows)

enum class GemmWeights { kInt8, kInt4Zeros, kInt4Mins };

// One panel of weights in VNNI order (see the top of this file), with its per-block scales and offsets.
struct PackedPanel {
  int64_t index = -1;          // which panel is packed (-1: none yet)
  std::vector<uint8_t> codes;  // (n_in / 4) steps of 64 (int4) or 128 (int8) bytes
  std::vector<float> scales;   // [n_blocks][32]; 0 past the weight's last column
  std::vector<float> offsets;  // [n_blocks][32] (int4 only)
};

// The weight as the packing reads it: q int8 (n_out, n_in) or int4 (n_out, n_in / 2, elements 2i and 2i + 1 in
// byte i), scales per row (int8 with group 0) or (n_out, n_groups); int4: integer zeros or Q4_1's float mins.
struct GemmWeight {
  const void* q;
  const float* scales;
  const int8_t* zeros;
  const float* mins;
  int64_t n_out, n_in, n_groups;
};

template <GemmWeights W>
void pack_panel(const GemmWeight& w, int64_t panel, PackedPanel& out) {
  const int64_t n0 = panel * kPanel, width = std::min<int64_t>(kPanel, w.n_out - n0), steps = w.n_in / 4;
  constexpr int step_bytes = W == GemmWeights::kInt8 ? 128 : 64;
  out.index = panel;
  out.codes.assign(steps * step_bytes, 0);  // columns past the weight's end stay code 0, scale 0
  out.scales.assign(w.n_groups * kPanel, 0.0f);
  if (W != GemmWeights::kInt8) out.offsets.assign(w.n_groups * kPanel, 0.0f);
  uint32_t* lanes = reinterpret_cast<uint32_t*>(out.codes.data());
  alignas(32) uint32_t run[8];  // the 8 dwords (4 inputs each) of a run of 32 inputs of one column
  for (int64_t n = 0; n < width; ++n) {
    const int64_t j = n0 + n;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float scale = w.scales[j * w.n_groups + g];
      out.scales[g * kPanel + n] = scale;
      if constexpr (W == GemmWeights::kInt4Zeros) out.offsets[g * kPanel + n] = scale * static_cast<float>(-(8 + w.zeros[j * w.n_groups + g]));
      if constexpr (W == GemmWeights::kInt4Mins) out.offsets[g * kPanel + n] = w.mins[j * w.n_groups + g];
    }
    for (int64_t c = 0; c < w.n_in; c += 32) {
      if constexpr (W == GemmWeights::kInt8) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const int8_t*>(w.q) + j * w.n_in + c));
        _mm256_store_si256(reinterpret_cast<__m256i*>(run), _mm256_xor_si256(v, _mm256_set1_epi8(-128)));
        for (int i = 0; i < 8; ++i) lanes[(c / 4 + i) * 32 + n] = run[i];
      } else {  // the low nibble for columns 0..15, the high nibble for 16..31
        const __m256i codes = nibbles_in_order(static_cast<const uint8_t*>(w.q) + j * (w.n_in / 2) + c / 2, false);
        _mm256_store_si256(reinterpret_cast<__m256i*>(run), n < 16 ? codes : _mm256_slli_epi16(codes, 4));
        for (int i = 0; i < 8; ++i) lanes[(c / 4 + i) * 16 + n % 16] |= run[i];
      }
    }
  }
}

// y[m0 + r, panel's columns] for r < R (bias added; columns past n_out not written).
template <int R, GemmWeights W>
__attribute__((always_inline)) inline void gemm_tile(const QuantizedActivations& xq, int64_t m0, const PackedPanel& p,
                                                     int64_t n0, const float* bias, float* y, int64_t n_out) {
  const int64_t n_in = xq.n, n_blocks = xq.n_blocks;
  constexpr int step_bytes = W == GemmWeights::kInt8 ? 128 : 64;
  const int8_t* x = xq.q8.data() + m0 * n_in;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < n_blocks; ++g) {
    const int64_t k0 = g * xq.block, steps = (std::min(k0 + xq.block, n_in) - k0) / 4;
    const uint8_t* w = p.codes.data() + (k0 / 4) * step_bytes;
    __m512i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm512_setzero_si512();
    for (int64_t s = 0; s < steps; ++s) {
      __m512i w0, w1;
      if constexpr (W == GemmWeights::kInt8) {
        w0 = _mm512_loadu_si512(w + s * 128), w1 = _mm512_loadu_si512(w + s * 128 + 64);
      } else {
        const __m512i b = _mm512_loadu_si512(w + s * 64), mask = _mm512_set1_epi8(0x0F);
        w0 = _mm512_and_si512(b, mask), w1 = _mm512_and_si512(_mm512_srli_epi16(b, 4), mask);
      }
      for (int r = 0; r < R; ++r) {
        int32_t four;  // x codes k0 + 4s .. + 3 of row m0 + r
        std::memcpy(&four, x + r * n_in + k0 + 4 * s, 4);
        const __m512i xb = _mm512_set1_epi32(four);
        dot[r][0] = _mm512_dpbusd_epi32(dot[r][0], w0, xb);
        dot[r][1] = _mm512_dpbusd_epi32(dot[r][1], w1, xb);
      }
    }
    const __m512 s0 = _mm512_loadu_ps(p.scales.data() + g * kPanel), s1 = _mm512_loadu_ps(p.scales.data() + g * kPanel + 16);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * n_blocks + g;
      if constexpr (W == GemmWeights::kInt8) {  // (w + 128) . x - 128 * sum(x): exact in int32
        const __m512i c = _mm512_set1_epi32(-128 * xq.isums[i]);
        dot[r][0] = _mm512_add_epi32(dot[r][0], c), dot[r][1] = _mm512_add_epi32(dot[r][1], c);
      }
      const __m512 xs = _mm512_set1_ps(xq.scales[i]);
      acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][0]), _mm512_mul_ps(s0, xs), acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][1]), _mm512_mul_ps(s1, xs), acc[r][1]);
      if constexpr (W != GemmWeights::kInt8) {
        const __m512 sum = _mm512_set1_ps(xq.scales[i] * static_cast<float>(xq.isums[i]));
        acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(p.offsets.data() + g * kPanel), sum, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_loadu_ps(p.offsets.data() + g * kPanel + 16), sum, acc[r][1]);
      }
    }
  }
  const int64_t width = std::min<int64_t>(kPanel, n_out - n0);
  auto lanes_kept = [](int64_t n) { return static_cast<__mmask16>(n >= 16 ? 0xFFFF : n <= 0 ? 0 : (1u << n) - 1); };
  const __mmask16 keep[2] = {lanes_kept(width), lanes_kept(width - 16)};
  for (int h = 0; h < 2; ++h) {
    const __m512 b = bias ? _mm512_maskz_loadu_ps(keep[h], bias + n0 + 16 * h) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * n_out + n0 + 16 * h, keep[h], _mm512_add_ps(acc[r][h], b));
  }
}

template <GemmWeights W>
void dynamic_gemm(const QuantizedActivations& xq, const GemmWeight& w, const float* bias, float* y, int threads) {
  const int64_t rows = xq.rows, n_panels = (w.n_out + kPanel - 1) / kPanel, chunks = (rows + kChunkRows - 1) / kChunkRows;
#pragma omp parallel num_threads(threads)
  {
    PackedPanel panel;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_panels * chunks; ++item) {
      const int64_t index = item / chunks, lo = (item % chunks) * kChunkRows, hi = std::min(lo + kChunkRows, rows);
      if (panel.index != index) pack_panel<W>(w, index, panel);
      int64_t m = lo;
      for (; m + kTileRows <= hi; m += kTileRows) gemm_tile<kTileRows, W>(xq, m, panel, index * kPanel, bias, y, w.n_out);
      switch (hi - m) {
        case 5: gemm_tile<5, W>(xq, m, panel, index * kPanel, bias, y, w.n_out); break;
        case 4: gemm_tile<4, W>(xq, m, panel, index * kPanel, bias, y, w.n_out); break;
        case 3: gemm_tile<3, W>(xq, m, panel, index * kPanel, bias, y, w.n_out); break;
        case 2: gemm_tile<2, W>(xq, m, panel, index * kPanel, bias, y, w.n_out); break;
        case 1: gemm_tile<1, W>(xq, m, panel, index * kPanel, bias, y, w.n_out); break;
        default: break;
      }
    }
  }
}
#endif  // AVX-512 VNNI

// y (rows, n_out) = quantize(x) @ W^T + bias for int8 weights (group 0: per row, with per-token activations)
// or int4 weights (zeros or mins), x (rows, n_in). Returns 1 where this build or the shape is not supported
// (no VNNI; n_in not a multiple of 32; per-token int8 rows wider than 65536, where w + 128 could overflow a lane).
inline int dynamic_gemm_matmul(const float* x, const void* q, bool int4, const float* scales, const int8_t* zeros,
                               const float* mins, const float* bias, float* y, int64_t rows, int64_t n_out,
                               int64_t n_in, int64_t group, int threads) {
#ifdef LMSTACK_DYNAMIC_GEMM
  if (n_in % 32 || group % 32 || group > 256 || rows < 1 || (int4 && group == 0) || (group == 0 && n_in > 65536))
    return 1;
  const QuantizedActivations xq(x, rows, n_in, group, CodeLayout::kInt8, threads);
  const GemmWeight w{q, scales, zeros, mins, n_out, n_in, xq.n_blocks};
  if (!int4) dynamic_gemm<GemmWeights::kInt8>(xq, w, bias, y, threads);
  else if (mins) dynamic_gemm<GemmWeights::kInt4Mins>(xq, w, bias, y, threads);
  else dynamic_gemm<GemmWeights::kInt4Zeros>(xq, w, bias, y, threads);
  return 0;
#else
  (void)x, (void)q, (void)int4, (void)scales, (void)zeros, (void)mins, (void)bias, (void)y, (void)rows, (void)n_out,
      (void)n_in, (void)group, (void)threads;
  return 1;
#endif
}

}  // namespace quant
}  // namespace lmstack
