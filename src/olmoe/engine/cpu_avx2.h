// The kernels' AVX2 back end (with FMA and F16C), for CPUs without AVX-512 BF16 (AMD Zen 2 and
// 3, Intel's client cores): the same interface as cpu_avx512.h, the same integer results and the
// same bf16 roundings, in 256-bit vectors and without bf16 or VNNI dot products:
// - bf16: activations widened to float32 once per call; each 16-weight load is widened by two
//   interleaving unpacks (elements 0-3 and 8-11, then 4-7 and 12-15), so the activations are
//   stored in that order and the products need no further shuffle.
// - int8: activations as 16-bit integers q (|q| <= 16383), weights widened to 16 bits; vpmaddwd
//   sums pairs of exact products into 32 bits.
// - int4: the packed layout's bytes against int8 activations by vpmaddubsw (unsigned nibble
//   times signed byte, pairs summed in 16 bits: at most 2 x 15 x 127 per pair, eight pairs per
//   block without overflow), then vpmaddwd by ones into each group's 32-bit lane.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_layout.h"

namespace {

// oneDNN emulates bf16 products here: cpu.cpp's gemm_out widens them to float32, and quantised
// weights are dequantised straight to float32 (the values bf16 rounding gives) for it.
constexpr bool kBf16Gemm = false;
using GemmValue = float;

// ------------------------------------------------------------------------- vector helpers
// Up to 8 values as floats (zero beyond n), from float or bf16 memory.
inline __m256 load_floats(const float* x, int64_t n) {
  if (n >= 8) return _mm256_loadu_ps(x);
  alignas(32) float part[8] = {};
  std::copy_n(x, std::max<int64_t>(n, 0), part);
  return _mm256_load_ps(part);
}
inline __m256 widen(__m128i bf16s) {  // 8 bf16 -> 8 floats, in order
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16s), 16));
}
inline __m256 load_floats(const bf16* x, int64_t n) {
  if (n >= 8) return widen(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
  alignas(16) bf16 part[8] = {};
  std::copy_n(x, std::max<int64_t>(n, 0), part);
  return widen(_mm_load_si128(reinterpret_cast<const __m128i*>(part)));
}
// The first n of 8 floats (none for n <= 0) into float memory.
inline void store_floats(float* out, __m256 x, int64_t n) {
  if (n >= 8) {
    _mm256_storeu_ps(out, x);
    return;
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, x);
  std::copy_n(part, std::max<int64_t>(n, 0), out);
}

// x's bits plus just under half a bf16 step (plus one where the kept half is odd): the upper 16
// bits of each lane are then x rounded to bf16, to nearest even (x finite, infinite, or a quiet
// NaN).
inline __m256i bf16_rounding_sum(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF)));
}
// 8 floats rounded to bf16, to nearest even (a NaN stays a NaN), as 8 16-bit values in order.
inline __m128i to_bf16(__m256 x) {
  __m256i rounded = _mm256_srli_epi32(bf16_rounding_sum(x), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  rounded = _mm256_or_si256(rounded, _mm256_and_si256(nan, _mm256_set1_epi32(0x0040)));
  const __m256i packed = _mm256_packus_epi32(rounded, rounded);  // per 128-bit half
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}
// 8 finite floats (or infinities, or quiet NaNs) rounded to bf16, to nearest even, and kept as
// floats: to_bf16 and widen in one, without leaving the 32-bit lanes.
inline __m256 bf16_floats(__m256 x) {
  return _mm256_castsi256_ps(_mm256_and_si256(bf16_rounding_sum(x), _mm256_set1_epi32(-65536)));
}
inline void store_bf16(bf16* out, __m256 x, int64_t n) {
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), to_bf16(x));
    return;
  }
  alignas(16) bf16 part[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(part), to_bf16(x));
  std::copy_n(part, std::max<int64_t>(n, 0), out);
}

inline float reduce_add(__m256 x) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)));
}
inline int64_t reduce_add(__m256i x) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), x);
  int64_t sum = 0;
  for (int32_t lane : lanes) sum += lane;
  return sum;
}
inline float reduce_max(__m256 x) {
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  const __m128 pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(pair, _mm_movehdup_ps(pair)));
}
inline __m256 abs_ps(__m256 x) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x); }

// e^x as cpu_avx512.h's exp_ps: x = n ln2 + r, e^r by its Taylor polynomial to degree 6, times
// 2^n built in the exponent bits (2^-127 comes out as 0).
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720.0f);
  for (float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i power = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(power));
}

// Float vectors as the code both back ends share sees them (cpu.cpp's exp_logits).
struct FloatLanes {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec x) { _mm256_storeu_ps(p, x); }
  static Vec broadcast(float x) { return _mm256_set1_ps(x); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static Vec exp(Vec x) { return exp_ps(x); }
  static float sum(Vec x) { return reduce_add(x); }
  static float top(Vec x) { return reduce_max(x); }
};

// Rows shorter than a whole number of 16-value chunks: the last chunk comes from a zeroed copy.
constexpr int64_t kChunk = 16;
inline int64_t chunks(int64_t k) { return (k + kChunk - 1) / kChunk * kChunk; }

// body(at, k) for each 16-value chunk k of [begin, end) (begin a multiple of 16, end <= the rows'
// length), at[i] pointing at row i's chunk: in place for whole chunks, from a zeroed copy for a
// last, partial one. The copy stays out of the main loop and calls nothing: a copy inside the
// loop made the compiler keep every accumulator in memory.
template <int S, class T, class Body>
inline void for_each_chunk(const T* const* rows, int64_t begin, int64_t end, Body&& body) {
  const int64_t whole = begin + (end - begin) / kChunk * kChunk;
  const T* at[S];
  for (int64_t k = begin; k < whole; k += kChunk) {
    for (int i = 0; i < S; i++) at[i] = rows[i] + k;
    body(at, k);
  }
  if (whole == end) return;
  alignas(32) T spare[S][kChunk];
  for (int i = 0; i < S; i++) {
    for (int64_t j = 0; j < kChunk; j++) spare[i][j] = whole + j < end ? rows[i][whole + j] : T(0);
    at[i] = spare[i];
  }
  body(at, whole);
}

// ------------------------------------------------------------------------- activations
// Rounded to bf16 (as PyTorch rounds), widened to float32 in the weights' unpack order.
struct Bf16Activations {
  std::vector<float> data;  // rows x Kp, zero padded
  int64_t K = 0, Kp = 0;
  void resize(int64_t rows, int64_t k) {
    K = k;
    Kp = chunks(k);
    data.assign(rows * Kp, 0.0f);
  }
  void set_row(int64_t row, const float* x) {
    for (int64_t k = 0; k < K; k += 8) {
      alignas(16) bf16 rounded[8];
      store_bf16(rounded, load_floats(x + k, K - k), 8);
      put(row, k, rounded, std::min<int64_t>(8, K - k));
    }
  }
  void set_row(int64_t row, const bf16* x) { put(row, 0, x, K); }

 private:
  // Values [k, k + n) of row `row`: chunk element e goes to the unpacks' position.
  void put(int64_t row, int64_t k, const bf16* values, int64_t n) {
    float* out = data.data() + row * Kp;
    for (int64_t i = 0; i < n; i++) {
      const int64_t e = (k + i) % kChunk, base = k + i - e;
      const int64_t at = e % 4 + 4 * (e / 8) + 8 * (e % 8 / 4);
      const uint32_t bits = (uint32_t)values[i] << 16;
      std::memcpy(out + base + at, &bits, 4);
    }
  }
};

struct Int8Activations {
  std::vector<int16_t> q;    // rows x Kp: round(x / s), |q| <= 16383, zero padded
  std::vector<float> scale;  // rows
  int64_t K = 0, Kp = 0;
  void resize(int64_t rows, int64_t k) {
    K = k;
    Kp = chunks(k);
    q.assign(rows * Kp, 0);
    scale.resize(rows);
  }
  template <class T>
  void set_row(int64_t row, const T* x) {
    __m256 peak = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8)
      peak = _mm256_max_ps(peak, abs_ps(load_floats(x + k, K - k)));
    const float top = reduce_max(peak);
    const float s = top > 0.0f ? top / 16383.0f : 1.0f;
    scale[row] = s;
    int16_t* out = q.data() + row * Kp;
    for (int64_t k = 0; k < K; k += 8) {  // nearest even, as cpu_avx512.h rounds
      alignas(32) int32_t values[8];
      const __m256 scaled = _mm256_div_ps(load_floats(x + k, K - k), _mm256_set1_ps(s));
      _mm256_store_si256(reinterpret_cast<__m256i*>(values), _mm256_cvtps_epi32(scaled));
      for (int64_t i = 0; i < 8 && k + i < K; i++) out[k + i] = (int16_t)values[i];
    }
  }
};

struct Int4Activations : Int4ActivationRows {
  template <class T>
  void set_row(int64_t row, const T* x) {
    for (int64_t k = 0; k < K; k += kInt4Group) {
      __m256 v[4], peak = _mm256_setzero_ps();
      for (int i = 0; i < 4; i++) {
        v[i] = load_floats(x + k + 8 * i, K - k - 8 * i);
        peak = _mm256_max_ps(peak, abs_ps(v[i]));
      }
      const float top = reduce_max(peak);
      const float s = top > 0.0f ? top / 127.0f : 1.0f;
      alignas(32) int32_t q32[kInt4Group];
      for (int i = 0; i < 4; i++)
        _mm256_store_si256(reinterpret_cast<__m256i*>(q32 + 8 * i),
                           _mm256_cvtps_epi32(_mm256_div_ps(v[i], _mm256_set1_ps(s))));
      int8_t values[kInt4Group];
      int32_t sum = 0;
      for (int i = 0; i < kInt4Group; i++) {  // |q| <= 127
        values[i] = (int8_t)q32[i];
        sum += q32[i];
      }
      put_group(row, k, values, s, sum);
    }
  }
};

// ------------------------------------------------------------------------- weights
// Each matrix's `products<S, NV>(row, ...)` computes out[v * ldo + row[i]] = dot(row row[i],
// activation row v0 + v) for S rows, v < NV; `split_rows` below feeds it the rows of [begin,
// end) as the names gemv calls (rows<U, NV>, dot<R, NV>).
//
// S rows at a time from S separate stretches of the range: S sequential streams, which the
// prefetchers follow each on its own, keep more reads in flight than one row after the other (as
// cpu_avx512.h's int4 kernel; docs/inference.md has the measurements). S is up to kStreams, as
// many as the accumulators allow (SplitRows below).

// Streams per pass: as many as keep the accumulators within half of the 16 vector registers (the
// rest hold weights and activations), so that two activation rows still read two streams; eight
// accumulators also keep enough sums in flight to cover the FMA's latency.
constexpr int kAccumulators = 8;
// The most accumulators one pass keeps: the 16 vector registers less a weight chunk's two
// halves. More activation rows than that (bf16 with 8) take two passes over each group of rows,
// the second reading them from L1: accumulators beyond the registers would live in memory.
constexpr int kMostAccumulators = 14;

template <int S, int NV, class Matrix>
void products_in_passes(const Matrix& W, const int64_t* row,
                        const typename Matrix::Activations& x, int64_t v0, float* out,
                        int64_t ldo) {
  constexpr int first = NV * Matrix::kAccumulatorsPerProduct > kMostAccumulators ? NV / 2 : NV;
  W.template products<S, first>(row, x, v0, out, ldo);
  if constexpr (first < NV)
    W.template products<S, NV - first>(row, x, v0 + first, out + first * ldo, ldo);
}

template <int S, class Matrix, int NV>
void split_rows(const Matrix& W, int64_t begin, int64_t end,
                const typename Matrix::Activations& x, int64_t v0, float* out, int64_t ldo) {
  const int64_t part = (end - begin) / S;
  int64_t row[S];
  for (int64_t j = 0; j < part; j++) {
    for (int i = 0; i < S; i++) row[i] = begin + i * part + j;
    products_in_passes<S, NV>(W, row, x, v0, out, ldo);
  }
  for (int64_t r = begin + S * part; r < end; r++)
    products_in_passes<1, NV>(W, &r, x, v0, out, ldo);
}

// gemv's names for the products, the same for every matrix kind.
template <class Matrix>
struct SplitRows {
  template <int U, int NV, class Activations>
  void rows(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
            int64_t ldo) const {
    constexpr int fit = kAccumulators / (NV * Matrix::kAccumulatorsPerProduct);
    split_rows<std::max(1, std::min(fit, Matrix::kStreams)), Matrix, NV>(
        static_cast<const Matrix&>(*this), begin, end, x, v0, out, ldo);
  }
  template <int R, int NV, class Activations>
  void dot(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
           int64_t ldo) const {
    rows<1, NV>(begin, end, x, v0, out, ldo);
  }
};

// A (rows, K) bf16 matrix; `ld` elements between rows.
struct Bf16Matrix : SplitRows<Bf16Matrix> {
  using Activations = Bf16Activations;
  static constexpr int64_t kBitsPerWeight = 16;
  static constexpr int kWideRows = 1, kSingleUnroll = 1, kStreams = 4;
  static constexpr int kAccumulatorsPerProduct = 2;
  const bf16* data;
  int64_t ld;
  Bf16Matrix(const bf16* data, int64_t ld) : data(data), ld(ld) {}

  // Two accumulators per row and activation row (low and high unpacks) keep enough
  // independent sums in flight.
  template <int S, int NV>
  void products(const int64_t* row, const Activations& x, int64_t v0, float* out,
                int64_t ldo) const {
    const int64_t K = x.K, Kp = x.Kp;
    const float* X = x.data.data() + v0 * Kp;
    const __m256i zero = _mm256_setzero_si256();
    const bf16* rows[S];
    for (int i = 0; i < S; i++) rows[i] = data + row[i] * ld;
    __m256 acc[S][NV][2];
    for (int i = 0; i < S; i++)
      for (int v = 0; v < NV; v++) acc[i][v][0] = acc[i][v][1] = _mm256_setzero_ps();
    for_each_chunk<S>(rows, 0, K, [&](const bf16* const* at, int64_t k) {
      for (int i = 0; i < S; i++) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at[i]));
        const __m256 low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, wv));
        const __m256 high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, wv));
        for (int v = 0; v < NV; v++) {
          const float* xv = X + v * Kp + k;
          acc[i][v][0] = _mm256_fmadd_ps(low, _mm256_loadu_ps(xv), acc[i][v][0]);
          acc[i][v][1] = _mm256_fmadd_ps(high, _mm256_loadu_ps(xv + 8), acc[i][v][1]);
        }
      }
    });
    for (int i = 0; i < S; i++)
      for (int v = 0; v < NV; v++)
        out[v * ldo + row[i]] = reduce_add(_mm256_add_ps(acc[i][v][0], acc[i][v][1]));
  }
};

// A (rows, K) int8 matrix with one float scale per row (the row sums are for cpu_avx512.h).
struct Int8Matrix : SplitRows<Int8Matrix> {
  using Activations = Int8Activations;
  static constexpr int64_t kBitsPerWeight = 8;
  static constexpr int kWideRows = 1, kSingleUnroll = 1, kStreams = 4;
  static constexpr int kAccumulatorsPerProduct = 1;
  // Values per 32-bit partial sum before it moves to 64 bits: 2 x 127 x 16383 per pair keeps
  // 4096 inputs (256 pairs per lane) below 2^31.
  static constexpr int64_t kExactSpan = 4096;
  const int8_t* data;
  int64_t ld;
  const float* scale;
  const int32_t* row_sum;
  Int8Matrix(const int8_t* data, int64_t ld, const float* scale, const int32_t* row_sum)
      : data(data), ld(ld), scale(scale), row_sum(row_sum) {}

  template <int S, int NV>
  void products(const int64_t* row, const Activations& x, int64_t v0, float* out,
                int64_t ldo) const {
    const int64_t K = x.K, Kp = x.Kp;
    const int16_t* X = x.q.data() + v0 * Kp;
    const int8_t* rows[S];
    for (int i = 0; i < S; i++) rows[i] = data + row[i] * ld;
    int64_t total[S][NV] = {};
    for (int64_t k0 = 0; k0 < K; k0 += kExactSpan) {
      __m256i acc[S][NV];
      for (int i = 0; i < S; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm256_setzero_si256();
      for_each_chunk<S>(rows, k0, std::min(K, k0 + kExactSpan), [&](const int8_t* const* at,
                                                                   int64_t k) {
        for (int i = 0; i < S; i++) {
          const __m256i wv =
              _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(at[i])));
          for (int v = 0; v < NV; v++) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X + v * Kp + k));
            acc[i][v] = _mm256_add_epi32(acc[i][v], _mm256_madd_epi16(wv, xv));
          }
        }
      });
      for (int i = 0; i < S; i++)
        for (int v = 0; v < NV; v++) total[i][v] += reduce_add(acc[i][v]);
    }
    for (int i = 0; i < S; i++)
      for (int v = 0; v < NV; v++)
        out[v * ldo + row[i]] = (float)total[i][v] * scale[row[i]] * x.scale[v0 + v];
  }
};

// A (rows, Kp / 2) packed int4 matrix with (rows, Kp / 32) float16 scales. A 64-byte chunk's
// two 32-byte halves hold groups 0-7 and 8-15 of the block (byte c: group c / 4).
struct Int4Matrix : SplitRows<Int4Matrix> {
  using Activations = Int4Activations;
  static constexpr int64_t kBitsPerWeight = 4;
  static constexpr int kWideRows = 1, kSingleUnroll = 1, kStreams = 3;
  static constexpr int kAccumulatorsPerProduct = 1;
  const uint8_t* data;
  int64_t ld;  // bytes per row, Kp / 2
  const c10::Half* scale;
  Int4Matrix(const uint8_t* data, int64_t ld, const c10::Half* scale)
      : data(data), ld(ld), scale(scale) {}

  template <int S, int NV>
  void products(const int64_t* row, const Activations& x, int64_t v0, float* out,
                int64_t ldo) const {
    const int64_t Kp = x.Kp, G = Kp / kInt4Group;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[S][NV];
    for (int i = 0; i < S; i++)
      for (int v = 0; v < NV; v++) acc[i][v] = _mm256_setzero_ps();
    for (int64_t b = 0; b < Kp; b += kInt4Block)
      for (int h = 0; h < 2; h++) {
        const int64_t group = b / kInt4Group + 8 * h;
        for (int i = 0; i < S; i++) {
          const uint8_t* w = data + row[i] * ld + b / 2 + 32 * h;
          __m256i sums[NV];
          for (int v = 0; v < NV; v++) sums[v] = _mm256_setzero_si256();
          for (int p = 0; p < 4; p++) {
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * p));
            const __m256i lo = _mm256_and_si256(wv, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
            for (int v = 0; v < NV; v++) {
              const int8_t* q = x.q.data() + (v0 + v) * Kp + b + 32 * h + 128 * p;
              const __m256i qlo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
              const __m256i qhi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64));
              sums[v] = _mm256_add_epi16(sums[v], _mm256_maddubs_epi16(lo, qlo));
              sums[v] = _mm256_add_epi16(sums[v], _mm256_maddubs_epi16(hi, qhi));
            }
          }
          const __m256 ws = _mm256_cvtph_ps(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + row[i] * G + group)));
          for (int v = 0; v < NV; v++) {
            const int64_t g = (v0 + v) * G + group;
            const __m256i exact = _mm256_sub_epi32(
                _mm256_madd_epi16(sums[v], ones),
                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.offset.data() + g)));
            acc[i][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(exact),
                                        _mm256_mul_ps(ws, _mm256_loadu_ps(x.scale.data() + g)),
                                        acc[i][v]);
          }
        }
      }
    for (int i = 0; i < S; i++)
      for (int v = 0; v < NV; v++) out[v * ldo + row[i]] = reduce_add(acc[i][v]);
  }
};

// ------------------------------------------------------------------------- dequantisation
// Dequantised weights go to the float32 GEMM as float32 rows holding bf16 values exactly.

// Rows of a packed int4 matrix (Kp / 2 bytes and Kp / 32 float16 scales each) as rows of K
// values, each bf16(float(q) * float(scale)) as olmoe.quantize.dequantize_int4 rounds: per
// group, its 16 possible values are computed once in bf16, split into a table of their low
// bytes and one of their high bytes, and its 32 nibbles look both up (vpshufb). Group l's
// inputs 4r .. 4r + 3 are the nibbles of dword l of register r: the low, then the high nibbles
// of the four 64-byte chunks' dword l.
inline void dequantize_int4_rows(const uint8_t* data, const c10::Half* scale, int64_t Kp,
                                 int64_t K, int64_t rows, float* out) {
  const __m256 negative = _mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1);
  const __m256 positive = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m128i bytes_apart = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  const __m128i nibble = _mm_set1_epi8(0x0F);
  for (int64_t row = 0; row < rows; row++)
    for (int64_t b = 0; b < K; b += kInt4Block) {
      const uint8_t* block = data + row * (Kp / 2) + b / 2;
      for (int64_t l = 0; l < kInt4Groups && b + kInt4Group * l < K; l++) {
        const int64_t g = row * (Kp / kInt4Group) + b / kInt4Group + l;
        const __m256 s = _mm256_set1_ps((float)scale[g]);
        const __m128i first = _mm_shuffle_epi8(to_bf16(_mm256_mul_ps(negative, s)), bytes_apart);
        const __m128i second = _mm_shuffle_epi8(to_bf16(_mm256_mul_ps(positive, s)), bytes_apart);
        const __m128i low_bytes = _mm_unpacklo_epi64(first, second);
        const __m128i high_bytes = _mm_unpackhi_epi64(first, second);
        int32_t dwords[4];
        for (int p = 0; p < 4; p++) std::memcpy(dwords + p, block + 64 * p + 4 * l, 4);
        const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(dwords));
        const __m128i lo = _mm_and_si128(packed, nibble);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
        const __m128i indices[2] = {_mm_unpacklo_epi32(lo, hi), _mm_unpackhi_epi32(lo, hi)};
        __m128i parts[4];
        for (int half = 0; half < 2; half++) {
          const __m128i l8 = _mm_shuffle_epi8(low_bytes, indices[half]);
          const __m128i h8 = _mm_shuffle_epi8(high_bytes, indices[half]);
          parts[2 * half] = _mm_unpacklo_epi8(l8, h8);
          parts[2 * half + 1] = _mm_unpackhi_epi8(l8, h8);
        }
        const int64_t col = b + kInt4Group * l;  // the group's values, as float32, up to K
        for (int p = 0; p < 4; p++)
          store_floats(out + row * K + col + 8 * p, widen(parts[p]), K - col - 8 * p);
      }
    }
}

// Rows of an int8 matrix (K values each, one float32 scale per row) as float32 rows for the
// float32 GEMM, each value bf16(float(q) * scale) as olmoe.quantize.dequantize_int8 rounds.
inline void dequantize_int8_rows(const int8_t* q, const float* s, int64_t K, int64_t rows,
                                 float* to) {
  const auto dequantize = [](const int8_t* eight, __m256 scale) {
    const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(eight));
    return bf16_floats(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), scale));
  };
  for (int64_t r = 0; r < rows; r++) {
    const __m256 row_scale = _mm256_set1_ps(s[r]);
    const int8_t* row = q + r * K;
    float* out = to + r * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, dequantize(row + k, row_scale));
    if (k < K) {
      alignas(8) int8_t part[8] = {};
      std::copy_n(row + k, K - k, part);
      store_floats(out + k, dequantize(part, row_scale), K - k);
    }
  }
}

// ------------------------------------------------------------------------- elementwise
// out[i] = bf16(x[i] + add[i]) (add may be null), i < n, rounded to nearest even.
inline void round_to_bf16(const float* x, const float* add, bf16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    __m256 value = load_floats(x + i, n - i);
    if (add) value = _mm256_add_ps(value, load_floats(add + i, n - i));
    store_bf16(out + i, value, n - i);
  }
}

// out[i] = silu(gate[i]) * up[i] = gate * up / (1 + e^-gate), i < n.
inline void silu_times(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t r = 0; r < n; r += 8) {
    const __m256 g = load_floats(gate + r, n - r), u = load_floats(up + r, n - r);
    const __m256 denominator = _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g)));
    store_floats(out + r, _mm256_div_ps(_mm256_mul_ps(g, u), denominator), n - r);
  }
}

// One query's attention: out (D) = softmax(query . keys * scale + mask) . values over P cached
// positions, key/value p at K0 / V0 + p * stride; mask (P) additive or null; score: P floats of
// scratch.
inline void attend(const bf16* query, const bf16* K0, int64_t k_stride, const bf16* V0,
                   int64_t v_stride, int64_t P, int64_t D, float scale, const float* mask,
                   float* score, bf16* out) {
  constexpr int64_t kDims = 64;  // output dimensions accumulated in registers per pass over P
  float peak = -INFINITY;
  for (int64_t p = 0; p < P; p++) {
    const bf16* key = K0 + p * k_stride;
    __m256 dot = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8)
      dot = _mm256_fmadd_ps(load_floats(query + d, D - d), load_floats(key + d, D - d), dot);
    score[p] = reduce_add(dot) * scale + (mask ? mask[p] : 0.0f);
    peak = std::max(peak, score[p]);
  }
  float total = 0.0f;
  for (int64_t p = 0; p < P; p += 8) {
    alignas(32) float part[8];
    const __m256 shifted = _mm256_sub_ps(load_floats(score + p, P - p), _mm256_set1_ps(peak));
    _mm256_store_ps(part, exp_ps(shifted));
    for (int64_t i = 0; i < 8 && p + i < P; i++) total += score[p + i] = part[i];
  }
  for (int64_t p = 0; p < P; p++) score[p] /= total;
  for (int64_t d0 = 0; d0 < D; d0 += kDims) {
    __m256 acc[kDims / 8];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
      const bf16* value = V0 + p * v_stride + d0;
      const __m256 w = _mm256_set1_ps(score[p]);
      for (int64_t c = 0; c < kDims / 8 && d0 + 8 * c < D; c++)
        acc[c] = _mm256_fmadd_ps(w, load_floats(value + 8 * c, D - d0 - 8 * c), acc[c]);
    }
    for (int64_t c = 0; c < kDims / 8 && d0 + 8 * c < D; c++)
      store_bf16(out + d0 + 8 * c, acc[c], D - d0 - 8 * c);
  }
}

// out[i] = bf16(float(a[i]) + float(b[i])), i < n.
inline void add_to_bf16(const bf16* a, const bf16* b, bf16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8)
    store_bf16(out + i, _mm256_add_ps(load_floats(a + i, n - i), load_floats(b + i, n - i)), n - i);
}

// A checksum of 64-byte lines [b, e) of p (64-byte aligned), read with four loads in flight.
inline int64_t xor_lines(const uint8_t* bytes, int64_t b, int64_t e) {
  const __m256i* p = reinterpret_cast<const __m256i*>(bytes);
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = b;
  for (; i + 2 <= e; i += 2) {
    a0 = _mm256_xor_si256(a0, _mm256_load_si256(p + 2 * i));
    a1 = _mm256_xor_si256(a1, _mm256_load_si256(p + 2 * i + 1));
    a2 = _mm256_xor_si256(a2, _mm256_load_si256(p + 2 * i + 2));
    a3 = _mm256_xor_si256(a3, _mm256_load_si256(p + 2 * i + 3));
  }
  for (; i < e; i++) {
    a0 = _mm256_xor_si256(a0, _mm256_load_si256(p + 2 * i));
    a1 = _mm256_xor_si256(a1, _mm256_load_si256(p + 2 * i + 1));
  }
  const __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), a);
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

}  // namespace
