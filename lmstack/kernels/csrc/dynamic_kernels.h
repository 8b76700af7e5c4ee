// Skinny matmuls (1 to 8 rows of x) of int8 or int4 weights with *dynamically quantized* int8 activations:
// x is rounded to int8 per block of inputs when the call starts, and every product is an integer one.
//
// Why: with fp32 activations each weight costs an unpack, an int -> float conversion and an FMA (about
// 0.5 vector instructions per weight); with int8 activations 16 to 32 weights share one integer
// multiply-add (vpmaddubsw / vpmaddwd) and the conversion happens once per group. That is how llama.cpp
// computes its Q8_0 and Q4_0 dot products.
//
// Activation blocks follow the weight's scales along the inputs: one block per row of x for per-row int8
// (torchao's Int8DynamicActivationInt8Weight: per-token), one block per weight group otherwise. Per block:
//     scale = max(amax / L, eps),  q = clamp(round_half_even(x * (1 / scale)), -128, 127)
// with L = 127.5 per token (torchao's rule) and L = 127 per group (llama.cpp's Q8_0 rule: the largest
// element lands on +-127 exactly, not on a rounding boundary); lmstack/compress/formats.py
// quantize_activations is the readable twin. The integer dot of a block is exact; the result is the sum
// over blocks of dot * x_scale * w_scale (+ zero-point terms).
//
// Two instruction sets, chosen when the kernels are compiled (lmstack/kernels/isa.py): AVX2 (vpmaddubsw /
// vpmaddwd, then adds) and, where the CPU has it, AVX-512 VNNI's vpdpbusd, which multiplies unsigned by
// signed bytes and accumulates four products into each int32 lane in one instruction. vpdpbusd needs one
// unsigned side: int4 codes (0..15) are; int8 weights become unsigned as w ^ 0x80 = w + 128, and the block's
// dot is corrected by -128 * sum(x codes) in integers, so both sets give the same exact integer dots.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "quant_kernels.h"  // LMSTACK_DISPATCH_ROWS
#include "skinny_kernels.h"

namespace lmstack {
namespace quant {

inline int32_t hsum_epi32(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
}

// L of the rule above: 127.5 per token (block 0), 127 per group.
inline float activation_levels(int64_t block) { return block ? 127.0f : 127.5f; }

// The scale of one block of activations (n a multiple of 8): max(amax / levels, eps).
inline float block_scale(const float* x, int64_t n, float levels) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return std::max(_mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))) / levels, FLT_EPSILON);
}

// The int8 codes of 8 activations, as floats: round half to even (as torch.round) of x * (1 / scale),
// clamped to [-128, 127].
inline __m256 block_codes(const float* x, __m256 inv) {
  const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-128.0f), v));
}

// x (rows, n) -> y (rows, n): every value replaced by the one its int8 code stands for (code * scale; block 0:
// per row with L = 127.5, else per block of `block` with L = 127), for prompts that multiply these in fp32
// over dequantised tiles (builds without dynamic_gemm.h's VNNI GEMM). Equal to formats.fake_quantize_activations
// bit for bit.
inline void fake_quantize_activations(const float* x, float* y, int64_t rows, int64_t n, int64_t block, int threads) {
  const float levels = activation_levels(block);
  const int64_t size = block ? block : n, n_blocks = (n + size - 1) / size;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < rows * n_blocks; ++i) {
    const int64_t r = i / n_blocks, lo = (i % n_blocks) * size, hi = std::min(lo + size, n);
    const float* xr = x + r * n;
    const float scale = block_scale(xr + lo, hi - lo, levels);
    const __m256 inv = _mm256_set1_ps(1.0f / scale), s = _mm256_set1_ps(scale);
    for (int64_t k = lo; k < hi; k += 8) _mm256_storeu_ps(y + r * n + k, _mm256_mul_ps(block_codes(xr + k, inv), s));
  }
}

// How QuantizedActivations stores its codes: int16 (int8 weights on AVX2, multiplied with vpmaddwd), int8 in
// element order (int8 weights with VNNI) or int8 in the order of the int4 codes (kInt8Nibbles): with blocks of
// 64 or more, per pair of runs of 32 as [evens of run 0 | evens of run 1 | odds of run 0 | odds of run 1] (the
// low and the high nibbles of the pair's 32 bytes, see Int4Row::pair); a last lone run, and every run with
// blocks of 32, as [elements 0, 2, ..., 30 | 1, 3, ..., 31] (see int4_run_codes).
enum class CodeLayout { kInt16, kInt8, kInt8Nibbles };

// x (rows, n) quantized per block of `block` inputs, stored as `layout` says. `isums` holds each block's sum
// of codes (scale * isum is the sum of the quantized x, which zero points and Q4_1's mins multiply).
struct QuantizedActivations {
  int64_t rows, n, block, n_blocks;
  std::vector<int16_t> q16;
  std::vector<int8_t> q8;
  std::vector<float> scales;
  std::vector<int32_t> isums;

  // block_ == 0: per token (L = 127.5), else per group of block_ (L = 127). Rows are shared among `threads`
  // (a prompt's many rows; decoding's few take one thread).
  QuantizedActivations(const float* x, int64_t rows_, int64_t n_, int64_t block_, CodeLayout layout, int threads = 1)
      : rows(rows_), n(n_), block(block_ ? block_ : n_), n_blocks((n_ + block - 1) / block) {
    const float levels = activation_levels(block_);
    const bool direct = layout == CodeLayout::kInt8;  // int8 codes in element order are stored as they come
    std::vector<int16_t> codes(direct ? 0 : rows * n);
    if (direct) q8.resize(rows * n);
    scales.resize(rows * n_blocks), isums.resize(rows * n_blocks);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t lo = b * block, hi = std::min(lo + block, n);  // multiples of 8 (of 32, in fact)
        const float* xr = x + r * n;
        const float scale = block_scale(xr + lo, hi - lo, levels);
        const __m256 inv = _mm256_set1_ps(1.0f / scale);
        __m256i total = _mm256_setzero_si256();
        for (int64_t i = lo; i < hi; i += 8) {
          const __m256i q = _mm256_cvtps_epi32(block_codes(xr + i, inv));  // in [-128, 127]: narrowing is exact
          total = _mm256_add_epi32(total, q);
          const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
          if (direct)
            _mm_storel_epi64(reinterpret_cast<__m128i*>(q8.data() + r * n + i), _mm_packs_epi16(q16, q16));
          else
            _mm_storeu_si128(reinterpret_cast<__m128i*>(codes.data() + r * n + i), q16);
        }
        scales[r * n_blocks + b] = scale;
        isums[r * n_blocks + b] = hsum_epi32(total);
      }
    if (direct) return;
    if (layout == CodeLayout::kInt16) {
      q16 = std::move(codes);
      return;
    }
    q8.resize(rows * n);
    // a pair of runs [evens of run 0 | evens of run 1 | odds of run 0 | odds of run 1] is the evens, then the odds,
    // of its 64 elements
    const int64_t paired = block >= 64 ? n / 64 * 64 : 0;  // columns laid out in pairs of runs
    for (int64_t r = 0; r < rows; ++r) {
      const int16_t* from = codes.data() + r * n;
      int8_t* to = q8.data() + r * n;
      for (int64_t c = 0; c < paired; c += 64) evens_then_odds(from + c, to + c, 32);
      for (int64_t c = paired; c < n; c += 32) evens_then_odds(from + c, to + c, 16);
    }
  }
};

// The 32 int4 codes (0..15) of one run, as bytes in the order of QuantizedActivations' int4 layout: the 16
// packed bytes are loaded into both halves; the low half keeps the low nibbles (even elements), the high
// half is shifted right by 4 first (odd elements). Shift + mask only: no shuffle.
inline __m256i int4_run_codes(const uint8_t* p) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i shifted = _mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

// Products of one run of 32 columns, accumulated into 8 lanes: `accumulate(acc, w, x)` adds the run's
// products, `widen(acc)` turns a block's accumulator into 8 int32 whose sum is the block's exact dot, and
// `correction` is what that sum still needs per unit of the block's sum of x codes (VNNI int8: -128).
// AVX2 int4: codes (unsigned bytes) times int8 activations as 16 int16 pair sums (each at most 2 * 15 * 128 =
// 3840 in magnitude, so up to 8 runs, a group of 256, add up in int16 without overflow; widened once per
// group); AVX2 int8: weights times int16 activations as 8 int32 (vpmaddwd).
struct Int4Products {
  static constexpr int correction = 0;
  static __m256i accumulate(__m256i acc, __m256i codes, const int8_t* x) {
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
  }
  static __m256i widen(__m256i a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
};

struct Int8Products {
  static constexpr int correction = 0;
  static __m256i accumulate(__m256i acc, const int8_t* w, const int16_t* x) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
  }
  static __m256i widen(__m256i a) { return a; }
};

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LMSTACK_VNNI 1
// VNNI: four byte products per int32 lane in one vpdpbusd (lanes stay far from overflow: a block of 256 adds
// 32 products of at most 255 * 128 per lane; a per-token row of 131072 inputs, 16384 of them, and the 8 lanes'
// total, which may wrap, is exact again once corrected: |dot| <= 128 * 128 * 131072 = 2^31).
struct Int4VnniProducts {
  static constexpr int correction = 0;
  static __m256i accumulate(__m256i acc, __m256i codes, const int8_t* x) {
    return _mm256_dpbusd_epi32(acc, codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  static __m256i widen(__m256i a) { return a; }
};

// w ^ 0x80 (= w + 128 as an unsigned byte) times x: the dot plus 128 * sum(x codes).
struct Int8VnniProducts {
  static constexpr int correction = -128;
  static __m256i accumulate(__m256i acc, __m256i w_plus_128, const int8_t* x) {
    return _mm256_dpbusd_epi32(acc, w_plus_128, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  static __m256i widen(__m256i a) { return a; }
};
#endif

// How far ahead of the current column the grouped kernels ask for weight bytes, and into which cache: L2
// (_MM_HINT_T1), 8 KiB ahead, once per block. Measured on SmolLM2's 211 weights streamed from memory by one
// thread (int8 activations, a kernel-only harness, together with four weight rows at a time): int4 g128 5.3 ->
// 3.65 ms, int8 g32 (Q8_0) 19.2 -> 7.2 ms, against 2 KiB ahead into L1 (_MM_HINT_T0, which held the fill buffers
// the loads needed) or the hardware prefetcher alone. The per-token int8 rows (one long stream per row) ran
// slower with it and go without. Always inlined: GCC otherwise took the call for a pure one and deleted it.
constexpr int64_t kPrefetchBytes = 8192;
__attribute__((always_inline)) inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p) + kPrefetchBytes, _MM_HINT_T1); }

// The weights of one output row, a run of 32 columns at a time, in the form Products multiplies; prefetch(c)
// asks for the bytes kPrefetchBytes after column c's.
struct Int4Row {
  const uint8_t* p;
  __m256i run(int64_t c) const { return int4_run_codes(p + (c >> 1)); }
  // The runs from column c and c + 32 (32 bytes): their low nibbles (the evens of both) and high nibbles (the
  // odds), as QuantizedActivations lays out pairs; half the instructions of two run() calls.
  void pair(int64_t c, __m256i& low, __m256i& high) const {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (c >> 1)));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    low = _mm256_and_si256(bytes, mask);
    high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  }
  __attribute__((always_inline)) void prefetch(int64_t c) const { prefetch_l2(p + (c >> 1)); }
};
struct Int8Row {
  const int8_t* p;
  const int8_t* run(int64_t c) const { return p + c; }
  void pair(int64_t c, const int8_t*& first, const int8_t*& second) const { first = p + c, second = p + c + 32; }
  __attribute__((always_inline)) void prefetch(int64_t c) const { prefetch_l2(p + c); }
};
// int8 weights as unsigned bytes w + 128, for vpdpbusd.
struct Int8UnsignedRow {
  const int8_t* p;
  __m256i run(int64_t c) const {
    return _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + c)), _mm256_set1_epi8(-128));
  }
  void pair(int64_t c, __m256i& first, __m256i& second) const { first = run(c), second = run(c + 32); }
  __attribute__((always_inline)) void prefetch(int64_t c) const { prefetch_l2(p + c); }
};

// idot[b] = the integer products of `runs` runs of 32 columns from column c, for each row b of x, as 8 int32
// (their sum is the block's dot, once Products::correction is added: add_to_first_lane).
// Called with a compile-time `runs` for whole blocks (the loop unrolls) and a run-time one for a shorter last.
// Always inlined: called out of line (GCC's choice once the body grew), the accumulators go through memory
// and int4 ran at 15 instead of 25 G weights/s.
template <int B, class Products, class Row, class Activations>
__attribute__((always_inline)) inline void block_dot(const Row& row, int64_t c, int runs, const Activations* xs,
                                                     int64_t n_in, __m256i idot[B]) {
  __m256i odd[B];  // odd runs accumulate apart: two dependency chains instead of one
  for (int b = 0; b < B; ++b) idot[b] = odd[b] = _mm256_setzero_si256();
  int r = 0;
  for (; r + 1 < runs; r += 2, c += 64) {
    decltype(row.run(c)) w0, w1;
    row.pair(c, w0, w1);
    for (int b = 0; b < B; ++b) {
      idot[b] = Products::accumulate(idot[b], w0, xs + b * n_in + c);
      odd[b] = Products::accumulate(odd[b], w1, xs + b * n_in + c + 32);
    }
  }
  if (r < runs) {
    const auto w = row.run(c);
    for (int b = 0; b < B; ++b) idot[b] = Products::accumulate(idot[b], w, xs + b * n_in + c);
  }
  for (int b = 0; b < B; ++b) idot[b] = _mm256_add_epi32(Products::widen(idot[b]), Products::widen(odd[b]));
}

// v with n added to its first lane: an integer correction of a block dot, whose lanes' sum is what counts.
inline __m256i add_to_first_lane(__m256i v, int32_t n) { return _mm256_add_epi32(v, _mm256_setr_epi32(n, 0, 0, 0, 0, 0, 0, 0)); }

// What a block of int4 weights adds per unit of its sum of x codes (see dynamic_row_block): none (int8), an
// integer zero point -(8 + zero), or GGUF Q4_1's float min.
struct NoOffsets {};
struct ZeroPoints {
  const int8_t* zeros;
  int64_t n_groups;
  int32_t operator()(int64_t j, int64_t g) const { return -(8 + zeros[j * n_groups + g]); }
};
struct Mins {
  const float* mins;
  int64_t n_groups;
  float operator()(int64_t j, int64_t g) const { return mins[j * n_groups + g]; }
};

// acc[r][b] = sum over blocks g of idot(j + r, g, b) * x_scale(b, g) * w_scale(j + r, g) for R consecutive
// weight rows from j: the exact integer dot of each block (RUNS runs of 32 columns; a last block may be
// shorter) scaled in fp32, still as 8 lanes. Blocks alternate between two accumulators, so that blocks
// of 32 do not wait on one FMA chain; R > 1 (with one row of x) interleaves independent weight rows.
// Offset: what a block adds per unit of its sum of x codes, beside scale * x_scale * dot. ZeroPoints (int4's
// -(8 + zero)) are folded into the integer dot; Mins (GGUF's Q4_1) are floats: offsets[r][b] = sum over blocks
// of min(j + r, g) * x_scale * isum, computed beside the products rather than in a second pass over the row.
template <int B, int R, int RUNS, class Products, class RowOf, class Activations, class WScale, class Offset>
__attribute__((always_inline)) inline void dynamic_row_block(const QuantizedActivations& xq, const Activations* xs, int64_t j, RowOf row_of,
                              WScale w_scale, Offset offset, __m256 out[R][B], float offsets[R][B]) {
  const int64_t n_in = xq.n, n_blocks = xq.n_blocks, full = n_in / (32 * RUNS);
  const float* x_scales = xq.scales.data();
  decltype(row_of(j)) rows[R];
  for (int r = 0; r < R; ++r) rows[r] = row_of(j + r);
  __m256 acc[R][B][2];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b][0] = acc[r][b][1] = _mm256_setzero_ps(), offsets[r][b] = 0.0f;
  auto block = [&](int64_t g, int runs, int k) __attribute__((always_inline)) {
    for (int r = 0; r < R; ++r) rows[r].prefetch(g * 32 * RUNS);
    for (int r = 0; r < R; ++r) {
      __m256i idot[B];
      block_dot<B, Products>(rows[r], g * 32 * RUNS, runs, xs, n_in, idot);
      if constexpr (Products::correction != 0 || std::is_same_v<Offset, ZeroPoints>) {
        int32_t c = Products::correction;  // per unit of the block's sum of x codes; exact: |c * isum| < 2^31
        if constexpr (std::is_same_v<Offset, ZeroPoints>) c += offset(j + r, g);
        for (int b = 0; b < B; ++b) idot[b] = add_to_first_lane(idot[b], c * xq.isums[b * n_blocks + g]);
      }
      const float ws = w_scale(j + r, g);
      for (int b = 0; b < B; ++b)
        acc[r][b][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot[b]), _mm256_set1_ps(ws * x_scales[b * n_blocks + g]),
                                       acc[r][b][k]);
      if constexpr (std::is_same_v<Offset, Mins>) {
        const float c = offset(j + r, g);
        for (int b = 0; b < B; ++b)
          offsets[r][b] += c * (x_scales[b * n_blocks + g] * static_cast<float>(xq.isums[b * n_blocks + g]));
      }
    }
  };
  int64_t g = 0;
  for (; g + 1 < full; g += 2) {
    block(g, RUNS, 0);
    block(g + 1, RUNS, 1);
  }
  for (; g < n_blocks; ++g) block(g, static_cast<int>((std::min((g + 1) * 32 * RUNS, n_in) - g * 32 * RUNS) / 32), 0);
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) out[r][b] = _mm256_add_ps(acc[r][b][0], acc[r][b][1]);
}

// y[b, j] = the dot and offsets of dynamic_row_block + bias[j], through the epilogue. With one row of x,
// weight rows go four at a time (more independent work per iteration, one horizontal reduction for four sums:
// int4 g128 in cache 35 -> 41 G weights/s against pairs).
// The rows are shared among the threads of the enclosing parallel region (an orphaned worksharing loop without
// a barrier at its end: a caller runs several weights in one region, see DynamicPart); called outside a region
// it runs on the calling thread.
template <int B, int RUNS, class Products, class RowOf, class Activations, class WScale, class Offset>
void dynamic_rows(const QuantizedActivations& xq, const Activations* xs, const float* bias, float* y, int64_t n_out,
                  RowOf row_of, WScale w_scale, Offset offset, Epilogue e) {
  constexpr int R = B == 1 ? 4 : 1;
  auto store = [&](int64_t j, int b, float dot) { finish(y + b * n_out + j, dot + (bias ? bias[j] : 0.0f), e); };
#pragma omp for schedule(static) nowait
  for (int64_t i = 0; i < n_out / R; ++i) {
    const int64_t j = i * R;
    __m256 dot[R][B];
    float offsets[R][B];
    dynamic_row_block<B, R, RUNS, Products>(xq, xs, j, row_of, w_scale, offset, dot, offsets);
    if constexpr (R == 4) {  // four horizontal sums at once: [a b c d | a b c d] partial sums, then halves added
      const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(dot[0][0], dot[1][0]), _mm256_hadd_ps(dot[2][0], dot[3][0]));
      alignas(16) float sums[4];
      _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
      for (int r = 0; r < 4; ++r) store(j + r, 0, sums[r] + offsets[r][0]);
    } else {
      for (int b = 0; b < B; ++b) store(j, b, horizontal_sum(dot[0][b]) + offsets[0][b]);
    }
  }
  if (n_out % R) {
#pragma omp single nowait
    for (int64_t j = n_out / R * R; j < n_out; ++j) {  // the last rows, where R does not divide n_out
      __m256 dot[1][B];
      float offsets[1][B];
      dynamic_row_block<B, 1, RUNS, Products>(xq, xs, j, row_of, w_scale, offset, dot, offsets);
      for (int b = 0; b < B; ++b) store(j, b, horizontal_sum(dot[0][b]) + offsets[0][b]);
    }
  }
}

// Dispatch on runs of 32 per block (block 32, 64, 128 or 256: RUNS = 1, 2, 4 or 8, a constexpr that CALL(B)
// sees) and on rows of x (B = 1..8).
#define LMSTACK_DISPATCH_RUNS_AND_ROWS(block, rows, CALL)                          \
  switch (block) {                                                                \
    case 32: { constexpr int RUNS = 1; LMSTACK_DISPATCH_ROWS(rows, CALL) } break;  \
    case 64: { constexpr int RUNS = 2; LMSTACK_DISPATCH_ROWS(rows, CALL) } break;  \
    case 128: { constexpr int RUNS = 4; LMSTACK_DISPATCH_ROWS(rows, CALL) } break; \
    case 256: { constexpr int RUNS = 8; LMSTACK_DISPATCH_ROWS(rows, CALL) } break; \
    default: return 1;                                                            \
  }

// Per-row int8 weights with per-token activations: one integer dot per row (at most 2^31 / 128^2 = 131072
// inputs), one scale product at the end. Rows shared as dynamic_rows shares them.
template <int B, class Products, class Row, class Activations>
void int8_dynamic_rows_per_token(const QuantizedActivations& xq, const Activations* codes, const int8_t* q,
                                 const float* scales, const float* bias, float* y, int64_t n_out, Epilogue e) {
  const int64_t n_in = xq.n;
#pragma omp for schedule(static) nowait
  for (int64_t j = 0; j < n_out; ++j) {
    __m256i idot[B];
    block_dot<B, Products>(Row{q + j * n_in}, 0, static_cast<int>(n_in / 32), codes, n_in, idot);
    for (int b = 0; b < B; ++b) {  // the lanes may wrap in int32 before the correction; their sum is exact after it
      const int32_t dot = hsum_epi32(add_to_first_lane(idot[b], Products::correction * xq.isums[b]));
      finish(y + b * n_out + j, static_cast<float>(dot) * xq.scales[b] * scales[j] + (bias ? bias[j] : 0.0f), e);
    }
  }
}

// One weight of a call that multiplies the same x by several weights (q, k and v; gate and up): x is quantized
// once and all of them run in one parallel region. q: int8 codes (n_out, n_in) or int4 codes (n_out, n_in / 2);
// scales per row (int8, group 0) or per group; int4: zeros or mins (one of them); bias or null.
struct DynamicPart {
  const void* q;
  const float* scales;
  const int8_t* zeros;
  const float* mins;
  const float* bias;
  float* y;
  int64_t n_out;
  Epilogue e;
};

// body(part) for every part inside one parallel region (each body shares its rows among the threads).
template <class Body>
void for_each_part(const DynamicPart* parts, int n_parts, int threads, Body body) {
#pragma omp parallel num_threads(threads)
  for (int i = 0; i < n_parts; ++i) body(parts[i]);
}

template <int B, int RUNS>
void int8_dynamic_parts(const QuantizedActivations& xq, const DynamicPart* parts, int n_parts, int threads) {
#ifdef LMSTACK_VNNI
  using Products = Int8VnniProducts;
  using Row = Int8UnsignedRow;
  const int8_t* codes = xq.q8.data();
#else
  using Products = Int8Products;
  using Row = Int8Row;
  const int16_t* codes = xq.q16.data();
#endif
  const int64_t n_in = xq.n, n_groups = xq.n_blocks;
  for_each_part(parts, n_parts, threads, [&](const DynamicPart& part) {
    const int8_t* q = static_cast<const int8_t*>(part.q);
    const float* scales = part.scales;
    if constexpr (RUNS == 0) {  // per token: one block per row
      int8_dynamic_rows_per_token<B, Products, Row>(xq, codes, q, scales, part.bias, part.y, part.n_out, part.e);
    } else {
      auto row_of = [=](int64_t j) { return Row{q + j * n_in}; };
      auto w_scale = [=](int64_t j, int64_t g) { return scales[j * n_groups + g]; };
      dynamic_rows<B, RUNS, Products>(xq, codes, part.bias, part.y, part.n_out, row_of, w_scale, NoOffsets{}, part.e);
    }
  });
}

template <int B, int RUNS>
void int4_dynamic_parts(const QuantizedActivations& xq, const DynamicPart* parts, int n_parts, int threads) {
#ifdef LMSTACK_VNNI
  using Products = Int4VnniProducts;
#else
  using Products = Int4Products;
#endif
  const int64_t n_in = xq.n, n_groups = xq.n_blocks;
  for_each_part(parts, n_parts, threads, [&](const DynamicPart& part) {
    const uint8_t* q = static_cast<const uint8_t*>(part.q);
    const float* scales = part.scales;
    auto row_of = [=](int64_t j) { return Int4Row{q + j * (n_in / 2)}; };
    auto w_scale = [=](int64_t j, int64_t g) { return scales[j * n_groups + g]; };
    // integer zero points, or Q4_1's float mins: two instantiations, not a branch per group
    if (part.mins)
      dynamic_rows<B, RUNS, Products>(xq, xq.q8.data(), part.bias, part.y, part.n_out, row_of, w_scale,
                                      Mins{part.mins, n_groups}, part.e);
    else
      dynamic_rows<B, RUNS, Products>(xq, xq.q8.data(), part.bias, part.y, part.n_out, row_of, w_scale,
                                      ZeroPoints{part.zeros, n_groups}, part.e);
  });
}

// int8 weights (scales per row: group 0, or per group) times int8 activations, for every part (same x, same
// n_in and group). Returns 1 for a shape the kernels do not take.
inline int int8_dynamic_matmuls(const float* x, int64_t rows, int64_t n_in, int64_t group, const DynamicPart* parts,
                                int n_parts, int threads) {
  if (n_in % 32 || group % 32 || group > 256 || rows < 1 || rows > 8 || n_in > 131072) return 1;
#ifdef LMSTACK_VNNI
  const QuantizedActivations xq(x, rows, n_in, group, CodeLayout::kInt8);
#else
  const QuantizedActivations xq(x, rows, n_in, group, CodeLayout::kInt16);
#endif
  if (group == 0) {
    constexpr int RUNS = 0;
#define CALL(B) int8_dynamic_parts<B, RUNS>(xq, parts, n_parts, threads)
    LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
    return 0;
  }
#define CALL(B) int8_dynamic_parts<B, RUNS>(xq, parts, n_parts, threads)
  LMSTACK_DISPATCH_RUNS_AND_ROWS(group, rows, CALL)
#undef CALL
  return 0;
}

// int4 weights (see int4_matmul in quant_kernels.h: integer zeros, or float mins) times int8 activations
// quantized per weight group, for every part: a group adds scale * x_scale * (idot(codes, x codes) - (8 + zero) *
// sum(x codes)), or with mins scale * x_scale * idot + min * x_scale * sum(x codes).
inline int int4_dynamic_matmuls(const float* x, int64_t rows, int64_t n_in, int64_t group, const DynamicPart* parts,
                                int n_parts, int threads) {
  if (n_in % 32 || group % 32 || group == 0 || group > 256 || rows < 1 || rows > 8) return 1;
  const QuantizedActivations xq(x, rows, n_in, group, CodeLayout::kInt8Nibbles);
#define CALL(B) int4_dynamic_parts<B, RUNS>(xq, parts, n_parts, threads)
  LMSTACK_DISPATCH_RUNS_AND_ROWS(group, rows, CALL)
#undef CALL
  return 0;
}

// One weight: the matmuls above with a single part.
inline int int8_dynamic_matmul(const float* x, const int8_t* q, const float* scales, const float* bias, float* y,
                               int64_t rows, int64_t n_out, int64_t n_in, int64_t group, int threads,
                               Epilogue e = Epilogue::kStore) {
  const DynamicPart part{q, scales, nullptr, nullptr, bias, y, n_out, e};
  return int8_dynamic_matmuls(x, rows, n_in, group, &part, 1, threads);
}

inline int int4_dynamic_matmul(const float* x, const uint8_t* q, const float* scales, const int8_t* zeros,
                               const float* mins, const float* bias, float* y, int64_t rows, int64_t n_out,
                               int64_t n_in, int64_t group, int threads, Epilogue e = Epilogue::kStore) {
  const DynamicPart part{q, scales, zeros, mins, bias, y, n_out, e};
  return int4_dynamic_matmuls(x, rows, n_in, group, &part, 1, threads);
}

}  // namespace quant
}  // namespace lmstack
