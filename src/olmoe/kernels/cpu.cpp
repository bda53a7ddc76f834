// Decode-time kernels for x86 CPUs with AVX-512 BF16: matrix-vector products that stream
// weights from memory near the bandwidth limit, and the whole sparse-MoE block of a few tokens in
// one call. Compiled on first use by olmoe/kernels/__init__.py; the PyTorch code in model.py and
// moe.py is the reference and the fallback.
//
// Why own these: with one to a few tokens per step, decoding reads every active weight once and
// does two flops per weight, so its speed is the memory bandwidth. PyTorch's bf16 GEMV streams
// well below it, and a MoE layer as a sequence of PyTorch ops pays per-op overhead per expert.
//
// Numerics: bf16 inputs, products and sums in float32 (vdpbf16ps), one rounding to bf16 at the
// end of each product. The MoE keeps gate/up/SiLU in float32 and rounds the expert activation
// to bf16 once, before the down projection.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int kMaxVectors = 8;  // vectors (tokens) multiplied per pass over a weight row
constexpr int kLanes = 32;      // bf16 values per 512-bit register

inline __m512bh load_bf16(const bf16* p, int64_t remaining) {
  if (remaining >= kLanes) return (__m512bh)_mm512_loadu_si512(p);
  __mmask32 mask = (__mmask32)((1ull << remaining) - 1);
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// out[v * ldo + r] = dot(W[r, :K], X[v, :K]) for r in [row_begin, row_end), v < NV.
// Rows go R at a time so that R independent weight streams are in flight; each weight register
// is used NV times, so the weights are read from memory once for all the vectors.
template <int R, int NV>
void rows_dot(const bf16* W, int64_t ldw, int64_t row_begin, int64_t row_end, int64_t K,
              const bf16* X, int64_t ldx, float* out, int64_t ldo) {
  int64_t r = row_begin;
  for (; r + R <= row_end; r += R) {
    __m512 acc[R][NV];
    for (int i = 0; i < R; i++)
      for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += kLanes) {
      __m512bh x[NV];
      for (int v = 0; v < NV; v++) x[v] = load_bf16(X + v * ldx + k, K - k);
      for (int i = 0; i < R; i++) {
        __m512bh w = load_bf16(W + (r + i) * ldw + k, K - k);
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], w, x[v]);
      }
    }
    for (int i = 0; i < R; i++)
      for (int v = 0; v < NV; v++) out[v * ldo + r + i] = _mm512_reduce_add_ps(acc[i][v]);
  }
  if (r < row_end) rows_dot<1, NV>(W, ldw, r, row_end, K, X, ldx, out, ldo);
}

// Picks the template for `nv` vectors: fewer vectors leave registers for more rows in flight.
void gemv(const bf16* W, int64_t ldw, int64_t row_begin, int64_t row_end, int64_t K,
          const bf16* X, int64_t ldx, int nv, float* out, int64_t ldo) {
  for (int v0 = 0; v0 < nv; v0 += kMaxVectors) {
    const bf16* x = X + v0 * ldx;
    float* o = out + v0 * ldo;
    switch (std::min(nv - v0, kMaxVectors)) {
      case 1: rows_dot<4, 1>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
      case 2: rows_dot<4, 2>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
      case 3: rows_dot<4, 3>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
      case 4: rows_dot<4, 4>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
      case 5: rows_dot<2, 5>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
      case 6: rows_dot<2, 6>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
      case 7: rows_dot<2, 7>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
      default: rows_dot<2, 8>(W, ldw, row_begin, row_end, K, x, ldx, o, ldo); break;
    }
  }
}

inline bf16 to_bf16(float f) { return c10::BFloat16(f).x; }

void check_bf16_matrix(const torch::Tensor& t, const char* name, int dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16, name, " must be bfloat16");
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim, "-d tensor");
}

// Row blocks small enough to balance two threads, large enough to amortise the reductions.
int64_t row_block(int64_t rows) { return std::max<int64_t>(16, rows / (8 * at::get_num_threads())); }

}  // namespace

// y (T, N) = x (T, K) @ weight (N, K)^T [+ bias], bf16, for a handful of rows T.
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias) {
  check_bf16_matrix(x, "x", 2);
  check_bf16_matrix(weight, "weight", 2);
  const int64_t T = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K, "x has ", K, " features but weight expects ", weight.size(1));
  auto acc = torch::empty({T, N}, x.options().dtype(torch::kFloat32));
  const bf16* W = reinterpret_cast<const bf16*>(weight.data_ptr());
  const bf16* X = reinterpret_cast<const bf16*>(x.data_ptr());
  float* A = acc.data_ptr<float>();
  at::parallel_for(0, N, row_block(N), [&](int64_t begin, int64_t end) {
    gemv(W, K, begin, end, K, X, K, (int)T, A, N);
  });
  if (bias.has_value()) acc.add_(bias->to(torch::kFloat32));
  return acc.to(torch::kBFloat16);
}

// The sparse-MoE block for a few tokens: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x_t)) * up_e(x_t))
// with e = idx[t,k]. gate_up (E, 2I, H) holds each expert's gate rows then its up rows; down
// (E, H, I). Only the experts some token chose are read, each once for all its tokens.
torch::Tensor moe(torch::Tensor x, torch::Tensor gate_up, torch::Tensor down, torch::Tensor idx,
                  torch::Tensor weights) {
  check_bf16_matrix(x, "x", 2);
  check_bf16_matrix(gate_up, "gate_up", 3);
  check_bf16_matrix(down, "down", 3);
  const int64_t T = x.size(0), H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2;
  const int64_t K = idx.size(1);
  TORCH_CHECK(gate_up.size(2) == H && down.size(0) == E && down.size(1) == H && down.size(2) == I,
              "expert weights do not match x");
  auto idx64 = idx.to(torch::kInt64).contiguous();
  auto w32 = weights.to(torch::kFloat32).contiguous();
  const int64_t* chosen = idx64.data_ptr<int64_t>();
  const float* mix = w32.data_ptr<float>();

  // Slots (t, k) grouped by expert: slot_of[s] is the flat index t * K + k.
  std::vector<int64_t> count(E, 0), start(E + 1, 0), slot_of(T * K);
  for (int64_t s = 0; s < T * K; s++) {
    TORCH_CHECK(chosen[s] >= 0 && chosen[s] < E, "expert index out of range");
    count[chosen[s]]++;
  }
  for (int64_t e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < T * K; s++) slot_of[fill[chosen[s]]++] = s;
  }
  std::vector<int64_t> hit;
  for (int64_t e = 0; e < E; e++)
    if (count[e]) hit.push_back(e);

  // Each expert's tokens side by side, so one pass over its rows serves all of them.
  const int64_t S = T * K;
  auto xs = torch::empty({S, H}, x.options());
  auto act = torch::empty({S, I}, x.options());
  auto gu = torch::empty({S, 2 * I}, x.options().dtype(torch::kFloat32));
  auto part = torch::empty({S, H}, x.options().dtype(torch::kFloat32));
  const bf16* X = reinterpret_cast<const bf16*>(x.data_ptr());
  bf16* XS = reinterpret_cast<bf16*>(xs.data_ptr());
  for (int64_t j = 0; j < S; j++)
    std::copy(X + (slot_of[j] / K) * H, X + (slot_of[j] / K + 1) * H, XS + j * H);

  // Work items: (expert, block of rows), for both products.
  struct Item { int64_t expert, begin, end; };
  auto items_for = [&](int64_t rows) {
    std::vector<Item> items;
    const int64_t block = row_block(rows);
    for (int64_t e : hit)
      for (int64_t b = 0; b < rows; b += block) items.push_back({e, b, std::min(rows, b + block)});
    return items;
  };

  // gate and up rows r and I + r: computed in one item, so SiLU(gate) * up happens right there.
  const bf16* GU = reinterpret_cast<const bf16*>(gate_up.data_ptr());
  float* G = gu.data_ptr<float>();
  bf16* A = reinterpret_cast<bf16*>(act.data_ptr());
  auto up_items = items_for(I);
  at::parallel_for(0, (int64_t)up_items.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const Item& it = up_items[i];
      const int64_t s0 = start[it.expert], n = count[it.expert];
      const bf16* W = GU + it.expert * 2 * I * H;
      gemv(W, H, it.begin, it.end, H, XS + s0 * H, H, (int)n, G + s0 * 2 * I, 2 * I);
      gemv(W + I * H, H, it.begin, it.end, H, XS + s0 * H, H, (int)n, G + s0 * 2 * I + I, 2 * I);
      for (int64_t j = s0; j < s0 + n; j++)
        for (int64_t r = it.begin; r < it.end; r++) {
          const float g = G[j * 2 * I + r], u = G[j * 2 * I + I + r];
          A[j * I + r] = to_bf16(g / (1.0f + std::exp(-g)) * u);
        }
    }
  });

  const bf16* D = reinterpret_cast<const bf16*>(down.data_ptr());
  float* P = part.data_ptr<float>();
  auto down_items = items_for(H);
  at::parallel_for(0, (int64_t)down_items.size(), 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i++) {
      const Item& it = down_items[i];
      const int64_t s0 = start[it.expert], n = count[it.expert];
      gemv(D + it.expert * H * I, I, it.begin, it.end, I, A + s0 * I, I, (int)n, P + s0 * H, H);
    }
  });

  // out[t] = sum over its k slots in top-k order of weight * expert output.
  std::vector<int64_t> position(S);
  for (int64_t j = 0; j < S; j++) position[slot_of[j]] = j;
  auto out = torch::empty({T, H}, x.options());
  bf16* O = reinterpret_cast<bf16*>(out.data_ptr());
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    std::vector<float> sum(H);
    for (int64_t t = b; t < e; t++) {
      std::fill(sum.begin(), sum.end(), 0.0f);
      for (int64_t k = 0; k < K; k++) {
        const float m = mix[t * K + k];
        const float* p = P + position[t * K + k] * H;
        for (int64_t h = 0; h < H; h++) sum[h] += m * p[h];
      }
      for (int64_t h = 0; h < H; h++) O[t * H + h] = to_bf16(sum[h]);
    }
  });
  return out;
}

// Reads `buffer` once with 512-bit loads on all threads; returns a checksum so the reads
// cannot be optimised away. The benchmark times it to measure the memory read bandwidth.
int64_t read_all(torch::Tensor buffer) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.nbytes() % 64 == 0, "buffer: contiguous, 64-byte multiple");
  const __m512i* p = reinterpret_cast<const __m512i*>(buffer.data_ptr());
  const int64_t n = buffer.nbytes() / 64;
  std::vector<int64_t> sums(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = b;
    for (; i + 4 <= e; i += 4) {
      a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
      a1 = _mm512_xor_si512(a1, _mm512_load_si512(p + i + 1));
      a2 = _mm512_xor_si512(a2, _mm512_load_si512(p + i + 2));
      a3 = _mm512_xor_si512(a3, _mm512_load_si512(p + i + 3));
    }
    for (; i < e; i++) a0 = _mm512_xor_si512(a0, _mm512_load_si512(p + i));
    __m512i a = _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3));
    sums[at::get_thread_num()] ^= _mm512_reduce_add_epi64(a);
  });
  int64_t total = 0;
  for (int64_t s : sums) total ^= s;
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ weight.T (+ bias) for a few bf16 rows");
  m.def("moe", &moe, "sparse MoE block for a few bf16 tokens");
  m.def("read_all", &read_all, "read a buffer once (memory bandwidth probe)");
}
