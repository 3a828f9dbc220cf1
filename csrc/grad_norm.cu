// grad_norm: the squared global norm of a bucket, plain / adaptive (ASAM) / Fisher, deterministic.
//
// Two kernels: every block of the multi-tensor launches reduces its chunk and writes one partial
// sum to partials[global chunk index]; then one block adds all partials in a fixed order and writes
// the total to *out. Both steps use the fixed-shape tree of block_reduce, so the result is bitwise
// reproducible and stays on the device. Math in fp32 whatever the storage dtype.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct PlainSquare {
  __host__ __device__ __forceinline__ float operator()(const float* e) const { return e[0] * e[0]; }
};

// ASAM (Kwon et al., ICML 2021): ((|w| + eta) g)^2; rows [grads, params].
struct AdaptiveSquare {
  float eta;
  __host__ __device__ __forceinline__ float operator()(const float* e) const {
    const float t = (fabsf(e[1]) + eta) * e[0];
    return t * t;
  }
};

// Fisher SAM (Kim et al., ICML 2022): g^2 / (1 + eta g^2).
struct FisherSquare {
  float eta;
  __host__ __device__ __forceinline__ float operator()(const float* e) const {
    const float g2 = e[0] * e[0];
    return g2 / (1.0f + eta * g2);
  }
};

struct NormPartialsArgs {
  float* partials;
  int64_t chunk_base;  // global chunk index of this launch's block 0
  float eta;
};

template <typename T, NormMode kMode>
struct NormChunkBody {
  static constexpr int kLists = kMode == NormMode::kAdaptive ? 2 : 1;
  using Meta = TensorListMeta<kLists>;

  static __host__ __device__ float thread_partial(const Meta& meta, const NormPartialsArgs& args, int block, int tid,
                                                  int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    if constexpr (kMode == NormMode::kPlain) {
      return reduce_chunk<kLists, T>(meta, c, tid, nthreads, PlainSquare());
    } else if constexpr (kMode == NormMode::kAdaptive) {
      return reduce_chunk<kLists, T>(meta, c, tid, nthreads, AdaptiveSquare{args.eta});
    } else {
      return reduce_chunk<kLists, T>(meta, c, tid, nthreads, FisherSquare{args.eta});
    }
  }

  static __host__ __device__ void finish(const Meta&, const NormPartialsArgs& args, int block, float total) {
    args.partials[args.chunk_base + block] = total;
  }
};

template <typename T, NormMode kMode, class Exec>
cudaError_t grad_sq_norm_typed(const Exec& exec, float eta, void* const* rows, const int64_t* numels, int n,
                               float* partials, float* out) {
  using Body = NormChunkBody<T, kMode>;
  const cudaError_t err =
      for_each_launch<Body::kLists>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t base) {
        return exec.template launch_reduce<Body>(blocks, meta, NormPartialsArgs{partials, base, eta});
      });
  if (err != cudaSuccess) return err;
  return sum_partials(exec, partials, count_chunks_of(numels, n), out);
}

template <class Exec>
cudaError_t launch_grad_sq_norm(const Exec& exec, DType dtype, NormMode mode, float eta, void* const* rows,
                                const int64_t* numels, int n, float* partials, float* out) {
#define FASTSAM_NORM_MODES(T)                                                                        \
  switch (mode) {                                                                                   \
    case NormMode::kPlain:                                                                          \
      return grad_sq_norm_typed<T, NormMode::kPlain>(exec, eta, rows, numels, n, partials, out);    \
    case NormMode::kAdaptive:                                                                       \
      return grad_sq_norm_typed<T, NormMode::kAdaptive>(exec, eta, rows, numels, n, partials, out); \
    case NormMode::kFisher:                                                                         \
      return grad_sq_norm_typed<T, NormMode::kFisher>(exec, eta, rows, numels, n, partials, out);   \
  }                                                                                                 \
  return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: {
      FASTSAM_NORM_MODES(float)
    }
    case DType::kFloat16: {
      FASTSAM_NORM_MODES(__half)
    }
    case DType::kBFloat16: {
      FASTSAM_NORM_MODES(__nv_bfloat16)
    }
  }
#undef FASTSAM_NORM_MODES
  return cudaErrorInvalidValue;
}

int64_t grad_norm_partials_count(const int64_t* numels, int n) { return count_chunks_of(numels, n); }

#ifndef FASTSAM_HOST_EMULATION
cudaError_t grad_sq_norm(DType dtype, NormMode mode, float eta, void* const* rows, const int64_t* numels, int n,
                         float* partials, float* out, cudaStream_t stream) {
  return launch_grad_sq_norm(DeviceExec{stream}, dtype, mode, eta, rows, numels, n, partials, out);
}
#endif

}  // namespace cuda
}  // namespace fastsam
