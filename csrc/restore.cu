// restore: w = backup for every tensor of a bucket, in place (the copy goes into the parameters' own
// storage, so optimizer state and captured CUDA graphs keep pointing at the same memory).
#include "launchers.h"
#include "multi_tensor_apply.cuh"

namespace fastsam {
namespace cuda {

template <typename T>
struct RestoreBody {
  using Meta = TensorListMeta<2>;

  // Lists: 0 = params (out), 1 = backups.
  static __host__ __device__ void run(const Meta& meta, int block, int tid, int nthreads) {
    const ChunkRef c = locate_chunk(meta, block);
    CopyOp<1, 0> copy;
    apply_chunk<2, T>(meta, c, tid, nthreads, copy);
  }
};

template <typename T, class Exec>
cudaError_t restore_typed(const Exec& exec, void* const* rows, const int64_t* numels, int n) {
  using Body = RestoreBody<T>;
  return for_each_launch<2>(rows, numels, n, [&](const typename Body::Meta& meta, int blocks, int64_t) {
    return exec.template launch<Body>(blocks, meta);
  });
}

template <class Exec>
cudaError_t launch_restore(const Exec& exec, DType dtype, void* const* rows, const int64_t* numels, int n) {
  switch (dtype) {
    case DType::kFloat32:
      return restore_typed<float>(exec, rows, numels, n);
    case DType::kFloat16:
      return restore_typed<__half>(exec, rows, numels, n);
    case DType::kBFloat16:
      return restore_typed<__nv_bfloat16>(exec, rows, numels, n);
  }
  return cudaErrorInvalidValue;
}

#ifndef FASTSAM_HOST_EMULATION
cudaError_t restore(DType dtype, void* const* rows, const int64_t* numels, int n, cudaStream_t stream) {
  return launch_restore(DeviceExec{stream}, dtype, rows, numels, n);
}
#endif

}  // namespace cuda
}  // namespace fastsam
