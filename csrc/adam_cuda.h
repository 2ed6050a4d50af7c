// Launcher of the CUDA kernel (adam_cuda.cu). No torch headers: raw pointers and a stream, so
// nvcc compiles the kernel on machines whose torch is a CPU build; ops_cuda.cpp binds it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "adam_math.h"

namespace fused_adam {

enum class DType : int { kFloat32, kFloat16, kBFloat16 };

struct AdamBuffers {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;  // nullptr unless amsgrad
  int64_t numel;
  DType param_dtype, grad_dtype, state_dtype;  // grad and states: the param dtype or float32
};

// Enqueues one step over the buffers on `stream` and returns the launch status.
cudaError_t launch_adam_cuda(const AdamBuffers& buffers, const AdamScalars& scalars,
                             WeightDecay weight_decay, cudaStream_t stream);

}  // namespace fused_adam
