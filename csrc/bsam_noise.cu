// bsam_noise: bSAM's noisy weights, backup = w; w += n / sqrt(num_data * s), in place (fp32 math).
//
// The standard normals n are not generated here: the op draws them with torch, one flat fp32
// buffer per bucket in row-major order (so every backend gives the same sample from the same
// generator state), and element i of the bucket reads noise[i], i being the position apply_chunk
// passes the op (the tensor's element_offset plus the element's index). The noise slice of a
// tensor starts wherever that running count puts it, so its loads are scalar (coalesced); w and s
// take the 128-bit path. The binding admits contiguous tensors only (storage order = row-major).
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

// Lists: 0 = params (in/out), 1 = backups (out), 2 = precisions (in).
struct BsamNoiseOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 2);
  static constexpr unsigned kStores = (1u << 0) | (1u << 1);
  const float* noise;
  float num_data;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t index) const {
    const float w = e[0];
    const float std = 1.0f / sqrtf(e[2] * num_data);  // correctly rounded (no fast math), as torch's CPU rsqrt
    e[1] = w;  // the exact stored value: T -> float -> T round-trips
    e[0] = w + std * noise[index];
  }
};

template <typename T>
struct BsamNoiseBody {
  using Meta = TensorListMeta<3>;

  static __host__ __device__ void run(const Meta& meta, const BsamNoiseOp& op, int block, int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    BsamNoiseOp local = op;
    apply_chunk<3, T>(meta, c, tid, nthreads, local);
  }
};

template <typename T, class Exec>
cudaError_t bsam_noise_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n, const BsamNoiseOp& op) {
  using Body = BsamNoiseBody<T>;
  return for_each_launch<3>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, op);
  });
}

template <class Exec>
cudaError_t launch_bsam_noise(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                              const float* noise, float num_data) {
  if (noise == nullptr || !(num_data >= 1.0f)) return cudaErrorInvalidValue;
  const BsamNoiseOp op{noise, num_data};
  switch (dtype) {
    case DType::kFloat32:
      return bsam_noise_typed<float>(exec, rows, numels, n, op);
    case DType::kFloat16:
      return bsam_noise_typed<__half>(exec, rows, numels, n, op);
    case DType::kBFloat16:
      return bsam_noise_typed<__nv_bfloat16>(exec, rows, numels, n, op);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t bsam_noise(DType dtype, void* const* rows, const int64_t* numels, int n, const float* noise,
                       float num_data, cudaStream_t stream) {
  return launch_bsam_noise(DeviceExec{stream}, dtype, rows, numels, n, noise, num_data);
}
#endif

}  // namespace cuda
}  // namespace fastsam
