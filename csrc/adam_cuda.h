// Launcher of the CUDA kernel (adam_cuda.cu). No torch headers: raw pointers and a stream, so
// nvcc compiles the kernel on machines whose torch is a CPU build; ops_cuda.cpp binds it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "adam_math.h"

namespace fused_adam {

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

struct Operand {
  void* data;  // nullptr: absent (max_exp_avg_sq without amsgrad, master without master weights)
  DType dtype;
};

struct AdamOperands {
  Operand param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master;  // master: float32
  const float* clip_coef;  // device scalar multiplying the grads, or nullptr
  const float* scalars;    // device [decay, neg_step_size, bc2_sqrt] replacing AdamScalars', or nullptr
  const float* found_inf;  // device scalar: nonzero skips the step, or nullptr
  int64_t numel;
};

// Enqueues one step over the operands on `stream` and returns the launch status.
cudaError_t launch_adam_cuda(const AdamOperands& operands, const AdamScalars& scalars,
                             WeightDecay weight_decay, const StochasticRounding& rounding,
                             cudaStream_t stream);

}  // namespace fused_adam
