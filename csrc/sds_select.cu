// sds_select: ESAM's sharpness-sensitive data selection (Du et al., ICLR 2022) in one launch.
//
// out[0..k) = the indices of the k largest s_i = after_i - before_i (fp32), ordered by decreasing
// s, ties by the lower index, NaN ranked as -inf (so NaN and -inf come last, in index order), -0
// equal to +0: exactly the order of the torch backend's stable descending sort.
//
// [note: rank by counting]
// Each sample gets a 64-bit key: the sharpness mapped to an order-preserving unsigned integer in
// the high half, (2^32 - 1 - index) in the low half. Keys are distinct and "larger key" means
// "earlier in the output", so rank_i = #{j : key_j > key_i} is a permutation of 0..B-1 and the
// kernel writes out[rank_i] = i whenever rank_i < k: exactly k writes, no atomics, no scratch
// memory, deterministic. Cost: B^2 key comparisons spread over ceil(B / 32) blocks, which is
// microseconds for the batch sizes SDS sees per device (up to a few thousand) and a fraction of a
// millisecond at the supported maximum of 65536.
#include <cstring>

#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

constexpr int kSdsLanes = 32;                        // samples ranked per block, one per lane
constexpr int kSdsGroups = 8;                        // warps sharing the comparisons of a block
constexpr int kSdsThreads = kSdsLanes * kSdsGroups;  // 256
constexpr int kSdsTile = 2048;                       // keys staged in shared memory at a time (16 KiB)

__host__ __device__ __forceinline__ uint32_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

// The sharpness as an unsigned integer with the same order: NaN -> -inf, -0 -> +0 first.
__host__ __device__ __forceinline__ uint32_t sortable_sharpness(float s) {
  if (s != s) s = -INFINITY;
  if (s == 0.0f) s = 0.0f;
  const uint32_t bits = float_bits(s);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__host__ __device__ __forceinline__ uint64_t sds_key(float sharpness, uint32_t index) {
  return (static_cast<uint64_t>(sortable_sharpness(sharpness)) << 32) | static_cast<uint64_t>(0xFFFFFFFFu - index);
}

template <typename T>
__host__ __device__ __forceinline__ uint64_t sample_key(const T* before, const T* after, int32_t i) {
  return sds_key(to_float(after[i]) - to_float(before[i]), static_cast<uint32_t>(i));
}

template <typename T>
__global__ void __launch_bounds__(kSdsThreads)
    sds_rank_kernel(const T* before, const T* after, int32_t batch, int32_t k, int64_t* out) {
  __shared__ uint64_t tile[kSdsTile];
  __shared__ int32_t above[kSdsGroups][kSdsLanes];
  const int lane = static_cast<int>(threadIdx.x) % kSdsLanes;
  const int group = static_cast<int>(threadIdx.x) / kSdsLanes;
  const int32_t i = static_cast<int32_t>(blockIdx.x) * kSdsLanes + lane;
  const uint64_t key = i < batch ? sample_key(before, after, i) : 0;
  int32_t count = 0;
  for (int32_t tile_start = 0; tile_start < batch; tile_start += kSdsTile) {
    const int32_t tile_len = batch - tile_start < kSdsTile ? batch - tile_start : kSdsTile;
    for (int32_t j = static_cast<int32_t>(threadIdx.x); j < tile_len; j += kSdsThreads) {
      tile[j] = sample_key(before, after, tile_start + j);
    }
    __syncthreads();
    // All lanes of a warp read the same slot (a broadcast); the warps split the tile.
    for (int32_t j = group; j < tile_len; j += kSdsGroups) count += tile[j] > key ? 1 : 0;
    __syncthreads();
  }
  above[group][lane] = count;
  __syncthreads();
  if (group == 0 && i < batch) {
    int32_t rank = 0;
    for (int g = 0; g < kSdsGroups; ++g) rank += above[g][lane];
    if (rank < k) out[rank] = i;
  }
}

// The same ranking, one sample at a time (host emulation for the tests).
template <typename T>
void sds_rank_host(const T* before, const T* after, int32_t batch, int32_t k, int64_t* out) {
  for (int32_t i = 0; i < batch; ++i) {
    const uint64_t key = sample_key(before, after, i);
    int32_t rank = 0;
    for (int32_t j = 0; j < batch; ++j) rank += sample_key(before, after, j) > key ? 1 : 0;
    if (rank < k) out[rank] = i;
  }
}

template <typename T, class Exec>
cudaError_t sds_select_typed(const Exec& exec, const void* before, const void* after, int32_t batch, int32_t k,
                             int64_t* out) {
  const T* b = static_cast<const T*>(before);
  const T* a = static_cast<const T*>(after);
  if constexpr (Exec::kHost) {
    sds_rank_host(b, a, batch, k, out);
    return cudaSuccess;
  } else {
    const int blocks = static_cast<int>((batch + kSdsLanes - 1) / kSdsLanes);
    sds_rank_kernel<T><<<blocks, kSdsThreads, 0, exec.stream>>>(b, a, batch, k, out);
    return cudaGetLastError();
  }
}

template <class Exec>
cudaError_t launch_sds_select(const Exec& exec, DType dtype, const void* before, const void* after, int32_t batch,
                              int32_t k, int64_t* out) {
  if (batch < 1 || batch > kMaxSdsSelectBatch || k < 1 || k > batch) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return sds_select_typed<float>(exec, before, after, batch, k, out);
    case DType::kFloat16:
      return sds_select_typed<__half>(exec, before, after, batch, k, out);
    case DType::kBFloat16:
      return sds_select_typed<__nv_bfloat16>(exec, before, after, batch, k, out);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t sds_select(DType dtype, const void* before, const void* after, int32_t batch, int32_t k, int64_t* out,
                       cudaStream_t stream) {
  return launch_sds_select(DeviceExec{stream}, dtype, before, after, batch, k, out);
}
#endif

}  // namespace cuda
}  // namespace fastsam
