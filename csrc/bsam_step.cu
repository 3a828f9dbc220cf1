// bsam_step: bSAM's update from the clean weights, fused with their restore (fp32 math):
//
//   w = backup
//   m = m + (1 - beta1) ((g_p + weight_decay w) - m)        (torch's lerp, weight < 0.5 form)
//   w = w - lr * (m / s)
//   s = s + (1 - beta2) ((h + damping + weight_decay) - s)
//
// lr may be a device scalar. The perturbed weights it overwrites are not read.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

// Lists: 0 = params (out), 1 = backups, 2 = grads (in), 3 = momenta, 4 = precisions (in/out), 5 = scales h (in).
struct BsamStepOp {
  static constexpr unsigned kLoads = (1u << 1) | (1u << 2) | (1u << 3) | (1u << 4) | (1u << 5);
  static constexpr unsigned kStores = (1u << 0) | (1u << 3) | (1u << 4);
  float lr;
  float one_minus_beta1;
  float one_minus_beta2;
  float weight_decay;
  float s_shift;  // damping + weight_decay

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    const float w = e[1];
    const float s = e[4];
    const float m = e[3] + one_minus_beta1 * ((e[2] + weight_decay * w) - e[3]);
    e[3] = m;
    e[0] = w - lr * (m / s);
    e[4] = s + one_minus_beta2 * ((e[5] + s_shift) - s);
  }
};

template <typename T>
struct BsamStepBody {
  using Meta = TensorListMeta<6>;

  static __host__ __device__ void run(const Meta& meta, const BsamStepConfig& config, int block, int tid,
                                      int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    BsamStepOp op{config.lr_ptr != nullptr ? *config.lr_ptr : config.lr, config.one_minus_beta1,
                  config.one_minus_beta2, config.weight_decay, config.s_shift};
    apply_chunk<6, T>(meta, c, tid, nthreads, op);
  }
};

template <typename T, class Exec>
cudaError_t bsam_step_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                            const BsamStepConfig& config) {
  using Body = BsamStepBody<T>;
  return for_each_launch<6>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, config);
  });
}

template <class Exec>
cudaError_t launch_bsam_step(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                             const BsamStepConfig& config) {
  switch (dtype) {
    case DType::kFloat32:
      return bsam_step_typed<float>(exec, rows, numels, n, config);
    case DType::kFloat16:
      return bsam_step_typed<__half>(exec, rows, numels, n, config);
    case DType::kBFloat16:
      return bsam_step_typed<__nv_bfloat16>(exec, rows, numels, n, config);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t bsam_step(DType dtype, void* const* rows, const int64_t* numels, int n, const BsamStepConfig& config,
                      cudaStream_t stream) {
  return launch_bsam_step(DeviceExec{stream}, dtype, rows, numels, n, config);
}
#endif

}  // namespace cuda
}  // namespace fastsam
