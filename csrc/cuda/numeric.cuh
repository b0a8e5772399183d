// Loads and stores of the four element types for the CUDA kernels (plain CUDA headers only).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace skd::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ double to_float(double v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store(float* out, float v) { *out = v; }
__device__ __forceinline__ void store(double* out, double v) { *out = v; }
__device__ __forceinline__ void store(__half* out, float v) { *out = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* out, float v) { *out = __float2bfloat16_rn(v); }

}  // namespace skd::cuda
