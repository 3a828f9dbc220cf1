// ema_direction: FriendlySAM's d = g - sigma m (written over g) and m = lmbda m + (1 - lmbda) g,
// one pass over both lists (the EMA in torch's lerp form m + (1 - lmbda)(g - m)). A set skip flag
// (device scalar, non-zero) leaves both untouched.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct EmaDirectionArgs {
  float sigma;
  float lmbda;
  const float* skip;
};

// Lists: 0 = grads (in/out), 1 = momenta (in/out).
struct EmaDirectionOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1);
  static constexpr unsigned kStores = (1u << 0) | (1u << 1);
  float sigma;
  float lmbda;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    const float g = e[0];
    const float m = e[1];
    e[0] = g - sigma * m;
    e[1] = m + (1.0f - lmbda) * (g - m);  // lmbda m + (1 - lmbda) g in torch's lerp form
  }
};

template <typename T>
struct EmaDirectionBody {
  using Meta = TensorListMeta<2>;

  static __host__ __device__ void run(const Meta& meta, const EmaDirectionArgs& args, int block, int tid,
                                      int nthreads) {
    if (args.skip != nullptr && *args.skip != 0.0f) return;
    const ChunkRef c = locate_chunk(meta, block);
    EmaDirectionOp op{args.sigma, args.lmbda};
    apply_chunk<2, T>(meta, c, tid, nthreads, op);
  }
};

template <typename T, class Exec>
cudaError_t ema_direction_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                const EmaDirectionArgs& args) {
  using Body = EmaDirectionBody<T>;
  return for_each_launch<2>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, args);
  });
}

template <class Exec>
cudaError_t launch_ema_direction(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                 float sigma, float lmbda, const float* skip) {
  const EmaDirectionArgs args{sigma, lmbda, skip};
  switch (dtype) {
    case DType::kFloat32:
      return ema_direction_typed<float>(exec, rows, numels, n, args);
    case DType::kFloat16:
      return ema_direction_typed<__half>(exec, rows, numels, n, args);
    case DType::kBFloat16:
      return ema_direction_typed<__nv_bfloat16>(exec, rows, numels, n, args);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t ema_direction(DType dtype, void* const* rows, const int64_t* numels, int n, float sigma, float lmbda,
                          const float* skip, cudaStream_t stream) {
  return launch_ema_direction(DeviceExec{stream}, dtype, rows, numels, n, sigma, lmbda, skip);
}
#endif

}  // namespace cuda
}  // namespace fastsam
