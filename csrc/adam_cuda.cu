// CUDA kernel of `fused_adam::adam_step_`: one pass over a flat buffer.
//
// Bytes per fp32 element: read p, g, m, v, write p, m, v = 28 B; ~20 flops, so the kernel is
// memory-bound and only has to keep every param access 128 bits wide: a thread takes 16 bytes
// of params (4 fp32 or 8 bf16/fp16). 8 fp32 per thread spilled on sm_80 with amsgrad (64
// registers, ptxas -v). Offsets are int64 (buffers pass 2**31 elements).
// Built with --fmad=false: the only FMAs are the ones adam_math.h names, so the bits equal the
// CPU kernel's and the Triton kernel's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "adam_cuda.h"

namespace fused_adam {
namespace {

constexpr int kThreads = 256;

template <typename P>
constexpr int kElems = 16 / sizeof(P);  // elements per thread: 16 bytes of params

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// `vec`: every pointer is Pack-aligned (the launcher checks), so whole packs load as 128-bit
// vectors; the buffer's ragged end and misaligned buffers take the element loop.
template <typename T, int N>
__device__ __forceinline__ void load(const T* ptr, int64_t base, int64_t n, bool vec,
                                     float (&out)[N]) {
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
__device__ __forceinline__ void store(T* ptr, int64_t base, int64_t n, bool vec,
                                      const float (&in)[N]) {
  if (vec && base + N <= n) {
    Pack<T, N> pack;
#pragma unroll
    for (int i = 0; i < N; ++i) pack.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Pack<T, N>*>(ptr + base) = pack;
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (base + i < n) ptr[base + i] = from_float<T>(in[i]);
  }
}

template <typename P, typename G, typename S, WeightDecay wd, bool amsgrad>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(P* __restrict__ p, const G* __restrict__ g, S* __restrict__ m,
                S* __restrict__ v, S* __restrict__ vmax, int64_t n, bool vec, AdamScalars s) {
  constexpr int N = kElems<P>;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * N;
  if (base >= n) return;
  float pf[N], gf[N], mf[N], vf[N], xf[N];
  load(p, base, n, vec, pf);
  load(g, base, n, vec, gf);
  load(m, base, n, vec, mf);
  load(v, base, n, vec, vf);
  if (amsgrad) load(vmax, base, n, vec, xf);
#pragma unroll
  for (int i = 0; i < N; ++i) adam_update<wd, amsgrad>(pf[i], gf[i], mf[i], vf[i], xf[i], s);
  store(p, base, n, vec, pf);
  store(m, base, n, vec, mf);
  store(v, base, n, vec, vf);
  if (amsgrad) store(vmax, base, n, vec, xf);
}

template <typename Fn>
void with_type(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
  }
}

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

}  // namespace

cudaError_t launch_adam_cuda(const AdamBuffers& b, const AdamScalars& scalars,
                             WeightDecay weight_decay, cudaStream_t stream) {
  if (b.numel == 0) return cudaSuccess;
  with_type(b.param_dtype, [&](auto p_tag) {
    using P = std::decay_t<decltype(p_tag)>;  // decay: nvcc sees captured tags as references
    with_type(b.grad_dtype, [&](auto g_tag) {
      using G = std::decay_t<decltype(g_tag)>;
      with_type(b.state_dtype, [&](auto s_tag) {
        using S = std::decay_t<decltype(s_tag)>;
        // ops.cpp admits only the param dtype or float32 for grads and states.
        if constexpr ((std::is_same_v<G, P> || std::is_same_v<G, float>) &&
                      (std::is_same_v<S, P> || std::is_same_v<S, float>)) {
          constexpr int N = kElems<P>;
          const bool vec = aligned(b.param, sizeof(Pack<P, N>)) &&
                           aligned(b.grad, sizeof(Pack<G, N>)) &&
                           aligned(b.exp_avg, sizeof(Pack<S, N>)) &&
                           aligned(b.exp_avg_sq, sizeof(Pack<S, N>)) &&
                           aligned(b.max_exp_avg_sq, sizeof(Pack<S, N>));
          const int64_t per_block = static_cast<int64_t>(kThreads) * N;
          const dim3 grid(static_cast<unsigned>((b.numel + per_block - 1) / per_block));
          dispatch_modes(weight_decay, b.max_exp_avg_sq != nullptr, [&](auto wd, auto amsgrad) {
            adam_kernel<P, G, S, wd(), amsgrad()><<<grid, kThreads, 0, stream>>>(
                static_cast<P*>(b.param), static_cast<const G*>(b.grad),
                static_cast<S*>(b.exp_avg), static_cast<S*>(b.exp_avg_sq),
                static_cast<S*>(b.max_exp_avg_sq), b.numel, vec, scalars);
          });
        }
      });
    });
  });
  return cudaGetLastError();
}

}  // namespace fused_adam
