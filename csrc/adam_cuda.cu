// CUDA kernel of `fused_adam::adam_step_`: one pass over a batch of segments per launch.
//
// Bytes per fp32 element: read p, g, m, v, write p, m, v = 28 B; ~20 flops, so the kernel is
// memory-bound and only has to keep every param access 128 bits wide: a thread takes 16 bytes
// of params (N = 4 fp32 or 8 bf16/fp16). 8 fp32 per thread spilled on sm_80 with amsgrad (64
// registers, ptxas -v). Offsets are int64 (buffers pass 2**31 elements).
// Each operand's dtype is a kernel argument, switched on per access: the branch is uniform across
// the grid, so it costs nothing next to the memory traffic and keeps 12 kernels instead of one
// per dtype combination. A launch takes up to kMaxSegments segments by value (torch's
// multi_tensor_apply does the same): nothing to copy to the device, so a captured CUDA graph
// replays it as is; a block finds its segment in that table (uniform loads from the constant
// bank). Built with --fmad=false: the only FMAs are the ones adam_math.h names,
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

struct Operand {
  void* data;
  DType dtype;
};

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
                                                 const float (&in)[N], uint32_t key,
                                                 int64_t index_base) {
  float bits[N];  // bf16 bit patterns, exact in fp32, so store_as<uint16_t> moves them as is
#pragma unroll
  for (int i = 0; i < N; ++i) bits[i] = bf16_stochastic(in[i], sr_bits(key, index_base + base + i));
  store_as<unsigned short, N>(data, base, n, vec, bits);
}

// 40 segments of 80 B and their first blocks: 3.4 KB, under the 4 KB of kernel arguments every
// supported architecture takes.
constexpr int kMaxSegments = 40;

struct Batch {
  Segment seg[kMaxSegments];
  int32_t first_block[kMaxSegments + 1];  // segment k: blocks [first_block[k], first_block[k + 1])
};

// N elements per thread of one segment, from `base`.
template <int N, WeightDecay wd, bool amsgrad>
__device__ __forceinline__ void step(const Segment& sg, int64_t base, const AdamHyper& h,
                                     bool stochastic) {
  const int64_t n = sg.numel;
  const bool vec = sg.vec;
  const Operand param{sg.data[0], sg.dtype[0]}, grad{sg.data[1], sg.dtype[1]};
  const Operand exp_avg{sg.data[2], sg.dtype[2]}, exp_avg_sq{sg.data[3], sg.dtype[3]};
  const Operand vmax{sg.data[4], sg.dtype[4]}, master{sg.data[5], sg.dtype[5]};
  // With a master copy the math updates the master; the param is its rounded image.
  const Operand p = master.data ? master : param;
  float pf[N], gf[N], mf[N], vf[N], xf[N];
  load(p, base, n, vec, pf);
  if (master.data) {
    float written[N];
    load(param, base, n, vec, written);
#pragma unroll
    for (int i = 0; i < N; ++i)
      pf[i] = master_or_written(pf[i], rounded_to(pf[i], param.dtype), written[i]);
  }
  load(grad, base, n, vec, gf);
  load(exp_avg, base, n, vec, mf);
  load(exp_avg_sq, base, n, vec, vf);
  if (amsgrad) load(vmax, base, n, vec, xf);
#pragma unroll
  for (int i = 0; i < N; ++i) adam_update<wd, amsgrad>(pf[i], gf[i], mf[i], vf[i], xf[i], h);
  if (stochastic) {
    store_stochastic(p.data, base, n, vec, pf, h.sr_key, sg.index_base);
  } else {
    store(p, base, n, vec, pf);
  }
  store(exp_avg, base, n, vec, mf);
  store(exp_avg_sq, base, n, vec, vf);
  if (amsgrad) store(vmax, base, n, vec, xf);
  if (master.data) store(param, base, n, vec, pf);
}

template <int N, bool amsgrad>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ Batch batch, const double* rows, const float* found_inf,
                bool stochastic) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int k = 0;
  while (block >= batch.first_block[k + 1]) ++k;
  const Segment& sg = batch.seg[k];
  const int64_t base =
      (static_cast<int64_t>(block - batch.first_block[k]) * kThreads + threadIdx.x) * N;
  if (base >= sg.numel) return;
  // Decided and computed on the device (skip_nonfinite, GradScaler): no host sync.
  if (found_inf && *found_inf != 0.0f) return;
  const AdamHyper h = hyper_from_row(rows + static_cast<int64_t>(sg.row) * kHyperFields);
  switch (weight_decay_mode(h)) {  // uniform over the block: one row per segment
    case WeightDecay::kNone: return step<N, WeightDecay::kNone, amsgrad>(sg, base, h, stochastic);
    case WeightDecay::kL2: return step<N, WeightDecay::kL2, amsgrad>(sg, base, h, stochastic);
    case WeightDecay::kDecoupled:
      return step<N, WeightDecay::kDecoupled, amsgrad>(sg, base, h, stochastic);
  }
}

template <int N>
cudaError_t launch(const Segment* segments, int64_t count, const double* rows,
                   const float* found_inf, bool amsgrad, bool stochastic, cudaStream_t stream) {
  constexpr int64_t kPerBlock = static_cast<int64_t>(kThreads) * N;
  for (int64_t done = 0; done < count;) {
    Batch batch;
    int k = 0;
    int64_t blocks = 0;
    for (; k < kMaxSegments && done + k < count; ++k) {
      const int64_t more = (segments[done + k].numel + kPerBlock - 1) / kPerBlock;
      if (k > 0 && blocks + more > INT32_MAX) break;  // the grid's x limit is 2**31 - 1
      batch.seg[k] = segments[done + k];
      batch.first_block[k] = static_cast<int32_t>(blocks);
      blocks += more;
    }
    batch.first_block[k] = static_cast<int32_t>(blocks);
    for (int rest = k + 1; rest <= kMaxSegments; ++rest) batch.first_block[rest] = INT32_MAX;
    if (amsgrad) {
      adam_kernel<N, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          batch, rows, found_inf, stochastic);
    } else {
      adam_kernel<N, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          batch, rows, found_inf, stochastic);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    done += k;
  }
  return cudaSuccess;
}

}  // namespace

int vector_width(DType param) { return param == DType::kFloat32 ? 4 : 8; }

cudaError_t launch_adam_cuda(const Segment* segments, int64_t count, const double* rows,
                             const float* found_inf, bool amsgrad, bool stochastic,
                             cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  // 16 bytes of params per thread (the segments of one launch share the param dtype; another
  // would still be right, with the width its `vec` flag was checked for).
  return vector_width(segments[0].dtype[0]) == 4
             ? launch<4>(segments, count, rows, found_inf, amsgrad, stochastic, stream)
             : launch<8>(segments, count, rows, found_inf, amsgrad, stochastic, stream);
}

}  // namespace fused_adam
