// What every kernel back end shares: the bf16 storage type, how many activation rows a
// pass over a weight row serves, and the packed int4 layout (olmoe.quantize.pack_int4).
#pragma once

#include <cstdint>

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

}  // namespace
