// Schema of `fused_adam::adam_step_` and the argument checks both device kernels share.
#include "ops.h"

namespace fused_adam {

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

std::vector<SegmentSpec> check_launch(const Buffers& b, const at::Tensor& hyper,
                                      at::IntArrayRef segments, bool stochastic,
                                      const std::optional<at::Tensor>& found_inf) {
  const size_t n = b.params.size();
  for (const auto& [list, name] : {std::pair{&b.grads, "grads"}, {&b.exp_avgs, "exp_avgs"},
                                   {&b.exp_avg_sqs, "exp_avg_sqs"}}) {
    TORCH_CHECK(list->size() == n, "fused_adam: ", name, " must hold one tensor per param buffer");
  }
  for (const auto& [list, name] : {std::pair{&b.max_exp_avg_sqs, "max_exp_avg_sqs"},
                                   {&b.masters, "masters"}, {&b.exp_avg_absmaxes, "exp_avg_absmaxes"},
                                   {&b.exp_avg_sq_absmaxes, "exp_avg_sq_absmaxes"}}) {
    TORCH_CHECK(list->empty() || list->size() == n, "fused_adam: ", name,
                " must be empty or hold one tensor per param buffer");
  }
  const bool quantized = b.quantized();
  TORCH_CHECK(b.exp_avg_sq_absmaxes.size() == b.exp_avg_absmaxes.size(),
              "fused_adam: 8-bit states are both moments or neither");
  TORCH_CHECK(!quantized || b.max_exp_avg_sqs.empty(),
              "fused_adam: amsgrad is not supported with 8-bit states");
  TORCH_CHECK(!stochastic || b.masters.empty(),
              "fused_adam: stochastic rounding applies to bfloat16 params without a master copy");
  const at::Device device = n ? b.params[0].device() : hyper.device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& param = b.params[i];
    TORCH_CHECK(!stochastic || param.scalar_type() == at::kBFloat16,
                "fused_adam: stochastic rounding applies to bfloat16 params");
    std::vector<const at::Tensor*> all = {&param, &b.grads[i]};
    if (quantized) {
      TORCH_CHECK(b.grads[i].scalar_type() == param.scalar_type(),
                  "fused_adam: with 8-bit states grads must have the param's dtype");
      for (const at::Tensor* codes : {&b.exp_avgs[i], &b.exp_avg_sqs[i]}) {
        TORCH_CHECK(codes->scalar_type() == at::kByte && codes->device() == device &&
                        codes->numel() == param.numel() && codes->is_contiguous(),
                    "fused_adam: 8-bit states must be contiguous uint8 codes, one per element");
      }
      const int64_t blocks = (param.numel() + kQBlock - 1) / kQBlock;
      for (const at::Tensor* absmax : {&b.exp_avg_absmaxes[i], &b.exp_avg_sq_absmaxes[i]}) {
        TORCH_CHECK(absmax->scalar_type() == at::kFloat && absmax->device() == device &&
                        absmax->numel() >= blocks && absmax->is_contiguous(),
                    "fused_adam: an absmax must be contiguous float32, one per block of ",
                    kQBlock, " elements");
      }
    } else {
      all.insert(all.end(), {&b.exp_avgs[i], &b.exp_avg_sqs[i]});
    }
    if (!b.max_exp_avg_sqs.empty()) all.push_back(&b.max_exp_avg_sqs[i]);
    if (!b.masters.empty()) {
      TORCH_CHECK(b.masters[i].scalar_type() == at::kFloat,
                  "fused_adam: the master copy must be float32");
      all.push_back(&b.masters[i]);
    }
    for (const at::Tensor* t : all) {
      TORCH_CHECK(is_float_type(t->scalar_type()),
                  "fused_adam: tensors must be float32, float16 or bfloat16, got ",
                  t->scalar_type());
      TORCH_CHECK(t->device() == device, "fused_adam: all tensors must be on ", device,
                  ", got one on ", t->device());
      TORCH_CHECK(t->numel() == param.numel(), "fused_adam: a buffer's tensors must have ",
                  param.numel(), " elements, got ", t->numel());
      TORCH_CHECK(t->is_contiguous(), "fused_adam: the kernels step contiguous buffers");
    }
  }
  TORCH_CHECK(hyper.scalar_type() == at::kDouble && hyper.dim() == 2 &&
                  hyper.size(1) == kHyperFields && hyper.is_contiguous(),
              "fused_adam: hyper must be a contiguous float64 [rows, ", kHyperFields, "] table");
  TORCH_CHECK(hyper.device() == device || hyper.device().is_cpu(),
              "fused_adam: hyper must be on the params' device or the CPU");
  TORCH_CHECK(!found_inf || (found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat &&
                             found_inf->device() == device),
              "fused_adam: found_inf must be one float32 element on the params' device");
  TORCH_CHECK(segments.size() % kSegmentFields == 0, "fused_adam: segments must hold ",
              kSegmentFields, " ints per segment");
  std::vector<SegmentSpec> out;
  out.reserve(segments.size() / kSegmentFields);
  for (size_t k = 0; k < segments.size(); k += kSegmentFields) {
    const SegmentSpec s{segments[k], segments[k + 1], segments[k + 2], segments[k + 3],
                        segments[k + 4]};
    TORCH_CHECK(s.buffer >= 0 && s.buffer < static_cast<int64_t>(n) && s.start >= 0 &&
                    s.length >= 0 && s.length <= b.params[s.buffer].numel() - s.start &&
                    s.row >= 0 && s.row < hyper.size(0),
                "fused_adam: segment ", k / kSegmentFields, " is out of range");
    TORCH_CHECK(!quantized || s.start % kQBlock == 0, "fused_adam: segment ", k / kSegmentFields,
                " must start on a block of ", kQBlock, " elements (8-bit states)");
    if (s.length) out.push_back(s);
  }
  return out;
}

}  // namespace fused_adam

TORCH_LIBRARY(fused_adam, m) {
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, "
      "Tensor(f!)[] exp_avg_absmaxes, Tensor(g!)[] exp_avg_sq_absmaxes, Tensor hyper, int[] segments, *, bool stochastic=False, Tensor? found_inf=None) -> ()");
}
