// sds_weights: the soft variant of ESAM's data selection, softmax(s / temperature) over the batch
// with s_i = after_i - before_i in fp32 and NaN sharpness mapped to -inf (weight 0).
//
// One block: a max reduction, a sum of exp(x - max), then the normalised weights, computed as
// torch.softmax computes them (exp(x - max) / sum). Both reductions use the fixed-shape tree of
// block_reduce, so the weights are bitwise reproducible.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

template <typename T>
struct SdsWeights {
  const T* before;
  const T* after;
  int64_t batch;  // 64-bit indices: `i += nthreads` must not overflow near INT32_MAX
  float temperature;

  __host__ __device__ __forceinline__ float logit(int64_t i) const {
    float s = to_float(after[i]) - to_float(before[i]);
    if (s != s) s = -INFINITY;
    return s / temperature;
  }
  __host__ __device__ float max_partial(int tid, int nthreads) const {
    float m = -INFINITY;
    for (int64_t i = tid; i < batch; i += nthreads) m = fmaxf(m, logit(i));
    return m;
  }
  __host__ __device__ float sum_partial(float max, int tid, int nthreads) const {
    float acc = 0.0f;
    for (int64_t i = tid; i < batch; i += nthreads) acc += expf(logit(i) - max);
    return acc;
  }
  __host__ __device__ void write(float max, float sum, float* out, int tid, int nthreads) const {
    for (int64_t i = tid; i < batch; i += nthreads) out[i] = expf(logit(i) - max) / sum;
  }
};

template <typename T>
__global__ void __launch_bounds__(kBlockSize) sds_weights_kernel(const SdsWeights<T> w, float* out) {
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  const float max = block_reduce(w.max_partial(tid, nthreads), MaxCombine());
  const float sum = block_reduce(w.sum_partial(max, tid, nthreads), SumCombine());
  w.write(max, sum, out, tid, nthreads);
}

template <typename T, class Exec>
cudaError_t sds_weights_typed(const Exec& exec, const void* before, const void* after, int64_t batch,
                              float temperature, float* out) {
  const SdsWeights<T> w{static_cast<const T*>(before), static_cast<const T*>(after), batch, temperature};
  if constexpr (Exec::kHost) {
    float slots[kBlockSize];
    for (int tid = 0; tid < kBlockSize; ++tid) slots[tid] = w.max_partial(tid, kBlockSize);
    const float max = host_block_reduce(slots, MaxCombine());
    for (int tid = 0; tid < kBlockSize; ++tid) slots[tid] = w.sum_partial(max, tid, kBlockSize);
    const float sum = host_block_reduce(slots, SumCombine());
    for (int tid = 0; tid < kBlockSize; ++tid) w.write(max, sum, out, tid, kBlockSize);
    return cudaSuccess;
  } else {
    sds_weights_kernel<T><<<1, kBlockSize, 0, exec.stream>>>(w, out);
    return cudaGetLastError();
  }
}

template <class Exec>
cudaError_t launch_sds_weights(const Exec& exec, DType dtype, const void* before, const void* after, int64_t batch,
                               float temperature, float* out) {
  if (batch < 1 || !(temperature > 0.0f)) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return sds_weights_typed<float>(exec, before, after, batch, temperature, out);
    case DType::kFloat16:
      return sds_weights_typed<__half>(exec, before, after, batch, temperature, out);
    case DType::kBFloat16:
      return sds_weights_typed<__nv_bfloat16>(exec, before, after, batch, temperature, out);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t sds_weights(DType dtype, const void* before, const void* after, int64_t batch, float temperature,
                        float* out, cudaStream_t stream) {
  return launch_sds_weights(DeviceExec{stream}, dtype, before, after, batch, temperature, out);
}
#endif

}  // namespace cuda
}  // namespace fastsam
