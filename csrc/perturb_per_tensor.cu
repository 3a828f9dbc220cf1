// perturb_per_tensor: backup = w; w += scales[t] * g, one device scale per tensor (layer-wise
// perturbation of AWP / WT-AWP / HERO, scales[t] = rho ||w_t|| / (||g_t|| + eps)).
//
// A tensor whose scale is not finite keeps its weights (its backup is still written), decided per
// block from the device value: no host synchronisation. Tensors must be non-empty (the Python op
// drops empty ones), so the launch's tensor index plus the tensors of earlier launches indexes
// `scales`.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct PerturbPerTensorArgs {
  const float* scales;
  int64_t tensor_base;  // index in `scales` of this launch's tensor 0
};

// Lists: 0 = params (in/out), 1 = grads, 2 = backups (out).
struct PerturbPerTensorOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1);  // the backup is only written
  static constexpr unsigned kStores = (1u << 0) | (1u << 2);
  float scale;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    e[2] = e[0];
    e[0] = e[0] + scale * e[1];
  }
};

template <typename T>
struct PerturbPerTensorBody {
  using Meta = TensorListMeta<3>;

  static __host__ __device__ void run(const Meta& meta, const PerturbPerTensorArgs& args, int block, int tid,
                                      int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    const float scale = args.scales[args.tensor_base + c.tensor];
    if (!is_finite(scale)) {
      CopyOp<0, 2> backup_only;
      apply_chunk<3, T>(meta, c, tid, nthreads, backup_only);
      return;
    }
    PerturbPerTensorOp op{scale};
    apply_chunk<3, T>(meta, c, tid, nthreads, op);
  }
};

template <typename T, class Exec>
cudaError_t perturb_per_tensor_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                     const float* scales) {
  int64_t tensor_base = 0;
  return for_each_launch<3>(rows, numels, n, [&](const TensorListMeta<3>& meta, int blocks, int64_t) {
    const cudaError_t err =
        exec.template launch<PerturbPerTensorBody<T>>(blocks, meta, PerturbPerTensorArgs{scales, tensor_base});
    tensor_base += meta.n_tensors;
    return err;
  });
}

template <class Exec>
cudaError_t launch_perturb_per_tensor(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                      const float* scales) {
  for (int t = 0; t < n; ++t) {
    if (numels[t] <= 0) return cudaErrorInvalidValue;  // empty tensors would shift the scale index
  }
  switch (dtype) {
    case DType::kFloat32:
      return perturb_per_tensor_typed<float>(exec, rows, numels, n, scales);
    case DType::kFloat16:
      return perturb_per_tensor_typed<__half>(exec, rows, numels, n, scales);
    case DType::kBFloat16:
      return perturb_per_tensor_typed<__nv_bfloat16>(exec, rows, numels, n, scales);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t perturb_per_tensor(DType dtype, void* const* rows, const int64_t* numels, int n, const float* scales,
                               cudaStream_t stream) {
  return launch_perturb_per_tensor(DeviceExec{stream}, dtype, rows, numels, n, scales);
}
#endif

}  // namespace cuda
}  // namespace fastsam
