// The C entry points of emu_harness.cpp (documented there), for C++ drivers such as
// sanitize_main.cpp; tests/test_cuda.py reaches them through ctypes.
#pragma once

#include <cstdint>

extern "C" {
void emu_forward(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
                 const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
                 int vec, float* row, float* col, int symmetric, int num_sms, int64_t min_tiles,
                 int64_t smem_per_sm);
int emu_backward(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
                 const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
                 int vec, const float* row_lse, const float* col_lse, const float* grad_row, const float* grad_col,
                 float* dq, float* dk, float* dbias, int symmetric, int need_q, int need_k, int num_sms,
                 int64_t min_tiles, int64_t smem_optin);
int emu_backward_launched();
void emu_set_copies_land_early(int early);
void emu_set_blocks_in_order(int in_order);
const char* emu_take_violation();
int emu_forward_resident(int kind, int64_t D, int64_t smem_per_sm);
void emu_backward_plan(int kind, int64_t D, int64_t smem_optin, int* out);
}
