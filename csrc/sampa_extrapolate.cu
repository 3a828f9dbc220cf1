// sampa_extrapolate: SAMPa's auxiliary point (Xie et al., NeurIPS 2024), in place:
//
//   backup = w;  w = w - lr * (d + weight_decay * w + momentum * buf)
//
// in the torch backend's order (d + wd w, then + mu buf), fp32 math, one rounding at the store.
// The buffer term is there only with kMomentum (rows include the buffers): SGD's step along d,
// without updating the buffer, as the authors' code takes it. Directions and buffers are read-only.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct SampaExtrapolateArgs {
  float lr;
  float momentum;
  float weight_decay;
};

// Lists: 0 = params (in/out), 1 = directions, 2 = backups (out), 3 = momentum buffers (with kMomentum).
template <bool kMomentum>
struct SampaExtrapolateOp {
  static constexpr unsigned kLoads = (1u << 0) | (1u << 1) | (kMomentum ? (1u << 3) : 0u);
  static constexpr unsigned kStores = (1u << 0) | (1u << 2);
  SampaExtrapolateArgs a;

  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const {
    const float w = e[0];
    e[2] = w;  // exact: a stored value converts to fp32 and back unchanged
    float d = e[1];
    if (a.weight_decay != 0.0f) d = d + a.weight_decay * w;
    if constexpr (kMomentum) d = d + a.momentum * e[3];
    e[0] = w - a.lr * d;
  }
};

template <typename T, bool kMomentum>
struct SampaExtrapolateBody {
  static constexpr int kLists = kMomentum ? 4 : 3;
  using Meta = TensorListMeta<kLists>;

  static __host__ __device__ void run(const Meta& meta, const SampaExtrapolateArgs& args, int block, int tid,
                                      int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    SampaExtrapolateOp<kMomentum> op{args};
    apply_chunk<kLists, T>(meta, c, tid, nthreads, op);
  }
};

template <typename T, bool kMomentum, class Exec>
cudaError_t sampa_extrapolate_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                    const SampaExtrapolateArgs& args) {
  using Body = SampaExtrapolateBody<T, kMomentum>;
  return for_each_launch<Body::kLists>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta, args);
  });
}

template <typename T, class Exec>
cudaError_t sampa_extrapolate_momentum(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                       bool has_momentum, const SampaExtrapolateArgs& args) {
  return has_momentum ? sampa_extrapolate_typed<T, true>(exec, rows, numels, n, args)
                      : sampa_extrapolate_typed<T, false>(exec, rows, numels, n, args);
}

template <class Exec>
cudaError_t launch_sampa_extrapolate(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                     const SampaExtrapolateConfig& config) {
  const SampaExtrapolateArgs args{config.lr, config.momentum, config.weight_decay};
  switch (dtype) {
    case DType::kFloat32:
      return sampa_extrapolate_momentum<float>(exec, rows, numels, n, config.has_momentum, args);
    case DType::kFloat16:
      return sampa_extrapolate_momentum<__half>(exec, rows, numels, n, config.has_momentum, args);
    case DType::kBFloat16:
      return sampa_extrapolate_momentum<__nv_bfloat16>(exec, rows, numels, n, config.has_momentum, args);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t sampa_extrapolate(DType dtype, void* const* rows, const int64_t* numels, int n,
                              const SampaExtrapolateConfig& config, cudaStream_t stream) {
  return launch_sampa_extrapolate(DeviceExec{stream}, dtype, rows, numels, n, config);
}
#endif

}  // namespace cuda
}  // namespace fastsam
