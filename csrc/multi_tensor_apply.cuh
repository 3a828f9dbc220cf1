// Multi-tensor apply: one launch walks a whole list of tensors, chunk by chunk.
//
// Torch-free on purpose (raw pointers and cudaStream_t only), so every kernel file compiles with a
// plain nvcc and the planning and per-thread code can also run on the host (see HostExec below,
// which the CPU test suite uses to check the index math without a GPU).
//
// [note: launch metadata]
// A launch covers up to TensorListMeta<D>::kMaxTensors tensors. For each one the kernel receives,
// as a by-value kernel argument (so a captured CUDA graph replays it unchanged): the D data
// addresses (one per list: params, grads, backups, ...), the element count, the index of its first
// element within the whole bucket (SWP counters need it), and the index of its first block.
// Every block processes one chunk of kChunkSize elements of one tensor; it finds its tensor by a
// binary search over first_block. Whole tensors go into one launch (a launch has as many blocks
// as its tensors have chunks), so launches are split only by the tensor count.
//
// [note: element order inside a chunk]
// Thread `tid` handles the groups of kVec consecutive elements starting at tid * kVec,
// (tid + nthreads) * kVec, ... where kVec = 16 bytes / sizeof(T). A group is loaded with one
// 128-bit access when every list's chunk start is 16-byte aligned and the group is complete;
// otherwise element by element with a bound check (the masked tail). The assignment of elements
// to threads is the same on both paths, so reductions add in the same order whatever the
// alignment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

// `#pragma unroll` for device code only: the host compiler sees these functions too and would warn.
#if defined(__CUDA_ARCH__)
#define FASTSAM_UNROLL _Pragma("unroll")
#else
#define FASTSAM_UNROLL
#endif

namespace fastsam {
namespace cuda {

constexpr int kBlockSize = 512;         // threads per block of every multi-tensor kernel (a power of 2)
constexpr int64_t kChunkSize = 65536;   // elements per block; a multiple of every kVec
constexpr int kMetaBytes = 3840;        // launch metadata budget: kernel arguments are limited to 4 KiB
constexpr int kKernelArgBytes = 4096;

// ------------------------------------------------------------------------------------------
// storage types: fp32, fp16, bf16 in memory; fp32 in registers
// ------------------------------------------------------------------------------------------

__host__ __device__ __forceinline__ float to_float(float x) { return x; }
__host__ __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__host__ __device__ __forceinline__ T from_float(float x);
template <>
__host__ __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__host__ __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Finite (not inf, not NaN): the host and device spelling of isfinite differ, this one does not.
__host__ __device__ __forceinline__ bool is_finite(float x) { return fabsf(x) <= 3.402823466e38f; }

__host__ __device__ __forceinline__ int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T>
struct alignas(16) Pack {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  T v[kVec];
};

__host__ __device__ __forceinline__ bool is_aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------------------------------
// launch metadata and the host-side planner
// ------------------------------------------------------------------------------------------

template <int kDepth>
struct TensorListMeta {
  // addresses (8 bytes per list) + numel + element_offset + first_block, per tensor
  static constexpr int kBytesPerTensor = kDepth * 8 + 8 + 8 + 4;
  static constexpr int kMaxTensors = (kMetaBytes - 16) / kBytesPerTensor;
  static_assert(kMaxTensors >= 16, "too many lists for one launch's metadata");

  void* addresses[kDepth][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t element_offset[kMaxTensors];   // index of the tensor's first element in the whole bucket
  int32_t first_block[kMaxTensors + 1];  // first_block[n_tensors] = number of blocks of the launch
  int32_t n_tensors;
};

// The block's chunk: which tensor, where the chunk starts in it, how many elements it has.
struct ChunkRef {
  int tensor;
  int64_t start;
  int64_t n;
};

template <int kDepth>
__host__ __device__ __forceinline__ ChunkRef locate_chunk(const TensorListMeta<kDepth>& meta, int block) {
  // Largest t with first_block[t] <= block; first_block is strictly increasing (empty tensors are
  // never added), so this is the block's tensor.
  int lo = 0, hi = meta.n_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (meta.first_block[mid] <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  ChunkRef c;
  c.tensor = lo;
  c.start = static_cast<int64_t>(block - meta.first_block[lo]) * kChunkSize;
  c.n = min_i64(kChunkSize, meta.numel[lo] - c.start);
  return c;
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// Total chunks (= blocks over all launches) of a list of tensors; grad_norm sizes its partials by it.
inline int64_t count_chunks_of(const int64_t* numels, int n) {
  int64_t total = 0;
  for (int t = 0; t < n; ++t) total += chunks_of(numels[t]);
  return total;
}

// Packs tensors into launches and calls launch(meta, n_blocks, chunk_base) for each, where
// chunk_base counts the blocks of all earlier launches (a global chunk index = chunk_base + block).
// `rows` is list-major: rows[l * n + t] is tensor t of list l, for l < kDepth.
template <int kDepth, class Launch>
cudaError_t for_each_launch(void* const* rows, const int64_t* numels, int n, Launch&& launch) {
  using Meta = TensorListMeta<kDepth>;
  constexpr int32_t kMaxBlocks = 0x7fffffff;
  Meta meta;
  std::memset(&meta, 0, sizeof(meta));
  int nt = 0;
  int32_t blocks = 0;
  int64_t element_offset = 0;
  int64_t chunk_base = 0;
  auto flush = [&]() -> cudaError_t {
    if (nt == 0) return cudaSuccess;
    meta.first_block[nt] = blocks;
    meta.n_tensors = nt;
    const cudaError_t err = launch(static_cast<const Meta&>(meta), static_cast<int>(blocks), chunk_base);
    chunk_base += blocks;
    nt = 0;
    blocks = 0;
    return err;
  };
  for (int t = 0; t < n; ++t) {
    const int64_t numel = numels[t];
    if (numel < 0) return cudaErrorInvalidValue;
    if (numel > 0) {
      const int64_t chunks = chunks_of(numel);
      if (chunks > kMaxBlocks) return cudaErrorInvalidValue;  // > 1.4e14 elements in one tensor
      if (nt == Meta::kMaxTensors || static_cast<int64_t>(blocks) + chunks > kMaxBlocks) {
        const cudaError_t err = flush();
        if (err != cudaSuccess) return err;
      }
      for (int d = 0; d < kDepth; ++d) meta.addresses[d][nt] = rows[static_cast<int64_t>(d) * n + t];
      meta.numel[nt] = numel;
      meta.element_offset[nt] = element_offset;
      meta.first_block[nt] = blocks;
      blocks += static_cast<int32_t>(chunks);
      ++nt;
    }
    element_offset += numel;
  }
  return flush();
}

// ------------------------------------------------------------------------------------------
// per-thread work on one chunk
// ------------------------------------------------------------------------------------------

// [note: load mask]
// An op names the lists it reads in Op::kLoads and the lists it writes in Op::kStores (bit l = list
// l). Only the read lists are loaded: restore does not read the parameters it overwrites, perturb
// not the backups, the fused SGD/AdamW steps not the parameters (the new weight comes from the
// backup), and the found-inf / non-finite-norm copies only their source. An unread list's value is
// 0 in `values` and the op must not use it. `skip` removes further lists at run time (the momentum
// buffer on SGD's first step); the compile-time mask is what removes the loads from the code, which
// tests/test_csrc_sass.py checks on the sm_90 SASS. Alignment is decided over the lists touched.
// The traffic of an op is then sizeof(T) per element for every bit of kLoads plus every bit of kStores
// (csrc/README.md tabulates it per op).
//
// Loads the read lists among the first kLists lists of the chunk (the remaining rows of the
// metadata, if any, hold per-tensor scalars), calls op(values, index) for every element the thread
// owns, where values[l] is the element of list l in fp32 and index its position in the whole
// bucket, and stores back the lists whose bit is set in Op::kStores.
template <int kLists, typename T, int kDepth, class Op>
__host__ __device__ __forceinline__ void apply_chunk(const TensorListMeta<kDepth>& meta, const ChunkRef& c, int tid,
                                                     int nthreads, Op& op, unsigned skip = 0u) {
  static_assert(kLists <= kDepth, "more lists than metadata rows");
  static_assert((Op::kLoads >> kLists) == 0u && (Op::kStores >> kLists) == 0u, "load/store mask beyond kLists");
  constexpr int kVec = Pack<T>::kVec;
  constexpr unsigned kTouched = Op::kLoads | Op::kStores;
  T* ptr[kLists];
  bool aligned = true;
FASTSAM_UNROLL
  for (int l = 0; l < kLists; ++l) {
    ptr[l] = static_cast<T*>(meta.addresses[l][c.tensor]) + c.start;
    if ((kTouched >> l) & 1u) aligned = aligned && is_aligned16(ptr[l]);
  }
  const int64_t first_index = meta.element_offset[c.tensor] + c.start;
  for (int64_t base = static_cast<int64_t>(tid) * kVec; base < c.n; base += static_cast<int64_t>(nthreads) * kVec) {
    const bool full = aligned && base + kVec <= c.n;
    float x[kLists][kVec];
FASTSAM_UNROLL
    for (int l = 0; l < kLists; ++l) {
      if (!((Op::kLoads >> l) & 1u) || ((skip >> l) & 1u)) {
FASTSAM_UNROLL
        for (int v = 0; v < kVec; ++v) x[l][v] = 0.0f;
      } else if (full) {
        const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(ptr[l] + base);
FASTSAM_UNROLL
        for (int v = 0; v < kVec; ++v) x[l][v] = to_float(pack.v[v]);
      } else {
FASTSAM_UNROLL
        for (int v = 0; v < kVec; ++v) x[l][v] = base + v < c.n ? to_float(ptr[l][base + v]) : 0.0f;
      }
    }
FASTSAM_UNROLL
    for (int v = 0; v < kVec; ++v) {
      if (full || base + v < c.n) {
        float e[kLists];
FASTSAM_UNROLL
        for (int l = 0; l < kLists; ++l) e[l] = x[l][v];
        op(e, first_index + base + v);
FASTSAM_UNROLL
        for (int l = 0; l < kLists; ++l) x[l][v] = e[l];
      }
    }
FASTSAM_UNROLL
    for (int l = 0; l < kLists; ++l) {
      if (!((Op::kStores >> l) & 1u)) continue;
      if (full) {
        Pack<T> pack;
FASTSAM_UNROLL
        for (int v = 0; v < kVec; ++v) pack.v[v] = from_float<T>(x[l][v]);
        *reinterpret_cast<Pack<T>*>(ptr[l] + base) = pack;
      } else {
FASTSAM_UNROLL
        for (int v = 0; v < kVec; ++v) {
          if (base + v < c.n) ptr[l][base + v] = from_float<T>(x[l][v]);
        }
      }
    }
  }
}

// Sum of term(values) over the elements the thread owns, in a fixed order (see the note above).
template <int kLists, typename T, int kDepth, class Term>
__host__ __device__ __forceinline__ float reduce_chunk(const TensorListMeta<kDepth>& meta, const ChunkRef& c, int tid,
                                                       int nthreads, const Term& term) {
  constexpr int kVec = Pack<T>::kVec;
  const T* ptr[kLists];
  bool aligned = true;
FASTSAM_UNROLL
  for (int l = 0; l < kLists; ++l) {
    ptr[l] = static_cast<const T*>(meta.addresses[l][c.tensor]) + c.start;
    aligned = aligned && is_aligned16(ptr[l]);
  }
  float acc = 0.0f;
  for (int64_t base = static_cast<int64_t>(tid) * kVec; base < c.n; base += static_cast<int64_t>(nthreads) * kVec) {
    const bool full = aligned && base + kVec <= c.n;
    float x[kLists][kVec];
FASTSAM_UNROLL
    for (int l = 0; l < kLists; ++l) {
      if (full) {
        const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(ptr[l] + base);
FASTSAM_UNROLL
        for (int v = 0; v < kVec; ++v) x[l][v] = to_float(pack.v[v]);
      } else {
FASTSAM_UNROLL
        for (int v = 0; v < kVec; ++v) x[l][v] = base + v < c.n ? to_float(ptr[l][base + v]) : 0.0f;
      }
    }
FASTSAM_UNROLL
    for (int v = 0; v < kVec; ++v) {
      if (full || base + v < c.n) {
        float e[kLists];
FASTSAM_UNROLL
        for (int l = 0; l < kLists; ++l) e[l] = x[l][v];
        acc += term(e);
      }
    }
  }
  return acc;
}

// `dst = src` for one list pair: the whole job of restore, and what the fused ops do when a
// found-inf flag (or a non-finite norm) says the arithmetic must be skipped.
template <int kSrc, int kDst>
struct CopyOp {
  static constexpr unsigned kLoads = 1u << kSrc;
  static constexpr unsigned kStores = 1u << kDst;
  __host__ __device__ __forceinline__ void operator()(float* e, int64_t) const { e[kDst] = e[kSrc]; }
};

// ------------------------------------------------------------------------------------------
// deterministic block reductions
// ------------------------------------------------------------------------------------------

// [note: reduction order]
// A shared-memory tree with a fixed shape: at each level thread i < s adds slot i + s into slot i.
// The order never depends on timing, so the result is bitwise reproducible; host_block_reduce
// below performs exactly the same additions for the host emulation.
struct SumCombine {
  __host__ __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct MaxCombine {
  // fmaxf ignores a NaN operand; the callers map NaN away before reducing.
  __host__ __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

#ifdef __CUDACC__
template <class Combine>
__device__ __forceinline__ float block_reduce(float v, Combine combine) {
  __shared__ float slots[kBlockSize];
  const int tid = static_cast<int>(threadIdx.x);
  slots[tid] = v;
  __syncthreads();
FASTSAM_UNROLL
  for (int s = kBlockSize / 2; s > 0; s >>= 1) {
    if (tid < s) slots[tid] = combine(slots[tid], slots[tid + s]);
    __syncthreads();
  }
  const float total = slots[0];
  __syncthreads();  // the slots may be reused by the next reduction of the same kernel
  return total;
}
#endif

template <class Combine>
inline float host_block_reduce(float* slots, Combine combine) {
  for (int s = kBlockSize / 2; s > 0; s >>= 1) {
    for (int tid = 0; tid < s; ++tid) slots[tid] = combine(slots[tid], slots[tid + s]);
  }
  return slots[0];
}

// ------------------------------------------------------------------------------------------
// executors: launch on a stream, or run the same per-thread code on the host (tests)
// ------------------------------------------------------------------------------------------

// Every multi-tensor kernel is a Body with
//   static void run(const Args&..., int block, int tid, int nthreads)
// (element-wise), or, for the one-result-per-block reductions,
//   static float thread_partial(const Args&..., int block, int tid, int nthreads)
//   static void finish(const Args&..., int block, float block_total)

#ifdef __CUDACC__
template <class Body, class... Args>
__global__ void __launch_bounds__(kBlockSize) body_kernel(const Args... args) {
  Body::run(args..., static_cast<int>(blockIdx.x), static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
}

template <class Body, class... Args>
__global__ void __launch_bounds__(kBlockSize) reduce_body_kernel(const Args... args) {
  const int block = static_cast<int>(blockIdx.x);
  const float partial =
      Body::thread_partial(args..., block, static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x));
  const float total = block_reduce(partial, SumCombine());
  if (threadIdx.x == 0) Body::finish(args..., block, total);
}

struct DeviceExec {
  static constexpr bool kHost = false;
  cudaStream_t stream;

  template <class Body, class... Args>
  cudaError_t launch(int grid, const Args&... args) const {
    static_assert((0 + ... + sizeof(Args)) <= kKernelArgBytes, "kernel arguments exceed 4 KiB");
    if (grid <= 0) return cudaSuccess;
    body_kernel<Body, Args...><<<grid, kBlockSize, 0, stream>>>(args...);
    return cudaGetLastError();
  }

  template <class Body, class... Args>
  cudaError_t launch_reduce(int grid, const Args&... args) const {
    static_assert((0 + ... + sizeof(Args)) <= kKernelArgBytes, "kernel arguments exceed 4 KiB");
    if (grid <= 0) return cudaSuccess;
    reduce_body_kernel<Body, Args...><<<grid, kBlockSize, 0, stream>>>(args...);
    return cudaGetLastError();
  }
};
#endif

// Runs a grid on the host, one block after the other and one thread after the other. Valid for
// bodies whose threads do not communicate (all element-wise bodies), and for reductions through
// host_block_reduce, which mirrors the device tree.
struct HostExec {
  static constexpr bool kHost = true;

  template <class Body, class... Args>
  cudaError_t launch(int grid, const Args&... args) const {
    for (int block = 0; block < grid; ++block) {
      for (int tid = 0; tid < kBlockSize; ++tid) Body::run(args..., block, tid, kBlockSize);
    }
    return cudaSuccess;
  }

  template <class Body, class... Args>
  cudaError_t launch_reduce(int grid, const Args&... args) const {
    float slots[kBlockSize];
    for (int block = 0; block < grid; ++block) {
      for (int tid = 0; tid < kBlockSize; ++tid) slots[tid] = Body::thread_partial(args..., block, tid, kBlockSize);
      Body::finish(args..., block, host_block_reduce(slots, SumCombine()));
    }
    return cudaSuccess;
  }
};

// *out = the sum of count per-block partial sums, in a fixed order: one block, thread tid adds
// partials tid, tid + nthreads, ... in turn, then the block tree. The second half of every
// deterministic global reduction (grad_norm, Momentum-SAM's fused steps).
struct SumPartialsArgs {
  const float* partials;
  int64_t count;
  float* out;
};

struct SumPartialsBody {
  static __host__ __device__ float thread_partial(const SumPartialsArgs& args, int, int tid, int nthreads) {
    float acc = 0.0f;
    for (int64_t i = tid; i < args.count; i += nthreads) acc += args.partials[i];
    return acc;
  }
  static __host__ __device__ void finish(const SumPartialsArgs& args, int, float total) { *args.out = total; }
};

template <class Exec>
cudaError_t sum_partials(const Exec& exec, const float* partials, int64_t count, float* out) {
  return exec.template launch_reduce<SumPartialsBody>(1, SumPartialsArgs{partials, count, out});
}

}  // namespace cuda
}  // namespace fastsam
