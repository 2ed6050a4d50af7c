// Schema of `fused_adam::adam_step_` and the argument checks both device kernels share.
#include "ops.h"

namespace fused_adam {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

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
                          const std::optional<at::Tensor>& found_inf) {
  for (const auto& [t, n, name] : {std::tuple{&clip_coef, 1, "clip_coef"},
                                   std::tuple{&device_scalars, 3, "device_scalars"},
                                   std::tuple{&found_inf, 1, "found_inf"}}) {
    TORCH_CHECK(!*t || ((*t)->numel() == n && (*t)->scalar_type() == at::kFloat &&
                        (*t)->device() == param.device() && (*t)->is_contiguous()),
                "fused_adam: ", name, " must be ", n, " float32 element(s) on the param's device");
  }
  TORCH_CHECK(!sr_key || (param.scalar_type() == at::kBFloat16 && !master),
              "fused_adam: stochastic rounding applies to bfloat16 params without a master copy");
  std::vector<const at::Tensor*> all = {&param, &grad, &exp_avg, &exp_avg_sq};
  if (max_exp_avg_sq) all.push_back(&*max_exp_avg_sq);
  if (master) {
    TORCH_CHECK(master->scalar_type() == at::kFloat, "fused_adam: the master copy must be float32");
    all.push_back(&*master);
  }
  for (const at::Tensor* t : all) {
    TORCH_CHECK(is_float_type(t->scalar_type()),
                "fused_adam: tensors must be float32, float16 or bfloat16, got ", t->scalar_type());
    TORCH_CHECK(t->device() == param.device(), "fused_adam: all tensors must be on ",
                param.device(), ", got one on ", t->device());
    TORCH_CHECK(t->numel() == param.numel(), "fused_adam: all tensors must have ", param.numel(),
                " elements, got ", t->numel());
    TORCH_CHECK(t->is_contiguous(), "fused_adam: the kernels step contiguous buffers");
  }
  const AdamScalars scalars{maximize ? -1.0f : 1.0f,          static_cast<float>(decay),
                            static_cast<float>(weight_decay),   static_cast<float>(lerp_weight),
                            static_cast<float>(beta2),          static_cast<float>(one_minus_beta2),
                            static_cast<float>(neg_step_size),  static_cast<float>(bc2_sqrt),
                            static_cast<float>(eps)};
  const WeightDecay mode = weight_decay == 0.0 ? WeightDecay::kNone
                           : decoupled         ? WeightDecay::kDecoupled
                                               : WeightDecay::kL2;
  const StochasticRounding rounding{sr_key.has_value(),
                                    static_cast<uint32_t>(sr_key.value_or(0)), index_base};
  return AdamConfig{scalars, mode, rounding};
}

}  // namespace fused_adam

TORCH_LIBRARY(fused_adam, m) {
  m.def(
      "adam_step_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!)? master, *, float decay, float weight_decay, "
      "float lerp_weight, float beta2, float one_minus_beta2, float neg_step_size, "
      "float bc2_sqrt, float eps, bool maximize, bool decoupled, int? sr_key=None, "
      "int index_base=0, Tensor? clip_coef=None, Tensor? device_scalars=None, "
      "Tensor? found_inf=None) -> ()");
}
