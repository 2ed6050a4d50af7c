// CPU kernel of `fused_adam::adam_step_`: one pass over every segment of the launch, the
// segments' elements split across torch's intra-op threads as one range.
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
                             const AdamHyper s) {
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

// Buffer b's operands. With a master copy the math updates the master; the param is its
// rounded image (`param_out`).
struct Operands {
  Operand p, g, m, v, vmax, param_out;
  bool all_fp32;
};

Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type()}; }

Operands operands(const Buffers& b, int64_t i) {
  const bool master = !b.masters.empty(), amsgrad = !b.max_exp_avg_sqs.empty();
  Operands o{master ? operand(b.masters[i]) : operand(b.params[i]), operand(b.grads[i]),
             operand(b.exp_avgs[i]), operand(b.exp_avg_sqs[i]),
             amsgrad ? operand(b.max_exp_avg_sqs[i]) : Operand{},
             master ? operand(b.params[i]) : Operand{}, !master};
  for (const Operand* x : {&o.p, &o.g, &o.m, &o.v, &o.vmax}) o.all_fp32 &= x->dtype == at::kFloat;
  return o;
}

// Elements [lo, end) of one buffer, one row; the random bits of element i keyed on
// (key, i + index_shift).
template <WeightDecay wd, bool amsgrad>
void step_range(const Operands& o, const AdamHyper& h, bool stochastic, int64_t index_shift,
                int64_t lo, int64_t end) {
  // All fp32 (no master): the math runs in place over the whole range in one call; a call per
  // 1024-element block cost ~8% at 16M elements (16K calls through the ifunc).
  float pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock], xb[kBlock];
  for (int64_t len = 0; lo < end; lo += len) {
    len = o.all_fp32 ? end - lo : std::min(kBlock, end - lo);
    float* pf = o.p.fp32(lo, pb);
    float* gf = o.g.fp32(lo, gb);
    float* mf = o.m.fp32(lo, mb);
    float* vf = o.v.fp32(lo, vb);
    float* xf = amsgrad ? o.vmax.fp32(lo, xb) : nullptr;
    o.p.load(lo, len, pb);
    if (o.param_out.data) {  // the master, unless user code wrote the param (adam_math.h)
      with_float_type(o.param_out.dtype, [&](auto tag) {
        using T = std::decay_t<decltype(tag)>;
        adopt_written(pf, static_cast<const T*>(o.param_out.data) + lo, len);
      });
    }
    o.g.load(lo, len, gb);
    o.m.load(lo, len, mb);
    o.v.load(lo, len, vb);
    if (amsgrad) o.vmax.load(lo, len, xb);
    adam_fp32<wd, amsgrad>(pf, gf, mf, vf, xf, len, h);
    if (stochastic) {
      store_bf16_stochastic(pf, static_cast<c10::BFloat16*>(o.p.data) + lo, len, h.sr_key,
                            lo + index_shift);
    } else {
      o.p.store(lo, len, pf);
    }
    o.m.store(lo, len, mf);
    o.v.store(lo, len, vf);
    if (amsgrad) o.vmax.store(lo, len, xf);
    if (o.param_out.data) o.param_out.store(lo, len, pf);
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   at::TensorList masters, const at::Tensor& hyper, at::IntArrayRef segments,
                   bool stochastic, const std::optional<at::Tensor>& found_inf) {
  const Buffers b{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters};
  const std::vector<SegmentSpec> segs = check_launch(b, hyper, segments, stochastic, found_inf);
  // "Device" scalars of CPU tensors are host memory: read them here.
  if (segs.empty() || (found_inf && *found_inf->const_data_ptr<float>() != 0.0f)) return;
  std::vector<Operands> ops;
  for (size_t i = 0; i < params.size(); ++i) ops.push_back(operands(b, i));
  const double* rows = hyper.const_data_ptr<double>();
  const bool amsgrad = !max_exp_avg_sqs.empty();
  // The segments' elements as one range [0, total): a thread's share may span many small
  // segments (1000 params of 1-4K elements: a handful of tasks, not 1000).
  std::vector<int64_t> prefix(segs.size() + 1, 0);
  for (size_t k = 0; k < segs.size(); ++k) prefix[k + 1] = prefix[k] + segs[k].length;
  at::parallel_for(0, prefix.back(), kGrain, [&](int64_t begin, int64_t end) {
    size_t k = std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1;
    for (; begin < end; ++k) {
      const SegmentSpec& s = segs[k];
      const int64_t stop = std::min(end, prefix[k + 1]);
      const int64_t lo = s.start + (begin - prefix[k]);
      const AdamHyper h = hyper_from_row(rows + s.row * kHyperFields);
      dispatch_modes(weight_decay_mode(h), amsgrad, [&](auto wd, auto ams) {
        step_range<wd(), ams()>(ops[s.buffer], h, stochastic, s.index_base - s.start, lo,
                                lo + (stop - begin));
      });
      begin = stop;
    }
  });
}

}  // namespace
}  // namespace fused_adam

TORCH_LIBRARY_IMPL(fused_adam, CPU, m) { m.impl("adam_step_", &fused_adam::adam_step_cpu); }
