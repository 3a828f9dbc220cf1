// Philox-4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011), reduced to
// what ESAM's stochastic weight perturbation needs: the first output word for one counter, mapped
// to [0, 1) exactly as Triton's tl.rand(seed, offset) maps it.
//
// [note: one generator for every backend]
// key = (seed_lo, seed_hi), counter = (offset_lo, offset_hi, 0, 0); the uniform is
// float(x') * 4.6566127342e-10f where x' is the first output reinterpreted as int32 and folded
// onto [0, 2^31) by x' -> -x' - 1 (= ~x') for negative values. fastsam/ops/_philox.py computes the
// same numbers with torch integer ops, and the host emulation test checks both agree bit for bit.
#pragma once

#include <cstdint>

#include "multi_tensor_apply.cuh"  // FASTSAM_UNROLL

namespace fastsam {
namespace cuda {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

__host__ __device__ __forceinline__ uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ uint32_t philox_first_word(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
FASTSAM_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint32_t hi_b = mul_hi_u32(kPhiloxRoundB, c2);
    const uint32_t lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mul_hi_u32(kPhiloxRoundA, c0);
    const uint32_t lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c2 = hi_a ^ c3 ^ k1;
    c1 = lo_b;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

__host__ __device__ __forceinline__ float philox_word_to_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;  // -x - 1 without the signed overflow at INT32_MIN
  return static_cast<float>(x) * 4.6566127342e-10f;
}

// u(seed, counter) in [0, 1): equal bit for bit to tl.rand(seed, counter).
__host__ __device__ __forceinline__ float philox_uniform(uint64_t seed, uint64_t counter) {
  return philox_word_to_uniform(philox_first_word(seed, counter));
}

}  // namespace cuda
}  // namespace fastsam
