// CPU kernel of `fused_adam::adam_step_`: one pass over a flat buffer, split across torch's
// intra-op threads, each chunk a plain loop over `adam_update` that the compiler vectorizes.
//
// The loop is compiled three times (target_clones) and picked at load time by the CPU:
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA + F16C), baseline. Vector body and scalar tail
// run the same per-element function with no contraction (-ffp-contract=off), so the result
// does not depend on the ISA, the thread count or where a chunk boundary falls.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "ops.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FA_CPU_CLONES
#endif

namespace fused_adam {
namespace {

// 64K elements per task: ~1.8 MB of traffic, large enough that thread hand-off (~5 us) is noise.
constexpr int64_t kGrain = 1 << 16;

template <typename P, typename G, typename S, WeightDecay wd, bool amsgrad>
FA_CPU_CLONES void adam_range(P* __restrict p, const G* __restrict g, S* __restrict m,
                              S* __restrict v, S* __restrict vmax, int64_t n,
                              const AdamScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = static_cast<float>(p[i]), mf = static_cast<float>(m[i]);
    float vf = static_cast<float>(v[i]), vmaxf = amsgrad ? static_cast<float>(vmax[i]) : 0.0f;
    adam_update<wd, amsgrad>(pf, static_cast<float>(g[i]), mf, vf, vmaxf, s);
    p[i] = static_cast<P>(pf);
    m[i] = static_cast<S>(mf);
    v[i] = static_cast<S>(vf);
    if (amsgrad) vmax[i] = static_cast<S>(vmaxf);
  }
}

// Calls fn(T{}) with T the C++ type of a float32/float16/bfloat16 dtype.
template <typename Fn>
void with_float_type(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, "fused_adam: unsupported dtype ", t);
  }
}

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                   double decay, double weight_decay, double lerp_weight, double beta2,
                   double one_minus_beta2, double neg_step_size, double bc2_sqrt, double eps,
                   bool maximize, bool decoupled) {
  const AdamConfig config = check_and_pack(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, decay,
                                           weight_decay, lerp_weight, beta2, one_minus_beta2,
                                           neg_step_size, bc2_sqrt, eps, maximize, decoupled);
  with_float_type(param.scalar_type(), [&](auto p_tag) {
    using P = decltype(p_tag);
    with_float_type(grad.scalar_type(), [&](auto g_tag) {
      using G = decltype(g_tag);
      with_float_type(exp_avg.scalar_type(), [&](auto s_tag) {
        using S = decltype(s_tag);
        // check_and_pack allows only the param dtype or float32 for grads and states.
        if constexpr ((std::is_same_v<G, P> || std::is_same_v<G, float>) &&
                      (std::is_same_v<S, P> || std::is_same_v<S, float>)) {
          P* p = param.data_ptr<P>();
          const G* g = grad.const_data_ptr<G>();
          S* m = exp_avg.data_ptr<S>();
          S* v = exp_avg_sq.data_ptr<S>();
          S* vmax = max_exp_avg_sq ? max_exp_avg_sq->data_ptr<S>() : nullptr;
          dispatch_modes(config.weight_decay, vmax != nullptr, [&](auto wd, auto amsgrad) {
            at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
              adam_range<P, G, S, wd(), amsgrad()>(p + begin, g + begin, m + begin, v + begin,
                                                   amsgrad() ? vmax + begin : nullptr,
                                                   end - begin, config.scalars);
            });
          });
        }
      });
    });
  });
}

}  // namespace
}  // namespace fused_adam

TORCH_LIBRARY_IMPL(fused_adam, CPU, m) { m.impl("adam_step_", &fused_adam::adam_step_cpu); }
