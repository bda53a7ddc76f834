// The kernels' AVX-512 back end (BF16 and VNNI): vector helpers, activation rows in the form
// each weight kind's dot product wants, the weight matrices' row products, dequantisation
// and the vectorised inner loops cpu.cpp calls.
#pragma once

#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_layout.h"

namespace {

constexpr bool kBf16Gemm = true;  // oneDNN multiplies bf16 with the same instructions
using GemmValue = bf16;           // what quantised weights are dequantised into for its GEMM

// ------------------------------------------------------------------------- vector helpers
inline __mmask16 first(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// Up to 16 values as floats (zero beyond n), from float or bf16 memory.
inline __m512 load_floats(const float* x, int64_t n) { return _mm512_maskz_loadu_ps(first(n), x); }
inline __m512 load_floats(const bf16* x, int64_t n) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), x));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));  // bf16 is a float's top half
}

// e^x, about 1e-7 relative: x = n ln2 + r (|r| <= ln2 / 2, ln2 in two parts so that r is
// exact), e^r by its Taylor polynomial to degree 6, times 2^n.
inline __m512 exp_ps(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  for (float c : {1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Float vectors as the code both back ends share sees them (cpu.cpp's exp_logits).
struct FloatLanes {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec x) { _mm512_storeu_ps(p, x); }
  static Vec broadcast(float x) { return _mm512_set1_ps(x); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static Vec exp(Vec x) { return exp_ps(x); }
  static float sum(Vec x) { return _mm512_reduce_add_ps(x); }
  static float top(Vec x) { return _mm512_reduce_max_ps(x); }
};

// ------------------------------------------------------------------------- activations
// Activation rows in the form the weights' dot product wants.
struct Bf16Activations {
  std::vector<bf16> data;  // rows x K
  int64_t K = 0;
  void resize(int64_t rows, int64_t k) { K = k; data.resize(rows * k); }
  void set_row(int64_t row, const float* x) {  // rounded to nearest even, as PyTorch rounds
    bf16* out = data.data() + row * K;
    for (int64_t k = 0; k < K; k += 16)
      _mm256_mask_storeu_epi16(out + k, first(K - k),
                               (__m256i)_mm512_cvtneps_pbh(load_floats(x + k, K - k)));
  }
  void set_row(int64_t row, const bf16* x) { std::copy(x, x + K, data.begin() + row * K); }
};

struct Int8Activations {
  std::vector<uint8_t> high, low;  // rows x Kp: a + 128 and b of q = 128 a + b
  std::vector<float> scale;        // rows
  int64_t K = 0, Kp = 0;           // Kp: K rounded up to 64, zero padded
  void resize(int64_t rows, int64_t k) {
    K = k;
    Kp = (k + 63) / 64 * 64;
    high.assign(rows * Kp, 128);
    low.assign(rows * Kp, 0);
    scale.resize(rows);
  }
  template <class T>
  void set_row(int64_t row, const T* x) {
    __m512 peak = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) peak = _mm512_max_ps(peak, _mm512_abs_ps(load_floats(x + k, K - k)));
    const float top = _mm512_reduce_max_ps(peak);
    const float s = top > 0.0f ? top / 16383.0f : 1.0f;
    scale[row] = s;
    uint8_t* hi = high.data() + row * Kp;
    uint8_t* lo = low.data() + row * Kp;
    for (int64_t k = 0; k < K; k += 16) {
      // q = round(x / s) in [-16383, 16383] (nearest even, as lrint); a = floor(q / 128) is
      // an arithmetic shift, in [-128, 127]; b = q - 128 a, in [0, 127], its low 7 bits.
      const __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(load_floats(x + k, K - k), _mm512_set1_ps(s)));
      const __m512i a = _mm512_srai_epi32(q, 7);
      const __m512i b = _mm512_and_si512(q, _mm512_set1_epi32(127));
      _mm_mask_storeu_epi8(hi + k, first(K - k), _mm512_cvtepi32_epi8(_mm512_add_epi32(a, _mm512_set1_epi32(128))));
      _mm_mask_storeu_epi8(lo + k, first(K - k), _mm512_cvtepi32_epi8(b));
    }
  }
};

// ------------------------------------------------------------------------- weights
inline __m512bh load_bf16(const bf16* p, int64_t remaining) {
  if (remaining >= 32) return (__m512bh)_mm512_loadu_si512(p);
  return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << remaining) - 1), p);
}

inline __m512i load_bytes(const void* p, int64_t remaining) {
  if (remaining >= 64) return _mm512_loadu_si512(p);
  return _mm512_maskz_loadu_epi8((__mmask64)((1ull << remaining) - 1), p);
}

// A (rows, K) bf16 matrix; `ld` elements between rows.
struct Bf16Matrix {
  using Activations = Bf16Activations;
  static constexpr int64_t kBitsPerWeight = 16;
  // Rows per pass with 5-8 activation rows: 2 x 8 accumulators + 8 activations fit in the 32
  // vector registers, and each activation load then serves two weight rows.
  static constexpr int kWideRows = 2;
  // Loads in flight per row for one activation row: 2 (128 bytes) streamed faster than 4 on one
  // core and no slower on two (docs/inference.md has the measurements).
  static constexpr int kSingleUnroll = 2;
  const bf16* data;
  int64_t ld;

  // out[v * ldo + r] = dot(row r, activation row v), r in [begin, end), v < NV. R rows at a
  // time keep R weight streams in flight; each loaded weight register serves all NV rows.
  template <int R, int NV>
  void dot(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
           int64_t ldo) const {
    const int64_t K = x.K;
    const bf16* X = x.data.data() + v0 * K;
    int64_t r = begin;
    for (; r + R <= end; r += R) {
      __m512 acc[R][NV];
      for (int i = 0; i < R; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 32) {
        __m512bh xv[NV];
        for (int v = 0; v < NV; v++) xv[v] = load_bf16(X + v * K + k, K - k);
        for (int i = 0; i < R; i++) {
          const __m512bh w = load_bf16(data + (r + i) * ld + k, K - k);
          for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], w, xv[v]);
        }
      }
      for (int i = 0; i < R; i++)
        for (int v = 0; v < NV; v++) out[v * ldo + r + i] = _mm512_reduce_add_ps(acc[i][v]);
    }
    if (r < end) dot<1, NV>(r, end, x, v0, out, ldo);
  }

  // The same products, one row after the other, each read front to back with U loads in
  // flight: a single sequential stream per thread, which the hardware prefetchers follow far
  // better than R interleaved rows when the rows are short (the 2 KB rows of a down
  // projection) or the activation rows few.
  template <int U, int NV>
  void rows(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
            int64_t ldo) const {
    const int64_t K = x.K;
    const bf16* X = x.data.data() + v0 * K;
    for (int64_t r = begin; r < end; r++) {
      const bf16* w = data + r * ld;
      __m512 acc[U][NV];
      for (int u = 0; u < U; u++)
        for (int v = 0; v < NV; v++) acc[u][v] = _mm512_setzero_ps();
      int64_t k = 0;
      for (; k + 32 * U <= K; k += 32 * U)
        for (int u = 0; u < U; u++) {
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
          for (int v = 0; v < NV; v++)
            acc[u][v] = _mm512_dpbf16_ps(
                acc[u][v], wv, (__m512bh)_mm512_loadu_si512(X + v * K + k + 32 * u));
        }
      for (; k < K; k += 32) {
        const __m512bh wv = load_bf16(w + k, K - k);
        for (int v = 0; v < NV; v++)
          acc[0][v] = _mm512_dpbf16_ps(acc[0][v], wv, load_bf16(X + v * K + k, K - k));
      }
      for (int v = 0; v < NV; v++) {
        __m512 sum = acc[0][v];
        for (int u = 1; u < U; u++) sum = _mm512_add_ps(sum, acc[u][v]);
        out[v * ldo + r] = _mm512_reduce_add_ps(sum);
      }
    }
  }
};

// A (rows, K) int8 matrix with one float scale and the integer sum of each row.
struct Int8Matrix {
  using Activations = Int8Activations;
  static constexpr int64_t kBitsPerWeight = 8;
  static constexpr int kWideRows = 1;  // two accumulators per row and activation row
  static constexpr int kSingleUnroll = 4;  // 256 bytes in flight per row: int8 rows are short
  const int8_t* data;
  int64_t ld;
  const float* scale;
  const int32_t* row_sum;

  template <int R, int NV>
  void dot(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
           int64_t ldo) const {
    const int64_t K = x.K, Kp = x.Kp;
    const uint8_t* A = x.high.data() + v0 * Kp;
    const uint8_t* B = x.low.data() + v0 * Kp;
    int64_t r = begin;
    for (; r + R <= end; r += R) {
      __m512i hi[R][NV], lo[R][NV];
      for (int i = 0; i < R; i++)
        for (int v = 0; v < NV; v++) hi[i][v] = lo[i][v] = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; k += 64) {
        for (int i = 0; i < R; i++) {
          const __m512i w = load_bytes(data + (r + i) * ld + k, K - k);
          for (int v = 0; v < NV; v++) {
            hi[i][v] = _mm512_dpbusd_epi32(hi[i][v], _mm512_loadu_si512(A + v * Kp + k), w);
            lo[i][v] = _mm512_dpbusd_epi32(lo[i][v], _mm512_loadu_si512(B + v * Kp + k), w);
          }
        }
      }
      for (int i = 0; i < R; i++)
        for (int v = 0; v < NV; v++)
          out[v * ldo + r + i] = result(hi[i][v], lo[i][v], r + i, x.scale[v0 + v]);
    }
    if (r < end) dot<1, NV>(r, end, x, v0, out, ldo);
  }

  // Row r's product with an activation row of scale `x_scale` from the two accumulators of
  // w * (a + 128) and w * b: sum(w a) = sum(w (a + 128)) - 128 sum(w); sum(w q) = 128 sum(w a)
  // + sum(w b).
  float result(__m512i high, __m512i low, int64_t r, float x_scale) const {
    const int64_t wa = (int64_t)_mm512_reduce_add_epi32(high) - 128 * row_sum[r];
    const int64_t wq = 128 * wa + _mm512_reduce_add_epi32(low);
    return (float)wq * scale[r] * x_scale;
  }

  // Row after row, as Bf16Matrix::rows (int8 rows are half as long, so this matters more).
  template <int U, int NV>
  void rows(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
            int64_t ldo) const {
    const int64_t K = x.K, Kp = x.Kp;
    const uint8_t* A = x.high.data() + v0 * Kp;
    const uint8_t* B = x.low.data() + v0 * Kp;
    for (int64_t r = begin; r < end; r++) {
      const int8_t* w = data + r * ld;
      __m512i hi[U][NV], lo[U][NV];
      for (int u = 0; u < U; u++)
        for (int v = 0; v < NV; v++) hi[u][v] = lo[u][v] = _mm512_setzero_si512();
      auto step = [&](int u, int64_t k, __m512i wv) {
        for (int v = 0; v < NV; v++) {
          hi[u][v] = _mm512_dpbusd_epi32(hi[u][v], _mm512_loadu_si512(A + v * Kp + k), wv);
          lo[u][v] = _mm512_dpbusd_epi32(lo[u][v], _mm512_loadu_si512(B + v * Kp + k), wv);
        }
      };
      int64_t k = 0;
      for (; k + 64 * U <= K; k += 64 * U)
        for (int u = 0; u < U; u++) step(u, k + 64 * u, _mm512_loadu_si512(w + k + 64 * u));
      for (; k < K; k += 64) step(0, k, load_bytes(w + k, K - k));
      for (int v = 0; v < NV; v++) {
        __m512i h = hi[0][v], l = lo[0][v];
        for (int u = 1; u < U; u++) {
          h = _mm512_add_epi32(h, hi[u][v]);
          l = _mm512_add_epi32(l, lo[u][v]);
        }
        out[v * ldo + r] = result(h, l, r, x.scale[v0 + v]);
      }
    }
  }
};


struct Int4Activations : Int4ActivationRows {
  template <class T>
  void set_row(int64_t row, const T* x) {
    for (int64_t k = 0; k < K; k += kInt4Group) {
      const __m512 a = load_floats(x + k, K - k), b = load_floats(x + k + 16, K - k - 16);
      const float top = std::max(_mm512_reduce_max_ps(_mm512_abs_ps(a)),
                                 _mm512_reduce_max_ps(_mm512_abs_ps(b)));
      const float s = top > 0.0f ? top / 127.0f : 1.0f;
      const __m512i qa = _mm512_cvtps_epi32(_mm512_div_ps(a, _mm512_set1_ps(s)));
      const __m512i qb = _mm512_cvtps_epi32(_mm512_div_ps(b, _mm512_set1_ps(s)));
      int8_t values[kInt4Group];
      _mm_storeu_si128(reinterpret_cast<__m128i*>(values), _mm512_cvtsepi32_epi8(qa));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(values + 16), _mm512_cvtsepi32_epi8(qb));
      put_group(row, k, values, s, _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)));
    }
  }
};

// A (rows, Kp / 2) packed int4 matrix with (rows, Kp / 32) float16 scales.
//
// At 4 bits a weight byte carries four times the work of a bf16 one, and one row after the
// other a core streamed from memory at about 60% of what it reads with nothing to compute: too
// few reads in flight. R rows from R separate stretches of the thread's rows (R sequential
// streams, which the prefetchers follow each on its own) keep enough in flight, and share each
// activation load (docs/inference.md has the measurements). Adjacent rows interleaved instead
// jump back and forth within a few KB, which the prefetchers do not follow.
struct Int4Matrix {
  using Activations = Int4Activations;
  static constexpr int64_t kBitsPerWeight = 4;
  static constexpr int kWideRows = 1;      // 5-8 activation rows: NV x 2 accumulators per row
  static constexpr int kSingleUnroll = 4;  // streams with one activation row
  const uint8_t* data;
  int64_t ld;  // bytes per row, Kp / 2
  const c10::Half* scale;

  // out[v * ldo + r] for rows r in [begin, end) and activation rows v0 + v, v < NV: R streams,
  // stream i taking rows begin + i * part + j, j < part; the rows left over one stream at a time.
  template <int R, int NV>
  void dot(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
           int64_t ldo) const {
    const int64_t Kp = x.Kp, G = Kp / kInt4Group, part = (end - begin) / R;
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t j = 0; j < part; j++) {
      int64_t row[R];
      for (int i = 0; i < R; i++) row[i] = begin + i * part + j;
      __m512 acc[R][NV];
      for (int i = 0; i < R; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
      for (int64_t b = 0; b < Kp; b += kInt4Block) {
        __m512i dots[R][NV];
        for (int i = 0; i < R; i++)
          for (int v = 0; v < NV; v++) dots[i][v] = _mm512_setzero_si512();
        for (int p = 0; p < 4; p++) {
          __m512i lo[R], hi[R];
          for (int i = 0; i < R; i++) {
            __m512i w = _mm512_loadu_si512(data + row[i] * ld + b / 2 + 64 * p);
            // One load for both nibbles: the compiler would otherwise fold the load into each
            // of its two uses, and loads, not arithmetic, bound this loop.
            asm volatile("" : "+v"(w));
            lo[i] = _mm512_and_si512(w, low);
            hi[i] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
          }
          for (int v = 0; v < NV; v++) {
            const int8_t* X = x.q.data() + (v0 + v) * Kp + b + 128 * p;
            const __m512i xa = _mm512_loadu_si512(X), xb = _mm512_loadu_si512(X + 64);
            for (int i = 0; i < R; i++) {
              dots[i][v] = _mm512_dpbusd_epi32(dots[i][v], lo[i], xa);
              dots[i][v] = _mm512_dpbusd_epi32(dots[i][v], hi[i], xb);
            }
          }
        }
        for (int v = 0; v < NV; v++) {
          const int64_t g = (v0 + v) * G + b / kInt4Group;
          const __m512 xs = _mm512_loadu_ps(x.scale.data() + g);
          const __m512i offset = _mm512_loadu_si512(x.offset.data() + g);
          for (int i = 0; i < R; i++) {
            const __m512 ws = _mm512_cvtph_ps(_mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(scale + row[i] * G + b / kInt4Group)));
            acc[i][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dots[i][v], offset)),
                                        _mm512_mul_ps(ws, xs), acc[i][v]);
          }
        }
      }
      for (int i = 0; i < R; i++)
        for (int v = 0; v < NV; v++) out[v * ldo + row[i]] = _mm512_reduce_add_ps(acc[i][v]);
    }
    if (R > 1 && begin + R * part < end) dot<1, NV>(begin + R * part, end, x, v0, out, ldo);
  }

  template <int U, int NV>
  void rows(int64_t begin, int64_t end, const Activations& x, int64_t v0, float* out,
            int64_t ldo) const {
    dot<U, NV>(begin, end, x, v0, out, ldo);
  }
};

// Index vectors for `int4_groups`: a transpose in three rounds of two-register permutes.
struct Int4Transpose {
  __m512i round1[2], round2[2], round3[2];
  Int4Transpose() {
    alignas(64) int32_t index[16];
    for (int k = 0; k < 2; k++) {  // groups 8k + t, registers 2a, 2a + 1 side by side
      for (int t = 0; t < 8; t++)
        for (int u = 0; u < 2; u++) index[2 * t + u] = 8 * k + t + 16 * u;
      round1[k] = _mm512_load_si512(index);
    }
    for (int m = 0; m < 2; m++) {  // groups 4m + t of those, four registers side by side
      for (int t = 0; t < 4; t++)
        for (int v = 0; v < 4; v++) index[4 * t + v] = 2 * (4 * m + t) + v % 2 + 16 * (v / 2);
      round2[m] = _mm512_load_si512(index);
    }
    for (int n = 0; n < 2; n++) {  // groups 2n + t of those, all eight registers side by side
      for (int t = 0; t < 2; t++)
        for (int w = 0; w < 8; w++) index[8 * t + w] = 4 * (2 * n + t) + w % 4 + 16 * (w / 4);
      round3[n] = _mm512_load_si512(index);
    }
  }
};

// One 512-input block of a packed int4 row (see pack_int4: byte c of register r holds input
// 32 (c / 4) + 4 r + c % 4) as its 16 groups' nibbles in the inputs' order: groups 2j and
// 2j + 1 in the low and high halves of groups[j], one byte per input.
inline void int4_groups(const uint8_t* data, __m512i groups[8]) {
  static const Int4Transpose order;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512i registers[8];  // dword l of register r: group l's inputs 4r .. 4r + 3
  for (int p = 0; p < 4; p++) {
    const __m512i w = _mm512_loadu_si512(data + 64 * p);
    registers[2 * p] = _mm512_and_si512(w, low);
    registers[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
  }
  __m512i pairs[4][2], quads[2][2][2];
  for (int a = 0; a < 4; a++)
    for (int k = 0; k < 2; k++)
      pairs[a][k] =
          _mm512_permutex2var_epi32(registers[2 * a], order.round1[k], registers[2 * a + 1]);
  for (int c = 0; c < 2; c++)
    for (int k = 0; k < 2; k++)
      for (int m = 0; m < 2; m++)
        quads[c][k][m] =
            _mm512_permutex2var_epi32(pairs[2 * c][k], order.round2[m], pairs[2 * c + 1][k]);
  for (int k = 0; k < 2; k++)
    for (int m = 0; m < 2; m++)
      for (int n = 0; n < 2; n++)
        groups[4 * k + 2 * m + n] =
            _mm512_permutex2var_epi32(quads[0][k][m], order.round3[n], quads[1][k][m]);
}

// Rows of a packed int4 matrix (Kp / 2 bytes and Kp / 32 float16 scales each) as bf16 rows of
// K values, each bf16(float(q) * float(scale)) as olmoe.quantize.dequantize_int4 rounds: per
// group, its 16 possible values are computed once and its 32 nibbles look them up.
void dequantize_int4_rows(const uint8_t* data, const c10::Half* scale, int64_t Kp, int64_t K,
                          int64_t rows, bf16* out) {
  const __m512 values = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t row = 0; row < rows; row++)
    for (int64_t b = 0; b < K; b += kInt4Block) {
      __m512i groups[8];
      int4_groups(data + row * (Kp / 2) + b / 2, groups);
      alignas(64) float scales[kInt4Groups];
      _mm512_store_ps(scales, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                  scale + row * (Kp / kInt4Group) + b / kInt4Group))));
      for (int64_t l = 0; l < kInt4Groups && b + kInt4Group * l < K; l++) {
        const __m256i nibbles = l % 2 ? _mm512_extracti64x4_epi64(groups[l / 2], 1)
                                      : _mm512_castsi512_si256(groups[l / 2]);
        const __m512i table = _mm512_castsi256_si512(
            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(values, _mm512_set1_ps(scales[l]))));
        const __m512i group = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(nibbles), table);
        const int64_t col = b + kInt4Group * l, left = K - col;
        const __mmask32 keep = left >= 32 ? 0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
        _mm512_mask_storeu_epi16(out + row * K + col, keep, group);
      }
    }
}

// out[i] = bf16(x[i] + add[i]) (add may be null), i < n, rounded to nearest even.
inline void round_to_bf16(const float* x, const float* add, bf16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    __m512 value = load_floats(x + i, n - i);
    if (add) value = _mm512_add_ps(value, load_floats(add + i, n - i));
    _mm256_mask_storeu_epi16(out + i, first(n - i), (__m256i)_mm512_cvtneps_pbh(value));
  }
}

// out[i] = silu(gate[i]) * up[i] = gate * up / (1 + e^-gate), i < n.
inline void silu_times(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t r = 0; r < n; r += 16) {
    const __m512 g = load_floats(gate + r, n - r), u = load_floats(up + r, n - r);
    const __m512 denominator = _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    _mm512_mask_storeu_ps(out + r, first(n - r), _mm512_div_ps(_mm512_mul_ps(g, u), denominator));
  }
}

// Rows of an int8 matrix (K values each, one float32 scale per row) as bf16 rows, each value
// bf16(float(q) * scale) as olmoe.quantize.dequantize_int8 rounds.
inline void dequantize_int8_rows(const int8_t* q, const float* s, int64_t K, int64_t rows,
                                 bf16* to) {
  for (int64_t r = 0; r < rows; r++) {
    const int8_t* from = q + r * K;
    const __m512 row_scale = _mm512_set1_ps(s[r]);
    const auto scaled = [&](int64_t k) {  // up to 16 values from input k
      return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                               _mm_maskz_loadu_epi8(first(K - k), from + k))),
                           row_scale);
    };
    bf16* out = to + r * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)  // two float vectors rounded into one bf16 vector
      _mm512_storeu_si512(out + k, (__m512i)_mm512_cvtne2ps_pbh(scaled(k + 16), scaled(k)));
    for (; k < K; k += 16)
      _mm256_mask_storeu_epi16(out + k, first(K - k), (__m256i)_mm512_cvtneps_pbh(scaled(k)));
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
    __m512 dot = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32)
      dot = _mm512_dpbf16_ps(dot, load_bf16(query + d, D - d), load_bf16(key + d, D - d));
    score[p] = _mm512_reduce_add_ps(dot) * scale + (mask ? mask[p] : 0.0f);
    peak = std::max(peak, score[p]);
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; p += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(load_floats(score + p, P - p), _mm512_set1_ps(peak)));
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(first(P - p), e));
    _mm512_mask_storeu_ps(score + p, first(P - p), e);
  }
  const float total = _mm512_reduce_add_ps(sum);
  for (int64_t p = 0; p < P; p++) score[p] /= total;
  for (int64_t d0 = 0; d0 < D; d0 += kDims) {
    __m512 acc[kDims / 16];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
      const bf16* value = V0 + p * v_stride + d0;
      const __m512 w = _mm512_set1_ps(score[p]);
      for (int64_t c = 0; c < kDims / 16 && d0 + 16 * c < D; c++)
        acc[c] = _mm512_fmadd_ps(w, load_floats(value + 16 * c, D - d0 - 16 * c), acc[c]);
    }
    for (int64_t c = 0; c < kDims / 16 && d0 + 16 * c < D; c++)
      _mm256_mask_storeu_epi16(out + d0 + 16 * c, first(D - d0 - 16 * c),
                               (__m256i)_mm512_cvtneps_pbh(acc[c]));
  }
}

// out[i] = bf16(float(a[i]) + float(b[i])), i < n.
inline void add_to_bf16(const bf16* a, const bf16* b, bf16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 sum = _mm512_add_ps(load_floats(a + i, n - i), load_floats(b + i, n - i));
    _mm256_mask_storeu_epi16(out + i, first(n - i), (__m256i)_mm512_cvtneps_pbh(sum));
  }
}

// A checksum of 64-byte lines [b, e) of p (64-byte aligned), read with four loads in flight.
inline int64_t xor_lines(const uint8_t* bytes, int64_t b, int64_t e) {
  const __m512i* p = reinterpret_cast<const __m512i*>(bytes);
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = b;
  for (; i + 4 <= e; i += 4) {
    a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 1));
    a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 2));
    a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 3));
  }
  for (; i < e; i++) a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
  const __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
  return _mm512_reduce_add_epi64(a);
}

}  // namespace
