// The torch-free entry points of the CUDA kernels, one per op (each defined in csrc/<op>.cu).
//
// binding.cpp turns tensors into the raw arrays these take; nothing here knows about torch.
// Conventions:
// * A bucket is a list of tensors on one device with one storage dtype (fp32, fp16 or bf16); every
//   list of an op has one entry per tensor, with the same element count and memory layout.
// * `rows` is list-major: rows[l * n + t] is the data pointer of tensor t of list l.
// * Per-step scalars that live on the device (norm, lr, grad scale, found-inf flag, step counts)
//   are passed as device pointers and read by the kernels: no host synchronisation. A null pointer
//   means "absent".
// * Work is queued on `stream`; the return value is the launch status (cudaGetLastError).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastsam {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class NormMode : int32_t { kPlain = 0, kAdaptive = 1, kFisher = 2 };

// Bumped whenever a signature or schema changes, so a stale build is detected at load time.
constexpr int64_t kAbiVersion = 4;

// sds_select ranks a batch in one launch up to this size (O(B^2 / #threads) comparisons).
constexpr int64_t kMaxSdsSelectBatch = 65536;

// Number of per-block partial sums grad_sq_norm writes: the size of its `partials` buffer.
int64_t grad_norm_partials_count(const int64_t* numels, int n);

// grad_norm: *out = sum over all elements of g^2 (plain), ((|w| + eta) g)^2 (adaptive) or
// g^2 / (1 + eta g^2) (fisher). rows: [grads] for plain/fisher, [grads, params] for adaptive.
// Deterministic: per-block partials, then one block adds them in a fixed order.
cudaError_t grad_sq_norm(DType dtype, NormMode mode, float eta, void* const* rows, const int64_t* numels, int n,
                         float* partials, float* out, cudaStream_t stream);

// perturb: rows [params, grads, backups]. backup = w; unless *norm is non-finite,
// w += s * d with s = rho / (norm + eps) (/ beta with SWP) and d = g, (|w|+eta)^2 g or g / (1 + eta g^2);
// with beta < 1 only elements whose Philox uniform u(seed, offset + i) < beta move.
struct PerturbConfig {
  NormMode mode;
  float rho;
  float eta;
  float eps;
  float beta;
  uint64_t seed;
  int64_t offset;
};
cudaError_t perturb(DType dtype, void* const* rows, const int64_t* numels, int n, const float* norm,
                    const PerturbConfig& config, cudaStream_t stream);

// restore: rows [params, backups]; w = backup.
cudaError_t restore(DType dtype, void* const* rows, const int64_t* numels, int n, cudaStream_t stream);

// restore + torch.optim.SGD step: rows [params, grads, backups] or, with momentum,
// [params, grads, backups, momentum_buffers] (has_momentum). found_inf set: only w = backup.
struct SgdConfig {
  const float* lr_ptr;  // read instead of lr when not null
  float lr;
  bool has_momentum;    // rows include the momentum buffers
  float momentum;
  double dampening;     // 1 - dampening is formed in double, as torch forms its alpha
  float weight_decay;
  bool nesterov;
  bool maximize;
  bool is_first_step;
  const float* grad_scale;  // g / *grad_scale when not null
  const float* found_inf;   // skip the step when not null and non-zero
};
cudaError_t restore_sgd_step(DType dtype, void* const* rows, const int64_t* numels, int n, const SgdConfig& config,
                             cudaStream_t stream);

// restore + torch.optim.AdamW step: rows [params, grads, backups, exp_avgs, exp_avg_sqs] plus
// max_exp_avg_sqs with amsgrad; `steps[t]` points to tensor t's step count (one fp32 or fp64
// value), which is incremented first (unless found_inf is set) and then used for the bias
// corrections. found_inf set: only w = backup, moments and steps unchanged.
struct AdamWConfig {
  const float* lr_ptr;
  float lr;
  double beta1;
  double beta2;
  float eps;
  float weight_decay;
  bool amsgrad;
  bool maximize;
  bool steps_fp64;
  const float* grad_scale;
  const float* found_inf;
};
cudaError_t restore_adamw_step(DType dtype, void* const* rows, void* const* steps, const int64_t* numels, int n,
                               const AdamWConfig& config, cudaStream_t stream);

// grad_mix: rows [xs, ys]. Unless *skip is non-zero: x = a x + b y, or with swap y = a x + b y and
// x = y_old. a, b (required) and skip (may be null) are device scalars.
struct GradMixConfig {
  const float* a;
  const float* b;
  bool swap;
  const float* skip;
};
cudaError_t grad_mix(DType dtype, void* const* rows, const int64_t* numels, int n, const GradMixConfig& config,
                     cudaStream_t stream);

// ema_direction: rows [grads, momenta]. Unless *skip is non-zero (skip may be null):
// g = g - sigma m and m = lmbda m + (1 - lmbda) g_old.
cudaError_t ema_direction(DType dtype, void* const* rows, const int64_t* numels, int n, float sigma, float lmbda,
                          const float* skip, cudaStream_t stream);

// ---- Momentum-SAM (momentum_sam.cu) and SAMPa (sampa_extrapolate.cu) ---------------------------

// momentum_sam_sgd: rows [params, grads, bufs], params at the ascent point w~ on entry:
// d = g + wd w~; w = w~ + *s_old v; v = mu v + d; w -= lr (nesterov ? d + mu v : v); and
// *out = sum of the new v^2 as stored. `partials` holds grad_norm_partials_count(numels, n) floats
// (one per block; the same chunking). Deterministic, as grad_sq_norm.
struct MomentumSamSgdConfig {
  const float* s_old;  // device scalar, required
  float lr;
  float momentum;
  float weight_decay;
  bool nesterov;
};
cudaError_t momentum_sam_sgd(DType dtype, void* const* rows, const int64_t* numels, int n,
                             const MomentumSamSgdConfig& config, float* partials, float* out, cudaStream_t stream);

// momentum_sam_adamw: rows [params, grads, exp_avgs, exp_avg_sqs]: w = w~ + *s_old m, AdamW moments
// and bias-corrected step (step t >= 1; corrections formed in double), then w *= 1 - lr wd;
// *out = sum of the new m^2 as stored; `partials` as for momentum_sam_sgd.
struct MomentumSamAdamWConfig {
  const float* s_old;
  double lr;
  double beta1;
  double beta2;
  float eps;
  double weight_decay;
  int64_t step;
};
cudaError_t momentum_sam_adamw(DType dtype, void* const* rows, const int64_t* numels, int n,
                               const MomentumSamAdamWConfig& config, float* partials, float* out, cudaStream_t stream);

// momentum_sam_shift: rows [params, bufs] or, with has_backups, [params, bufs, backups]:
// backup = w (has_backups), w += *scale v.
cudaError_t momentum_sam_shift(DType dtype, void* const* rows, const int64_t* numels, int n, bool has_backups,
                               const float* scale, cudaStream_t stream);

// sampa_extrapolate: rows [params, directions, backups] or, with has_momentum, [..., bufs]:
// backup = w; w -= lr (d + weight_decay w + momentum buf).
struct SampaExtrapolateConfig {
  float lr;
  bool has_momentum;  // rows include the momentum buffers
  float momentum;
  float weight_decay;
};
cudaError_t sampa_extrapolate(DType dtype, void* const* rows, const int64_t* numels, int n,
                              const SampaExtrapolateConfig& config, cudaStream_t stream);

// sds_select: out[0..k) = indices of the k largest s_i = after_i - before_i (fp32), by decreasing s,
// ties by lower index, NaN ranked as -inf (last). 1 <= k <= batch <= kMaxSdsSelectBatch.
cudaError_t sds_select(DType dtype, const void* before, const void* after, int32_t batch, int32_t k, int64_t* out,
                       cudaStream_t stream);

// sds_weights: out = softmax(s / temperature) over the batch, NaN sharpness mapped to -inf; batch >= 1.
cudaError_t sds_weights(DType dtype, const void* before, const void* after, int64_t batch, float temperature,
                        float* out, cudaStream_t stream);

// ---- layer-wise perturbation (AWP / WT-AWP / HERO) ----------------------------------------------

// Number of per-block partial sums per_tensor_sq_norms writes: the size of its `partials` buffer.
int64_t per_tensor_norm_partials_count(const int64_t* numels, int n);

// per_tensor_norm: rows [tensors], every tensor non-empty; out[t] = sum of tensor t's squares (fp32).
// Deterministic: per-block partials, then one block per tensor adds its partials in a fixed order.
cudaError_t per_tensor_sq_norms(DType dtype, void* const* rows, const int64_t* numels, int n, float* partials,
                                float* out, cudaStream_t stream);

// perturb_per_tensor: rows [params, grads, backups], every tensor non-empty; backup = w and, unless
// scales[t] is non-finite, w += scales[t] * g (scales: fp32 device vector, one entry per tensor).
cudaError_t perturb_per_tensor(DType dtype, void* const* rows, const int64_t* numels, int n, const float* scales,
                               cudaStream_t stream);

// ---- Bayesian SAM (bSAM) -------------------------------------------------------------------------

// bsam_noise: rows [params, backups, precisions], contiguous. backup = w; w += n_i / sqrt(num_data * s),
// where n_i = noise[i] and i is the element's position in the bucket (tensor by tensor, row-major):
// `noise` is the bucket's flat fp32 draw of standard normals (device memory, sum(numels) values).
cudaError_t bsam_noise(DType dtype, void* const* rows, const int64_t* numels, int n, const float* noise,
                       float num_data, cudaStream_t stream);

// bsam_ascent: rows [params, backups, grads, precisions, scales]. w = backup + rho d / s with d = g, or
// backup^2 g when adaptive; scales h = sqrt(s) |g|.
cudaError_t bsam_ascent(DType dtype, void* const* rows, const int64_t* numels, int n, float rho, bool adaptive,
                        cudaStream_t stream);

// bsam_step: rows [params, backups, grads, momenta, precisions, scales]. From w = backup:
// m += (1 - beta1) (g + weight_decay w - m); w -= lr m / s; s += (1 - beta2) (h + s_shift - s).
struct BsamStepConfig {
  const float* lr_ptr;  // read instead of lr when not null
  float lr;
  float one_minus_beta1;
  float one_minus_beta2;
  float weight_decay;
  float s_shift;  // damping + weight_decay
};
cudaError_t bsam_step(DType dtype, void* const* rows, const int64_t* numels, int n, const BsamStepConfig& config,
                      cudaStream_t stream);

}  // namespace cuda
}  // namespace fastsam
