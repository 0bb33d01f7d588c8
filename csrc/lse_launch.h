// fastnce CUDA backend: kernel launchers (defined in lse_kernels.cu, called from lse_ops.cpp).
#pragma once

#include <cuda_runtime_api.h>

#include "lse_plan.h"

namespace fastnce {

enum DTypeCode : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Grid (ceil(M / kBM), p.splits). p.row_lse must hold -inf when p.splits > 1, p.col_lse (if set)
// always.
void launch_lse_forward(const LseParams& p, int dtype, bool allow_tf32, cudaStream_t stream);

// for_k = false: p.out = dq (M, D), grid (ceil(M / kBM), p.splits).
// for_k = true:  p.out = dk (N, D) and p.dbias, grid (ceil(N / kBN), p.splits).
// Outputs must be zero when p.splits > 1. p.panel from backward_panel().
void launch_lse_backward(const LseParams& p, int dtype, bool allow_tf32, bool for_k, cudaStream_t stream);

}  // namespace fastnce
