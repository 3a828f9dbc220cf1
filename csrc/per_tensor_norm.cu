// per_tensor_norm: the squared L2 norm of every tensor of a bucket (AWP / WT-AWP / HERO layer norms).
//
// Two kernels per multi-tensor launch: every block reduces its chunk and writes one partial sum to
// partials[global chunk index]; the chunks of one tensor are consecutive, so a second kernel with
// one block per tensor of the launch adds that tensor's partials in a fixed order and writes
// out[tensor]. Both use the fixed-shape tree of block_reduce: bitwise reproducible, on the device,
// fp32 whatever the storage dtype. Tensors must be non-empty (the Python op drops empty ones), so
// the launch's tensor index plus the tensors of earlier launches is the tensor's index in `out`.
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

struct TensorNormPartialsArgs {
  float* partials;
  int64_t chunk_base;  // global chunk index of this launch's block 0
};

struct TensorNormSquare {
  __host__ __device__ __forceinline__ float operator()(const float* e) const { return e[0] * e[0]; }
};

template <typename T>
struct TensorNormPartialsBody {
  using Meta = TensorListMeta<1>;

  static __host__ __device__ float thread_partial(const Meta& meta, const TensorNormPartialsArgs&, int block, int tid,
                                                  int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    return reduce_chunk<1, T>(meta, c, tid, nthreads, TensorNormSquare());
  }

  static __host__ __device__ void finish(const Meta&, const TensorNormPartialsArgs& args, int block, float total) {
    args.partials[args.chunk_base + block] = total;
  }
};

struct TensorNormSegmentArgs {
  const float* partials;
  int64_t chunk_base;
  int64_t tensor_base;  // index in `out` of this launch's tensor 0
  float* out;
};

// Block b of the launch: tensor b's chunks are first_block[b] .. first_block[b + 1] - 1.
struct TensorNormSegmentBody {
  using Meta = TensorListMeta<1>;

  static __host__ __device__ float thread_partial(const Meta& meta, const TensorNormSegmentArgs& args, int block,
                                                  int tid, int nthreads) {
    const int64_t begin = args.chunk_base + meta.first_block[block];
    const int64_t end = args.chunk_base + meta.first_block[block + 1];
    float acc = 0.0f;
    for (int64_t i = begin + tid; i < end; i += nthreads) acc += args.partials[i];
    return acc;
  }

  static __host__ __device__ void finish(const Meta&, const TensorNormSegmentArgs& args, int block, float total) {
    args.out[args.tensor_base + block] = total;
  }
};

template <typename T, class Exec>
cudaError_t per_tensor_sq_norms_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n,
                                      float* partials, float* out) {
  int64_t tensor_base = 0;
  return for_each_launch<1>(rows, numels, n, [&](const TensorListMeta<1>& meta, int blocks, int64_t base) {
    cudaError_t err =
        exec.template launch_reduce<TensorNormPartialsBody<T>>(blocks, meta, TensorNormPartialsArgs{partials, base});
    if (err != cudaSuccess) return err;
    err = exec.template launch_reduce<TensorNormSegmentBody>(meta.n_tensors, meta,
                                                             TensorNormSegmentArgs{partials, base, tensor_base, out});
    tensor_base += meta.n_tensors;
    return err;
  });
}

template <class Exec>
cudaError_t launch_per_tensor_sq_norms(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n,
                                       float* partials, float* out) {
  for (int t = 0; t < n; ++t) {
    if (numels[t] <= 0) return cudaErrorInvalidValue;  // empty tensors would shift the output index
  }
  switch (dtype) {
    case DType::kFloat32:
      return per_tensor_sq_norms_typed<float>(exec, rows, numels, n, partials, out);
    case DType::kFloat16:
      return per_tensor_sq_norms_typed<__half>(exec, rows, numels, n, partials, out);
    case DType::kBFloat16:
      return per_tensor_sq_norms_typed<__nv_bfloat16>(exec, rows, numels, n, partials, out);
  }
  return cudaErrorInvalidValue;
}

int64_t per_tensor_norm_partials_count(const int64_t* numels, int n) { return count_chunks_of(numels, n); }

#ifndef FASTSAM_HOST_EMULATION
cudaError_t per_tensor_sq_norms(DType dtype, void* const* rows, const int64_t* numels, int n, float* partials,
                                float* out, cudaStream_t stream) {
  return launch_per_tensor_sq_norms(DeviceExec{stream}, dtype, rows, numels, n, partials, out);
}
#endif

}  // namespace cuda
}  // namespace fastsam
