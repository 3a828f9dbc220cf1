// momentum_sam: Momentum-SAM's fused step (SGD and AdamW forms) and its ascent move (Becker et al. 2024).
//
// The weights sit at the ascent point w~ = w - s_old v; one pass per element (fp32 math, one
// rounding at each store):
//
//   sgd:   d = g + wd w~;  w = w~ + s_old v;  v = mu v + d;  w -= lr (nesterov ? d + mu v : v)
//   adamw: w = w~ + s_old m;  m = m + (1 - b1)(g - m);  u = b2 u + (1 - b2) g^2;
//          w -= lr / (1 - b1^t) * m / (sqrt(u) / sqrt(1 - b2^t) + eps);  w *= 1 - lr wd
//   shift: backup = w (optional);  w += scale v
//
// The two steps also return sum(v^2) of the new momentum as stored (the rounded values the next
// ascent move follows), as grad_norm does: every block of the multi-tensor launches writes one
// partial sum to partials[global chunk index], then one block adds them in a fixed order
// (SumPartialsBody). No atomics: the result is bitwise reproducible and stays on the device.
// s_old and scale are device scalars (no host sync). Grads are read-only.
#include <cmath>

#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

// The squared element as stored in T (what a later read of the buffer sees).
template <typename T>
__host__ __device__ __forceinline__ float stored_square(float x) {
  const float s = to_float(from_float<T>(x));
  return s * s;
}

struct MomentumSamSgdArgs {
  const float* s_old;
  float lr;
  float momentum;
  float weight_decay;
  bool nesterov;
  float* partials;
  int64_t chunk_base;  // global chunk index of this launch's block 0
};

// Lists: 0 = params (in/out: w~ in, w out), 1 = grads, 2 = momentum buffers (in/out).
template <typename T>
struct MomentumSamSgdOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1) | (1u << 2);
  static constexpr unsigned kStores = (1u << 0) | (1u << 2);
  float s_old;
  float lr;
  float momentum;
  float weight_decay;
  bool nesterov;
  float sq;  // this thread's running sum of the new buffers' squares

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) {
    const float w_tilde = e[0];
    const float d = weight_decay != 0.0f ? e[1] + weight_decay * w_tilde : e[1];
    const float v = momentum * e[2] + d;
    const float w = w_tilde + s_old * e[2];
    e[0] = w - lr * (nesterov ? d + momentum * v : v);
    e[2] = v;
    sq += stored_square<T>(v);
  }
};

template <typename T>
struct MomentumSamSgdBody {
  using Meta = TensorListMeta<3>;

  static __host__ __device__ float thread_partial(const Meta& meta, const MomentumSamSgdArgs& args, int block,
                                                  int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    MomentumSamSgdOp<T> op{*args.s_old, args.lr, args.momentum, args.weight_decay, args.nesterov, 0.0f};
    apply_chunk<3, T>(meta, c, tid, nthreads, op);
    return op.sq;
  }

  static __host__ __device__ void finish(const Meta&, const MomentumSamSgdArgs& args, int block, float total) {
    args.partials[args.chunk_base + block] = total;
  }
};

struct MomentumSamAdamWArgs {
  const float* s_old;
  float step_size;              // lr / (1 - beta1^t)
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
  float eps;
  float decay;                  // 1 - lr * weight_decay
  bool has_weight_decay;
  float* partials;
  int64_t chunk_base;
};

// Lists: 0 = params (in/out), 1 = grads, 2 = exp_avgs (in/out), 3 = exp_avg_sqs (in/out).
template <typename T>
struct MomentumSamAdamWOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1) | (1u << 2) | (1u << 3);
  static constexpr unsigned kStores = (1u << 0) | (1u << 2) | (1u << 3);
  MomentumSamAdamWArgs a;
  float s_old;
  float sq;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) {
    const float g = e[1];
    float w = e[0] + s_old * e[2];
    const float m = e[2] + a.one_minus_beta1 * (g - e[2]);  // torch's lerp, as the torch backend
    const float u = a.beta2 * e[3] + a.one_minus_beta2 * g * g;
    const float denom = sqrtf(u) / a.bias_correction2_sqrt + a.eps;
    w = w - a.step_size * (m / denom);
    if (a.has_weight_decay) w = w * a.decay;  // decoupled decay after the Adam step (the authors' order)
    e[0] = w;
    e[2] = m;
    e[3] = u;
    sq += stored_square<T>(m);
  }
};

template <typename T>
struct MomentumSamAdamWBody {
  using Meta = TensorListMeta<4>;

  static __host__ __device__ float thread_partial(const Meta& meta, const MomentumSamAdamWArgs& args, int block,
                                                  int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    MomentumSamAdamWOp<T> op{args, *args.s_old, 0.0f};
    apply_chunk<4, T>(meta, c, tid, nthreads, op);
    return op.sq;
  }

  static __host__ __device__ void finish(const Meta&, const MomentumSamAdamWArgs& args, int block, float total) {
    args.partials[args.chunk_base + block] = total;
  }
};

// Lists: 0 = params (in/out), 1 = momentum buffers, 2 = backups (out, with kBackup).
template <bool kBackup>
struct MomentumSamShiftOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1);
  static constexpr unsigned kStores = (1u << 0) | (kBackup ? (1u << 2) : 0u);
  float scale;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    if constexpr (kBackup) e[2] = e[0];  // exact: a stored value converts to fp32 and back unchanged
    e[0] = e[0] + scale * e[1];
  }
};

template <typename T, bool kBackup>
struct MomentumSamShiftBody {
  static constexpr int kLists = kBackup ? 3 : 2;
  using Meta = TensorListMeta<kLists>;

  static __host__ __device__ void run(const Meta& meta, const float* scale, int block, int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    MomentumSamShiftOp<kBackup> op{*scale};
    apply_chunk<kLists, T>(meta, c, tid, nthreads, op);
  }
};

// ---- launchers --------------------------------------------------------------------------------

template <typename T, class Exec>
cudaError_t momentum_sam_sgd_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                   MomentumSamSgdArgs args, float* out) {
  using Body = MomentumSamSgdBody<T>;
  const cudaError_t err =
      for_each_launch<3>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t base) {
        args.chunk_base = base;
        return exec.template launch_reduce<Body>(blocks, meta, args);
      });
  if (err != cudaSuccess) return err;
  return sum_partials(exec, args.partials, count_chunks_of(numels, n), out);
}

template <class Exec>
cudaError_t launch_momentum_sam_sgd(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                    const MomentumSamSgdConfig& config, float* partials, float* out) {
  if (config.s_old == nullptr || partials == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const MomentumSamSgdArgs args{config.s_old,    config.lr,       config.momentum, config.weight_decay,
                                config.nesterov, partials,        0};
  switch (dtype) {
    case DType::kFloat32:
      return momentum_sam_sgd_typed<float>(exec, rows, numels, n, args, out);
    case DType::kFloat16:
      return momentum_sam_sgd_typed<__half>(exec, rows, numels, n, args, out);
    case DType::kBFloat16:
      return momentum_sam_sgd_typed<__nv_bfloat16>(exec, rows, numels, n, args, out);
  }
  return cudaErrorInvalidValue;
}

template <typename T, class Exec>
cudaError_t momentum_sam_adamw_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                     MomentumSamAdamWArgs args, float* out) {
  using Body = MomentumSamAdamWBody<T>;
  const cudaError_t err =
      for_each_launch<4>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t base) {
        args.chunk_base = base;
        return exec.template launch_reduce<Body>(blocks, meta, args);
      });
  if (err != cudaSuccess) return err;
  return sum_partials(exec, args.partials, count_chunks_of(numels, n), out);
}

template <class Exec>
cudaError_t launch_momentum_sam_adamw(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                      const MomentumSamAdamWConfig& config, float* partials, float* out) {
  if (config.s_old == nullptr || partials == nullptr || out == nullptr || config.step < 1) return cudaErrorInvalidValue;
  // The bias corrections in double, as the torch backend forms them on the host.
  const double t = static_cast<double>(config.step);
  const double lr = config.lr;
  MomentumSamAdamWArgs args;
  args.s_old = config.s_old;
  args.step_size = static_cast<float>(lr / (1.0 - std::pow(config.beta1, t)));
  args.one_minus_beta1 = static_cast<float>(1.0 - config.beta1);
  args.beta2 = static_cast<float>(config.beta2);
  args.one_minus_beta2 = static_cast<float>(1.0 - config.beta2);
  args.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(config.beta2, t)));
  args.eps = config.eps;
  args.decay = static_cast<float>(1.0 - lr * config.weight_decay);
  args.has_weight_decay = config.weight_decay != 0.0;
  args.partials = partials;
  args.chunk_base = 0;
  switch (dtype) {
    case DType::kFloat32:
      return momentum_sam_adamw_typed<float>(exec, rows, numels, n, args, out);
    case DType::kFloat16:
      return momentum_sam_adamw_typed<__half>(exec, rows, numels, n, args, out);
    case DType::kBFloat16:
      return momentum_sam_adamw_typed<__nv_bfloat16>(exec, rows, numels, n, args, out);
  }
  return cudaErrorInvalidValue;
}

template <typename T, bool kBackup, class Exec>
cudaError_t momentum_sam_shift_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                     const float* scale) {
  using Body = MomentumSamShiftBody<T, kBackup>;
  return for_each_launch<Body::kLists>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, scale);
  });
}

template <typename T, class Exec>
cudaError_t momentum_sam_shift_backup(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                      bool has_backups, const float* scale) {
  return has_backups ? momentum_sam_shift_typed<T, true>(exec, rows, numels, n, scale)
                     : momentum_sam_shift_typed<T, false>(exec, rows, numels, n, scale);
}

template <class Exec>
cudaError_t launch_momentum_sam_shift(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                      bool has_backups, const float* scale) {
  if (scale == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return momentum_sam_shift_backup<float>(exec, rows, numels, n, has_backups, scale);
    case DType::kFloat16:
      return momentum_sam_shift_backup<__half>(exec, rows, numels, n, has_backups, scale);
    case DType::kBFloat16:
      return momentum_sam_shift_backup<__nv_bfloat16>(exec, rows, numels, n, has_backups, scale);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t momentum_sam_sgd(DType dtype, void* const* rows, const int64_t* numels, int n,
                             const MomentumSamSgdConfig& config, float* partials, float* out, cudaStream_t stream) {
  return launch_momentum_sam_sgd(DeviceExec{stream}, dtype, rows, numels, n, config, partials, out);
}

cudaError_t momentum_sam_adamw(DType dtype, void* const* rows, const int64_t* numels, int n,
                               const MomentumSamAdamWConfig& config, float* partials, float* out, cudaStream_t stream) {
  return launch_momentum_sam_adamw(DeviceExec{stream}, dtype, rows, numels, n, config, partials, out);
}

cudaError_t momentum_sam_shift(DType dtype, void* const* rows, const int64_t* numels, int n, bool has_backups,
                               const float* scale, cudaStream_t stream) {
  return launch_momentum_sam_shift(DeviceExec{stream}, dtype, rows, numels, n, has_backups, scale);
}
#endif

}  // namespace cuda
}  // namespace fastsam
