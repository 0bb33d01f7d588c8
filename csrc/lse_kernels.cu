// fastnce CUDA backend: kernel instantiations and launchers. Kept free of ATen so that it
// compiles quickly; errors surface through C10_CUDA_CHECK / C10_CUDA_KERNEL_LAUNCH_CHECK.
#include <c10/cuda/CUDAException.h>

#include "lse_kernels.cuh"
#include "lse_launch.h"

namespace fastnce {
namespace {

template <class T, int KIND>
void forward_impl(const LseParams& p, cudaStream_t stream) {
  auto kernel = lse_forward_kernel<T, KIND>;
  const size_t smem = smem_layout(sizeof(T), 0, p.resident).total;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const dim3 grid(unsigned((p.M + kBM - 1) / kBM), unsigned(p.splits));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, int KIND, bool FOR_K>
void backward_impl(const LseParams& p, cudaStream_t stream) {
  auto kernel = lse_backward_kernel<T, KIND, FOR_K>;
  const size_t smem = smem_layout(sizeof(T), p.panel, p.resident).total;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t outer = FOR_K ? p.N : p.M;
  const dim3 grid(unsigned((outer + 63) / 64), unsigned(p.splits));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class T, bool FOR_K, int MI_G>
void backward_wide_impl(const LseParams& p, cudaStream_t stream) {
  auto kernel = lse_backward_wide_kernel<T, FOR_K, MI_G>;
  const size_t smem = wide_smem_layout(p.resident).total;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  const int64_t outer = FOR_K ? p.N : p.M;
  const dim3 grid(unsigned((outer + 63) / 64), unsigned(p.splits));
  kernel<<<grid, kWideThreads, smem, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-bit inputs: the wide kernel where the plan says (p.wide).
template <class T, bool FOR_K>
void backward_16bit(const LseParams& p, cudaStream_t stream) {
  if (!p.wide) {
    backward_impl<T, kMmaWmma16, FOR_K>(p, stream);
  } else if (wide_two_warps_a_chunk(p.resident)) {
    backward_wide_impl<T, FOR_K, 2>(p, stream);
  } else {
    backward_wide_impl<T, FOR_K, 4>(p, stream);
  }
}

template <bool FOR_K>
void backward_dispatch(const LseParams& p, int dtype, bool allow_tf32, cudaStream_t stream) {
  switch (dtype) {
    case kFloat16: backward_16bit<__half, FOR_K>(p, stream); break;
    case kBFloat16: backward_16bit<__nv_bfloat16, FOR_K>(p, stream); break;
    default:
      if (allow_tf32) {
        backward_impl<float, kMmaTf32, FOR_K>(p, stream);
      } else {
        backward_impl<float, kMmaSimt, FOR_K>(p, stream);
      }
  }
}

}  // namespace

void launch_lse_forward(const LseParams& p, int dtype, bool allow_tf32, cudaStream_t stream) {
  switch (dtype) {
    case kFloat16: forward_impl<__half, kMmaWmma16>(p, stream); break;
    case kBFloat16: forward_impl<__nv_bfloat16, kMmaWmma16>(p, stream); break;
    default:
      if (allow_tf32) {
        forward_impl<float, kMmaTf32>(p, stream);
      } else {
        forward_impl<float, kMmaSimt>(p, stream);
      }
  }
}

void launch_lse_backward(const LseParams& p, int dtype, bool allow_tf32, bool for_k, cudaStream_t stream) {
  if (for_k) {
    backward_dispatch<true>(p, dtype, allow_tf32, stream);
  } else {
    backward_dispatch<false>(p, dtype, allow_tf32, stream);
  }
}

}  // namespace fastnce
