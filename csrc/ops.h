// The torch op `fused_adam::adam_step_`: its schema lives in ops.cpp, one kernel per device
// (adam_cpu.cpp, ops_cuda.cpp). Shared here: argument checks and the host scalars.
#pragma once

#include <torch/library.h>

#include <optional>

#include "adam_math.h"

namespace fused_adam {

struct AdamConfig {
  AdamScalars scalars;
  WeightDecay weight_decay;
  StochasticRounding rounding;
};

// Checks every tensor against the param (device, numel, contiguity, dtypes: each of
// float32/float16/bfloat16, the master copy float32) and returns the scalars rounded to fp32
// with the weight-decay mode.
AdamConfig check_and_pack(const at::Tensor& param, const at::Tensor& grad,
                           const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                           const std::optional<at::Tensor>& max_exp_avg_sq,
                           const std::optional<at::Tensor>& master, double decay,
                           double weight_decay, double lerp_weight, double beta2,
                           double one_minus_beta2, double neg_step_size, double bc2_sqrt,
                           double eps, bool maximize, bool decoupled,
                           std::optional<int64_t> sr_key, int64_t index_base,
                           const std::optional<at::Tensor>& clip_coef,
                           const std::optional<at::Tensor>& device_scalars,
                           const std::optional<at::Tensor>& found_inf);

}  // namespace fused_adam
