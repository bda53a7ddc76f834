// Decode-time kernels for x86 CPUs: matrix-vector products that stream weights from memory
// near the bandwidth limit, and the whole sparse-MoE block of a few tokens in one call, for bf16
// weights, int8 weights (symmetric, one scale per output row) and int4 weights (one float16
// scale per group of 32 inputs); the grouped GEMMs of prefill and training; and the exponentiated
// logits of the LM head's float32 training loss, never writing the logits. Compiled on first
// use by olmoe/engine/native.py for the machine's vector extension: this file is the part both
// back ends share, cpu_avx512.h (AVX-512 BF16 and VNNI) and cpu_avx2.h (AVX2, FMA and F16C)
// the vector code. The PyTorch code in model.py, moe.py and quantize.py is the reference and
// the fallback.
//
// Why own these: with one to a few tokens per step, decoding reads every active weight once and
// does two flops per weight, so its speed is the memory bandwidth. PyTorch's bf16 GEMV streams
// well below it, and a MoE layer as a sequence of PyTorch ops pays per-op overhead per expert.
//
// Numerics (both back ends). bf16 weights: bf16 activations, exact products, sums in float32,
// one rounding to bf16 per result. int8 weights: each activation row is quantised to 15 bits
// (q = round(x / s), |q| <= 16383) and the integer sum of w * q is exact; the error is the
// weights' rounding and 2^-15 of the row's largest activation, far below bf16's 2^-8.
// int4 weights: each group of 32 activations is quantised to int8 with its own scale (as
// llama.cpp's Q8_0), the group's integer dot product is exact and scaled once by both scales.
// The MoE keeps gate/up/SiLU in float32 and rounds (bf16) or quantises (int8, int4) the expert
// activation once before the down projection.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#include "cpu_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "cpu_avx2.h"
#else
#error "olmoe's kernels need AVX-512 BF16/VNNI or AVX2, FMA and F16C (see native.py's flags)"
#endif

namespace {

// Rows [begin, end) of W times activation rows [v0, v0 + nv). Up to 4 activation rows, row
// after row (one sequential stream); from 5 on, the work per weight byte is high enough that
// reusing each activation load for two weight rows pays more (see `rows`).
template <class Matrix>
void gemv(const Matrix& W, int64_t begin, int64_t end, const typename Matrix::Activations& x,
          int64_t v0, int64_t nv, float* out, int64_t ldo) {
  for (int64_t v = 0; v < nv; v += kMaxVectors) {
    float* o = out + v * ldo;
    switch (std::min<int64_t>(nv - v, kMaxVectors)) {
      case 1: W.template rows<Matrix::kSingleUnroll, 1>(begin, end, x, v0 + v, o, ldo); break;
      case 2: W.template rows<4, 2>(begin, end, x, v0 + v, o, ldo); break;
      case 3: W.template rows<2, 3>(begin, end, x, v0 + v, o, ldo); break;
      case 4: W.template rows<2, 4>(begin, end, x, v0 + v, o, ldo); break;
      case 5: W.template dot<Matrix::kWideRows, 5>(begin, end, x, v0 + v, o, ldo); break;
      case 6: W.template dot<Matrix::kWideRows, 6>(begin, end, x, v0 + v, o, ldo); break;
      case 7: W.template dot<Matrix::kWideRows, 7>(begin, end, x, v0 + v, o, ldo); break;
      default: W.template dot<Matrix::kWideRows, 8>(begin, end, x, v0 + v, o, ldo); break;
    }
  }
}

// Runs f(i) for i in [0, n) on all threads, each taking the next item when it is free: a thread
// that starts late (waking up) or runs slow does not hold the others at the end.
template <class F>
void parallel_items(int64_t n, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) f(i);
  });
}

// Rows per work item: each item reads about 1 MB of weights. The items go to whichever thread
// is free, so a thread's reads jump elsewhere after every item, and short items (tens of KB)
// cut each thread's stream into pieces the prefetchers keep restarting on; larger items gained
// nothing more, and at the end of a region a thread waits at most one item (docs/inference.md
// has the measurements). A matrix smaller than that (the router) is still shared by all
// threads.
constexpr int64_t kItemBytes = 1 << 20;
inline int64_t rows_per_item(int64_t rows, int64_t row_bytes) {
  const int64_t threads = at::get_num_threads();
  const int64_t share = (rows + threads - 1) / threads;
  return std::max<int64_t>(1, std::min(kItemBytes / row_bytes, share));
}

void check(const torch::Tensor& t, const char* name, int dim, torch::ScalarType type) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == type, name, " must be ", c10::toString(type));
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be a contiguous ", dim,
              "-d tensor");
}

// A weight matrix (or a stack of them) of any kind, from the Python-side tensors: bf16, int8
// (int8 data, float32 scale per row, int32 row sums) or int4 (uint8 packed data, float16 scale
// per group of 32 inputs).
struct Weights {
  torch::Tensor data, scale, row_sum;  // scale undefined for bf16, row_sum for bf16 and int4
  bool is_int8() const { return data.scalar_type() == torch::kChar; }
  bool is_int4() const { return data.scalar_type() == torch::kByte; }
  // Whether rows of this matrix take `k` inputs: int4 rows are stored padded.
  bool takes(int64_t k) const {
    return is_int4() ? data.size(-1) * 2 == int4_padded(k) : data.size(-1) == k;
  }
};

Weights weights_from(const torch::Tensor& data, const c10::optional<torch::Tensor>& scale,
                     const c10::optional<torch::Tensor>& row_sum, int dim, const char* name) {
  Weights w{data, {}, {}};
  if (data.scalar_type() == torch::kChar) {
    TORCH_CHECK(scale.has_value() && row_sum.has_value(), name, ": int8 needs scale and row_sum");
    check(data, name, dim, torch::kChar);
    check(*scale, "scale", dim - 1, torch::kFloat32);
    check(*row_sum, "row_sum", dim - 1, torch::kInt32);
    w.scale = *scale;
    w.row_sum = *row_sum;
  } else if (data.scalar_type() == torch::kByte) {
    TORCH_CHECK(scale.has_value(), name, ": int4 needs its scales");
    check(data, name, dim, torch::kByte);
    check(*scale, "scale", dim, torch::kHalf);
    TORCH_CHECK(data.size(-1) % (kInt4Block / 2) == 0 &&
                    scale->size(-1) * kInt4Group == data.size(-1) * 2 &&
                    scale->size(-2) == data.size(-2),
                name, ": int4 rows are whole 512-input blocks with a scale per 32 inputs");
    w.scale = *scale;
  } else {
    check(data, name, dim, torch::kBFloat16);
  }
  return w;
}

Bf16Matrix bf16_matrix(const Weights& w, int64_t index, int64_t rows, int64_t cols) {
  return {reinterpret_cast<const bf16*>(w.data.data_ptr()) + index * rows * cols, cols};
}

Int8Matrix int8_matrix(const Weights& w, int64_t index, int64_t rows, int64_t cols) {
  return {w.data.data_ptr<int8_t>() + index * rows * cols, cols,
          w.scale.data_ptr<float>() + index * rows, w.row_sum.data_ptr<int32_t>() + index * rows};
}

// cols: the logical inputs per row (the stored rows are padded).
Int4Matrix int4_matrix(const Weights& w, int64_t index, int64_t rows, int64_t cols) {
  const int64_t ld = int4_padded(cols) / 2;
  return {w.data.data_ptr<uint8_t>() + index * rows * ld, ld,
          w.scale.data_ptr<c10::Half>() + index * rows * (int4_padded(cols) / kInt4Group)};
}

// ------------------------------------------------------------------------- linear
// out[m] (T, N_m) bf16 = x (T, K) @ W_m^T (+ bias_m, float32) for several matrices that share
// their input, in one parallel region (one wait for the slowest thread, not one per matrix);
// each result rounded to bf16 once, in the item that computed it.
template <class Matrix>
std::vector<torch::Tensor> linear_impl(const torch::Tensor& x, const std::vector<Matrix>& W,
                                       const std::vector<int64_t>& N,
                                       const std::vector<const float*>& bias) {
  const int64_t T = x.size(0), K = x.size(1);
  typename Matrix::Activations act;
  act.resize(T, K);
  const bf16* X = reinterpret_cast<const bf16*>(x.data_ptr());
  for (int64_t t = 0; t < T; t++) act.set_row(t, X + t * K);
  struct Item { size_t matrix; int64_t begin, end; };
  std::vector<Item> items;
  std::vector<torch::Tensor> out;
  std::vector<std::vector<float>> acc;
  for (size_t m = 0; m < W.size(); m++) {
    const int64_t step = rows_per_item(N[m], K * Matrix::kBitsPerWeight / 8);
    for (int64_t b = 0; b < N[m]; b += step) items.push_back({m, b, std::min(N[m], b + step)});
    out.push_back(torch::empty({T, N[m]}, x.options()));
    acc.emplace_back(T * N[m]);
  }
  parallel_items((int64_t)items.size(), [&](int64_t i) {
    const Item& it = items[i];
    const int64_t n = N[it.matrix];
    float* a = acc[it.matrix].data();
    gemv(W[it.matrix], it.begin, it.end, act, 0, T, a, n);
    bf16* o = reinterpret_cast<bf16*>(out[it.matrix].data_ptr());
    const float* add = bias[it.matrix];
    for (int64_t t = 0; t < T; t++)
      round_to_bf16(a + t * n + it.begin, add ? add + it.begin : nullptr, o + t * n + it.begin,
                    it.end - it.begin);
  });
  return out;
}

// ------------------------------------------------------------------------- MoE
template <class Matrix, class GateUpOf, class DownOf>
torch::Tensor moe_impl(const torch::Tensor& x, int64_t E, int64_t I, const GateUpOf& gate_up_of,
                       const DownOf& down_of, const torch::Tensor& idx,
                       const torch::Tensor& weights) {
  const int64_t T = x.size(0), H = x.size(1), K = idx.size(1), S = T * K;
  auto idx64 = idx.to(torch::kInt64).contiguous();
  auto mix32 = weights.to(torch::kFloat32).contiguous();
  const int64_t* chosen = idx64.data_ptr<int64_t>();
  const float* mix = mix32.data_ptr<float>();

  // Slots (t, k) grouped by expert: slot_of[j] is the flat index t * K + k of the j-th slot.
  std::vector<int64_t> count(E, 0), start(E + 1, 0), slot_of(S), position(S);
  for (int64_t s = 0; s < S; s++) {
    TORCH_CHECK(chosen[s] >= 0 && chosen[s] < E, "expert index ", chosen[s], " out of range");
    count[chosen[s]]++;
  }
  for (int64_t e = 0; e < E; e++) start[e + 1] = start[e] + count[e];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t s = 0; s < S; s++) slot_of[fill[chosen[s]]++] = s;
  }
  for (int64_t j = 0; j < S; j++) position[slot_of[j]] = j;
  std::vector<int64_t> hit;
  for (int64_t e = 0; e < E; e++)
    if (count[e]) hit.push_back(e);

  // Each expert's tokens side by side, so one pass over its rows serves all of them.
  typename Matrix::Activations xs, act;
  xs.resize(S, H);
  act.resize(S, I);
  const bf16* X = reinterpret_cast<const bf16*>(x.data_ptr());
  for (int64_t j = 0; j < S; j++) xs.set_row(j, X + (slot_of[j] / K) * H);
  std::vector<float> gate_up(S * 2 * I), part(S * H);

  struct Item { int64_t expert, begin, end; };
  auto items_for = [&](int64_t rows, int64_t row_bytes) {
    const int64_t step = rows_per_item(rows, row_bytes);
    std::vector<Item> items;
    for (int64_t e : hit)
      for (int64_t b = 0; b < rows; b += step) items.push_back({e, b, std::min(rows, b + step)});
    return items;
  };

  // Gate rows [b, e) and the matching up rows I + [b, e) in one item.
  auto up_items = items_for(I, 2 * H * Matrix::kBitsPerWeight / 8);  // a gate and an up row each
  parallel_items((int64_t)up_items.size(), [&](int64_t i) {
    const Item& it = up_items[i];
    const int64_t s0 = start[it.expert], n = count[it.expert];
    const Matrix W = gate_up_of(it.expert);
    float* G = gate_up.data() + s0 * 2 * I;
    gemv(W, it.begin, it.end, xs, s0, n, G, 2 * I);
    gemv(W, I + it.begin, I + it.end, xs, s0, n, G, 2 * I);
  });
  at::parallel_for(0, S, 1, [&](int64_t b, int64_t e) {
    std::vector<float> silu(I);
    for (int64_t j = b; j < e; j++) {
      const float* G = gate_up.data() + j * 2 * I;  // gate then up
      silu_times(G, G + I, silu.data(), I);
      act.set_row(j, silu.data());
    }
  });

  auto down_items = items_for(H, I * Matrix::kBitsPerWeight / 8);
  parallel_items((int64_t)down_items.size(), [&](int64_t i) {
    const Item& it = down_items[i];
    const int64_t s0 = start[it.expert];
    gemv(down_of(it.expert), it.begin, it.end, act, s0, count[it.expert], part.data() + s0 * H,
         H);
  });

  // out[t] = sum over its K slots, in top-k order, of weight * expert output.
  auto out = torch::zeros({T, H}, x.options().dtype(torch::kFloat32));
  float* O = out.data_ptr<float>();
  for (int64_t t = 0; t < T; t++)
    for (int64_t k = 0; k < K; k++) {
      const float m = mix[t * K + k];
      const float* p = part.data() + position[t * K + k] * H;
      for (int64_t h = 0; h < H; h++) O[t * H + h] += m * p[h];
    }
  return out;
}

}  // namespace

// y (T, N) = x (T, K) @ W (N, K)^T [+ bias] for a handful of bf16 rows x; W bf16, int8 with
// per-row `scale` and `row_sum`, or packed int4 (N, Kp / 2) with its (N, Kp / 32) `scale`.
torch::Tensor linear(torch::Tensor x, torch::Tensor weight, c10::optional<torch::Tensor> bias,
                     c10::optional<torch::Tensor> scale, c10::optional<torch::Tensor> row_sum) {
  check(x, "x", 2, torch::kBFloat16);
  const Weights w = weights_from(weight, scale, row_sum, 2, "weight");
  const int64_t N = weight.size(0), K = x.size(1);
  TORCH_CHECK(w.takes(K), "x has ", K, " features but the weight's rows do not match");
  torch::Tensor bias32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " entries for ", N, " outputs");
    bias32 = bias->to(torch::kFloat32).contiguous();
  }
  const float* add = bias32.defined() ? bias32.data_ptr<float>() : nullptr;
  if (w.is_int8()) return linear_impl(x, std::vector{int8_matrix(w, 0, N, K)}, {N}, {add})[0];
  if (w.is_int4()) return linear_impl(x, std::vector{int4_matrix(w, 0, N, K)}, {N}, {add})[0];
  return linear_impl(x, std::vector{bf16_matrix(w, 0, N, K)}, {N}, {add})[0];
}

// x @ W^T for matrices of one kind, bf16 or int4, without bias that share their input (q, k
// and v), in one region.
std::vector<torch::Tensor> linears(const torch::Tensor& x, const std::vector<Weights>& weights) {
  const int64_t K = x.size(1);
  std::vector<int64_t> N;
  for (const auto& w : weights) {
    TORCH_CHECK(w.takes(K) && !w.is_int8() && w.is_int4() == weights[0].is_int4(),
                "x has ", K, " features; the weights must take them and be all bf16 or all int4");
    N.push_back(w.data.size(0));
  }
  const std::vector<const float*> no_bias(weights.size(), nullptr);
  if (weights[0].is_int4()) {
    std::vector<Int4Matrix> W;
    for (size_t m = 0; m < weights.size(); m++) W.push_back(int4_matrix(weights[m], 0, N[m], K));
    return linear_impl(x, W, N, no_bias);
  }
  std::vector<Bf16Matrix> W;
  for (size_t m = 0; m < weights.size(); m++) W.push_back(bf16_matrix(weights[m], 0, N[m], K));
  return linear_impl(x, W, N, no_bias);
}

// The MoE block's experts for a few bf16 tokens: out[t] = sum_k w[t,k] * down_e(silu(gate_e(x_t))
// * up_e(x_t)), e = idx[t,k]. gate_up (E, 2I, H) holds each expert's gate rows then its up rows;
// down (E, H, I). Only chosen experts are read, each once for all of its tokens.
torch::Tensor moe(torch::Tensor x, torch::Tensor gate_up, torch::Tensor down, torch::Tensor idx,
                  torch::Tensor weights, c10::optional<torch::Tensor> gate_up_scale,
                  c10::optional<torch::Tensor> gate_up_sum, c10::optional<torch::Tensor> down_scale,
                  c10::optional<torch::Tensor> down_sum) {
  check(x, "x", 2, torch::kBFloat16);
  const Weights gu = weights_from(gate_up, gate_up_scale, gate_up_sum, 3, "gate_up");
  const Weights dn = weights_from(down, down_scale, down_sum, 3, "down");
  const int64_t H = x.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gu.takes(H) && down.size(0) == E && down.size(1) == H && dn.takes(I) &&
                  gate_up.scalar_type() == down.scalar_type(),
              "expert weights do not match x or each other");
  TORCH_CHECK(idx.dim() == 2 && idx.size(0) == x.size(0) && weights.sizes() == idx.sizes(),
              "indices and weights must both be (tokens, top_k)");
  torch::Tensor out;
  if (gu.is_int8()) {
    out = moe_impl<Int8Matrix>(
        x, E, I, [&](int64_t e) { return int8_matrix(gu, e, 2 * I, H); },
        [&](int64_t e) { return int8_matrix(dn, e, H, I); }, idx, weights);
  } else if (gu.is_int4()) {
    out = moe_impl<Int4Matrix>(
        x, E, I, [&](int64_t e) { return int4_matrix(gu, e, 2 * I, H); },
        [&](int64_t e) { return int4_matrix(dn, e, H, I); }, idx, weights);
  } else {
    out = moe_impl<Bf16Matrix>(
        x, E, I, [&](int64_t e) { return bf16_matrix(gu, e, 2 * I, H); },
        [&](int64_t e) { return bf16_matrix(dn, e, H, I); }, idx, weights);
  }
  return out.to(torch::kBFloat16);
}

// Grouped products for prefill and training: out (S, N) holds the rows of x (S, K) in
// consecutive groups, group e (counts[e] rows) times weight[e] (E, N, K) transposed. The groups
// run side by side, each a whole oneDNN GEMM on one thread (nested in this parallel region, it
// runs single-threaded), largest first. With ~64-128 rows per expert that beats splitting each
// small GEMM over the threads, which pays a synchronisation per expert and shares out too
// little work.
// Runs f(e, first row, rows) for every group that has rows, largest first, side by side.
template <class F>
void for_each_group(const torch::Tensor& counts, int64_t rows, const F& f) {
  TORCH_CHECK(counts.dim() == 1, "counts must be 1-d");
  auto count64 = counts.to(torch::kInt64).contiguous();
  const int64_t* count = count64.data_ptr<int64_t>();
  const int64_t E = counts.size(0);
  std::vector<int64_t> start(E + 1, 0), order;
  for (int64_t e = 0; e < E; e++) {
    start[e + 1] = start[e] + count[e];
    if (count[e]) order.push_back(e);
  }
  TORCH_CHECK(start[E] == rows, "counts sum to ", start[E], " but there are ", rows, " rows");
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return count[a] > count[b]; });
  parallel_items((int64_t)order.size(), [&](int64_t i) {
    // Below autograd, which refuses out= arguments that require grad even when no graph is
    // recorded (the Python side owns the gradients). The guard is thread-local: per item.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t e = order[i];
    f(e, start[e], count[e]);
  });
}

// The dtype of GemmValue, what x and dequantised weights go into the back end's GEMM as.
const auto kGemmType = kBf16Gemm ? torch::kBFloat16 : torch::kFloat32;

// out = x @ w (+ bias), into `out` (a view may be): oneDNN's GEMM, unless the operands are bf16
// and the back end has no bf16 GEMM (kBf16Gemm): without bf16 instructions oneDNN emulates
// bf16 products hundreds of times slower than float32 ones (docs/inference.md), so there the
// operands are widened to float32 (exactly; float32 ones, such as dequantised tiles, stay as
// they are) and the float32 sums rounded once into a bf16 `out`, as a bf16 GEMM rounds them.
void gemm_out(torch::Tensor out, const torch::Tensor& x, const torch::Tensor& w,
              const torch::Tensor& bias = {}) {
  const auto type = x.scalar_type();
  if (type == out.scalar_type() && (kBf16Gemm || type != torch::kBFloat16)) {
    if (bias.defined()) {
      at::addmm_out(out, bias, x, w);
    } else {
      at::mm_out(out, x, w);
    }
    return;
  }
  const auto wide = [](const torch::Tensor& t) { return t.to(torch::kFloat32); };
  out.copy_(bias.defined() ? at::addmm(wide(bias), wide(x), wide(w)) : at::mm(wide(x), wide(w)));
}

// Weight rows per tile of a tiled product: a dequantised tile (at most 2 MB) stays in the
// core's caches for the GEMM that reads it, where a whole dequantised matrix (8 MB in bf16)
// would go out to memory and back; 1 MB tiles (this L2's size on AMD's Zen 4) were slower, each
// GEMM call having its own fixed cost.
constexpr int64_t kTileBytes = 2 << 20;
inline int64_t tile_rows(int64_t N, int64_t K) {
  return std::max<int64_t>(16, std::min<int64_t>(N, kTileBytes / (sizeof(GemmValue) * K)));
}

// Rows [r0, r0 + rows) of matrix e of an (E, N, *) weight, E = 1 for a 2-d one, as rows of K
// GemmValues: int8 with `scale` (E, N) float32 per row, or packed int4 with `scale`
// (E, N, Kp / 32) float16, rounded as olmoe.quantize rounds (bf16(float(q) * scale)); or bf16
// (no scale), widened where the back end multiplies float32.
void dequantize_tile(const torch::Tensor& weight, const torch::Tensor& scale, int64_t e,
                     int64_t r0, int64_t rows, int64_t K, GemmValue* to) {
  const int64_t N = weight.size(-2), first_row = e * N + r0;
  if (weight.scalar_type() == torch::kBFloat16) {
    const auto matrix = weight.dim() == 3 ? weight[e] : weight;
    torch::from_blob(to, {rows, K}, weight.options().dtype(kGemmType))
        .copy_(matrix.narrow(0, r0, rows));
    return;
  }
  if (weight.scalar_type() == torch::kByte) {
    const int64_t Kp = int4_padded(K);
    dequantize_int4_rows(weight.data_ptr<uint8_t>() + first_row * Kp / 2,
                         scale.data_ptr<c10::Half>() + first_row * Kp / kInt4Group, Kp, K, rows,
                         to);
    return;
  }
  dequantize_int8_rows(weight.data_ptr<int8_t>() + first_row * K,
                       scale.data_ptr<float>() + first_row, K, rows, to);
}

// out[:, r0 : r0 + rows] = x (n, K) @ those rows^T (+ bias[r0 : r0 + rows]), dequantised (or
// widened) into `buffer` (at least rows x K, kGemmType) and multiplied by oneDNN's GEMM on the
// calling thread; x is in kGemmType too (widened once per product, not per tile).
void quantized_tile(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& scale,
                    const torch::Tensor& bias, int64_t e, int64_t r0, int64_t rows,
                    torch::Tensor& buffer, torch::Tensor& out) {
  const int64_t K = x.size(1);
  dequantize_tile(weight, scale, e, r0, rows, K, static_cast<GemmValue*>(buffer.data_ptr()));
  auto part = out.narrow(1, r0, rows);
  const auto tile = buffer.narrow(0, 0, rows * K).view({rows, K}).t();
  gemm_out(part, x, tile, bias.defined() ? bias.narrow(0, r0, rows) : bias);
}

// x (n, K) @ weight[e]^T into out (n, N), on the calling thread: bf16 (or float32) weights by
// one oneDNN GEMM where the back end multiplies them as they are; quantised ones, and bf16 ones
// to be multiplied in float32, a tile at a time, so that a layer's experts never exist
// dequantised or widened all at once (and each tile stays in the core's caches).
void expert_product(const torch::Tensor& x, const torch::Tensor& weight,
                    const c10::optional<torch::Tensor>& scale, int64_t e, torch::Tensor out) {
  const auto type = weight.scalar_type();
  const bool quantised = type == torch::kByte || type == torch::kChar;
  if (!quantised && (kBf16Gemm || type != torch::kBFloat16)) {
    gemm_out(out, x, weight[e].t());
    return;
  }
  const int64_t K = x.size(1), N = weight.size(1), tile = tile_rows(N, K);
  const auto operand = x.to(kGemmType);
  const auto tile_scale = scale.value_or(torch::Tensor());
  auto buffer = torch::empty({tile * K}, x.options().dtype(kGemmType));
  for (int64_t r0 = 0; r0 < N; r0 += tile)
    quantized_tile(operand, weight, tile_scale, {}, e, r0, std::min(tile, N - r0), buffer, out);
}

// Whether a grouped (E, N, *) weight fits rows of K inputs; checks a quantised one's scales.
bool grouped_weight_takes(const torch::Tensor& weight, const c10::optional<torch::Tensor>& scale,
                          int64_t K, const char* name) {
  const auto type = weight.scalar_type();
  if (type == torch::kByte) return weights_from(weight, scale, c10::nullopt, 3, name).takes(K);
  if (type == torch::kChar) {
    TORCH_CHECK(scale.has_value(), name, ": int8 weights need their scale");
    check(weight, name, 3, torch::kChar);
    check(*scale, "scale", 2, torch::kFloat32);
  }
  return weight.dim() == 3 && weight.size(2) == K;
}

torch::Tensor grouped_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor counts,
                             c10::optional<torch::Tensor> scale) {
  const bool quantised = weight.scalar_type() == torch::kChar || weight.scalar_type() == torch::kByte;
  TORCH_CHECK(x.dim() == 2 && grouped_weight_takes(weight, scale, x.size(1), "weight") &&
                  (quantised ? x.scalar_type() == torch::kBFloat16 : x.scalar_type() == weight.scalar_type()) &&
                  counts.size(0) == weight.size(0),
              "x (S, K), weight (E, N, K) and counts (E,) must match");
  auto out = torch::empty({x.size(0), weight.size(1)}, x.options());
  for_each_group(counts, x.size(0), [&](int64_t e, int64_t first_row, int64_t n) {
    expert_product(x.narrow(0, first_row, n), weight, scale, e, out.narrow(0, first_row, n));
  });
  return out;
}

// The experts of a prefill (inference) in one pass per expert: for the routing slots of each
// expert (`slot_order`, the flat slots t * K + k sorted by expert, counts[e] of them for expert
// e), gather the tokens' rows of x (T, H), gate/up GEMM, silu(gate) * up, down GEMM, times each
// slot's routing weight; every result row lands at its slot in the returned (T * K, H). The same
// GEMMs and elementwise ATen ops as moe.grouped_experts' separate steps, so the same bits, but
// each expert's intermediates stay in its thread's caches and no pass over all slots is serial.
torch::Tensor grouped_experts(torch::Tensor x, torch::Tensor gate_up, torch::Tensor down,
                              torch::Tensor slot_order, torch::Tensor counts,
                              torch::Tensor top_k_weights, c10::optional<torch::Tensor> gate_up_scale,
                              c10::optional<torch::Tensor> down_scale) {
  check(x, "x", 2, torch::kBFloat16);
  const int64_t T = x.size(0), H = x.size(1), K = top_k_weights.size(1), S = T * K;
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3, "gate_up and down must be 3-d");
  const int64_t E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(grouped_weight_takes(gate_up, gate_up_scale, H, "gate_up") &&
                  grouped_weight_takes(down, down_scale, I, "down") &&
                  gate_up.size(1) == 2 * I && down.size(0) == E && down.size(1) == H &&
                  counts.size(0) == E,
              "gate_up (E, 2I, H), down (E, H, I) and counts (E,) must match x (T, H)");
  TORCH_CHECK(top_k_weights.dim() == 2 && top_k_weights.size(0) == T &&
                  top_k_weights.scalar_type() == torch::kBFloat16 && slot_order.numel() == S,
              "top_k_weights must be bf16 (T, K) and slot_order hold T * K slots");
  const auto order64 = slot_order.to(torch::kInt64).contiguous();
  const int64_t* slot = order64.data_ptr<int64_t>();
  for (int64_t j = 0; j < S; j++)
    TORCH_CHECK(slot[j] >= 0 && slot[j] < S, "slot_order holds ", slot[j], ", not a slot");
  const auto mix = top_k_weights.contiguous().view({S, 1});
  auto out = torch::empty({S, H}, x.options());
  const bf16* X = reinterpret_cast<const bf16*>(x.data_ptr());
  for_each_group(counts, S, [&](int64_t e, int64_t first_row, int64_t n) {
    const int64_t* slots = slot + first_row;
    auto rows = torch::empty({n, H}, x.options());
    bf16* R = reinterpret_cast<bf16*>(rows.data_ptr());
    for (int64_t j = 0; j < n; j++) std::copy_n(X + (slots[j] / K) * H, H, R + j * H);
    auto gate_and_up = torch::empty({n, 2 * I}, x.options());
    expert_product(rows, gate_up, gate_up_scale, e, gate_and_up);
    const auto act = at::silu(gate_and_up.narrow(1, 0, I)).mul_(gate_and_up.narrow(1, I, I));
    auto y = torch::empty({n, H}, x.options());
    expert_product(act, down, down_scale, e, y);
    y.mul_(mix.index_select(0, order64.narrow(0, first_row, n)));  // y * weight, rounded once
    const bf16* Y = reinterpret_cast<const bf16*>(y.data_ptr());
    bf16* O = reinterpret_cast<bf16*>(out.data_ptr());
    for (int64_t j = 0; j < n; j++) std::copy_n(Y + j * H, H, O + slots[j] * H);
  });
  return out;
}

// The weight gradient of grouped_linear: (E, N, K), group e's grad (n, N) transposed times its
// x rows (n, K); zero for groups without rows.
torch::Tensor grouped_weight_grad(torch::Tensor grad, torch::Tensor x, torch::Tensor counts) {
  TORCH_CHECK(grad.dim() == 2 && x.dim() == 2 && grad.size(0) == x.size(0) &&
                  grad.scalar_type() == x.scalar_type(),
              "grad (S, N) and x (S, K) must match in rows and dtype");
  auto out = torch::zeros({counts.size(0), grad.size(1), x.size(1)}, x.options());
  for_each_group(counts, x.size(0), [&](int64_t e, int64_t first, int64_t n) {
    auto slice = out[e];
    gemm_out(slice, grad.narrow(0, first, n).t(), x.narrow(0, first, n));
  });
  return out;
}

// ----------------------------------------------------------------- the LM head's training loss
// exp(h @ weight.T - shift) for a chunk of positions in one pass, with each row's sum and the
// largest exponent: the logits never reach memory, only their exponentials, which
// olmoe/head_loss.py turns into the loss and both gradients. A tile of kExpRows positions by
// two vectors of vocabulary ids is summed over the hidden size in registers and exponentiated
// there; each thread packs kExpPanels tiles' worth of weight rows (transposed, so that every k
// is two loads) and runs all positions against them before packing the next.
using F = FloatLanes;
constexpr int kExpRows = 6;  // 12 accumulators, 2 weight vectors and a broadcast: AVX2's 16
constexpr int kExpCols = 2 * F::kLanes;
constexpr int64_t kExpPanels = 8;

// One tile: out[i][j] = exp(h[i] . panel[:, j] - shift[i]) for the first `valid` columns,
// their sums added to row i's lanes in `sums`, the exponents' maximum into `top`.
template <int MR>
inline void exp_tile(const float* h, int64_t K, const float* panel, const float* shift,
                     float* out, int64_t ldo, int64_t valid, float* sums, F::Vec& top) {
  F::Vec acc[MR][2];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = F::broadcast(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const F::Vec w0 = F::load(panel + k * kExpCols);
    const F::Vec w1 = F::load(panel + k * kExpCols + F::kLanes);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {  // unrolled, so that acc stays in registers
      const F::Vec a = F::broadcast(h[i * K + k]);
      acc[i][0] = F::fmadd(a, w0, acc[i][0]);
      acc[i][1] = F::fmadd(a, w1, acc[i][1]);
    }
  }
  alignas(64) float part[kExpCols];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    const F::Vec c = F::broadcast(shift[i]);
    F::Vec x0 = F::sub(acc[i][0], c), x1 = F::sub(acc[i][1], c);
    if (valid < kExpCols) {  // the vocabulary's last tile: ids beyond it count for nothing
      F::store(part, x0);
      F::store(part + F::kLanes, x1);
      std::fill(part + valid, part + kExpCols, -INFINITY);
      x0 = F::load(part);
      x1 = F::load(part + F::kLanes);
    }
    top = F::max(top, F::max(x0, x1));
    const F::Vec e0 = F::exp(x0), e1 = F::exp(x1);  // exp clamps -inf to -88: 0
    float* row = out + i * ldo;
    if (valid == kExpCols) {
      F::store(row, e0);
      F::store(row + F::kLanes, e1);
    } else {
      F::store(part, e0);
      F::store(part + F::kLanes, e1);
      std::copy_n(part, valid, row);
    }
    float* lanes = sums + i * F::kLanes;
    F::store(lanes, F::add(F::load(lanes), F::add(e0, e1)));
  }
}

// exp(h @ weight.T - shift[:, None]) (R, V) float32, its row sums (R,), and the largest
// element of h @ weight.T - shift[:, None]: h (R, K), weight (V, K), shift (R,), float32.
std::tuple<torch::Tensor, torch::Tensor, double> exp_logits(torch::Tensor h, torch::Tensor weight,
                                                            torch::Tensor shift) {
  check(h, "h", 2, torch::kFloat32);
  check(weight, "weight", 2, torch::kFloat32);
  check(shift, "shift", 1, torch::kFloat32);
  const int64_t R = h.size(0), K = h.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && shift.size(0) == R,
              "h (R, K), weight (V, K) and shift (R,) must agree in R and K");
  auto out = torch::empty({R, V}, h.options());
  const int64_t panels = (V + kExpCols - 1) / kExpCols;
  const int64_t groups = (panels + kExpPanels - 1) / kExpPanels;
  const int threads = at::get_num_threads();
  std::vector<float> sums(threads * R * F::kLanes, 0.0f), tops(threads, -INFINITY);
  const float *hp = h.data_ptr<float>(), *wp = weight.data_ptr<float>();
  const float* sp = shift.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    float* thread_sums = sums.data() + at::get_thread_num() * R * F::kLanes;
    F::Vec top = F::broadcast(-INFINITY);
    std::vector<float> pack(kExpPanels * K * kExpCols);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kExpPanels, count = std::min(kExpPanels, panels - first);
      for (int64_t p = 0; p < count; ++p) {
        float* panel = pack.data() + p * K * kExpCols;
        for (int j = 0; j < kExpCols; ++j) {
          const int64_t v = (first + p) * kExpCols + j;
          for (int64_t k = 0; k < K; ++k) panel[k * kExpCols + j] = v < V ? wp[v * K + k] : 0.0f;
        }
      }
      for (int64_t r = 0; r < R; r += kExpRows) {
        for (int64_t p = 0; p < count; ++p) {
          const int64_t v = (first + p) * kExpCols, valid = std::min<int64_t>(kExpCols, V - v);
          const float* panel = pack.data() + p * K * kExpCols;
          float* tile_sums = thread_sums + r * F::kLanes;
          switch (std::min<int64_t>(kExpRows, R - r)) {
#define OLMOE_EXP_TILE(MR)                                                                   \
  case MR:                                                                                   \
    exp_tile<MR>(hp + r * K, K, panel, sp + r, op + r * V + v, V, valid, tile_sums, top); \
    break;
            OLMOE_EXP_TILE(6) OLMOE_EXP_TILE(5) OLMOE_EXP_TILE(4)
            OLMOE_EXP_TILE(3) OLMOE_EXP_TILE(2) OLMOE_EXP_TILE(1)
#undef OLMOE_EXP_TILE
          }
        }
      }
    }
    float& thread_top = tops[at::get_thread_num()];
    thread_top = std::max(thread_top, F::top(top));
  });
  auto row_sums = torch::zeros({R}, h.options());
  float* rs = row_sums.data_ptr<float>();
  for (int t = 0; t < threads; ++t)
    for (int64_t r = 0; r < R; ++r) rs[r] += F::sum(F::load(sums.data() + (t * R + r) * F::kLanes));
  return {out, row_sums, *std::max_element(tops.begin(), tops.end())};
}

// RMSNorm of a few bf16 rows, rounding where the PyTorch module does: the normalised row is
// rounded to bf16, then multiplied by the weight and rounded again.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check(x, "x", 2, torch::kBFloat16);
  check(weight, "weight", 1, torch::kBFloat16);
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.size(0) == H, "weight has ", weight.size(0), " entries for rows of ", H);
  auto out = torch::empty_like(x);
  const c10::BFloat16* X = x.data_ptr<c10::BFloat16>();
  const c10::BFloat16* W = weight.data_ptr<c10::BFloat16>();
  c10::BFloat16* O = out.data_ptr<c10::BFloat16>();
  for (int64_t t = 0; t < T; t++) {
    float sum = 0.0f;
    for (int64_t h = 0; h < H; h++) sum += (float)X[t * H + h] * (float)X[t * H + h];
    const float inv = 1.0f / std::sqrt(sum / (float)H + (float)eps);
    for (int64_t h = 0; h < H; h++)
      O[t * H + h] = c10::BFloat16((float)W[h] * (float)c10::BFloat16((float)X[t * H + h] * inv));
  }
  return out;
}

// Attention of one new query per sequence over the cached keys: q (B, N, D); k, v (B, G, P, D)
// with any strides but the last (views of the cache); mask (B, P) additive float32 or empty.
// Scores (exact bf16 products, float32 sums), softmax and the weighted sum in float32; heads
// share key/value heads in groups. Vectorised: at a few hundred cached positions a scalar loop
// here cost as much as streaming a tenth of the layer's weights.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               c10::optional<torch::Tensor> mask, double scale) {
  check(q, "q", 3, torch::kBFloat16);
  TORCH_CHECK(k.scalar_type() == torch::kBFloat16 && v.scalar_type() == torch::kBFloat16 &&
                  k.dim() == 4 && v.sizes() == k.sizes() && k.stride(3) == 1 && v.stride(3) == 1,
              "k and v must be bf16 (B, G, P, D) with contiguous rows");
  const int64_t B = q.size(0), N = q.size(1), D = q.size(2), G = k.size(1), P = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && N % G == 0, "q, k and v do not match");
  const float* M = nullptr;
  torch::Tensor mask32;
  if (mask.has_value()) {
    mask32 = mask->to(torch::kFloat32).contiguous();
    TORCH_CHECK(mask32.numel() == B * P, "mask must be (B, P)");
    M = mask32.data_ptr<float>();
  }
  auto out = torch::empty_like(q);
  const bf16* Q = reinterpret_cast<const bf16*>(q.data_ptr());
  const bf16* Kp = reinterpret_cast<const bf16*>(k.data_ptr());
  const bf16* Vp = reinterpret_cast<const bf16*>(v.data_ptr());
  bf16* O = reinterpret_cast<bf16*>(out.data_ptr());
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(P);
    for (int64_t bn = begin; bn < end; bn++) {
      const int64_t b = bn / N, g = (bn % N) / (N / G);
      const bf16* K0 = Kp + b * k.stride(0) + g * k.stride(1);
      const bf16* V0 = Vp + b * v.stride(0) + g * v.stride(1);
      attend(Q + bn * D, K0, k.stride(2), V0, v.stride(2), P, D, (float)scale,
             M ? M + b * P : nullptr, score.data(), O + bn * D);
    }
  });
  return out;
}

// ------------------------------------------------------------------------- decoder layer
// a + b for bf16 tensors of one shape, rounded once (PyTorch's bf16 add).
torch::Tensor add_bf16(const torch::Tensor& a, const torch::Tensor& b) {
  auto out = torch::empty_like(a);
  const bf16* A = reinterpret_cast<const bf16*>(a.data_ptr());
  const bf16* B = reinterpret_cast<const bf16*>(b.data_ptr());
  bf16* O = reinterpret_cast<bf16*>(out.data_ptr());
  const int64_t n = a.numel();
  add_to_bf16(A, B, O, n);
  return out;
}

// Rotary embedding of x (B, heads * D) in place, rounding as PyTorch's bf16 ops do in
// `x * cos + rotate_half(x) * sin`: each product once, then the sum.
void rotate_in_place(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                     int64_t D) {
  const int64_t B = x.size(0), heads = x.size(1) / D, half = D / 2;
  auto* X = x.data_ptr<c10::BFloat16>();
  const auto* C = cos.data_ptr<c10::BFloat16>();
  const auto* S = sin.data_ptr<c10::BFloat16>();
  std::vector<float> row(D);
  for (int64_t b = 0; b < B; b++)
    for (int64_t h = 0; h < heads; h++) {
      c10::BFloat16* v = X + (b * heads + h) * D;
      for (int64_t d = 0; d < D; d++) row[d] = (float)v[d];
      for (int64_t d = 0; d < D; d++) {
        const float rotated = d < half ? -row[d + half] : row[d - half];
        const float a = (float)c10::BFloat16(row[d] * (float)C[b * D + d]);
        const float c = (float)c10::BFloat16(rotated * (float)S[b * D + d]);
        v[d] = c10::BFloat16(a + c);
      }
    }
}

// One OLMoE decoder layer for one new token per sequence (decoding), in one call: the same
// operations, in the same order and with the same bf16 roundings, as OlmoeDecoderLayer's
// PyTorch path, without a Python round trip per operation. x (B, H) bf16; attention weights
// bf16 or int4 (with scales) without bias; experts bf16, int8 (with scales and row sums) or int4
// (with scales). The new key and value
// are written at each row's own position (B,) of the (B, G, C, D) caches, and attention runs
// over the first kv_length positions (a mask hides what a row has not written).
// Returns the layer's output (B, H) and the router's logits (B, E).
std::vector<torch::Tensor> decode_layer(
    torch::Tensor x, torch::Tensor input_norm, torch::Tensor q_weight, torch::Tensor k_weight,
    torch::Tensor v_weight, torch::Tensor o_weight, torch::Tensor q_norm, torch::Tensor k_norm,
    torch::Tensor post_norm, torch::Tensor router, torch::Tensor gate_up, torch::Tensor down,
    c10::optional<torch::Tensor> gate_up_scale, c10::optional<torch::Tensor> gate_up_sum,
    c10::optional<torch::Tensor> down_scale, c10::optional<torch::Tensor> down_sum,
    torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache, torch::Tensor v_cache,
    torch::Tensor positions, int64_t kv_length, c10::optional<torch::Tensor> mask, double eps,
    double clip_qkv, int64_t top_k, bool norm_topk_prob,
    const std::vector<c10::optional<torch::Tensor>>& attention_scales) {
  check(x, "x", 2, torch::kBFloat16);
  check(k_cache, "k_cache", 4, torch::kBFloat16);
  check(v_cache, "v_cache", 4, torch::kBFloat16);
  check(cos, "cos", 2, torch::kBFloat16);
  check(sin, "sin", 2, torch::kBFloat16);
  check(positions, "positions", 1, torch::kInt64);
  const int64_t B = x.size(0), G = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k_cache.size(0) == B && positions.size(0) == B && cos.size(1) == D &&
                  kv_length <= C,
              "caches, positions and rotary tables do not match x");
  const int64_t* position = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; b++)
    TORCH_CHECK(position[b] >= 0 && position[b] < kv_length, "position out of the cache");
  const c10::optional<torch::Tensor> none;

  // attention: h = x + o(attend(rope(norm(q(n))), rope(norm(k(n))), v(n))), n = norm(x)
  const auto n = rms_norm(x, input_norm, eps);
  const torch::Tensor* projections[4] = {&q_weight, &k_weight, &v_weight, &o_weight};
  std::vector<Weights> attention;
  for (int i = 0; i < 4; i++)
    attention.push_back(weights_from(*projections[i], attention_scales[i], none, 2, "attention"));
  const auto qkv = linears(n, {attention[0], attention[1], attention[2]});
  auto q = rms_norm(qkv[0], q_norm, eps);  // (B, N*D)
  auto k = rms_norm(qkv[1], k_norm, eps);  // (B, G*D)
  auto v = qkv[2];
  if (clip_qkv > 0) {
    q.clamp_(-clip_qkv, clip_qkv);
    k.clamp_(-clip_qkv, clip_qkv);
    v.clamp_(-clip_qkv, clip_qkv);
  }
  rotate_in_place(q, cos, sin, D);
  rotate_in_place(k, cos, sin, D);
  const auto write = [&](torch::Tensor& cache, const torch::Tensor& rows) {  // contiguous both
    const bf16* from = reinterpret_cast<const bf16*>(rows.data_ptr());
    bf16* to = reinterpret_cast<bf16*>(cache.data_ptr());
    for (int64_t b = 0; b < B; b++)
      for (int64_t g = 0; g < G; g++)
        std::copy_n(from + (b * G + g) * D, D, to + ((b * G + g) * C + position[b]) * D);
  };
  write(k_cache, k);
  write(v_cache, v);
  const auto attended =
      decode_attention(q.view({B, -1, D}), k_cache.narrow(2, 0, kv_length),
                       v_cache.narrow(2, 0, kv_length), mask, 1.0 / std::sqrt((double)D));
  const auto h = add_bf16(x, linear(attended.view({B, -1}), o_weight, none, attention_scales[3], none));

  // experts: out = h + moe(m), m = norm(h), routed by softmax(router(m)) over all experts
  const auto m = rms_norm(h, post_norm, eps);
  const auto logits = linear(m, router, none, none, none);  // (B, E)
  auto chosen = at::topk(at::softmax(logits, -1, torch::kFloat32), top_k);
  auto weights = std::get<0>(chosen);
  if (norm_topk_prob) weights = weights / weights.sum(-1, true);
  weights = weights.to(torch::kBFloat16);
  const auto indices = std::get<1>(chosen);
  const auto out = add_bf16(h, moe(m, gate_up, down, indices, weights, gate_up_scale,
                                   gate_up_sum, down_scale, down_sum));
  return {out, logits};
}

// Tensors per layer in decode_layers' `weights`: decode_layer's from input_norm to down (the
// required ones), then the four extras of quantised experts: gate_up's scale and row sums,
// down's scale and row sums (int8: all four; int4: the scales; bf16: none), then the scales of
// int4 q, k, v and o (none for bf16 attention).
constexpr size_t kRequiredWeights = 11, kExpertExtras = 4, kAttentionScales = 4;
constexpr size_t kWeightsPerLayer = kRequiredWeights + kExpertExtras + kAttentionScales;
constexpr size_t kFirstProjection = 1, kLastProjection = 4;  // q, k, v, o among the required

// Whether every layer's weights are what decode_layer takes (dtype, device, layout), checked
// before any layer writes its cache entries: weights that do not fit fall back to the per-module
// path instead of failing halfway through a step.
bool decode_weights_fit(const std::vector<c10::optional<torch::Tensor>>& weights) {
  for (size_t i = 0; i < weights.size(); i++) {
    const auto& w = weights[i];
    const size_t slot = i % kWeightsPerLayer;
    const auto experts = weights[i - slot + kRequiredWeights - 2]->scalar_type();
    const auto attention = weights[i - slot + kFirstProjection]->scalar_type();
    if (slot >= kRequiredWeights + kExpertExtras) {  // int4 attention's scales
      if (w.has_value() != (attention == torch::kByte)) return false;
      if (w.has_value() && !w->device().is_cpu()) return false;
      continue;
    }
    if (slot >= kRequiredWeights) {  // the experts' extras: scales, then row sums
      const bool scale = (slot - kRequiredWeights) % 2 == 0;
      const bool wanted = experts == torch::kChar || (experts == torch::kByte && scale);
      if (w.has_value() != wanted) return false;
      if (w.has_value() && !w->device().is_cpu()) return false;
      continue;
    }
    const bool expert = slot >= kRequiredWeights - 2;
    const bool projection = slot >= kFirstProjection && slot <= kLastProjection;
    if (expert && experts != torch::kChar && experts != torch::kByte &&
        experts != torch::kBFloat16)
      return false;
    if (projection && attention != torch::kByte && attention != torch::kBFloat16) return false;
    const auto wanted = expert ? experts : projection ? attention : torch::kBFloat16;
    if (!w.has_value() || !w->device().is_cpu() || !w->is_contiguous() ||
        w->scalar_type() != wanted)
      return false;
  }
  return true;
}

// Every decoder layer of one decode step, one after the other in one call. Returning to Python
// between layers is slow: the weights streamed through the caches evict the interpreter's
// state, so every attribute lookup there misses. Returns the
// last layer's output (B, H), then each layer's router logits (B, E); nothing when the weights
// no longer fit (see decode_weights_fit), before anything is written.
std::vector<torch::Tensor> decode_layers(
    torch::Tensor x, std::vector<c10::optional<torch::Tensor>> weights,
    std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, torch::Tensor cos,
    torch::Tensor sin, torch::Tensor positions, int64_t kv_length,
    c10::optional<torch::Tensor> mask, double eps, double clip_qkv, int64_t top_k,
    bool norm_topk_prob) {
  const size_t L = k_caches.size();
  TORCH_CHECK(v_caches.size() == L && weights.size() == kWeightsPerLayer * L,
              "decode_layers: ", kWeightsPerLayer, " weights and a key and a value cache per layer");
  for (size_t l = 0; l < L; l++)
    for (size_t i = 0; i < kRequiredWeights; i++)
      TORCH_CHECK(weights[l * kWeightsPerLayer + i].has_value(), "layer ", l, ": weight ", i,
                  " is missing");
  if (!decode_weights_fit(weights)) return {};
  std::vector<torch::Tensor> out{x};
  for (size_t l = 0; l < L; l++) {
    const c10::optional<torch::Tensor>* w = weights.data() + l * kWeightsPerLayer;
    const auto result = decode_layer(
        out[0], *w[0], *w[1], *w[2], *w[3], *w[4], *w[5], *w[6], *w[7], *w[8], *w[9], *w[10],
        w[11], w[12], w[13], w[14], cos, sin, k_caches[l], v_caches[l], positions, kv_length, mask,
        eps, clip_qkv, top_k, norm_topk_prob, {w[15], w[16], w[17], w[18]});
    out[0] = result[0];
    out.push_back(result[1]);
  }
  return out;
}

// y (T, N) = x (T, K) @ W^T (+ bias) for many bf16 rows x and a quantised W (int8 (N, K) with
// its float32 scale per row, or packed int4 with its float16 group scales): a prefill's linear
// layer. The threads share the tiles of W, each dequantising its tile into its own cache for
// its own GEMM: the dequantised matrix never goes out to memory.
torch::Tensor quantized_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor scale,
                               c10::optional<torch::Tensor> bias) {
  check(x, "x", 2, torch::kBFloat16);
  const int64_t N = weight.size(0), K = x.size(1);
  if (weight.scalar_type() == torch::kChar) {
    check(weight, "weight", 2, torch::kChar);
    check(scale, "scale", 1, torch::kFloat32);
    TORCH_CHECK(weight.size(1) == K && scale.size(0) == N, "int8 weight (N, K) and scale (N,) ",
                "must match x's ", K, " features");
  } else {
    TORCH_CHECK(weights_from(weight, scale, c10::nullopt, 2, "weight").takes(K),
                "weight must be packed int4 rows of ", K, " inputs");
  }
  torch::Tensor add;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "bias has ", bias->numel(), " entries for ", N, " outputs");
    add = bias->to(torch::kBFloat16).contiguous();
  }
  auto out = torch::empty({x.size(0), N}, x.options());
  const auto operand = x.to(kGemmType);
  const int64_t tile = tile_rows((N + at::get_num_threads() - 1) / at::get_num_threads(), K);
  parallel_items((N + tile - 1) / tile, [&](int64_t i) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in for_each_group
    auto buffer = torch::empty({tile * K}, x.options().dtype(kGemmType));
    const int64_t r0 = i * tile;
    quantized_tile(operand, weight, scale, add, 0, r0, std::min(tile, N - r0), buffer, out);
  });
  return out;
}

// y (T, N) = x (T, K) @ weight (N, K)^T (+ bias) for many bf16 rows and a bf16 weight, by the
// back end's GEMM (see gemm_out): the engine calls it where that is not oneDNN's bf16 GEMM.
torch::Tensor prefill_linear(torch::Tensor x, torch::Tensor weight,
                             c10::optional<torch::Tensor> bias) {
  check(x, "x", 2, torch::kBFloat16);
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16 &&
                  weight.device().is_cpu(),
              "weight must be a 2-d bf16 CPU tensor (any layout)");
  TORCH_CHECK(weight.size(1) == x.size(1), "x has ", x.size(1), " features, weight takes ",
              weight.size(1));
  torch::Tensor add;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == weight.size(0), "bias has ", bias->numel(), " entries for ",
                weight.size(0), " outputs");
    add = bias->to(torch::kBFloat16);
  }
  auto out = torch::empty({x.size(0), weight.size(0)}, x.options());
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in for_each_group
  gemm_out(out, x, weight.t(), add);
  return out;
}

// Reads `buffer` once with 512-bit loads on all threads; returns a checksum so that the reads
// cannot be optimised away. The benchmark times it to measure the memory read bandwidth.
int64_t read_all(torch::Tensor buffer) {
  TORCH_CHECK(buffer.is_contiguous() && buffer.nbytes() % 64 == 0 &&
                  reinterpret_cast<uintptr_t>(buffer.data_ptr()) % 64 == 0,
              "buffer: contiguous, 64-byte aligned, a multiple of 64 bytes");
  const auto* p = reinterpret_cast<const uint8_t*>(buffer.data_ptr());
  const int64_t n = buffer.nbytes() / 64;
  std::vector<int64_t> sums(at::get_num_threads(), 0);
  at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
    sums[at::get_thread_num()] ^= xor_lines(p, b, e);
  });
  int64_t total = 0;
  for (int64_t s : sums) total ^= s;
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ weight.T (+ bias) for a few bf16 rows; bf16, int8 or int4 weight");
  m.def("moe", &moe, "sparse MoE experts for a few bf16 tokens; bf16, int8 or int4 experts");
  m.def("quantized_linear", &quantized_linear, "x @ dequantised(weight).T, tile by tile");
  m.def("grouped_linear", &grouped_linear, "per-group x @ weight[e].T, the groups side by side");
  m.def("grouped_experts", &grouped_experts, "a prefill's experts, one pass per expert, side by side");
  m.def("grouped_weight_grad", &grouped_weight_grad, "per-group grad.T @ x, side by side");
  m.def("rms_norm", &rms_norm, "RMSNorm of a few bf16 rows");
  m.def("decode_attention", &decode_attention, "one query per sequence over the KV cache");
  m.def("decode_layers", &decode_layers, "every decoder layer for one new token per sequence");
  m.def("prefill_linear", &prefill_linear, "x @ weight.T (+ bias) by the back end's GEMM");
  m.def("exp_logits", &exp_logits, "exp(h @ weight.T - shift), its row sums and largest exponent");
  m.def("read_all", &read_all, "read a buffer once (memory bandwidth probe)");
  m.attr("bf16_gemm") = kBf16Gemm;  // whether bf16 products go to oneDNN as they are
}
