// CUDA kernel registration of `fused_adam::adam_step_`: checks, then the raw-pointer launcher
// of adam_cuda.cu on the current stream. Built only against a CUDA build of torch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "adam_cuda.h"
#include "ops.h"

namespace fused_adam {
namespace {

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "fused_adam: unsupported dtype ", t);
  }
}

Operand operand(const at::Tensor& t) { return {t.data_ptr(), to_dtype(t.scalar_type())}; }

void adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                    const std::optional<at::Tensor>& master, double decay, double weight_decay,
                    double lerp_weight, double beta2, double one_minus_beta2,
                    double neg_step_size, double bc2_sqrt, double eps, bool maximize,
                    bool decoupled, std::optional<int64_t> sr_key, int64_t index_base,
                    const std::optional<at::Tensor>& clip_coef,
                    const std::optional<at::Tensor>& device_scalars,
                    const std::optional<at::Tensor>& found_inf) {
  const AdamConfig config =
      check_and_pack(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, decay, weight_decay,
                     lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, maximize,
                     decoupled, sr_key, index_base, clip_coef, device_scalars, found_inf);
  const c10::cuda::CUDAGuard guard(param.device());
  const Operand absent{nullptr, DType::kFloat32};
  const AdamOperands operands{operand(param),
                              operand(grad),
                              operand(exp_avg),
                              operand(exp_avg_sq),
                              max_exp_avg_sq ? operand(*max_exp_avg_sq) : absent,
                              master ? operand(*master) : absent,
                              clip_coef ? clip_coef->const_data_ptr<float>() : nullptr,
                              device_scalars ? device_scalars->const_data_ptr<float>() : nullptr,
                              found_inf ? found_inf->const_data_ptr<float>() : nullptr,
                              param.numel()};
  const cudaError_t err = launch_adam_cuda(operands, config.scalars, config.weight_decay,
                                           config.rounding, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fused_adam: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace fused_adam

TORCH_LIBRARY_IMPL(fused_adam, CUDA, m) { m.impl("adam_step_", &fused_adam::adam_step_cuda); }
