// The one torch-facing file of the CUDA extension: registers the kernels of csrc/<op>.cu with
// torch.library as the operators fastsam_cuda::<op>, implemented for the CUDA dispatch key.
//
// The Python side (the "cuda backend" section at the end of each fastsam/ops/<op>.py) calls these
// ops, registers their fake implementations for torch.compile, and falls back to the torch backend
// when an op raises NotImplementedError carrying kFallbackTag (a memory layout the multi-tensor
// kernels do not take). Every check happens before the first launch, so a rejected call modifies
// nothing.
//
// The schemas mirror the backend contracts in the op docstrings; where a contract argument can be
// a float or a tensor (lr) the schema has both (`Tensor? lr_tensor, float lr`). The contracts' `mode`
// is called `norm_mode` here: torch.compile's functionalization passes a mutating op's arguments
// by name next to its own argument called `mode`, and the two would collide.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "launchers.h"

namespace fastsam {
namespace cuda {
namespace {

// Marks errors after which the Python side runs the torch backend instead (see the file comment).
constexpr const char* kFallbackTag = "[fastsam:fallback]";

DType kernel_dtype(const at::Tensor& t, const char* what) {
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK_VALUE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16, "fastsam cuda: ", what,
                    " must be float32, float16 or bfloat16, got ", s);
  return s == at::kFloat ? DType::kFloat32 : (s == at::kHalf ? DType::kFloat16 : DType::kBFloat16);
}

// Same element order in storage: equal strides wherever the size is above 1.
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

NormMode parse_norm_mode(c10::string_view mode) {
  if (mode == "plain") return NormMode::kPlain;
  if (mode == "adaptive") return NormMode::kAdaptive;
  if (mode == "fisher") return NormMode::kFisher;
  TORCH_CHECK_VALUE(false, "fastsam cuda: mode must be plain, adaptive or fisher, got ", std::string(mode));
}

// The data pointers of several lists that run through one multi-tensor launch, list-major, plus the
// element counts. Every list must match the first tensor-for-tensor in device, dtype, shape and
// strides, and be dense: the kernels walk each tensor's storage as one flat array.
class TensorRows {
 public:
  explicit TensorRows(at::TensorList first, const char* first_name) : n_(static_cast<int>(first.size())) {
    TORCH_CHECK_VALUE(!first.empty(), "fastsam cuda: ", first_name, " is empty");
    device_ = first[0].device();
    scalar_type_ = first[0].scalar_type();
    dtype_ = kernel_dtype(first[0], first_name);
    TORCH_CHECK_VALUE(device_.is_cuda(), "fastsam cuda: ", first_name, " must be CUDA tensors, got ", device_);
    numels_.reserve(n_);
    for (const at::Tensor& t : first) numels_.push_back(t.numel());
    add(first, first_name, first);
  }

  void add(at::TensorList list, const char* name, at::TensorList reference) {
    TORCH_CHECK_VALUE(static_cast<int>(list.size()) == n_, "fastsam cuda: ", name, " has ", list.size(),
                      " tensors, expected ", n_);
    for (int t = 0; t < n_; ++t) {
      const at::Tensor& x = list[t];
      const at::Tensor& ref = reference[t];
      TORCH_CHECK_VALUE(x.device() == device_, "fastsam cuda: ", name, "[", t, "] is on ", x.device(),
                        ", expected ", device_);
      TORCH_CHECK_VALUE(x.scalar_type() == scalar_type_, "fastsam cuda: ", name, "[", t, "] is ", x.scalar_type(),
                        ", expected ", scalar_type_);
      TORCH_CHECK_VALUE(x.sizes() == ref.sizes(), "fastsam cuda: ", name, "[", t, "] has shape ", x.sizes(),
                        ", expected ", ref.sizes());
      TORCH_CHECK_NOT_IMPLEMENTED(x.is_non_overlapping_and_dense() && same_layout(x, ref),
                                  kFallbackTag, " fastsam cuda: ", name, "[", t,
                                  "] is not dense or its strides differ from the parameter's");
      rows_.push_back(x.numel() > 0 ? x.data_ptr() : nullptr);
    }
  }

  void* const* rows() const { return rows_.data(); }
  const int64_t* numels() const { return numels_.data(); }
  int size() const { return n_; }
  at::Device device() const { return device_; }
  DType dtype() const { return dtype_; }

 private:
  int n_;
  at::Device device_{at::kCPU};
  at::ScalarType scalar_type_{at::kFloat};
  DType dtype_{DType::kFloat32};
  std::vector<void*> rows_;
  std::vector<int64_t> numels_;
};

// A one-element device scalar as fp32 (converted on the device when it is not fp32 already).
at::Tensor device_scalar(const at::Tensor& t, const at::Device& device, const char* what) {
  TORCH_CHECK_VALUE(t.numel() == 1, "fastsam cuda: ", what, " must have one element, got ", t.numel());
  TORCH_CHECK_VALUE(t.device() == device, "fastsam cuda: ", what, " is on ", t.device(), ", expected ", device);
  return t.to(at::kFloat).contiguous();
}

cudaStream_t stream_on(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }

int64_t abi_version() { return kAbiVersion; }

at::Tensor grad_sq_norm_cuda(at::TensorList grads, at::TensorList params, c10::string_view mode, double eta) {
  const NormMode m = parse_norm_mode(mode);
  TensorRows rows(grads, "grads");
  if (m == NormMode::kAdaptive) rows.add(params, "params", grads);
  c10::cuda::CUDAGuard guard(rows.device());
  const int64_t count = grad_norm_partials_count(rows.numels(), rows.size());
  const auto options = at::TensorOptions().dtype(at::kFloat).device(rows.device());
  at::Tensor partials = at::empty({count > 0 ? count : 1}, options);
  at::Tensor out = at::empty({}, options);
  C10_CUDA_CHECK(grad_sq_norm(rows.dtype(), m, static_cast<float>(eta), rows.rows(), rows.numels(), rows.size(),
                              partials.data_ptr<float>(), out.data_ptr<float>(), stream_on(rows.device())));
  return out;
}

void perturb_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups, const at::Tensor& norm,
                  double rho, c10::string_view mode, double eta, double eps, double beta, int64_t seed,
                  int64_t offset) {
  TORCH_CHECK_VALUE(beta > 0.0 && beta <= 1.0, "fastsam cuda: beta must be in (0, 1], got ", beta);
  TensorRows rows(params, "params");
  rows.add(grads, "grads", params);
  rows.add(backups, "backups", params);
  if (beta < 1.0) {
    // SWP counts elements in logical (row-major) order; the kernels count in storage order.
    for (size_t t = 0; t < params.size(); ++t) {
      TORCH_CHECK_NOT_IMPLEMENTED(params[t].is_contiguous(), kFallbackTag, " fastsam cuda: SWP (beta < 1) needs ",
                                  "contiguous tensors; params[", t, "] is not");
    }
  }
  c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor norm32 = device_scalar(norm, rows.device(), "norm");
  const PerturbConfig config{parse_norm_mode(mode),          static_cast<float>(rho),  static_cast<float>(eta),
                             static_cast<float>(eps),  static_cast<float>(beta), static_cast<uint64_t>(seed),
                             offset};
  C10_CUDA_CHECK(perturb(rows.dtype(), rows.rows(), rows.numels(), rows.size(), norm32.data_ptr<float>(), config,
                         stream_on(rows.device())));
}

void restore_cuda(at::TensorList params, at::TensorList backups) {
  TensorRows rows(params, "params");
  rows.add(backups, "backups", params);
  c10::cuda::CUDAGuard guard(rows.device());
  C10_CUDA_CHECK(restore(rows.dtype(), rows.rows(), rows.numels(), rows.size(), stream_on(rows.device())));
}

void restore_sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                           at::TensorList momentum_buffers, const c10::optional<at::Tensor>& lr_tensor, double lr,
                           double momentum, double dampening, bool nesterov, double weight_decay, bool maximize,
                           bool is_first_step, const c10::optional<at::Tensor>& grad_scale,
                           const c10::optional<at::Tensor>& found_inf) {
  TensorRows rows(params, "params");
  rows.add(grads, "grads", params);
  rows.add(backups, "backups", params);
  const bool has_momentum = !momentum_buffers.empty();
  TORCH_CHECK_VALUE(has_momentum == (momentum != 0.0),
                    "fastsam cuda: momentum buffers must be given exactly when momentum != 0");
  if (has_momentum) rows.add(momentum_buffers, "momentum_buffers", params);
  c10::cuda::CUDAGuard guard(rows.device());
  at::Tensor lr32, scale32, found32;
  if (lr_tensor.has_value()) lr32 = device_scalar(*lr_tensor, rows.device(), "lr");
  if (grad_scale.has_value()) scale32 = device_scalar(*grad_scale, rows.device(), "grad_scale");
  if (found_inf.has_value()) found32 = device_scalar(*found_inf, rows.device(), "found_inf");
  SgdConfig config;
  config.lr_ptr = lr32.defined() ? lr32.data_ptr<float>() : nullptr;
  config.lr = static_cast<float>(lr);
  config.has_momentum = has_momentum;
  config.momentum = static_cast<float>(momentum);
  config.dampening = dampening;
  config.weight_decay = static_cast<float>(weight_decay);
  config.nesterov = nesterov;
  config.maximize = maximize;
  config.is_first_step = is_first_step;
  config.grad_scale = scale32.defined() ? scale32.data_ptr<float>() : nullptr;
  config.found_inf = found32.defined() ? found32.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(restore_sgd_step(rows.dtype(), rows.rows(), rows.numels(), rows.size(), config,
                                  stream_on(rows.device())));
}

void restore_adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                             at::TensorList state_steps, const c10::optional<at::Tensor>& lr_tensor, double lr,
                             double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize,
                             const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  TensorRows rows(params, "params");
  rows.add(grads, "grads", params);
  rows.add(backups, "backups", params);
  rows.add(exp_avgs, "exp_avgs", params);
  rows.add(exp_avg_sqs, "exp_avg_sqs", params);
  TORCH_CHECK_VALUE(amsgrad || max_exp_avg_sqs.empty(), "fastsam cuda: max_exp_avg_sqs given without amsgrad");
  if (amsgrad) rows.add(max_exp_avg_sqs, "max_exp_avg_sqs", params);
  TORCH_CHECK_VALUE(state_steps.size() == params.size(), "fastsam cuda: state_steps has ", state_steps.size(),
                    " tensors, expected ", params.size());
  const at::ScalarType step_type = state_steps[0].scalar_type();
  TORCH_CHECK_VALUE(step_type == at::kFloat || step_type == at::kDouble,
                    "fastsam cuda: state_steps must be float32 or float64, got ", step_type);
  std::vector<void*> steps;
  steps.reserve(state_steps.size());
  for (size_t t = 0; t < state_steps.size(); ++t) {
    const at::Tensor& s = state_steps[t];
    TORCH_CHECK_VALUE(s.numel() == 1 && s.device() == rows.device() && s.scalar_type() == step_type,
                      "fastsam cuda: state_steps[", t, "] must be a one-element ", step_type, " tensor on ",
                      rows.device());
    steps.push_back(s.data_ptr());
  }
  c10::cuda::CUDAGuard guard(rows.device());
  at::Tensor lr32, scale32, found32;
  if (lr_tensor.has_value()) lr32 = device_scalar(*lr_tensor, rows.device(), "lr");
  if (grad_scale.has_value()) scale32 = device_scalar(*grad_scale, rows.device(), "grad_scale");
  if (found_inf.has_value()) found32 = device_scalar(*found_inf, rows.device(), "found_inf");
  AdamWConfig config;
  config.lr_ptr = lr32.defined() ? lr32.data_ptr<float>() : nullptr;
  config.lr = static_cast<float>(lr);
  config.beta1 = beta1;
  config.beta2 = beta2;
  config.eps = static_cast<float>(eps);
  config.weight_decay = static_cast<float>(weight_decay);
  config.amsgrad = amsgrad;
  config.maximize = maximize;
  config.steps_fp64 = step_type == at::kDouble;
  config.grad_scale = scale32.defined() ? scale32.data_ptr<float>() : nullptr;
  config.found_inf = found32.defined() ? found32.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(restore_adamw_step(rows.dtype(), rows.rows(), steps.data(), rows.numels(), rows.size(), config,
                                    stream_on(rows.device())));
}

void grad_mix_cuda(at::TensorList xs, at::TensorList ys, const at::Tensor& a, const at::Tensor& b, bool swap,
                   const c10::optional<at::Tensor>& skip) {
  TensorRows rows(xs, "xs");
  rows.add(ys, "ys", xs);
  c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor a32 = device_scalar(a, rows.device(), "a");
  const at::Tensor b32 = device_scalar(b, rows.device(), "b");
  at::Tensor skip32;
  if (skip.has_value()) skip32 = device_scalar(*skip, rows.device(), "skip");
  const GradMixConfig config{a32.data_ptr<float>(), b32.data_ptr<float>(), swap,
                             skip32.defined() ? skip32.data_ptr<float>() : nullptr};
  C10_CUDA_CHECK(grad_mix(rows.dtype(), rows.rows(), rows.numels(), rows.size(), config, stream_on(rows.device())));
}

void ema_direction_cuda(at::TensorList grads, at::TensorList momenta, double sigma, double lmbda,
                        const c10::optional<at::Tensor>& skip) {
  TensorRows rows(grads, "grads");
  rows.add(momenta, "momenta", grads);
  c10::cuda::CUDAGuard guard(rows.device());
  at::Tensor skip32;
  if (skip.has_value()) skip32 = device_scalar(*skip, rows.device(), "skip");
  C10_CUDA_CHECK(ema_direction(rows.dtype(), rows.rows(), rows.numels(), rows.size(), static_cast<float>(sigma),
                               static_cast<float>(lmbda), skip32.defined() ? skip32.data_ptr<float>() : nullptr,
                               stream_on(rows.device())));
}

// ---- Momentum-SAM (momentum_sam.cu) and SAMPa (sampa_extrapolate.cu) ----

// The per-block partials and the 0-dim fp32 result of a fused step that also reduces (as grad_sq_norm).
std::pair<at::Tensor, at::Tensor> reduction_buffers(const TensorRows& rows) {
  const int64_t count = grad_norm_partials_count(rows.numels(), rows.size());
  const auto options = at::TensorOptions().dtype(at::kFloat).device(rows.device());
  return {at::empty({count > 0 ? count : 1}, options), at::empty({}, options)};
}

at::Tensor momentum_sam_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                 const at::Tensor& s_old, double lr, double momentum, double weight_decay,
                                 bool nesterov) {
  TensorRows rows(params, "params");
  rows.add(grads, "grads", params);
  rows.add(bufs, "bufs", params);
  c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor s32 = device_scalar(s_old, rows.device(), "s_old");
  auto [partials, out] = reduction_buffers(rows);
  const MomentumSamSgdConfig config{s32.data_ptr<float>(), static_cast<float>(lr), static_cast<float>(momentum),
                                    static_cast<float>(weight_decay), nesterov};
  C10_CUDA_CHECK(momentum_sam_sgd(rows.dtype(), rows.rows(), rows.numels(), rows.size(), config,
                                  partials.data_ptr<float>(), out.data_ptr<float>(), stream_on(rows.device())));
  return out;
}

at::Tensor momentum_sam_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, const at::Tensor& s_old, double lr, double beta1,
                                   double beta2, double eps, double weight_decay, int64_t step) {
  TORCH_CHECK_VALUE(step >= 1, "fastsam cuda: step must be >= 1, got ", step);
  TensorRows rows(params, "params");
  rows.add(grads, "grads", params);
  rows.add(exp_avgs, "exp_avgs", params);
  rows.add(exp_avg_sqs, "exp_avg_sqs", params);
  c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor s32 = device_scalar(s_old, rows.device(), "s_old");
  auto [partials, out] = reduction_buffers(rows);
  const MomentumSamAdamWConfig config{s32.data_ptr<float>(), lr, beta1, beta2, static_cast<float>(eps), weight_decay,
                                      step};
  C10_CUDA_CHECK(momentum_sam_adamw(rows.dtype(), rows.rows(), rows.numels(), rows.size(), config,
                                    partials.data_ptr<float>(), out.data_ptr<float>(), stream_on(rows.device())));
  return out;
}

void momentum_sam_shift_cuda(at::TensorList params, at::TensorList bufs, const at::Tensor& scale,
                             at::TensorList backups) {
  TensorRows rows(params, "params");
  rows.add(bufs, "bufs", params);
  const bool has_backups = !backups.empty();
  if (has_backups) rows.add(backups, "backups", params);
  c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor scale32 = device_scalar(scale, rows.device(), "scale");
  C10_CUDA_CHECK(momentum_sam_shift(rows.dtype(), rows.rows(), rows.numels(), rows.size(), has_backups,
                                    scale32.data_ptr<float>(), stream_on(rows.device())));
}

void sampa_extrapolate_cuda(at::TensorList params, at::TensorList directions, at::TensorList backups,
                            at::TensorList bufs, double lr, double momentum, double weight_decay) {
  TensorRows rows(params, "params");
  rows.add(directions, "directions", params);
  rows.add(backups, "backups", params);
  const bool has_momentum = !bufs.empty() && momentum != 0.0;  // no buffers yet, or mu = 0: the term is left out
  if (has_momentum) rows.add(bufs, "bufs", params);
  c10::cuda::CUDAGuard guard(rows.device());
  const SampaExtrapolateConfig config{static_cast<float>(lr), has_momentum, static_cast<float>(momentum),
                                      static_cast<float>(weight_decay)};
  C10_CUDA_CHECK(sampa_extrapolate(rows.dtype(), rows.rows(), rows.numels(), rows.size(), config,
                                   stream_on(rows.device())));
}

// Both losses in one kernel dtype: as given when they already share one, else both as fp32
// (exactly the torch backend's `.float()` before the subtraction).
std::pair<at::Tensor, at::Tensor> loss_pair(const at::Tensor& before, const at::Tensor& after) {
  TORCH_CHECK_VALUE(before.dim() == 1 && after.sizes() == before.sizes(),
                    "fastsam cuda: losses must be 1-D of the same length");
  TORCH_CHECK_VALUE(before.device() == after.device() && before.is_cuda(),
                    "fastsam cuda: losses must be CUDA tensors on one device");
  const at::ScalarType s = before.scalar_type();
  const bool kernel_type = s == at::kFloat || s == at::kHalf || s == at::kBFloat16;
  if (kernel_type && after.scalar_type() == s) return {before.contiguous(), after.contiguous()};
  return {before.to(at::kFloat).contiguous(), after.to(at::kFloat).contiguous()};
}

at::Tensor sds_select_cuda(const at::Tensor& loss_before, const at::Tensor& loss_after, int64_t k) {
  const int64_t batch = loss_before.numel();
  TORCH_CHECK_VALUE(k >= 1 && k <= batch, "fastsam cuda: k must be in [1, ", batch, "], got ", k);
  TORCH_CHECK_NOT_IMPLEMENTED(batch <= kMaxSdsSelectBatch, kFallbackTag, " fastsam cuda: sds_select ranks batches "
                              "of up to ", kMaxSdsSelectBatch, " samples in one launch, got ", batch);
  c10::cuda::CUDAGuard guard(loss_before.device());
  const auto [before, after] = loss_pair(loss_before, loss_after);
  at::Tensor out = at::empty({k}, before.options().dtype(at::kLong));
  C10_CUDA_CHECK(sds_select(kernel_dtype(before, "losses"), before.data_ptr(), after.data_ptr(),
                            static_cast<int32_t>(batch), static_cast<int32_t>(k), out.data_ptr<int64_t>(),
                            stream_on(before.device())));
  return out;
}

at::Tensor sds_weights_cuda(const at::Tensor& loss_before, const at::Tensor& loss_after, double temperature) {
  const int64_t batch = loss_before.numel();
  TORCH_CHECK_VALUE(temperature > 0.0, "fastsam cuda: temperature must be > 0, got ", temperature);
  c10::cuda::CUDAGuard guard(loss_before.device());
  const auto [before, after] = loss_pair(loss_before, loss_after);
  at::Tensor out = at::empty({batch}, before.options().dtype(at::kFloat));
  if (batch == 0) return out;  // softmax over an empty batch: no weights (as torch.softmax)
  C10_CUDA_CHECK(sds_weights(kernel_dtype(before, "losses"), before.data_ptr(), after.data_ptr(),
                             batch, static_cast<float>(temperature), out.data_ptr<float>(),
                             stream_on(before.device())));
  return out;
}

// ---- layer-wise perturbation (AWP / WT-AWP / HERO): per_tensor_norm.cu, perturb_per_tensor.cu ----

void check_non_empty(at::TensorList list, const char* name) {
  for (size_t t = 0; t < list.size(); ++t) {
    TORCH_CHECK_VALUE(list[t].numel() > 0, "fastsam cuda: ", name, "[", t, "] is empty (the Python op drops "
                      "empty tensors before calling the kernels)");
  }
}

at::Tensor per_tensor_sq_norms_cuda(at::TensorList tensors) {
  TensorRows rows(tensors, "tensors");
  check_non_empty(tensors, "tensors");
  c10::cuda::CUDAGuard guard(rows.device());
  const int64_t count = per_tensor_norm_partials_count(rows.numels(), rows.size());
  const auto options = at::TensorOptions().dtype(at::kFloat).device(rows.device());
  at::Tensor partials = at::empty({count > 0 ? count : 1}, options);
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, options);
  C10_CUDA_CHECK(per_tensor_sq_norms(rows.dtype(), rows.rows(), rows.numels(), rows.size(), partials.data_ptr<float>(),
                                     out.data_ptr<float>(), stream_on(rows.device())));
  return out;
}

void perturb_per_tensor_cuda(at::TensorList params, at::TensorList grads, at::TensorList backups,
                             const at::Tensor& scales) {
  TensorRows rows(params, "params");
  rows.add(grads, "grads", params);
  rows.add(backups, "backups", params);
  check_non_empty(params, "params");
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.numel() == static_cast<int64_t>(params.size()),
                    "fastsam cuda: scales must be 1-D with one entry per parameter (", params.size(), "), got ",
                    scales.sizes());
  TORCH_CHECK_VALUE(scales.device() == rows.device(), "fastsam cuda: scales is on ", scales.device(), ", expected ",
                    rows.device());
  c10::cuda::CUDAGuard guard(rows.device());
  const at::Tensor scales32 = scales.to(at::kFloat).contiguous();
  C10_CUDA_CHECK(perturb_per_tensor(rows.dtype(), rows.rows(), rows.numels(), rows.size(), scales32.data_ptr<float>(),
                                    stream_on(rows.device())));
}

// ---- Bayesian SAM (bSAM): bsam_noise.cu, bsam_ascent.cu, bsam_step.cu ----

void bsam_noise_cuda(at::TensorList params, at::TensorList backups, at::TensorList precisions, const at::Tensor& noise,
                     double num_data) {
  TensorRows rows(params, "params");
  rows.add(backups, "backups", params);
  rows.add(precisions, "precisions", params);
  int64_t total = 0;
  for (size_t t = 0; t < params.size(); ++t) {
    // The noise is numbered in row-major order; the kernels walk storage order.
    TORCH_CHECK_NOT_IMPLEMENTED(params[t].is_contiguous() && backups[t].is_contiguous() &&
                                    precisions[t].is_contiguous(),
                                kFallbackTag, " fastsam cuda: bsam_noise_ needs contiguous tensors; params[", t,
                                "] (or its backup or precision) is not");
    total += params[t].numel();
  }
  TORCH_CHECK_VALUE(noise.scalar_type() == at::kFloat && noise.dim() == 1 && noise.numel() == total &&
                        noise.is_contiguous(),
                    "fastsam cuda: noise must be a contiguous 1-D float32 tensor of ", total, " elements, got ",
                    noise.scalar_type(), " of shape ", noise.sizes());
  TORCH_CHECK_VALUE(noise.device() == rows.device(), "fastsam cuda: noise is on ", noise.device(), ", expected ",
                    rows.device());
  TORCH_CHECK_VALUE(num_data >= 1.0, "fastsam cuda: num_data must be >= 1, got ", num_data);
  c10::cuda::CUDAGuard guard(rows.device());
  C10_CUDA_CHECK(bsam_noise(rows.dtype(), rows.rows(), rows.numels(), rows.size(), noise.data_ptr<float>(),
                            static_cast<float>(num_data), stream_on(rows.device())));
}

void bsam_ascent_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList precisions,
                      at::TensorList scales, double rho, bool adaptive) {
  TensorRows rows(params, "params");
  rows.add(backups, "backups", params);
  rows.add(grads, "grads", params);
  rows.add(precisions, "precisions", params);
  rows.add(scales, "scales", params);
  c10::cuda::CUDAGuard guard(rows.device());
  C10_CUDA_CHECK(bsam_ascent(rows.dtype(), rows.rows(), rows.numels(), rows.size(), static_cast<float>(rho), adaptive,
                             stream_on(rows.device())));
}

void bsam_step_cuda(at::TensorList params, at::TensorList backups, at::TensorList grads, at::TensorList momenta,
                    at::TensorList precisions, at::TensorList scales, const c10::optional<at::Tensor>& lr_tensor,
                    double lr, double beta1, double beta2, double weight_decay, double damping) {
  TensorRows rows(params, "params");
  rows.add(backups, "backups", params);
  rows.add(grads, "grads", params);
  rows.add(momenta, "momenta", params);
  rows.add(precisions, "precisions", params);
  rows.add(scales, "scales", params);
  c10::cuda::CUDAGuard guard(rows.device());
  at::Tensor lr32;
  if (lr_tensor.has_value()) lr32 = device_scalar(*lr_tensor, rows.device(), "lr");
  // 1 - beta and damping + weight_decay formed in double, as the torch backend's Python scalars.
  const BsamStepConfig config{lr32.defined() ? lr32.data_ptr<float>() : nullptr, static_cast<float>(lr),
                              static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
                              static_cast<float>(weight_decay), static_cast<float>(damping + weight_decay)};
  C10_CUDA_CHECK(bsam_step(rows.dtype(), rows.rows(), rows.numels(), rows.size(), config, stream_on(rows.device())));
}

}  // namespace
}  // namespace cuda
}  // namespace fastsam

// [note: schemas] One line per op; tests/test_csrc_schemas.py reads them from this file, so keep
// each schema a single string literal.
TORCH_LIBRARY(fastsam_cuda, m) {
  m.def("abi_version() -> int", &fastsam::cuda::abi_version);
  m.def("grad_sq_norm(Tensor[] grads, Tensor[] params, str norm_mode, float eta) -> Tensor");
  m.def("perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor norm, float rho, str norm_mode, float eta, float eps, float beta, int seed, int offset) -> ()");
  m.def("restore_(Tensor(a!)[] params, Tensor[] backups) -> ()");
  m.def("restore_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor(b!)[] momentum_buffers, Tensor? lr_tensor, float lr, float momentum, float dampening, bool nesterov, float weight_decay, bool maximize, bool is_first_step, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def("restore_adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor[] backups, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor? lr_tensor, float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()");
  m.def("grad_mix_(Tensor(a!)[] xs, Tensor(b!)[] ys, Tensor a, Tensor b, bool swap, Tensor? skip) -> ()");
  m.def("ema_direction_(Tensor(a!)[] grads, Tensor(b!)[] momenta, float sigma, float lmbda, Tensor? skip) -> ()");
  m.def("sds_select(Tensor loss_before, Tensor loss_after, int k) -> Tensor");
  m.def("sds_weights(Tensor loss_before, Tensor loss_after, float temperature) -> Tensor");
  // layer-wise perturbation (AWP / WT-AWP / HERO)
  m.def("per_tensor_sq_norms(Tensor[] tensors) -> Tensor");
  m.def("perturb_per_tensor_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] backups, Tensor scales) -> ()");
  // Momentum-SAM and SAMPa
  m.def("momentum_sam_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] bufs, Tensor s_old, float lr, float momentum, float weight_decay, bool nesterov) -> Tensor");
  m.def("momentum_sam_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, Tensor s_old, float lr, float beta1, float beta2, float eps, float weight_decay, int step) -> Tensor");
  m.def("momentum_sam_shift_(Tensor(a!)[] params, Tensor[] bufs, Tensor scale, Tensor(b!)[] backups) -> ()");
  m.def("sampa_extrapolate_(Tensor(a!)[] params, Tensor[] directions, Tensor(b!)[] backups, Tensor[] bufs, float lr, float momentum, float weight_decay) -> ()");
  // Bayesian SAM (bSAM)
  m.def("bsam_noise_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor[] precisions, Tensor noise, float num_data) -> ()");
  m.def("bsam_ascent_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor[] precisions, Tensor(b!)[] scales, float rho, bool adaptive) -> ()");
  m.def("bsam_step_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor(b!)[] momenta, Tensor(c!)[] precisions, Tensor[] scales, Tensor? lr_tensor, float lr, float beta1, float beta2, float weight_decay, float damping) -> ()");
}

TORCH_LIBRARY_IMPL(fastsam_cuda, CUDA, m) {
  m.impl("grad_sq_norm", &fastsam::cuda::grad_sq_norm_cuda);
  m.impl("perturb_", &fastsam::cuda::perturb_cuda);
  m.impl("restore_", &fastsam::cuda::restore_cuda);
  m.impl("restore_sgd_step_", &fastsam::cuda::restore_sgd_step_cuda);
  m.impl("restore_adamw_step_", &fastsam::cuda::restore_adamw_step_cuda);
  m.impl("grad_mix_", &fastsam::cuda::grad_mix_cuda);
  m.impl("ema_direction_", &fastsam::cuda::ema_direction_cuda);
  m.impl("sds_select", &fastsam::cuda::sds_select_cuda);
  m.impl("sds_weights", &fastsam::cuda::sds_weights_cuda);
  // layer-wise perturbation (AWP / WT-AWP / HERO)
  m.impl("per_tensor_sq_norms", &fastsam::cuda::per_tensor_sq_norms_cuda);
  m.impl("perturb_per_tensor_", &fastsam::cuda::perturb_per_tensor_cuda);
  // Momentum-SAM and SAMPa
  m.impl("momentum_sam_sgd_", &fastsam::cuda::momentum_sam_sgd_cuda);
  m.impl("momentum_sam_adamw_", &fastsam::cuda::momentum_sam_adamw_cuda);
  m.impl("momentum_sam_shift_", &fastsam::cuda::momentum_sam_shift_cuda);
  m.impl("sampa_extrapolate_", &fastsam::cuda::sampa_extrapolate_cuda);
  // Bayesian SAM (bSAM)
  m.impl("bsam_noise_", &fastsam::cuda::bsam_noise_cuda);
  m.impl("bsam_ascent_", &fastsam::cuda::bsam_ascent_cuda);
  m.impl("bsam_step_", &fastsam::cuda::bsam_step_cuda);
}

// The Python module fastsam._C (or the JIT build's module) itself is empty: importing it runs the
// registrations above.
#define FASTSAM_STRINGIFY_(x) #x
#define FASTSAM_STRINGIFY(x) FASTSAM_STRINGIFY_(x)
#define FASTSAM_PYINIT_(name) PyInit_##name
#define FASTSAM_PYINIT(name) FASTSAM_PYINIT_(name)

PyMODINIT_FUNC FASTSAM_PYINIT(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, FASTSAM_STRINGIFY(TORCH_EXTENSION_NAME),
                               "fastsam CUDA kernels (operators under torch.ops.fastsam_cuda)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
