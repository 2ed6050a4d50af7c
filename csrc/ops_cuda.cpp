// CUDA kernel registration of `fused_adam::adam_step_`: checks, the segments' pointers, then the
// raw-pointer launcher of adam_cuda.cu on the current stream. Built only against a CUDA build of
// torch.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "adam_cuda.h"
#include "ops.h"

namespace fused_adam {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kByte: return DType::kUInt8;
    default: TORCH_CHECK(false, "fused_adam: unsupported dtype ", t);
  }
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList masters, at::TensorList exp_avg_absmaxes,
                    at::TensorList exp_avg_sq_absmaxes, const at::Tensor& hyper,
                    at::IntArrayRef segments, bool stochastic,
                    const std::optional<at::Tensor>& found_inf) {
  const Buffers b{params,  grads,           exp_avgs,         exp_avg_sqs,
                  max_exp_avg_sqs, masters, exp_avg_absmaxes, exp_avg_sq_absmaxes};
  const std::vector<SegmentSpec> specs = check_launch(b, hyper, segments, stochastic, found_inf);
  if (specs.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  // Host rows go over once per launch (~1 KB; a copy the stream orders before the kernel).
  const at::Tensor rows = hyper.to(params[0].device(), /*non_blocking=*/true);
  const int width = vector_width(to_dtype(params[0].scalar_type()));
  std::vector<Segment> segs(specs.size());
  for (size_t k = 0; k < specs.size(); ++k) {
    const SegmentSpec& s = specs[k];
    const at::Tensor* tensors[kOperands] = {
        &params[s.buffer], &grads[s.buffer], &exp_avgs[s.buffer], &exp_avg_sqs[s.buffer],
        max_exp_avg_sqs.empty() ? nullptr : &max_exp_avg_sqs[s.buffer],
        masters.empty() ? nullptr : &masters[s.buffer],
        b.quantized() ? &exp_avg_absmaxes[s.buffer] : nullptr,
        b.quantized() ? &exp_avg_sq_absmaxes[s.buffer] : nullptr};
    Segment& sg = segs[k];
    sg.numel = s.length;
    sg.index_base = s.index_base;
    sg.row = static_cast<int32_t>(s.row);
    sg.vec = true;
    for (int i = 0; i < kOperands; ++i) {
      const at::Tensor* t = tensors[i];
      const int64_t at = i >= 6 ? s.start / kQBlock : s.start;  // (scales: one per block)
      sg.data[i] = t ? static_cast<char*>(t->data_ptr()) + at * t->element_size() : nullptr;
      sg.dtype[i] = t ? to_dtype(t->scalar_type()) : DType::kFloat32;
      if (t && i < 6) {
        sg.vec &= reinterpret_cast<uintptr_t>(sg.data[i]) % (width * t->element_size()) == 0;
      }
    }
  }
  const cudaError_t err = launch_adam_cuda(
      segs.data(), static_cast<int64_t>(segs.size()), rows.const_data_ptr<double>(),
      found_inf ? found_inf->const_data_ptr<float>() : nullptr, !max_exp_avg_sqs.empty(),
      b.quantized(), stochastic, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fused_adam: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace fused_adam

TORCH_LIBRARY_IMPL(fused_adam, CUDA, m) { m.impl("adam_step_", &fused_adam::adam_step_cuda); }
