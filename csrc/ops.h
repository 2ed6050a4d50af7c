// The torch op `fused_adam::adam_step_`: its schema lives in ops.cpp, one kernel per device
// (adam_cpu.cpp, ops_cuda.cpp). Shared here: the argument checks.
#pragma once

#include <torch/library.h>

#include <optional>
#include <vector>

#include "adam_math.h"

namespace fused_adam {

// The operands of one launch: buffer b's tensors are params[b], grads[b], ...; max_exp_avg_sqs
// (amsgrad), masters (master weights) and the absmaxes (8-bit states: exp_avgs and exp_avg_sqs
// hold uint8 codes, adam_math.h) are empty or hold one tensor per buffer.
struct Buffers {
  const at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters,
      exp_avg_absmaxes, exp_avg_sq_absmaxes;
  bool quantized() const { return !exp_avg_absmaxes.empty(); }
};

// Checks every tensor (device, numel, contiguity, dtypes: each of float32/float16/bfloat16, the
// master copies float32; with 8-bit states uint8 moments, grads of the param's dtype, fp32
// absmaxes of a scale per block, segments starting on a block, no amsgrad), the hyperparameter
// table (float64 [rows, kHyperFields]), found_inf and every segment against them; returns the
// segments.
std::vector<SegmentSpec> check_launch(const Buffers& b, const at::Tensor& hyper,
                                      at::IntArrayRef segments, bool stochastic,
                                      const std::optional<at::Tensor>& found_inf);

}  // namespace fused_adam
