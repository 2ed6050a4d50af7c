// Launcher of the CUDA kernel (adam_cuda.cu). No torch headers: raw pointers and a stream, so
// nvcc compiles the kernel on machines whose torch is a CPU build; ops_cuda.cpp binds it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "adam_math.h"

namespace fused_adam {

enum class DType : int8_t { kFloat32, kFloat16, kBFloat16, kUInt8 };

// param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, exp_avg_absmax, exp_avg_sq_absmax:
// the order of a segment's operands.
constexpr int kOperands = 8;

// One segment, its pointers at its first element (the absmaxes: at its first block of scales):
// nullptr for an absent operand (max_exp_avg_sq without amsgrad, master without master weights,
// absmaxes without 8-bit states, whose moments are uint8 codes; the master is float32).
struct Segment {
  void* data[kOperands];
  int64_t numel;
  int64_t index_base;  // stochastic rounding keys element i on index_base + i
  int32_t row;         // of the hyperparameter table
  DType dtype[kOperands];
  bool vec;            // every operand aligned for the kernel's vector width
};

// Elements per thread for a param dtype: 16 bytes of params (a segment's `vec` means every
// operand is aligned for that many elements of its own dtype).
int vector_width(DType param);

// Enqueues one step over `count` segments on `stream` (as few launches as the kernel's argument
// space allows) and returns the launch status. `rows`: the device hyperparameter table, float64
// [rows, kHyperFields]; `found_inf`: a device scalar, nonzero skips the step, or nullptr.
cudaError_t launch_adam_cuda(const Segment* segments, int64_t count, const double* rows,
                             const float* found_inf, bool amsgrad, bool quantized,
                             bool stochastic, cudaStream_t stream);

}  // namespace fused_adam
