// restore_adamw_step: w = backup fused with exactly torch.optim.AdamW's update (Loshchilov & Hutter,
// ICLR 2019), fp32 element math:
//
//   w    = backup * (1 - lr * weight_decay)
//   g    = g' / grad_scale (if given);  g = -g (maximize)
//   m    = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2;   vmax = max(vmax, v) (amsgrad)
//   w    = w - lr / (1 - beta1^step) * m / (sqrt(v or vmax) / sqrt(1 - beta2^step) + eps)
//
// Two launches (plus more when the tensors do not fit one launch's metadata): the first adds 1 to
// every step count (unless found_inf is set); the main one then reads each tensor's count through
// a pointer in the launch metadata, so no count ever reaches the host. The bias corrections are
// formed in double from the double betas, as torch's fused kernel forms them. With found_inf set
// the main kernel only restores: moments, steps and the update are left alone.
#include <cmath>
#include <vector>

#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct AdamWArgs {
  const float* lr_ptr;
  float lr;
  double beta1;
  double beta2;
  float beta1_f;
  float beta2_f;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  bool maximize;
  bool steps_fp64;
  const float* grad_scale;
  const float* found_inf;
};

// Lists: 0 = params (out), 1 = grads, 2 = backups, 3 = exp_avgs, 4 = exp_avg_sqs,
// 5 = max_exp_avg_sqs (amsgrad); all moments in/out.
template <bool kAmsgrad>
struct AdamWOp {
  // Everything but the parameters, which are only written (the new weight comes from the backup).
  static constexpr unsigned kLoads = (1u << 1) | (1u << 2) | (1u << 3) | (1u << 4) | (kAmsgrad ? (1u << 5) : 0u);
  static constexpr unsigned kStores = (1u << 0) | (1u << 3) | (1u << 4) | (kAmsgrad ? (1u << 5) : 0u);
  float decay;      // 1 - lr * weight_decay
  float step_size;  // lr / (1 - beta1^step)
  float bias_correction2_sqrt;
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float eps;
  float grad_scale;
  bool has_grad_scale;
  bool maximize;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    const float w = e[2] * decay;
    float g = e[1];
    if (has_grad_scale) g = g / grad_scale;
    if (maximize) g = -g;
    const float m = beta1 * e[3] + one_minus_beta1 * g;
    const float v = beta2 * e[4] + one_minus_beta2 * g * g;
    e[3] = m;
    e[4] = v;
    float v_used = v;
    if constexpr (kAmsgrad) {
      const float vmax = (v > e[5] || v != v) ? v : e[5];  // torch.maximum: NaN propagates
      e[5] = vmax;
      v_used = vmax;
    }
    const float denom = sqrtf(v_used) / bias_correction2_sqrt + eps;
    e[0] = w - step_size * m / denom;
  }
};

template <typename T, bool kAmsgrad>
struct AdamWBody {
  static constexpr int kLists = kAmsgrad ? 6 : 5;
  using Meta = TensorListMeta<kLists + 1>;  // the extra row: each tensor's step count

  static __host__ __device__ void run(const Meta& meta, const AdamWArgs& args, int block, int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    if (args.found_inf != nullptr && *args.found_inf != 0.0f) {
      CopyOp<2, 0> restore_only;
      apply_chunk<kLists, T>(meta, c, tid, nthreads, restore_only);
      return;
    }
    const void* step_ptr = meta.addresses[kLists][c.tensor];
    const double step = args.steps_fp64 ? *static_cast<const double*>(step_ptr)
                                        : static_cast<double>(*static_cast<const float*>(step_ptr));
    const float lr = args.lr_ptr != nullptr ? *args.lr_ptr : args.lr;
    const double bias_correction1 = 1.0 - pow(args.beta1, step);
    const double bias_correction2 = 1.0 - pow(args.beta2, step);
    AdamWOp<kAmsgrad> op;
    op.decay = 1.0f - lr * args.weight_decay;
    op.step_size = static_cast<float>(static_cast<double>(lr) / bias_correction1);
    op.bias_correction2_sqrt = static_cast<float>(sqrt(bias_correction2));
    op.beta1 = args.beta1_f;
    op.beta2 = args.beta2_f;
    op.one_minus_beta1 = args.one_minus_beta1;
    op.one_minus_beta2 = args.one_minus_beta2;
    op.eps = args.eps;
    op.has_grad_scale = args.grad_scale != nullptr;
    op.grad_scale = op.has_grad_scale ? *args.grad_scale : 1.0f;
    op.maximize = args.maximize;
    apply_chunk<kLists, T>(meta, c, tid, nthreads, op);
  }
};

// The step counters: one pointer per tensor, incremented by one thread each.
struct StepList {
  static constexpr int kMaxSteps = 470;  // fits the metadata budget and one block
  static_assert(kMaxSteps <= kBlockSize, "one thread per counter");
  void* ptr[kMaxSteps];
  int32_t n;
};

struct StepArgs {
  const float* found_inf;
  bool fp64;
};

struct IncrementStepsBody {
  static __host__ __device__ void run(const StepList& list, const StepArgs& args, int block, int tid, int nthreads) {
    const int i = block * nthreads + tid;
    if (i >= list.n) return;
    if (args.found_inf != nullptr && *args.found_inf != 0.0f) return;
    if (args.fp64) {
      *static_cast<double*>(list.ptr[i]) += 1.0;
    } else {
      *static_cast<float*>(list.ptr[i]) += 1.0f;
    }
  }
};

template <class Exec>
cudaError_t increment_steps(const Exec& exec, void* const* steps, int n, const StepArgs& args) {
  StepList list;
  for (int start = 0; start < n; start += StepList::kMaxSteps) {
    list.n = n - start < StepList::kMaxSteps ? n - start : StepList::kMaxSteps;
    for (int i = 0; i < list.n; ++i) list.ptr[i] = steps[start + i];
    const cudaError_t err = exec.template launch<IncrementStepsBody>(1, list, args);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename T, bool kAmsgrad, class Exec>
cudaError_t adamw_typed(const Exec& exec, void* const* rows, void* const* steps, const int64_t* numels, int n,
                        const AdamWArgs& args) {
  using Body = AdamWBody<T, kAmsgrad>;
  // The metadata rows: the kLists element lists, then the step pointers.
  std::vector<void*> all_rows(rows, rows + static_cast<size_t>(Body::kLists) * n);
  all_rows.insert(all_rows.end(), steps, steps + n);
  return for_each_launch<Body::kLists + 1>(all_rows.data(), numels, n,
                                           [&](const typename Body::Meta& meta, int blocks, int64_t) {
                                             return exec.template launch<Body>(blocks, meta, args);
                                           });
}

template <typename T, class Exec>
cudaError_t adamw_amsgrad(const Exec& exec, void* const* rows, void* const* steps, const int64_t* numels, int n,
                          bool amsgrad, const AdamWArgs& args) {
  return amsgrad ? adamw_typed<T, true>(exec, rows, steps, numels, n, args)
                 : adamw_typed<T, false>(exec, rows, steps, numels, n, args);
}

template <class Exec>
cudaError_t launch_restore_adamw_step(const Exec& exec, DType dtype, void* const* rows, void* const* steps,
                                      const int64_t* numels, int n, const AdamWConfig& config) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  AdamWArgs args;
  args.lr_ptr = config.lr_ptr;
  args.lr = config.lr;
  args.beta1 = config.beta1;
  args.beta2 = config.beta2;
  args.beta1_f = static_cast<float>(config.beta1);
  args.beta2_f = static_cast<float>(config.beta2);
  args.one_minus_beta1 = static_cast<float>(1.0 - config.beta1);
  args.one_minus_beta2 = static_cast<float>(1.0 - config.beta2);
  args.eps = config.eps;
  args.weight_decay = config.weight_decay;
  args.maximize = config.maximize;
  args.steps_fp64 = config.steps_fp64;
  args.grad_scale = config.grad_scale;
  args.found_inf = config.found_inf;

  // Counters first: the main kernel reads the incremented value, as torch's fused AdamW does.
  cudaError_t err = increment_steps(exec, steps, n, StepArgs{config.found_inf, config.steps_fp64});
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case DType::kFloat32:
      return adamw_amsgrad<float>(exec, rows, steps, numels, n, config.amsgrad, args);
    case DType::kFloat16:
      return adamw_amsgrad<__half>(exec, rows, steps, numels, n, config.amsgrad, args);
    case DType::kBFloat16:
      return adamw_amsgrad<__nv_bfloat16>(exec, rows, steps, numels, n, config.amsgrad, args);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t restore_adamw_step(DType dtype, void* const* rows, void* const* steps, const int64_t* numels, int n,
                               const AdamWConfig& config, cudaStream_t stream) {
  return launch_restore_adamw_step(DeviceExec{stream}, dtype, rows, steps, numels, n, config);
}
#endif

}  // namespace cuda
}  // namespace fastsam
