// CPU kernel of `fused_adam::adam_step_`: one pass over a flat buffer, split across torch's
// intra-op threads.
//
// The math runs on fp32 arrays in one vectorized loop (`adam_fp32`). Operands that are fp32 are
// updated in place; a bf16/fp16 operand goes through a 1024-element fp32 block on the stack
// (converted in, computed, rounded once on the way out), so dtype combinations cost a conversion
// loop each instead of a copy of the math per combination. The loops are compiled three times
// (target_clones) and picked at load time: x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA + F16C),
// baseline. Vector body and scalar tail run the same per-element function with no contraction
// (-ffp-contract=off), so results do not depend on the ISA, the thread count or chunking.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

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
// fp32 staging block for low-precision operands: 5 x 4 KB stays in a 32 KB L1.
constexpr int64_t kBlock = 1024;

template <WeightDecay wd, bool amsgrad>
FA_CPU_CLONES void adam_fp32(float* __restrict p, const float* __restrict g, float* __restrict m,
                             float* __restrict v, float* __restrict vmax, int64_t n,
                             const AdamScalars s) {
  for (int64_t i = 0; i < n; ++i) {
    float vmax_i = amsgrad ? vmax[i] : 0.0f;
    adam_update<wd, amsgrad>(p[i], g[i], m[i], v[i], vmax_i, s);
    if (amsgrad) vmax[i] = vmax_i;
  }
}

template <typename T>
FA_CPU_CLONES void to_fp32(const T* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename T>
FA_CPU_CLONES void from_fp32(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);  // round to nearest even
}

template <typename T>
FA_CPU_CLONES void adopt_written(float* __restrict master, const T* __restrict param, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    master[i] = master_or_written(master[i], static_cast<float>(static_cast<T>(master[i])),
                                  static_cast<float>(param[i]));
}

FA_CPU_CLONES void store_bf16_stochastic(const float* __restrict src, c10::BFloat16* __restrict dst,
                                         int64_t n, uint32_t key, int64_t index0) {
  for (int64_t i = 0; i < n; ++i)
    dst[i].x = bf16_stochastic(src[i], sr_bits(key, index0 + i));
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

// One tensor of the step: its data and dtype; `fp32(begin, len, block)` is where the math reads
// and writes elements [begin, begin + len): in place for fp32, else `block`, filled on `load`.
struct Operand {
  void* data = nullptr;
  at::ScalarType dtype = at::kFloat;

  float* fp32(int64_t begin, float* block) const {
    return dtype == at::kFloat ? static_cast<float*>(data) + begin : block;
  }
  void load(int64_t begin, int64_t len, float* block) const {
    if (dtype == at::kFloat) return;
    with_float_type(dtype, [&](auto tag) {
      using T = std::decay_t<decltype(tag)>;
      to_fp32(static_cast<const T*>(data) + begin, block, len);
    });
  }
  void store(int64_t begin, int64_t len, const float* src) const {
    if (dtype == at::kFloat && static_cast<float*>(data) + begin == src) return;
    with_float_type(dtype, [&](auto tag) {
      using T = std::decay_t<decltype(tag)>;
      from_fp32(src, static_cast<T*>(data) + begin, len);
    });
  }
};

Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type()}; }

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                   const std::optional<at::Tensor>& master, double decay, double weight_decay,
                   double lerp_weight, double beta2, double one_minus_beta2, double neg_step_size,
                   double bc2_sqrt, double eps, bool maximize, bool decoupled,
                   std::optional<int64_t> sr_key, int64_t index_base,
                   const std::optional<at::Tensor>& clip_coef,
                   const std::optional<at::Tensor>& device_scalars,
                   const std::optional<at::Tensor>& found_inf) {
  AdamConfig config =
      check_and_pack(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, decay, weight_decay,
                     lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, maximize,
                     decoupled, sr_key, index_base, clip_coef, device_scalars, found_inf);
  // "Device" scalars of CPU tensors are host memory: read them here.
  if (found_inf && *found_inf->const_data_ptr<float>() != 0.0f) return;  // a skipped step
  if (clip_coef) config.scalars.grad_mult *= *clip_coef->const_data_ptr<float>();
  if (device_scalars) {
    const float* d = device_scalars->const_data_ptr<float>();
    config.scalars.decay = d[0];
    config.scalars.neg_step_size = d[1];
    config.scalars.bc2_sqrt = d[2];
  }
  const StochasticRounding& sr = config.rounding;
  // With a master copy the math updates the master; the param is its rounded image.
  const Operand p = master ? operand(*master) : operand(param), g = operand(grad);
  const Operand m = operand(exp_avg), v = operand(exp_avg_sq);
  const Operand vmax = max_exp_avg_sq ? operand(*max_exp_avg_sq) : Operand{};
  const Operand param_out = master ? operand(param) : Operand{};
  const bool amsgrad = max_exp_avg_sq.has_value();
  // All fp32 (no master): the math runs in place over a thread's whole range in one call; a
  // call per 1024-element block cost ~8% at 16M elements (16K calls through the ifunc).
  bool all_fp32 = !master;
  for (const Operand* o : {&p, &g, &m, &v, &vmax}) all_fp32 &= o->dtype == at::kFloat;
  dispatch_modes(config.weight_decay, amsgrad, [&](auto wd, auto ams) {
    at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
      float pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock], xb[kBlock];
      for (int64_t lo = begin, len = 0; lo < end; lo += len) {
        len = all_fp32 ? end - lo : std::min(kBlock, end - lo);
        float* pf = p.fp32(lo, pb);
        float* gf = g.fp32(lo, gb);
        float* mf = m.fp32(lo, mb);
        float* vf = v.fp32(lo, vb);
        float* xf = ams() ? vmax.fp32(lo, xb) : nullptr;
        p.load(lo, len, pb);
        if (param_out.data) {  // the master, unless user code wrote the param (adam_math.h)
          with_float_type(param_out.dtype, [&](auto tag) {
            using T = std::decay_t<decltype(tag)>;
            adopt_written(pf, static_cast<const T*>(param_out.data) + lo, len);
          });
        }
        g.load(lo, len, gb);
        m.load(lo, len, mb);
        v.load(lo, len, vb);
        if (ams()) vmax.load(lo, len, xb);
        adam_fp32<wd(), ams()>(pf, gf, mf, vf, xf, len, config.scalars);
        if (sr.on) {
          store_bf16_stochastic(pf, static_cast<c10::BFloat16*>(p.data) + lo, len, sr.key,
                                sr.index_base + lo);
        } else {
          p.store(lo, len, pf);
        }
        m.store(lo, len, mf);
        v.store(lo, len, vf);
        if (ams()) vmax.store(lo, len, xf);
        if (param_out.data) param_out.store(lo, len, pf);
      }
    });
  });
}

}  // namespace
}  // namespace fused_adam

TORCH_LIBRARY_IMPL(fused_adam, CPU, m) { m.impl("adam_step_", &fused_adam::adam_step_cpu); }
