// Host emulation of the CUDA kernels, for the CPU test suite (tests/test_csrc_emulation.py).
//
// Compiles the kernel files with FASTSAM_HOST_EMULATION, which leaves out their device entry points,
// and runs the very same planning and per-thread code on the host through HostExec: every block of
// every launch, one thread after the other, on CPU memory. What this checks without a GPU: the
// chunk/tensor mapping, the vector/tail split, the element math of every op, the Philox mask and
// the SDS order. What it cannot check: anything about the device itself (memory model, launch
// configuration, shared-memory code of the SDS ranking kernel); the GPU tests cover those.
#define FASTSAM_HOST_EMULATION 1

#include "ema_direction.cu"
#include "grad_mix.cu"
#include "grad_norm.cu"
#include "perturb.cu"
#include "restore.cu"
#include "restore_adamw_step.cu"
#include "restore_sgd_step.cu"
#include "sds_select.cu"
#include "sds_weights.cu"
// layer-wise perturbation (AWP / WT-AWP / HERO)
#include "per_tensor_norm.cu"
#include "perturb_per_tensor.cu"
// Momentum-SAM and SAMPa
#include "momentum_sam.cu"
#include "sampa_extrapolate.cu"
// Bayesian SAM (bSAM)
#include "bsam_ascent.cu"
#include "bsam_noise.cu"
#include "bsam_step.cu"

using namespace fastsam::cuda;

namespace {

// Records, for every block of every launch, which tensor and which elements it covers. `rows` hold
// fake addresses (tensor index + 1), so the block's tensor can be recovered from its metadata.
template <int kDepth>
int plan_blocks(const int64_t* numels, int n, int64_t* out, int64_t max_blocks) {
  std::vector<void*> rows(static_cast<size_t>(kDepth) * n);
  for (int d = 0; d < kDepth; ++d) {
    for (int t = 0; t < n; ++t) rows[static_cast<size_t>(d) * n + t] = reinterpret_cast<void*>(static_cast<uintptr_t>(t + 1));
  }
  int64_t written = 0;
  int launch_id = 0;
  const cudaError_t err = for_each_launch<kDepth>(
      rows.data(), numels, n, [&](const TensorListMeta<kDepth>& meta, int blocks, int64_t chunk_base) {
        for (int b = 0; b < blocks; ++b) {
          if (written >= max_blocks) return cudaErrorInvalidValue;
          const ChunkRef c = locate_chunk(meta, b);
          for (int d = 0; d < kDepth; ++d) {
            if (meta.addresses[d][c.tensor] != meta.addresses[0][c.tensor]) return cudaErrorInvalidValue;
          }
          int64_t* row = out + written * 6;
          row[0] = launch_id;
          row[1] = chunk_base + b;
          row[2] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(meta.addresses[0][c.tensor])) - 1;
          row[3] = c.start;
          row[4] = c.n;
          row[5] = meta.element_offset[c.tensor] + c.start;
          ++written;
        }
        ++launch_id;
        return cudaSuccess;
      });
  return err == cudaSuccess ? static_cast<int>(written) : -1;
}

}  // namespace

extern "C" {

int fastsam_emu_max_tensors(int depth) {
  switch (depth) {
    case 1: return TensorListMeta<1>::kMaxTensors;
    case 2: return TensorListMeta<2>::kMaxTensors;
    case 3: return TensorListMeta<3>::kMaxTensors;
    case 4: return TensorListMeta<4>::kMaxTensors;
    case 6: return TensorListMeta<6>::kMaxTensors;
    case 7: return TensorListMeta<7>::kMaxTensors;
  }
  return -1;
}

int64_t fastsam_emu_chunk_size() { return kChunkSize; }

// Rows of (launch, global chunk, tensor, chunk start, chunk length, bucket index of the first element).
int fastsam_emu_plan(int depth, const int64_t* numels, int n, int64_t* out, int64_t max_blocks) {
  switch (depth) {
    case 1: return plan_blocks<1>(numels, n, out, max_blocks);
    case 3: return plan_blocks<3>(numels, n, out, max_blocks);
    case 7: return plan_blocks<7>(numels, n, out, max_blocks);
  }
  return -1;
}

void fastsam_emu_philox(uint64_t seed, const uint64_t* counters, int n, uint32_t* words, float* uniforms) {
  for (int i = 0; i < n; ++i) {
    words[i] = philox_first_word(seed, counters[i]);
    uniforms[i] = philox_uniform(seed, counters[i]);
  }
}

int64_t fastsam_emu_partials_count(const int64_t* numels, int n) { return grad_norm_partials_count(numels, n); }

int fastsam_emu_grad_sq_norm(int dtype, int mode, float eta, void* const* rows, const int64_t* numels, int n,
                             float* partials, float* out) {
  return launch_grad_sq_norm(HostExec{}, static_cast<DType>(dtype), static_cast<NormMode>(mode), eta, rows, numels,
                             n, partials, out);
}

int fastsam_emu_perturb(int dtype, void* const* rows, const int64_t* numels, int n, const float* norm, int mode,
                        float rho, float eta, float eps, float beta, uint64_t seed, int64_t offset) {
  const PerturbConfig config{static_cast<NormMode>(mode), rho, eta, eps, beta, seed, offset};
  return launch_perturb(HostExec{}, static_cast<DType>(dtype), rows, numels, n, norm, config);
}

int fastsam_emu_restore(int dtype, void* const* rows, const int64_t* numels, int n) {
  return launch_restore(HostExec{}, static_cast<DType>(dtype), rows, numels, n);
}

int fastsam_emu_restore_sgd_step(int dtype, void* const* rows, const int64_t* numels, int n, const float* lr_ptr,
                                 float lr, int has_momentum, float momentum, double dampening, float weight_decay,
                                 int nesterov, int maximize, int is_first_step, const float* grad_scale,
                                 const float* found_inf) {
  SgdConfig config;
  config.lr_ptr = lr_ptr;
  config.lr = lr;
  config.has_momentum = has_momentum != 0;
  config.momentum = momentum;
  config.dampening = dampening;
  config.weight_decay = weight_decay;
  config.nesterov = nesterov != 0;
  config.maximize = maximize != 0;
  config.is_first_step = is_first_step != 0;
  config.grad_scale = grad_scale;
  config.found_inf = found_inf;
  return launch_restore_sgd_step(HostExec{}, static_cast<DType>(dtype), rows, numels, n, config);
}

int fastsam_emu_restore_adamw_step(int dtype, void* const* rows, void* const* steps, const int64_t* numels, int n,
                                   const float* lr_ptr, float lr, double beta1, double beta2, float eps,
                                   float weight_decay, int amsgrad, int maximize, int steps_fp64,
                                   const float* grad_scale, const float* found_inf) {
  AdamWConfig config;
  config.lr_ptr = lr_ptr;
  config.lr = lr;
  config.beta1 = beta1;
  config.beta2 = beta2;
  config.eps = eps;
  config.weight_decay = weight_decay;
  config.amsgrad = amsgrad != 0;
  config.maximize = maximize != 0;
  config.steps_fp64 = steps_fp64 != 0;
  config.grad_scale = grad_scale;
  config.found_inf = found_inf;
  return launch_restore_adamw_step(HostExec{}, static_cast<DType>(dtype), rows, steps, numels, n, config);
}

int fastsam_emu_sds_select(int dtype, const void* before, const void* after, int batch, int k, int64_t* out) {
  return launch_sds_select(HostExec{}, static_cast<DType>(dtype), before, after, batch, k, out);
}

int fastsam_emu_sds_weights(int dtype, const void* before, const void* after, int64_t batch, float temperature,
                            float* out) {
  return launch_sds_weights(HostExec{}, static_cast<DType>(dtype), before, after, batch, temperature, out);
}

int fastsam_emu_grad_mix(int dtype, void* const* rows, const int64_t* numels, int n, const float* a, const float* b,
                         int swap, const float* skip) {
  const GradMixConfig config{a, b, swap != 0, skip};
  return launch_grad_mix(HostExec{}, static_cast<DType>(dtype), rows, numels, n, config);
}

int fastsam_emu_ema_direction(int dtype, void* const* rows, const int64_t* numels, int n, float sigma, float lmbda,
                              const float* skip) {
  return launch_ema_direction(HostExec{}, static_cast<DType>(dtype), rows, numels, n, sigma, lmbda, skip);
}

// ---- layer-wise perturbation (AWP / WT-AWP / HERO) ----

int64_t fastsam_emu_per_tensor_partials_count(const int64_t* numels, int n) {
  return per_tensor_norm_partials_count(numels, n);
}

int fastsam_emu_per_tensor_sq_norms(int dtype, void* const* rows, const int64_t* numels, int n, float* partials,
                                    float* out) {
  return launch_per_tensor_sq_norms(HostExec{}, static_cast<DType>(dtype), rows, numels, n, partials, out);
}

int fastsam_emu_perturb_per_tensor(int dtype, void* const* rows, const int64_t* numels, int n, const float* scales) {
  return launch_perturb_per_tensor(HostExec{}, static_cast<DType>(dtype), rows, numels, n, scales);
}

// ---- Momentum-SAM and SAMPa ----

int fastsam_emu_momentum_sam_sgd(int dtype, void* const* rows, const int64_t* numels, int n, const float* s_old,
                                 float lr, float momentum, float weight_decay, int nesterov, float* partials,
                                 float* out) {
  const MomentumSamSgdConfig config{s_old, lr, momentum, weight_decay, nesterov != 0};
  return launch_momentum_sam_sgd(HostExec{}, static_cast<DType>(dtype), rows, numels, n, config, partials, out);
}

int fastsam_emu_momentum_sam_adamw(int dtype, void* const* rows, const int64_t* numels, int n, const float* s_old,
                                   double lr, double beta1, double beta2, float eps, double weight_decay, int64_t step,
                                   float* partials, float* out) {
  const MomentumSamAdamWConfig config{s_old, lr, beta1, beta2, eps, weight_decay, step};
  return launch_momentum_sam_adamw(HostExec{}, static_cast<DType>(dtype), rows, numels, n, config, partials, out);
}

int fastsam_emu_momentum_sam_shift(int dtype, void* const* rows, const int64_t* numels, int n, int has_backups,
                                   const float* scale) {
  return launch_momentum_sam_shift(HostExec{}, static_cast<DType>(dtype), rows, numels, n, has_backups != 0, scale);
}

int fastsam_emu_sampa_extrapolate(int dtype, void* const* rows, const int64_t* numels, int n, float lr,
                                  int has_momentum, float momentum, float weight_decay) {
  const SampaExtrapolateConfig config{lr, has_momentum != 0, momentum, weight_decay};
  return launch_sampa_extrapolate(HostExec{}, static_cast<DType>(dtype), rows, numels, n, config);

}

// ---- Bayesian SAM (bSAM) ----

int fastsam_emu_bsam_noise(int dtype, void* const* rows, const int64_t* numels, int n, const float* noise,
                           float num_data) {
  return launch_bsam_noise(HostExec{}, static_cast<DType>(dtype), rows, numels, n, noise, num_data);
}

int fastsam_emu_bsam_ascent(int dtype, void* const* rows, const int64_t* numels, int n, float rho, int adaptive) {
  return launch_bsam_ascent(HostExec{}, static_cast<DType>(dtype), rows, numels, n, rho, adaptive != 0);
}

int fastsam_emu_bsam_step(int dtype, void* const* rows, const int64_t* numels, int n, const float* lr_ptr, float lr,
                          float one_minus_beta1, float one_minus_beta2, float weight_decay, float s_shift) {
  const BsamStepConfig config{lr_ptr, lr, one_minus_beta1, one_minus_beta2, weight_decay, s_shift};
  return launch_bsam_step(HostExec{}, static_cast<DType>(dtype), rows, numels, n, config);
}

}  // extern "C"
