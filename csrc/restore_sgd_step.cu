// restore_sgd_step: w = backup fused with exactly torch.optim.SGD's update (fp32 math):
//
//   w   = backup
//   d   = g / grad_scale (if given);  d = -d (maximize);  d = d + weight_decay * w
//   buf = d (first step)  or  momentum * buf + (1 - dampening) * d
//   d   = d + momentum * buf (nesterov)  or  buf
//   w   = w - lr * d
//
// lr, grad_scale and found_inf may be device scalars. With found_inf set the block only restores
// (w = backup) and leaves the momentum buffers alone, as GradScaler expects. Grads are read-only.
// A parameter may pass itself as its backup (not perturbed): the element is read before it is written.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct SgdArgs {
  const float* lr_ptr;
  float lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  const float* grad_scale;
  const float* found_inf;
};

// Lists: 0 = params (out), 1 = grads, 2 = backups, 3 = momentum buffers (in/out, with momentum).
template <bool kMomentum>
struct SgdOp {
  // The parameters are only written (the new weight comes from the backup); the momentum buffer is
  // not read on the first step either (see the skip mask in SgdBody::run).
  static constexpr unsigned kLoads = (1u << 1) | (1u << 2) | (kMomentum ? (1u << 3) : 0u);
  static constexpr unsigned kStores = (1u << 0) | (kMomentum ? (1u << 3) : 0u);
  float lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  float grad_scale;
  bool has_grad_scale;
  bool nesterov;
  bool maximize;
  bool is_first_step;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    const float w = e[2];
    float d = e[1];
    if (has_grad_scale) d = d / grad_scale;
    if (maximize) d = -d;
    if (weight_decay != 0.0f) d = d + weight_decay * w;
    if constexpr (kMomentum) {
      const float buf = is_first_step ? d : momentum * e[3] + one_minus_dampening * d;
      e[3] = buf;
      d = nesterov ? d + momentum * buf : buf;
    }
    e[0] = w - lr * d;
  }
};

template <typename T, bool kMomentum>
struct SgdBody {
  static constexpr int kLists = kMomentum ? 4 : 3;
  using Meta = TensorListMeta<kLists>;

  static __host__ __device__ void run(const Meta& meta, const SgdArgs& args, int block, int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    if (args.found_inf != nullptr && *args.found_inf != 0.0f) {
      CopyOp<2, 0> restore_only;
      apply_chunk<kLists, T>(meta, c, tid, nthreads, restore_only);
      return;
    }
    SgdOp<kMomentum> op;
    op.lr = args.lr_ptr != nullptr ? *args.lr_ptr : args.lr;
    op.momentum = args.momentum;
    op.one_minus_dampening = args.one_minus_dampening;
    op.weight_decay = args.weight_decay;
    op.has_grad_scale = args.grad_scale != nullptr;
    op.grad_scale = op.has_grad_scale ? *args.grad_scale : 1.0f;
    op.nesterov = args.nesterov;
    op.maximize = args.maximize;
    op.is_first_step = args.is_first_step;
    apply_chunk<kLists, T>(meta, c, tid, nthreads, op, kMomentum && args.is_first_step ? (1u << 3) : 0u);
  }
};

template <typename T, bool kMomentum, class Exec>
cudaError_t sgd_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n, const SgdArgs& args) {
  using Body = SgdBody<T, kMomentum>;
  return for_each_launch<Body::kLists>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, args);
  });
}

template <typename T, class Exec>
cudaError_t sgd_momentum(const Exec& exec, void* const* rows, const int64_t* numels, int n, bool has_momentum,
                         const SgdArgs& args) {
  return has_momentum ? sgd_typed<T, true>(exec, rows, numels, n, args)
                      : sgd_typed<T, false>(exec, rows, numels, n, args);
}

template <class Exec>
cudaError_t launch_restore_sgd_step(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                    const SgdConfig& config) {
  const SgdArgs args{config.lr_ptr,
                     config.lr,
                     config.momentum,
                     static_cast<float>(1.0 - config.dampening),
                     config.weight_decay,
                     config.nesterov,
                     config.maximize,
                     config.is_first_step,
                     config.grad_scale,
                     config.found_inf};
  switch (dtype) {
    case DType::kFloat32:
      return sgd_momentum<float>(exec, rows, numels, n, config.has_momentum, args);
    case DType::kFloat16:
      return sgd_momentum<__half>(exec, rows, numels, n, config.has_momentum, args);
    case DType::kBFloat16:
      return sgd_momentum<__nv_bfloat16>(exec, rows, numels, n, config.has_momentum, args);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t restore_sgd_step(DType dtype, void* const* rows, const int64_t* numels, int n, const SgdConfig& config,
                             cudaStream_t stream) {
  return launch_restore_sgd_step(DeviceExec{stream}, dtype, rows, numels, n, config);
}
#endif

}  // namespace cuda
}  // namespace fastsam
