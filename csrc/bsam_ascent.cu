// bsam_ascent: bSAM's ascent from the clean weights, w = backup + rho d / s and h = sqrt(s) |g|
// (d = g, or backup^2 g when adaptive), fp32 math. The noisy weights it overwrites are not read.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

// Lists: 0 = params (out), 1 = backups, 2 = grads, 3 = precisions (in), 4 = scales h (out).
template <bool kAdaptive>
struct BsamAscentOp {
  static constexpr unsigned kLoads = (1u << 1) | (1u << 2) | (1u << 3);
  static constexpr unsigned kStores = (1u << 0) | (1u << 4);
  float rho;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    const float w0 = e[1];
    const float g = e[2];
    const float s = e[3];
    float d = g * rho;
    if constexpr (kAdaptive) d = d * (w0 * w0);
    e[0] = d / s + w0;
    e[4] = sqrtf(s) * fabsf(g);
  }
};

template <typename T, bool kAdaptive>
struct BsamAscentBody {
  using Meta = TensorListMeta<5>;

  static __host__ __device__ void run(const Meta& meta, float rho, int block, int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    BsamAscentOp<kAdaptive> op{rho};
    apply_chunk<5, T>(meta, c, tid, nthreads, op);
  }
};

template <typename T, bool kAdaptive, class Exec>
cudaError_t bsam_ascent_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n, float rho) {
  using Body = BsamAscentBody<T, kAdaptive>;
  return for_each_launch<5>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, rho);
  });
}

template <typename T, class Exec>
cudaError_t bsam_ascent_adaptive(const Exec& exec, void* const* rows, const int64_t* numels, int n, float rho,
                                 bool adaptive) {
  return adaptive ? bsam_ascent_typed<T, true>(exec, rows, numels, n, rho)
                  : bsam_ascent_typed<T, false>(exec, rows, numels, n, rho);
}

template <class Exec>
cudaError_t launch_bsam_ascent(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                               float rho, bool adaptive) {
  switch (dtype) {
    case DType::kFloat32:
      return bsam_ascent_adaptive<float>(exec, rows, numels, n, rho, adaptive);
    case DType::kFloat16:
      return bsam_ascent_adaptive<__half>(exec, rows, numels, n, rho, adaptive);
    case DType::kBFloat16:
      return bsam_ascent_adaptive<__nv_bfloat16>(exec, rows, numels, n, rho, adaptive);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t bsam_ascent(DType dtype, void* const* rows, const int64_t* numels, int n, float rho, bool adaptive,
                        cudaStream_t stream) {
  return launch_bsam_ascent(DeviceExec{stream}, dtype, rows, numels, n, rho, adaptive);
}
#endif

}  // namespace cuda
}  // namespace fastsam
