// What every kernel back end shares: the bf16 storage type, how many activation rows a
// pass over a weight row serves, and the packed int4 layout (olmoe.quantize.pack_int4).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int kMaxVectors = 8;  // activation rows multiplied per pass over a weight row

// Group-wise int4 (olmoe.quantize.pack_int4's layout): rows padded with zeros to a multiple of
// 512 inputs, one float16 scale per group of 32, each value stored as the nibble q + 8. In each
// 512-input block the 256 bytes are four chunks of 64: chunk p's low nibbles are "register"
// 2p, its high nibbles register 2p + 1, and byte c of register r holds input 32 (c / 4) + 4r +
// c % 4. One VNNI dot product with register r therefore adds four products of group l into
// 32-bit lane l; after the block's eight registers, lane l holds group l's whole integer dot
// product, which one multiply-add scales by the two groups' scales.
constexpr int64_t kInt4Block = 512, kInt4Group = 32, kInt4Groups = kInt4Block / kInt4Group;
inline int64_t int4_padded(int64_t k) { return (k + kInt4Block - 1) / kInt4Block * kInt4Block; }

// Activation rows for int4 weights, each group of 32 quantised to int8 with its own scale (the
// back ends' Int4Activations compute the values; this is where they go).
struct Int4ActivationRows {
  std::vector<int8_t> q;        // rows x Kp, in the weights' input order within each block
  std::vector<float> scale;     // rows x Kp / 32: the group's max |x| / 127
  std::vector<int32_t> offset;  // rows x Kp / 32: 8 x the sum of the group's q (the nibbles' + 8)
  int64_t K = 0, Kp = 0;
  void resize(int64_t rows, int64_t k) {
    K = k;
    Kp = int4_padded(k);
    q.assign(rows * Kp, 0);
    scale.assign(rows * Kp / kInt4Group, 0.0f);
    offset.assign(rows * Kp / kInt4Group, 0);
  }
  // Stores the group of row `row` that starts at input k: its 32 values in input order, their
  // scale and the sum of the values; input 4r + c of group l goes to byte 4l + c of register r.
  void put_group(int64_t row, int64_t k, const int8_t* values, float s, int32_t sum) {
    const int64_t g = row * Kp / kInt4Group + k / kInt4Group;
    scale[g] = s;
    offset[g] = 8 * sum;
    int8_t* block = q.data() + row * Kp + k / kInt4Block * kInt4Block;
    const int64_t lane = k % kInt4Block / kInt4Group;
    for (int r = 0; r < 8; r++) std::memcpy(block + 64 * r + 4 * lane, values + 4 * r, 4);
  }
};

}  // namespace
