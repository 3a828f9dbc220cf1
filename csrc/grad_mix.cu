// grad_mix: x <- a x + b y, or (swap) y <- a x + b y and x <- y_old, in place (WSAM's mixes).
//
// a and b are device scalars (a clip coefficient or a tensor learning rate never visits the host).
// A set skip flag (device scalar, non-zero) leaves both lists untouched, decided per block.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct GradMixArgs {
  const float* a;
  const float* b;
  const float* skip;
};

// Lists: 0 = x (in/out), 1 = y (in; out with kSwap).
template <bool kSwap>
struct GradMixOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1);
  static constexpr unsigned kStores = kSwap ? ((1u << 0) | (1u << 1)) : (1u << 0);
  float a;
  float b;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    const float x = e[0];
    const float y = e[1];
    const float mixed = a * x + b * y;
    if constexpr (kSwap) {
      e[0] = y;
      e[1] = mixed;
    } else {
      e[0] = mixed;
    }
  }
};

template <typename T, bool kSwap>
struct GradMixBody {
  using Meta = TensorListMeta<2>;

  static __host__ __device__ void run(const Meta& meta, const GradMixArgs& args, int block, int tid, int nthreads) {
    if (args.skip != nullptr && *args.skip != 0.0f) return;
    const ChunkRef c = locate_chunk(meta, block);
    GradMixOp<kSwap> op{*args.a, *args.b};
    apply_chunk<2, T>(meta, c, tid, nthreads, op);
  }
};

template <typename T, bool kSwap, class Exec>
cudaError_t grad_mix_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n, const GradMixArgs& args) {
  using Body = GradMixBody<T, kSwap>;
  return for_each_launch<2>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, args);
  });
}

template <typename T, class Exec>
cudaError_t grad_mix_swap(const Exec& exec, void* const* rows, const int64_t* numels, int n, bool swap,
                          const GradMixArgs& args) {
  return swap ? grad_mix_typed<T, true>(exec, rows, numels, n, args)
              : grad_mix_typed<T, false>(exec, rows, numels, n, args);
}

template <class Exec>
cudaError_t launch_grad_mix(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                            const GradMixConfig& config) {
  if (config.a == nullptr || config.b == nullptr) return cudaErrorInvalidValue;
  const GradMixArgs args{config.a, config.b, config.skip};
  switch (dtype) {
    case DType::kFloat32:
      return grad_mix_swap<float>(exec, rows, numels, n, config.swap, args);
    case DType::kFloat16:
      return grad_mix_swap<__half>(exec, rows, numels, n, config.swap, args);
    case DType::kBFloat16:
      return grad_mix_swap<__nv_bfloat16>(exec, rows, numels, n, config.swap, args);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t grad_mix(DType dtype, void* const* rows, const int64_t* numels, int n, const GradMixConfig& config,
                     cudaStream_t stream) {
  return launch_grad_mix(DeviceExec{stream}, dtype, rows, numels, n, config);
}
#endif

}  // namespace cuda
}  // namespace fastsam
