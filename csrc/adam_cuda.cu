// CUDA kernel of `fused_adam::adam_step_`: one pass over a flat buffer.
//
// Bytes per fp32 element: read p, g, m, v, write p, m, v = 28 B; ~20 flops, so the kernel is
// memory-bound and only has to keep every param access 128 bits wide: a thread takes 16 bytes
// of params (N = 4 fp32 or 8 bf16/fp16). 8 fp32 per thread spilled on sm_80 with amsgrad (64
// registers, ptxas -v). Offsets are int64 (buffers pass 2**31 elements).
// Each operand's dtype is a kernel argument, switched on per access: the branch is uniform across
// the grid, so it costs nothing next to the memory traffic and keeps 12 kernels instead of one
// per dtype combination. Built with --fmad=false: the only FMAs are the ones adam_math.h names,
// so the bits equal the CPU kernel's and the Triton kernel's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "adam_cuda.h"

namespace fused_adam {
namespace {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_float(float x, float& out) { out = x; }
__device__ __forceinline__ void from_float(float x, __half& out) { out = __float2half_rn(x); }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16& out) {
  out = __float2bfloat16_rn(x);
}
__device__ __forceinline__ void from_float(float x, unsigned short& out) {
  out = static_cast<unsigned short>(x);  // a bf16 bit pattern carried exactly in fp32
}

// x rounded to `t` (as a store rounds it) and back: exact in fp32.
__device__ __forceinline__ float rounded_to(float x, DType t) {
  switch (t) {
    case DType::kFloat16: return __half2float(__float2half_rn(x));
    case DType::kBFloat16: return __bfloat162float(__float2bfloat16_rn(x));
    default: return x;
  }
}

// `vec`: every pointer is Pack-aligned (the launcher checks), so whole packs move as vector
// accesses; the buffer's ragged end and misaligned buffers take the element loop.
template <typename T, int N>
__device__ __forceinline__ void load_as(const void* data, int64_t base, int64_t n, bool vec,
                                        float (&out)[N]) {
  const T* ptr = static_cast<const T*>(data);
  if (vec && base + N <= n) {
    const Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(ptr + base);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_float(pack.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = base + i < n ? to_float(ptr[base + i]) : 0.0f;
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_as(void* data, int64_t base, int64_t n, bool vec,
                                         const float (&in)[N]) {
  T* ptr = static_cast<T*>(data);
  if (vec && base + N <= n) {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) from_float(in[i], pack.v[i]);
    *reinterpret_cast<Pack<T, N>*>(ptr + base) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (base + i < n) from_float(in[i], ptr[base + i]);
  }
}

template <int N>
__device__ __forceinline__ void load(Operand o, int64_t base, int64_t n, bool vec,
                                     float (&out)[N]) {
  switch (o.dtype) {
    case DType::kFloat32: return load_as<float, N>(o.data, base, n, vec, out);
    case DType::kFloat16: return load_as<__half, N>(o.data, base, n, vec, out);
    case DType::kBFloat16: return load_as<__nv_bfloat16, N>(o.data, base, n, vec, out);
  }
}

template <int N>
__device__ __forceinline__ void store(Operand o, int64_t base, int64_t n, bool vec,
                                      const float (&in)[N]) {
  switch (o.dtype) {
    case DType::kFloat32: return store_as<float, N>(o.data, base, n, vec, in);
    case DType::kFloat16: return store_as<__half, N>(o.data, base, n, vec, in);
    case DType::kBFloat16: return store_as<__nv_bfloat16, N>(o.data, base, n, vec, in);
  }
}

// The param, bf16, stochastically rounded (adam_math.h).
template <int N>
__device__ __forceinline__ void store_stochastic(void* data, int64_t base, int64_t n, bool vec,
                                                 const float (&in)[N], StochasticRounding sr) {
  float bits[N];  // bf16 bit patterns, exact in fp32, so store_as<uint16_t> moves them as is
#pragma unroll
  for (int i = 0; i < N; ++i) bits[i] = bf16_stochastic(in[i], sr_bits(sr.key, sr.index_base + base + i));
  store_as<unsigned short, N>(data, base, n, vec, bits);
}

template <int N, WeightDecay wd, bool amsgrad>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(AdamOperands o, bool vec, AdamScalars host, StochasticRounding sr) {
  const int64_t n = o.numel;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * N;
  if (base >= n) return;
  // Decided and computed on the device (skip_nonfinite, GradScaler): no host sync.
  if (o.found_inf && *o.found_inf != 0.0f) return;
  AdamScalars s = host;
  if (o.scalars) {
    s.decay = o.scalars[0];
    s.neg_step_size = o.scalars[1];
    s.bc2_sqrt = o.scalars[2];
  }
  // With a master copy the math updates the master; the param is its rounded image.
  const Operand p = o.master.data ? o.master : o.param;
  float pf[N], gf[N], mf[N], vf[N], xf[N];
  load(p, base, n, vec, pf);
  if (o.master.data) {
    float written[N];
    load(o.param, base, n, vec, written);
#pragma unroll
    for (int i = 0; i < N; ++i)
      pf[i] = master_or_written(pf[i], rounded_to(pf[i], o.param.dtype), written[i]);
  }
  load(o.grad, base, n, vec, gf);
  if (o.clip_coef) {  // computed on the device: no host sync; g * coef, then adam_update's sign
    const float coef = *o.clip_coef;
#pragma unroll
    for (int i = 0; i < N; ++i) gf[i] *= coef;
  }
  load(o.exp_avg, base, n, vec, mf);
  load(o.exp_avg_sq, base, n, vec, vf);
  if (amsgrad) load(o.max_exp_avg_sq, base, n, vec, xf);
#pragma unroll
  for (int i = 0; i < N; ++i) adam_update<wd, amsgrad>(pf[i], gf[i], mf[i], vf[i], xf[i], s);
  if (sr.on) {
    store_stochastic(p.data, base, n, vec, pf, sr);
  } else {
    store(p, base, n, vec, pf);
  }
  store(o.exp_avg, base, n, vec, mf);
  store(o.exp_avg_sq, base, n, vec, vf);
  if (amsgrad) store(o.max_exp_avg_sq, base, n, vec, xf);
  if (o.master.data) store(o.param, base, n, vec, pf);
}

int element_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

// Every present operand aligned for an N-element vector access of its own dtype.
bool aligned(const AdamOperands& o, int n) {
  for (const Operand* x : {&o.param, &o.grad, &o.exp_avg, &o.exp_avg_sq, &o.max_exp_avg_sq,
                           &o.master}) {
    if (x->data && reinterpret_cast<uintptr_t>(x->data) % (n * element_size(x->dtype)) != 0)
      return false;
  }
  return true;
}

template <int N>
cudaError_t launch(const AdamOperands& o, const AdamScalars& s, WeightDecay weight_decay,
                   const StochasticRounding& sr, cudaStream_t stream) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * N;
  const dim3 grid(static_cast<unsigned>((o.numel + per_block - 1) / per_block));
  const bool vec = aligned(o, N);
  dispatch_modes(weight_decay, o.max_exp_avg_sq.data != nullptr, [&](auto wd, auto amsgrad) {
    adam_kernel<N, wd(), amsgrad()><<<grid, kThreads, 0, stream>>>(o, vec, s, sr);
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_adam_cuda(const AdamOperands& operands, const AdamScalars& scalars,
                             WeightDecay weight_decay, const StochasticRounding& rounding,
                             cudaStream_t stream) {
  if (operands.numel == 0) return cudaSuccess;
  // 16 bytes of params per thread.
  return element_size(operands.param.dtype) == 4
             ? launch<4>(operands, scalars, weight_decay, rounding, stream)
             : launch<8>(operands, scalars, weight_decay, rounding, stream);
}

}  // namespace fused_adam
