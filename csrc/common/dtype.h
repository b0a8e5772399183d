// Element types the kernels read and write. Plain C++, shared by the CPU and CUDA kernels.
#pragma once

namespace skd {

enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

}  // namespace skd
