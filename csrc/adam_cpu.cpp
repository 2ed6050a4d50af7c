// CPU kernel of `fused_adam::adam_step_`: one pass over every segment of the launch, the
// segments' elements split across torch's intra-op threads as one range.
//
// One loop per element (`adam_loop`): each operand is loaded in its own dtype, widened to fp32 in
// registers, updated, rounded once and stored. It is a template over the operand mixes the
// optimizer makes: the param stored as fp32 or bf16, as bf16 rounded stochastically, or as the
// bf16 image of an fp32 master; grads of the param's dtype; both moments in one dtype, fp32 or
// bf16 (8 mixes). An fp32 staging block per operand instead (the kernel up to 2026-11) left the
// bf16 rows at 57-76% of the stream limit, 16M elements on 2 cores: five passes over L1 per
// block, and a loop that streams one operand at a time (bench/NOTES.md 19). Any other mix (fp32
// grads on bf16 params through p.grad_dtype, moments of two dtypes) still goes through such
// blocks and the fp32 loop: the same bits, slower; so does any mix with fp16 operands, whose
// conversions vectorize only as the hardware's instructions on a block (`load_fp32`). 8-bit
// states (adam_math.h) take `adam_loop_q8`, a block of 256 elements at a time (decode, update,
// encode with the block's new absmax), threads' shares cut on blocks. The loops are compiled
// three times (target_clones) and picked at load time: x86-64-v4 (AVX-512), x86-64-v3 (AVX2 +
// FMA + F16C), baseline. Vector body and scalar tail run the same per-element function with no
// contraction (-ffp-contract=off), so results depend on neither the ISA, the thread count nor
// chunking.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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
constexpr int64_t kBlock = 256;  // step_staged's fp32 blocks: 5 of them stay in L1 (NOTES 25)

// How the param operand is stored: in its own dtype (rounded to nearest even), bf16 rounded
// stochastically, or as the rounded image of an fp32 master that the math updates.
enum class Param : int { kPlain, kStochastic, kMaster };

template <typename T>
FA_HD float widen(T x) { return static_cast<float>(x); }

template <typename T>
FA_HD T narrow(float x) { return static_cast<T>(x); }  // round to nearest even

// Element i of the param operand as the math reads it: the master, unless user code wrote the
// param since (adam_math.h), or the param.
template <typename T, Param kind>
FA_HD float load_param(const T* p, const float* master, int64_t i) {
  if constexpr (kind == Param::kMaster) {
    return master_or_written(master[i], widen(narrow<T>(master[i])), widen(p[i]));
  }
  return widen(p[i]);
}

// Stores the updated param of element i; `random`: its stochastic-rounding bits (kStochastic).
template <typename T, Param kind>
FA_HD void store_param(T* p, float* master, int64_t i, float p_i, uint32_t random) {
  if constexpr (kind == Param::kMaster) master[i] = p_i;
  if constexpr (kind == Param::kStochastic) {
    p[i].x = bf16_stochastic(p_i, random);
  } else {
    p[i] = narrow<T>(p_i);
  }
}

// Operands at the first element of a run: param and grad (T), exp_avg, exp_avg_sq and
// max_exp_avg_sq (S), the master (fp32, kMaster only). __restrict on parameters, not on locals
// copied from a struct: GCC ignores the latter and versions the loop for aliasing, and with a
// master and amsgrad (11 checks, over its limit of 10) left it scalar.
template <typename T, Param kind, typename S, WeightDecay wd, bool amsgrad>
FA_CPU_CLONES void adam_loop(T* __restrict p, const T* __restrict g, S* __restrict m,
                             S* __restrict v, S* __restrict vmax, float* __restrict master,
                             int64_t n, const AdamHyper s, int64_t index0) {
  // stochastic rounding: element i's index is index0 + i = hi * 2**32 + lo; callers split runs
  // so that hi is the same for all of them (sr_bits_at)
  const uint32_t high = sr_high(static_cast<uint32_t>(static_cast<uint64_t>(index0) >> 32));
  uint32_t lo = static_cast<uint32_t>(index0);
  for (int64_t i = 0; i < n; ++i, ++lo) {
    float p_i = load_param<T, kind>(p, master, i), m_i = widen(m[i]), v_i = widen(v[i]);
    float vmax_i = amsgrad ? widen(vmax[i]) : 0.0f;
    adam_update<wd, amsgrad>(p_i, widen(g[i]), m_i, v_i, vmax_i, s);
    store_param<T, kind>(p, master, i, p_i,
                         kind == Param::kStochastic ? sr_bits_at(s.sr_key, lo, high) : 0u);
    m[i] = narrow<S>(m_i);
    v[i] = narrow<S>(v_i);
    if (amsgrad) vmax[i] = narrow<S>(vmax_i);
  }
}

// 8-bit states (adam_math.h), a run that starts on a block: per block of kQBlock elements the
// moments are decoded, updated and kept in fp32 on the stack (the param update reads those),
// then encoded with the block's new absmax. 2 B/param of states instead of 8.
template <typename T, Param kind, WeightDecay wd>
FA_CPU_CLONES void adam_loop_q8(T* __restrict p, const T* __restrict g, uint8_t* __restrict mq,
                                uint8_t* __restrict vq, float* __restrict m_absmax,
                                float* __restrict v_absmax, float* __restrict master, int64_t n,
                                const AdamHyper s, int64_t index0) {
  float mb[kQBlock], vb[kQBlock];
  for (int64_t b0 = 0, block = 0; b0 < n; b0 += kQBlock, ++block) {
    const int64_t len = std::min<int64_t>(kQBlock, n - b0);
    const float m_scale = m_absmax[block], v_scale = v_absmax[block];
    uint32_t m_top = 0, v_top = 0;
    for (int64_t j = 0; j < len; ++j) {
      const int64_t i = b0 + j;
      float p_i = load_param<T, kind>(p, master, i), unused = 0.0f;
      float m_i = q8_decode<QState::kExpAvg>(mq[i], m_scale);
      float v_i = q8_decode<QState::kExpAvgSq>(vq[i], v_scale);
      adam_update<wd, false>(p_i, widen(g[i]), m_i, v_i, unused, s);
      store_param<T, kind>(p, master, i, p_i,
                           kind == Param::kStochastic ? sr_bits(s.sr_key, index0 + i) : 0u);
      mb[j] = m_i;
      vb[j] = v_i;
      m_top = std::max(m_top, abs_bits(m_i));
      v_top = std::max(v_top, abs_bits(v_i));
    }
    const float m_new = float_from_bits(m_top), v_new = float_from_bits(v_top);
    const float m_inverse = q8_inverse(m_new), v_inverse = q8_inverse(v_new);
    for (int64_t j = 0; j < len; ++j) {
      mq[b0 + j] = q8_encode<QState::kExpAvg>(mb[j], m_inverse);
      vq[b0 + j] = q8_encode<QState::kExpAvgSq>(vb[j], v_inverse);
    }
    m_absmax[block] = m_new;
    v_absmax[block] = v_new;
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

// Blocks of an operand to and from fp32 (the staged loop), as the casts above vectorize; fp16
// with the hardware's instructions (vcvtph2ps / vcvtps2ph: AVX-512F, 16 elements at a time, or
// F16C, 8), picked once at run time; the tail, and CPUs without F16C, in C++ to the same bits
// (round to nearest even, a NaN's payload kept as the instructions keep it). GCC 12 vectorizes
// no _Float16 conversion, and c10::Half's bit manipulation, vectorized, costs ~0.08 ns per
// element and conversion: at 7 of them per element an all-fp16 step of 16M elements took 12.3 ms
// on one thread, torch's fused 6.8 (bench/NOTES.md 25). So fp16 mixes take the staged loop.
template <typename T>
void load_fp32(const T* src, float* dst, int64_t n) { to_fp32(src, dst, n); }

template <typename T>
void store_fp32(const float* src, T* dst, int64_t n) { from_fp32(src, dst, n); }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// fp32 -> fp16 as vcvtps2ph rounds, for the elements the instructions leave (a block's tail, a
// CPU without F16C): c10::Half's rounding, but a NaN keeps the top of its payload, quieted, as
// the instruction keeps it (c10::Half makes every NaN 0x7E00: a NaN's bits then depended on
// the ISA and on where a thread's share starts; found by review).
void half_from_fp32(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = float_bits(src[i]);
    dst[i] = std::isnan(src[i])
                 ? c10::Half(static_cast<uint16_t>(((bits >> 16) & 0x8000u) | 0x7E00u |
                                                   ((bits >> 13) & 0x3FFu)),
                             c10::Half::from_bits())
                 : static_cast<c10::Half>(src[i]);
  }
}

__attribute__((target("avx512f"))) void half_to_fp32_x16(const c10::Half* __restrict src,
                                                         float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(0xFFFF, _mm256_loadu_si256(
                                  reinterpret_cast<const __m256i*>(src + i))));
  to_fp32(src + i, dst + i, n - i);
}

__attribute__((target("avx512f"))) void fp32_to_half_x16(const float* __restrict src,
                                                         c10::Half* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(dst + i),
        _mm512_maskz_cvtps_ph(0xFFFF, _mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  half_from_fp32(src + i, dst + i, n - i);
}

__attribute__((target("avx,f16c"))) void half_to_fp32_x8(const c10::Half* __restrict src,
                                                         float* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(
                                  reinterpret_cast<const __m128i*>(src + i))));
  to_fp32(src + i, dst + i, n - i);
}

__attribute__((target("avx,f16c"))) void fp32_to_half_x8(const float* __restrict src,
                                                         c10::Half* __restrict dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  half_from_fp32(src + i, dst + i, n - i);
}

// The widest of the three the CPU has and torch's CPU capability allows (ATEN_CPU_CAPABILITY
// caps both: "avx2" takes F16C, "default" c10::Half; tests run each so).
int half_width() {
  static const int width = [] {
    const std::string allowed = at::get_cpu_capability();
    if (allowed == "AVX512" && __builtin_cpu_supports("avx512f")) return 16;
    if (allowed != "DEFAULT" && __builtin_cpu_supports("f16c")) return 8;
    return 1;
  }();
  return width;
}

void load_fp32(const c10::Half* src, float* dst, int64_t n) {
  switch (half_width()) {
    case 16: return half_to_fp32_x16(src, dst, n);
    case 8: return half_to_fp32_x8(src, dst, n);
    default: return to_fp32(src, dst, n);
  }
}

void store_fp32(const float* src, c10::Half* dst, int64_t n) {
  switch (half_width()) {
    case 16: return fp32_to_half_x16(src, dst, n);
    case 8: return fp32_to_half_x8(src, dst, n);
    default: return half_from_fp32(src, dst, n);
  }
}
#endif

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
      load_fp32(static_cast<const T*>(data) + begin, block, len);
    });
  }
  void store(int64_t begin, int64_t len, const float* src) const {
    if (dtype == at::kFloat && static_cast<float*>(data) + begin == src) return;
    with_float_type(dtype, [&](auto tag) {
      using T = std::decay_t<decltype(tag)>;
      store_fp32(src, static_cast<T*>(data) + begin, len);
    });
  }
};

// Buffer b's operands. With a master copy the math updates the master; the param is its
// rounded image (`param_out`).
struct Operands {
  Operand p, g, m, v, vmax, param_out;
  float *m_absmax, *v_absmax;  // 8-bit states: m and v hold codes (adam_loop_q8), else null
  bool amsgrad, fused;  // fused: a mix adam_loop is instantiated for
};

Operand operand(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type()}; }

Operands operands(const Buffers& b, int64_t i) {
  const bool master = !b.masters.empty(), amsgrad = !b.max_exp_avg_sqs.empty();
  Operands o{master ? operand(b.masters[i]) : operand(b.params[i]), operand(b.grads[i]),
             operand(b.exp_avgs[i]), operand(b.exp_avg_sqs[i]),
             amsgrad ? operand(b.max_exp_avg_sqs[i]) : Operand{},
             master ? operand(b.params[i]) : Operand{},
             b.quantized() ? b.exp_avg_absmaxes[i].data_ptr<float>() : nullptr,
             b.quantized() ? b.exp_avg_sq_absmaxes[i].data_ptr<float>() : nullptr, amsgrad, false};
  const bool half = b.params[i].scalar_type() == at::kHalf || o.m.dtype == at::kHalf;
  o.fused = !half && o.g.dtype == b.params[i].scalar_type() && o.m.dtype == o.v.dtype &&
            (!amsgrad || o.vmax.dtype == o.v.dtype);
  return o;
}

// Element `i` of operand x (null when x is absent).
void* element(const Operand& x, int64_t i) {
  return x.data ? static_cast<char*>(x.data) + i * c10::elementSize(x.dtype) : nullptr;
}

// Calls fn(T{}, kind) with T the C++ type of the param as stored and `kind` how (Param).
template <typename Fn>
void with_param(const Operands& o, bool stochastic, Fn&& fn) {
  const Operand& param = o.param_out.data ? o.param_out : o.p;
  with_float_type(param.dtype, [&](auto t_tag) {
    using T = std::decay_t<decltype(t_tag)>;
    using P = Param;
    if constexpr (!std::is_same_v<T, float>) {
      if (o.param_out.data) return fn(t_tag, std::integral_constant<P, P::kMaster>{});
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (stochastic) return fn(t_tag, std::integral_constant<P, P::kStochastic>{});
    }
    fn(t_tag, std::integral_constant<P, P::kPlain>{});
  });
}

// Elements [lo, end) of one buffer with a mix adam_loop is instantiated for: one call, or one
// per 2**32 stochastic-rounding indices crossed (adam_loop works in 32-bit index lanes).
template <WeightDecay wd, bool amsgrad>
void step_fused(const Operands& o, const AdamHyper& h, bool stochastic, int64_t index0,
                int64_t lo, int64_t end) {
  const Operand& param = o.param_out.data ? o.param_out : o.p;
  const bool master = o.param_out.data != nullptr;
  with_param(o, stochastic, [&](auto t_tag, auto kind) {
    using T = std::decay_t<decltype(t_tag)>;
    with_float_type(o.m.dtype, [&](auto s_tag) {
      using S = std::decay_t<decltype(s_tag)>;
      if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<S, c10::Half>) {
        TORCH_CHECK(false, "fused_adam: fp16 operands take the staged loop");
      } else {
        for (int64_t len = 0; lo < end; lo += len, index0 += len) {
          len = std::min(end - lo, (int64_t{1} << 32) - (index0 & 0xffffffff));
          adam_loop<T, kind(), S, wd, amsgrad>(
              static_cast<T*>(element(param, lo)), static_cast<const T*>(element(o.g, lo)),
              static_cast<S*>(element(o.m, lo)), static_cast<S*>(element(o.v, lo)),
              static_cast<S*>(element(o.vmax, lo)),
              master ? static_cast<float*>(element(o.p, lo)) : nullptr, len, h, index0);
        }
      }
    });
  });
}

// Elements [lo, end) of one buffer with 8-bit states, lo on a block.
template <WeightDecay wd>
void step_q8(const Operands& o, const AdamHyper& h, bool stochastic, int64_t index0, int64_t lo,
             int64_t end) {
  const Operand& param = o.param_out.data ? o.param_out : o.p;
  const bool master = o.param_out.data != nullptr;
  with_param(o, stochastic, [&](auto t_tag, auto kind) {
    using T = std::decay_t<decltype(t_tag)>;
    adam_loop_q8<T, kind(), wd>(
        static_cast<T*>(element(param, lo)), static_cast<const T*>(element(o.g, lo)),
        static_cast<uint8_t*>(o.m.data) + lo, static_cast<uint8_t*>(o.v.data) + lo,
        o.m_absmax + lo / kQBlock, o.v_absmax + lo / kQBlock,
        master ? static_cast<float*>(element(o.p, lo)) : nullptr, end - lo, h, index0);
  });
}

// Elements [lo, end) of one buffer with any other mix: each operand that is not fp32 goes
// through a 1024-element fp32 block (5 x 4 KB stays in a 32 KB L1), the math is the fp32 loop.
template <WeightDecay wd, bool amsgrad>
void step_staged(const Operands& o, const AdamHyper& h, bool stochastic, int64_t index0,
                 int64_t lo, int64_t end) {
  float pb[kBlock], gb[kBlock], mb[kBlock], vb[kBlock], xb[kBlock];
  for (int64_t len = 0; lo < end; lo += len, index0 += len) {
    len = std::min(kBlock, end - lo);
    float* pf = o.p.fp32(lo, pb);
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
    adam_loop<float, Param::kPlain, float, wd, amsgrad>(pf, o.g.fp32(lo, gb), mf, vf, xf, nullptr,
                                                        len, h, index0);
    if (stochastic) {
      store_bf16_stochastic(pf, static_cast<c10::BFloat16*>(o.p.data) + lo, len, h.sr_key, index0);
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
                   at::TensorList masters, at::TensorList exp_avg_absmaxes,
                   at::TensorList exp_avg_sq_absmaxes, const at::Tensor& hyper,
                   at::IntArrayRef segments, bool stochastic,
                   const std::optional<at::Tensor>& found_inf) {
  const Buffers b{params,  grads,           exp_avgs,         exp_avg_sqs,
                  max_exp_avg_sqs, masters, exp_avg_absmaxes, exp_avg_sq_absmaxes};
  const std::vector<SegmentSpec> segs = check_launch(b, hyper, segments, stochastic, found_inf);
  // "Device" scalars of CPU tensors are host memory: read them here.
  if (segs.empty() || (found_inf && *found_inf->const_data_ptr<float>() != 0.0f)) return;
  std::vector<Operands> ops;
  for (size_t i = 0; i < params.size(); ++i) ops.push_back(operands(b, i));
  const double* rows = hyper.const_data_ptr<double>();
  const bool amsgrad = !max_exp_avg_sqs.empty();
  // The segments' elements as one range [0, total): a thread's share may span many small
  // segments (1000 params of 1-4K elements: a handful of tasks, not 1000). With 8-bit states
  // each segment counts whole blocks and shares are cut on blocks: a block's absmax is one
  // thread's.
  const int64_t unit = b.quantized() ? kQBlock : 1;
  std::vector<int64_t> prefix(segs.size() + 1, 0);
  for (size_t k = 0; k < segs.size(); ++k) {
    prefix[k + 1] = prefix[k] + (segs[k].length + unit - 1) / unit * unit;
  }
  at::parallel_for(0, prefix.back(), kGrain, [&](int64_t begin, int64_t end) {
    begin = (begin + unit - 1) / unit * unit;
    end = (end + unit - 1) / unit * unit;
    size_t k = std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1;
    for (; begin < end; ++k) {
      const SegmentSpec& s = segs[k];
      const int64_t stop = std::min(end, prefix[k + 1]);
      const int64_t lo = s.start + (begin - prefix[k]);
      const int64_t hi = std::min(s.start + (stop - prefix[k]), s.start + s.length);
      const AdamHyper h = hyper_from_row(rows + s.row * kHyperFields);
      const Operands& o = ops[s.buffer];
      const int64_t index0 = s.index_base + (lo - s.start);
      dispatch_modes(weight_decay_mode(h), amsgrad, [&](auto wd, auto ams) {
        if constexpr (!ams()) {
          if (o.m_absmax) return step_q8<wd()>(o, h, stochastic, index0, lo, hi);
        }
        (o.fused ? step_fused<wd(), ams()> : step_staged<wd(), ams()>)(o, h, stochastic, index0, lo,
                                                                     hi);
      });
      begin = stop;
    }
  });
}

}  // namespace
}  // namespace fused_adam

TORCH_LIBRARY_IMPL(fused_adam, CPU, m) { m.impl("adam_step_", &fused_adam::adam_step_cpu); }
