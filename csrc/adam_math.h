// The per-element Adam/AdamW update shared by the CUDA and CPU kernels (fp32 math).
//
// It is the op order of torch.optim's `_single_tensor_adam` and of the Triton kernel's
// `_adam_math`, with the roundings of torch's CPU ATen ops: lerp, add(alpha=) and addcmul are
// one FMA each (measured on torch 2.13, AVX-512), every other op rounds on its own. Builds must
// not contract anything else (nvcc --fmad=false, g++ -ffp-contract=off): then the CUDA kernel, the
// CPU kernel's vector body and scalar tail, and the Triton kernel give the same bits.
// No torch headers here: nvcc compiles this on machines whose torch is a CPU build.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define FA_HD __host__ __device__ __forceinline__
#else
#define FA_HD inline __attribute__((always_inline))
#endif

namespace fused_adam {

// One row of the hyperparameter table: one per (param group, step count), computed in double (on
// the host as `_single_tensor_adam` computes them, or on the device from a device step count) and
// rounded to fp32 here, as ATen rounds a Python scalar. The same fields in the same order as
// fused_adam/functional.py's HYPER_FIELDS (tests/test_kernels_agree.py compares the two).
struct AdamHyper {
  float grad_mult;        // -1 for maximize (exact: the bits of negation), else 1; times the clip
                          // coefficient and GradScaler's inverse scale (torch: g * c, then -g)
  float decay;            // 1 - lr * weight_decay with decoupled weight decay, else 1
  float weight_decay;     // the L2 coefficient (coupled weight decay), else 0
  float lerp_weight;      // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float neg_step_size;    // -lr / bias_correction1
  float bc2_sqrt;         // sqrt(bias_correction2)
  float eps;
  uint32_t sr_key;        // stochastic rounding: hash of (seed, step), an integer held exactly
};
constexpr int kHyperFields = 10;

FA_HD AdamHyper hyper_from_row(const double* r) {
  return {static_cast<float>(r[0]), static_cast<float>(r[1]), static_cast<float>(r[2]),
          static_cast<float>(r[3]), static_cast<float>(r[4]), static_cast<float>(r[5]),
          static_cast<float>(r[6]), static_cast<float>(r[7]), static_cast<float>(r[8]),
          static_cast<uint32_t>(static_cast<int64_t>(r[9]))};
}

// One contiguous run of elements stepped with one row: elements [start, start + length) of the
// operands of buffer `buffer`; stochastic rounding keys element i on index_base + i. The op takes
// segments as a flat int list, these five fields each (functional.py's SEGMENT_FIELDS).
struct SegmentSpec {
  int64_t buffer, start, length, row, index_base;
};
constexpr int kSegmentFields = 5;

// With a master copy the step reads the master, unless user code wrote the param since the last
// step (model.load_state_dict, p.clamp_, an EMA swap): the param then no longer equals the
// master's rounding (`master_rounded`, to the param's dtype, nearest even, as the step stores
// it), and that write wins, as it would with torch.optim. 2 more bytes read per param.
FA_HD float master_or_written(float master, float master_rounded, float param) {
  return master_rounded == param ? master : param;
}

// Compile-time modes: with them as template arguments the CPU loop vectorizes (GCC 12 leaves
// a loop with run-time branches around FMAs scalar: 3.5x slower, measured).
enum class WeightDecay : int { kNone, kL2, kDecoupled };

// A row's weight decay, as torch's `if weight_decay != 0` decides it: the two fields that carry
// it are neutral (0 and 1) otherwise, so groups with and without decay share a launch.
FA_HD WeightDecay weight_decay_mode(const AdamHyper& h) {
  return h.weight_decay != 0.0f ? WeightDecay::kL2
         : h.decay != 1.0f      ? WeightDecay::kDecoupled
                                : WeightDecay::kNone;
}

// Calls fn(wd, amsgrad) with both as std::integral_constant.
template <typename Fn>
inline void dispatch_modes(WeightDecay wd, bool amsgrad, Fn&& fn) {
  auto with_wd = [&](auto ams) {
    switch (wd) {
      case WeightDecay::kNone: return fn(std::integral_constant<WeightDecay, WeightDecay::kNone>{}, ams);
      case WeightDecay::kL2: return fn(std::integral_constant<WeightDecay, WeightDecay::kL2>{}, ams);
      case WeightDecay::kDecoupled:
        return fn(std::integral_constant<WeightDecay, WeightDecay::kDecoupled>{}, ams);
    }
  };
  if (amsgrad) {
    with_wd(std::true_type{});
  } else {
    with_wd(std::false_type{});
  }
}

FA_HD float fa_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

FA_HD float fa_sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return __builtin_sqrtf(x);  // correctly rounded; vectorizes with -fno-math-errno
#endif
}

FA_HD float fa_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// torch.maximum: NaN in either operand gives NaN.
FA_HD float fa_max_nan(float a, float b) { return ((a != a) | (a > b)) ? a : b; }  // | : no branch (vectorizes)

// Stochastic rounding of an fp32 param to bf16, reproducible: the random bits of element `index`
// come from a hash of (key, index), key = hash(seed, step) computed on the host, so every backend
// and launch configuration gives the same bits. lowbias32 (Wellons' hash prospector): full
// avalanche in 2 multiplies, cheap next to the memory traffic.
FA_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The bits of element index = hi * 2**32 + lo, with sr_high(hi) computed once: a loop whose
// indices share `hi` (any run under 2**32 elements that does not cross a multiple of it) then
// works in 32-bit lanes. The CPU loop does; 64-bit index lanes cost it ~10% at 16M elements.
FA_HD uint32_t sr_high(uint32_t hi) { return hi * 0x9e3779b9u; }

FA_HD uint32_t sr_bits_at(uint32_t key, uint32_t lo, uint32_t high) {
  return lowbias32(key ^ lowbias32(lo ^ high));
}

FA_HD uint32_t sr_bits(uint32_t key, int64_t index) {
  const uint64_t i = static_cast<uint64_t>(index);
  return sr_bits_at(key, static_cast<uint32_t>(i), sr_high(static_cast<uint32_t>(i >> 32)));
}

FA_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t bits;
  __builtin_memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

FA_HD float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float x;
  __builtin_memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

// bf16 bits of x rounded up in magnitude with probability (dropped bits) / 2**16: unbiased.
// Inf and NaN keep their class (the add could carry a NaN's payload into the sign).
FA_HD uint16_t bf16_stochastic(float x, uint32_t random) {
  const uint32_t bits = float_bits(x);
  if ((bits & 0x7f800000u) == 0x7f800000u) {
    return static_cast<uint16_t>((bits >> 16) | ((bits & 0xffffu) ? 0x40u : 0u));
  }
  return static_cast<uint16_t>((bits + (random & 0xffffu)) >> 16);
}

// 8-bit states (fused_adam/quantize.py, the format's reference): a uint8 code per element and an
// fp32 scale per block of kQBlock elements, the block's absmax. Code k > 0 stands for the fp32
// bits (k + bias) << (23 - mantissa bits) times the scale, 3 mantissa bits; exp_avg: bit 7 the
// sign, 16 binades; exp_avg_sq: 32 binades; the top code 1.0.
constexpr int kQBlock = 256;
enum class QState : int { kExpAvg, kExpAvgSq };
constexpr int32_t kQMantissa = 3;
template <QState q>
constexpr int32_t kQBias = q == QState::kExpAvg ? 889 : 761;  // (127 << mantissa) - top
template <QState q>
constexpr int32_t kQTop = q == QState::kExpAvg ? 127 : 255;

// |x| as bits: a block's absmax is the max of these as integers, which orders non-negative
// floats as the floats and puts a NaN above everything (a NaN element makes the scale NaN), in
// any reduction order.
FA_HD uint32_t abs_bits(float x) { return float_bits(x) & 0x7fffffffu; }

// The factor a block's codes are encoded with: 1 / absmax once per block (0 for an all-zero
// block), a multiply per element instead of a division (2 divisions of 4 per element: the
// 8-bit CPU step was compute-bound at 0.51 ns/element/thread, bench/NOTES.md 20).
FA_HD float q8_inverse(float absmax) { return absmax > 0.0f ? fa_div(1.0f, absmax) : 0.0f; }

template <QState q>
FA_HD uint8_t q8_encode(float x, float inverse) {
  const float ratio = float_from_bits(abs_bits(x)) * inverse;  // may pass 1.0 by an ulp: clamped
  const uint32_t bits = abs_bits(ratio);  // (a NaN's sign is the platform's: dropped)
  constexpr int32_t drop = 23 - kQMantissa;  // to nearest even on the kept bits
  int32_t k = static_cast<int32_t>((bits + ((1u << (drop - 1)) - 1u) + ((bits >> drop) & 1u)) >>
                                   drop) - kQBias<q>;
  k = k > kQTop<q> ? kQTop<q> : k;
  if (q == QState::kExpAvg) {
    return static_cast<uint8_t>((k < 0 ? 0 : k) | (x < 0.0f ? 0x80 : 0));
  }
  return static_cast<uint8_t>(x > 0.0f ? (k < 1 ? 1 : k) : 0);  // positive: never 0
}

template <QState q>
FA_HD float q8_decode(uint8_t code, float absmax) {
  const int32_t k = q == QState::kExpAvg ? (code & 0x7f) : code;
  const float value =
      float_from_bits(k == 0 ? 0u : static_cast<uint32_t>(k + kQBias<q>) << (23 - kQMantissa)) *
      absmax;
  return q == QState::kExpAvg && (code & 0x80) ? -value : value;
}

// One element. `vmax` is read and written only when `amsgrad`.
template <WeightDecay wd, bool amsgrad>
FA_HD void adam_update(float& p, float g, float& m, float& v, float& vmax, const AdamHyper& s) {
  g = g * s.grad_mult;
  if (wd == WeightDecay::kL2) g = fa_fma(p, s.weight_decay, g);
  if (wd == WeightDecay::kDecoupled) p = p * s.decay;
  // torch's lerp: start + w*(end-start) for |w| < 0.5, else end + (w-1)*(end-start), one FMA.
  const bool small = s.lerp_weight < 0.5f;
  m = fa_fma(small ? s.lerp_weight : s.lerp_weight - 1.0f, g - m, small ? m : g);
  v = fa_fma(s.one_minus_beta2 * g, g, v * s.beta2);
  float second = v;
  if (amsgrad) {
    vmax = fa_max_nan(vmax, v);
    second = vmax;
  }
  const float denom = fa_div(fa_sqrt(second), s.bc2_sqrt) + s.eps;
  p = p + fa_div(s.neg_step_size * m, denom);
}

}  // namespace fused_adam
