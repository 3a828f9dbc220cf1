// perturb: backup = w; w += s * d, the SAM / ASAM / Fisher SAM perturbation, optionally masked (ESAM SWP).
//
// With s = rho / (norm + eps) read from the device:
//   plain    (SAM, Foret et al. 2021):        d = g
//   adaptive (ASAM, Kwon et al. 2021):        d = (|w| + eta)^2 g
//   fisher   (Fisher SAM, Kim et al. 2022):   d = g / (1 + eta g^2)
// SWP (ESAM, Du et al. 2022): with beta < 1, element i of the bucket moves only if
// u(seed, offset + i) < beta (philox.cuh) and s is divided by beta. A non-finite norm leaves the
// weights untouched (the backup is still written), decided per block from the device value.
#include "launchers.h"
#include "multi_tensor_apply.cuh"
#include "philox.cuh"

namespace fastsam {
namespace cuda {

struct PerturbArgs {
  const float* norm;
  float rho;
  float eta;
  float eps;
  float beta;
  uint64_t seed;
  uint64_t offset;
};

// Lists: 0 = params (in/out), 1 = grads, 2 = backups (out).
template <NormMode kMode, bool kSwp>
struct PerturbOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1);  // the backup is only written
  static constexpr unsigned kStores = (1u << 0) | (1u << 2);
  float scale;
  float eta;
  float beta;
  uint64_t seed;
  uint64_t offset;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t index) const {
    const float w = e[0];
    const float g = e[1];
    e[2] = w;
    if constexpr (kSwp) {
      if (!(philox_uniform(seed, offset + static_cast<uint64_t>(index)) < beta)) return;
    }
    float d;
    if constexpr (kMode == NormMode::kPlain) {
      d = g;
    } else if constexpr (kMode == NormMode::kAdaptive) {
      const float t = fabsf(w) + eta;
      d = t * t * g;
    } else {
      d = g / (1.0f + eta * g * g);
    }
    e[0] = w + scale * d;
  }
};

template <typename T, NormMode kMode, bool kSwp>
struct PerturbBody {
  using Meta = TensorListMeta<3>;

  static __host__ __device__ void run(const Meta& meta, const PerturbArgs& args, int block, int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    const float norm = *args.norm;
    if (!is_finite(norm)) {
      CopyOp<0, 2> backup_only;
      apply_chunk<3, T>(meta, c, tid, nthreads, backup_only);
      return;
    }
    float scale = args.rho / (norm + args.eps);
    if (kSwp) scale = scale / args.beta;
    PerturbOp<kMode, kSwp> op{scale, args.eta, args.beta, args.seed, args.offset};
    apply_chunk<3, T>(meta, c, tid, nthreads, op);
  }
};

template <typename T, NormMode kMode, bool kSwp, class Exec>
cudaError_t perturb_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n, const PerturbArgs& args) {
  using Body = PerturbBody<T, kMode, kSwp>;
  return for_each_launch<3>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, args);
  });
}

template <typename T, class Exec>
cudaError_t perturb_modes(const Exec& exec, void* const* rows, const int64_t* numels, int n, NormMode mode, bool swp,
                          const PerturbArgs& args) {
  switch (mode) {
    case NormMode::kPlain:
      return swp ? perturb_typed<T, NormMode::kPlain, true>(exec, rows, numels, n, args)
                 : perturb_typed<T, NormMode::kPlain, false>(exec, rows, numels, n, args);
    case NormMode::kAdaptive:
      return swp ? perturb_typed<T, NormMode::kAdaptive, true>(exec, rows, numels, n, args)
                 : perturb_typed<T, NormMode::kAdaptive, false>(exec, rows, numels, n, args);
    case NormMode::kFisher:
      return swp ? perturb_typed<T, NormMode::kFisher, true>(exec, rows, numels, n, args)
                 : perturb_typed<T, NormMode::kFisher, false>(exec, rows, numels, n, args);
  }
  return cudaErrorInvalidValue;
}

template <class Exec>
cudaError_t launch_perturb(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                           const float* norm, const PerturbConfig& config) {
  if (!(config.beta > 0.0f && config.beta <= 1.0f)) return cudaErrorInvalidValue;
  const PerturbArgs args{norm, config.rho, config.eta, config.eps, config.beta, config.seed,
                         static_cast<uint64_t>(config.offset)};
  const bool swp = config.beta < 1.0f;
  switch (dtype) {
    case DType::kFloat32:
      return perturb_modes<float>(exec, rows, numels, n, config.mode, swp, args);
    case DType::kFloat16:
      return perturb_modes<__half>(exec, rows, numels, n, config.mode, swp, args);
    case DType::kBFloat16:
      return perturb_modes<__nv_bfloat16>(exec, rows, numels, n, config.mode, swp, args);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t perturb(DType dtype, void* const* rows, const int64_t* numels, int n, const float* norm,
                    const PerturbConfig& config, cudaStream_t stream) {
  return launch_perturb(DeviceExec{stream}, dtype, rows, numels, n, norm, config);
}
#endif

}  // namespace cuda
}  // namespace fastsam
