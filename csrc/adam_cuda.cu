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
__device__ __forceinline__ float to_float(uint8_t x) { return x; }  // 8-bit codes, exact
__device__ __forceinline__ void from_float(float x, float& out) { out = x; }
__device__ __forceinline__ void from_float(float x, __half& out) { out = __float2half_rn(x); }
__device__ __forceinline__ void from_float(float x, __nv_bfloat16& out) {
  out = __float2bfloat16_rn(x);
}
__device__ __forceinline__ void from_float(float x, unsigned short& out) {
  out = static_cast<unsigned short>(x);  // a bf16 bit pattern carried exactly in fp32
}
__device__ __forceinline__ void from_float(float x, uint8_t& out) {
  out = static_cast<uint8_t>(x);  // an 8-bit code carried exactly in fp32
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
    case DType::kUInt8: return load_as<uint8_t, N>(o.data, base, n, vec, out);
  }
}

template <int N>
__device__ __forceinline__ void store(Operand o, int64_t base, int64_t n, bool vec,
                                      const float (&in)[N]) {
  switch (o.dtype) {
    case DType::kFloat32: return store_as<float, N>(o.data, base, n, vec, in);
    case DType::kFloat16: return store_as<__half, N>(o.data, base, n, vec, in);
    case DType::kBFloat16: return store_as<__nv_bfloat16, N>(o.data, base, n, vec, in);
    case DType::kUInt8: return store_as<uint8_t, N>(o.data, base, n, vec, in);
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

// 40 segments of 96 B and their first blocks: 4.0 KB, under the 4 KB (4096 B) of kernel
// arguments every supported architecture takes.
constexpr int kMaxSegments = 40;

struct Batch {
  Segment seg[kMaxSegments];
  int32_t first_block[kMaxSegments + 1];  // segment k: blocks [first_block[k], first_block[k + 1])
};

// The param operand as the math reads it (the master, unless user code wrote the param since),
// and its store: with a master copy the math updates the master and the param is its rounding.
template <int N>
__device__ __forceinline__ void load_param(const Segment& sg, int64_t base, float (&pf)[N]) {
  const Operand param{sg.data[0], sg.dtype[0]}, master{sg.data[5], sg.dtype[5]};
  load(master.data ? master : param, base, sg.numel, sg.vec, pf);
  if (master.data) {
    float written[N];
    load(param, base, sg.numel, sg.vec, written);
#pragma unroll
    for (int i = 0; i < N; ++i)
      pf[i] = master_or_written(pf[i], rounded_to(pf[i], param.dtype), written[i]);
  }
}

template <int N>
__device__ __forceinline__ void store_param(const Segment& sg, int64_t base, const float (&pf)[N],
                                            const AdamHyper& h, bool stochastic) {
  const Operand param{sg.data[0], sg.dtype[0]}, master{sg.data[5], sg.dtype[5]};
  const Operand p = master.data ? master : param;
  if (stochastic) {
    store_stochastic(p.data, base, sg.numel, sg.vec, pf, h.sr_key, sg.index_base);
  } else {
    store(p, base, sg.numel, sg.vec, pf);
  }
  if (master.data) store(param, base, sg.numel, sg.vec, pf);
}

// N elements per thread of one segment, from `base`.
template <int N, WeightDecay wd, bool amsgrad>
__device__ __forceinline__ void step(const Segment& sg, int64_t base, const AdamHyper& h,
                                     bool stochastic) {
  const int64_t n = sg.numel;
  const bool vec = sg.vec;
  const Operand grad{sg.data[1], sg.dtype[1]};
  const Operand exp_avg{sg.data[2], sg.dtype[2]}, exp_avg_sq{sg.data[3], sg.dtype[3]};
  const Operand vmax{sg.data[4], sg.dtype[4]};
  float pf[N], gf[N], mf[N], vf[N], xf[N];
  load_param(sg, base, pf);
  load(grad, base, n, vec, gf);
  load(exp_avg, base, n, vec, mf);
  load(exp_avg_sq, base, n, vec, vf);
  if (amsgrad) load(vmax, base, n, vec, xf);
#pragma unroll
  for (int i = 0; i < N; ++i) adam_update<wd, amsgrad>(pf[i], gf[i], mf[i], vf[i], xf[i], h);
  store_param(sg, base, pf, h, stochastic);
  store(exp_avg, base, n, vec, mf);
  store(exp_avg_sq, base, n, vec, vf);
  if (amsgrad) store(vmax, base, n, vec, xf);
}

// The max over the kQBlock elements of this thread's block of scales: over the warp, then over
// the warps of the block of scales (shared memory) when it spans several (N = 4: 2 warps).
template <int N>
__device__ __forceinline__ uint32_t block_max(uint32_t top, uint32_t* shared) {
#pragma unroll
  for (int lane = 16; lane; lane >>= 1) top = max(top, __shfl_xor_sync(0xffffffffu, top, lane));
  constexpr int kWarps = kQBlock / (32 * N);
  if (kWarps > 1) {
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) shared[warp] = top;
    __syncthreads();
    top = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = max(top, shared[warp / kWarps * kWarps + w]);
  }
  return top;
}

// 8-bit states (adam_math.h): N elements per thread of a segment that starts on a block of
// scales; every thread of the CUDA block takes part in the per-block max, those past the
// segment's end with zeros, storing nothing.
template <int N, WeightDecay wd>
__device__ __forceinline__ void step_q8(const Segment& sg, int64_t base, const AdamHyper& h,
                                        bool stochastic, uint32_t* shared) {
  const int64_t n = sg.numel;
  const bool in_range = base < n;
  float* m_absmax = static_cast<float*>(sg.data[6]) + base / kQBlock;
  float* v_absmax = static_cast<float*>(sg.data[7]) + base / kQBlock;
  const Operand m_codes{sg.data[2], DType::kUInt8}, v_codes{sg.data[3], DType::kUInt8};
  float pf[N], gf[N], mf[N], vf[N], mq[N], vq[N], unused = 0.0f;  // (codes carried in fp32)
  uint32_t m_top = 0, v_top = 0;
  if (in_range) {
    load_param(sg, base, pf);
    load(Operand{sg.data[1], sg.dtype[1]}, base, n, sg.vec, gf);
    load(m_codes, base, n, sg.vec, mq);
    load(v_codes, base, n, sg.vec, vq);
    const float m_scale = *m_absmax, v_scale = *v_absmax;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      mf[i] = q8_decode<QState::kExpAvg>(static_cast<uint8_t>(mq[i]), m_scale);
      vf[i] = q8_decode<QState::kExpAvgSq>(static_cast<uint8_t>(vq[i]), v_scale);
      adam_update<wd, false>(pf[i], gf[i], mf[i], vf[i], unused, h);
      if (base + i < n) {  // (past the end: no element, no part in the max)
        m_top = max(m_top, abs_bits(mf[i]));
        v_top = max(v_top, abs_bits(vf[i]));
      }
    }
    store_param(sg, base, pf, h, stochastic);
  }
  m_top = block_max<N>(m_top, shared);
  v_top = block_max<N>(v_top, shared + kThreads / 32);
  if (!in_range) return;
  const float m_new = float_from_bits(m_top), v_new = float_from_bits(v_top);
  const float m_inverse = q8_inverse(m_new), v_inverse = q8_inverse(v_new);
#pragma unroll
  for (int i = 0; i < N; ++i) {
    mq[i] = q8_encode<QState::kExpAvg>(mf[i], m_inverse);
    vq[i] = q8_encode<QState::kExpAvgSq>(vf[i], v_inverse);
  }
  store(m_codes, base, n, sg.vec, mq);
  store(v_codes, base, n, sg.vec, vq);
  if (base % kQBlock == 0) {
    *m_absmax = m_new;
    *v_absmax = v_new;
  }
}

// Modes that change which operands exist: amsgrad, 8-bit states (never together).
enum class Mode : int { kPlain, kAmsgrad, kQ8 };

template <int N, Mode mode>
__global__ void __launch_bounds__(kThreads)
    adam_kernel(const __grid_constant__ Batch batch, const double* rows, const float* found_inf,
                bool stochastic) {
  const int32_t block = static_cast<int32_t>(blockIdx.x);
  int k = 0;
  while (block >= batch.first_block[k + 1]) ++k;
  const Segment& sg = batch.seg[k];
  const int64_t base =
      (static_cast<int64_t>(block - batch.first_block[k]) * kThreads + threadIdx.x) * N;
  if (mode != Mode::kQ8 && base >= sg.numel) return;  // (8-bit: every thread takes the max)
  // Decided and computed on the device (skip_nonfinite, GradScaler): no host sync.
  if (found_inf && *found_inf != 0.0f) return;
  const AdamHyper h = hyper_from_row(rows + static_cast<int64_t>(sg.row) * kHyperFields);
  __shared__ uint32_t shared[2 * kThreads / 32];
  constexpr bool ams = mode == Mode::kAmsgrad;
  switch (weight_decay_mode(h)) {  // uniform over the block: one row per segment
    case WeightDecay::kNone:
      if constexpr (mode == Mode::kQ8) return step_q8<N, WeightDecay::kNone>(sg, base, h, stochastic, shared);
      return step<N, WeightDecay::kNone, ams>(sg, base, h, stochastic);
    case WeightDecay::kL2:
      if constexpr (mode == Mode::kQ8) return step_q8<N, WeightDecay::kL2>(sg, base, h, stochastic, shared);
      return step<N, WeightDecay::kL2, ams>(sg, base, h, stochastic);
    case WeightDecay::kDecoupled:
      if constexpr (mode == Mode::kQ8) {
        return step_q8<N, WeightDecay::kDecoupled>(sg, base, h, stochastic, shared);
      }
      return step<N, WeightDecay::kDecoupled, ams>(sg, base, h, stochastic);
  }
}

template <int N>
cudaError_t launch(const Segment* segments, int64_t count, const double* rows,
                   const float* found_inf, bool amsgrad, bool quantized, bool stochastic,
                   cudaStream_t stream) {
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
    const dim3 grid(static_cast<unsigned>(blocks));
    if (quantized) {
      adam_kernel<N, Mode::kQ8><<<grid, kThreads, 0, stream>>>(batch, rows, found_inf, stochastic);
    } else if (amsgrad) {
      adam_kernel<N, Mode::kAmsgrad><<<grid, kThreads, 0, stream>>>(batch, rows, found_inf,
                                                                    stochastic);
    } else {
      adam_kernel<N, Mode::kPlain><<<grid, kThreads, 0, stream>>>(batch, rows, found_inf,
                                                                  stochastic);
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
                             const float* found_inf, bool amsgrad, bool quantized,
                             bool stochastic, cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  // 16 bytes of params per thread (the segments of one launch share the param dtype; another
  // would still be right, with the width its `vec` flag was checked for).
  return vector_width(segments[0].dtype[0]) == 4
             ? launch<4>(segments, count, rows, found_inf, amsgrad, quantized, stochastic, stream)
             : launch<8>(segments, count, rows, found_inf, amsgrad, quantized, stochastic, stream);
}

}  // namespace fused_adam
