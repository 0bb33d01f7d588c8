// C entry points that run the fastnce kernels under the CPU emulation (cuda_emu.h), with the
// same orchestration as lse_ops.cpp (splits, -inf / zero pre-fill, symmetric mirror or sum). The test
// forces small split sizes and panels so that every path (atomic merges, several backward
// passes) is taken at small sizes.
//   g++ -std=c++20 -O1 -shared -fPIC -DFASTNCE_EMULATE -include cuda_emu.h -I<cuda>/include \
//       emu_harness.cpp -o libfastnce_emu.so
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../lse_kernels.cuh"
#include "emu_harness.h"

using namespace fastnce;

namespace {

template <class T, int KIND>
void run_forward(const LseParams& p) {
  const unsigned gx = unsigned((p.M + kBM - 1) / kBM);
  emu::launch([p] { lse_forward_kernel<T, KIND>(p); }, gx, unsigned(p.splits), kThreads,
              smem_layout(sizeof(T), 0, p.resident).total);
}

template <class T, bool FOR_K>
void run_backward_wide(const LseParams& p, unsigned gx) {
  const size_t smem = wide_smem_layout(p.resident).total;
  if (wide_two_warps_a_chunk(p.resident)) {
    emu::launch([p] { lse_backward_wide_kernel<T, FOR_K, 2>(p); }, gx, unsigned(p.splits), kWideThreads, smem);
  } else {
    emu::launch([p] { lse_backward_wide_kernel<T, FOR_K, 4>(p); }, gx, unsigned(p.splits), kWideThreads, smem);
  }
}

template <class T, int KIND>
void run_backward(const LseParams& p, bool for_k) {
  const unsigned gx = unsigned(((for_k ? p.N : p.M) + 63) / 64);
  if constexpr (KIND == kMmaWmma16) {
    if (p.wide) {
      if (for_k) {
        run_backward_wide<T, true>(p, gx);
      } else {
        run_backward_wide<T, false>(p, gx);
      }
      return;
    }
  }
  const size_t smem = smem_layout(sizeof(T), p.panel, p.resident).total;
  if (for_k) {
    emu::launch([p] { lse_backward_kernel<T, KIND, true>(p); }, gx, unsigned(p.splits), kThreads, smem);
  } else {
    emu::launch([p] { lse_backward_kernel<T, KIND, false>(p); }, gx, unsigned(p.splits), kThreads, smem);
  }
}

// kind: 0 fp16 (wmma), 1 bf16 (wmma), 2 fp32 tf32, 3 fp32 simt
void fwd_dispatch(int kind, const LseParams& p) {
  switch (kind) {
    case 0: run_forward<__half, kMmaWmma16>(p); break;
    case 1: run_forward<__nv_bfloat16, kMmaWmma16>(p); break;
    case 2: run_forward<float, kMmaTf32>(p); break;
    default: run_forward<float, kMmaSimt>(p);
  }
}

void bwd_dispatch(int kind, const LseParams& p, bool for_k) {
  switch (kind) {
    case 0: run_backward<__half, kMmaWmma16>(p, for_k); break;
    case 1: run_backward<__nv_bfloat16, kMmaWmma16>(p, for_k); break;
    case 2: run_backward<float, kMmaTf32>(p, for_k); break;
    default: run_backward<float, kMmaSimt>(p, for_k);
  }
}

// The launch limit on shared memory a block for a device that lets a block have optin bytes.
// The tests also plan for devices smaller than any sm_80+ GPU, to reach the streamed and
// multi-pass paths at small sizes; the limit is checked for real ones only (an RTX 30xx /
// 40xx's 99 KiB and up).
size_t smem_limit(size_t optin) { return optin >= 101376 ? optin : 0; }

// vec: 1 or 0 forces 16-byte copies or plain loads; -1 takes lse_ops.cpp's rule (use_vec_loads).
LseParams base(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
               const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
               int vec) {
  LseParams p;
  p.q = q;
  p.k = k;
  p.scale = scale;
  p.bias = bias;
  p.q_labels = ql;
  p.k_labels = kl;
  p.mask_mode = mask_mode;
  p.has_exclude = has_excl;
  p.exclude_offset = off;
  p.M = M;
  p.N = N;
  p.D = D;
  p.vec_loads = vec >= 0 ? vec : int(use_vec_loads(kind <= 1 ? 2 : 4, D, q, k));
  return p;
}

}  // namespace

extern "C" {

// row: (M,), col: (N,) or null. num_sms / min_tiles steer choose_splits, smem_per_sm whether the
// rows are resident. symmetric (k is q): without bias and with only self-pairs excluded, the
// tiles on and above the diagonal.
void emu_forward(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
                 const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
                 int vec, float* row, float* col, int symmetric, int num_sms, int64_t min_tiles,
                 int64_t smem_per_sm) {
  LseParams p = base(kind, q, k, scale, bias, ql, kl, mask_mode, has_excl, off, M, N, D, vec);
  p.resident = forward_resident(kind <= 1 ? 2 : 4, D, size_t(smem_per_sm));
  emu::g_smem_per_block = smem_limit(size_t(smem_per_sm) - 1024);  // a multiprocessor's, less a block's reserve
  const float ninf = -std::numeric_limits<float>::infinity();
  p.upper = forward_upper(symmetric, bias != nullptr, has_excl, off);
  std::vector<float> part(p.upper ? N : 0, ninf);  // the rows' parts from the tiles above them
  choose_splits(p, (M + kBM - 1) / kBM, (N + kBN - 1) / kBN, num_sms, min_tiles);
  for (int64_t i = 0; i < M; ++i) row[i] = p.splits > 1 ? ninf : std::nanf("");
  if (col)
    for (int64_t j = 0; j < N; ++j) col[j] = ninf;
  p.row_lse = row;
  p.col_lse = p.upper ? part.data() : col;
  fwd_dispatch(kind, p);
  if (p.upper) {
    for (int64_t i = 0; i < M; ++i) {
      const float a = row[i], b = part[i], hi = std::fmax(a, b), lo = std::fmin(a, b);
      row[i] = (std::isnan(a) || std::isnan(b)) ? std::nanf("") : (lo == ninf ? hi : hi + std::log1p(std::exp(lo - hi)));
      if (col) col[i] = row[i];
    }
  }
}

// dq (M, D), dk (N, D) scratch, dbias (N,) or null (need_bias). The launches are lse_ops.cpp's
// (backward_launches): a buffer no launch writes is left as it was. symmetric: with bias
// dq += dk at the end, without it the row kernel's mirror (dk untouched).
// Returns the number of backward passes used (D / panel, rounded up).
int emu_backward(int kind, const void* q, const void* k, const float* scale, const float* bias, const int64_t* ql,
                 const int64_t* kl, int mask_mode, int has_excl, int64_t off, int64_t M, int64_t N, int64_t D,
                 int vec, const float* row_lse, const float* col_lse, const float* grad_row, const float* grad_col,
                 float* dq, float* dk, float* dbias, int symmetric, int need_q, int need_k, int num_sms,
                 int64_t min_tiles, int64_t smem_optin) {
  LseParams p = base(kind, q, k, scale, bias, ql, kl, mask_mode, has_excl, off, M, N, D, vec);
  p.row_lse_in = row_lse;
  p.col_lse_in = grad_col ? col_lse : nullptr;
  p.grad_row = grad_row;
  p.grad_col = grad_col;
  plan_backward(p, kind <= 1 ? 2 : 4, size_t(smem_optin));
  emu::g_smem_per_block = smem_limit(size_t(smem_optin));

  const int passes = int((D + p.panel - 1) / p.panel);
  const BackwardLaunches launch = backward_launches(symmetric, bias != nullptr, need_q, need_k, dbias != nullptr);
  if (launch.rows) {
    LseParams pq = p;
    pq.mirror = launch.mirror;
    choose_splits(pq, (M + kBM - 1) / kBM, (N + kBN - 1) / kBN, num_sms, min_tiles);
    for (int64_t e = 0; e < M * D; ++e) dq[e] = pq.splits > 1 ? 0.0f : std::nanf("");
    pq.out = dq;
    bwd_dispatch(kind, pq, false);
  }
  if (!launch.cols) return passes;

  LseParams pk = p;
  choose_splits(pk, (N + kBN - 1) / kBN, (M + kBM - 1) / kBM, num_sms, min_tiles);
  for (int64_t e = 0; e < N * D; ++e) dk[e] = pk.splits > 1 ? 0.0f : std::nanf("");
  if (dbias)
    for (int64_t j = 0; j < N; ++j) dbias[j] = pk.splits > 1 ? 0.0f : std::nanf("");
  pk.out = dk;
  pk.dbias = dbias;
  bwd_dispatch(kind, pk, true);

  if (launch.add_cols_to_rows)
    for (int64_t e = 0; e < M * D; ++e) dq[e] += dk[e];
  return passes;
}

// Where the asynchronous copies land from now on: at the issuing thread's wait (0, the latest)
// or at their issue (1, the earliest); see cuda_emu.h.
void emu_set_copies_land_early(int early) { emu::g_copies_land_early = early != 0; }

// The first hardware rule the kernels broke since the last call (cuda_emu.h), or null.
const char* emu_take_violation() { return emu::take_violation(); }

// Features of the forward's rows held in shared memory (0: streamed) for D on a device with
// smem_per_sm bytes of shared memory a multiprocessor.
int emu_forward_resident(int kind, int64_t D, int64_t smem_per_sm) {
  return forward_resident(kind <= 1 ? 2 : 4, D, size_t(smem_per_sm));
}

// The backward's plan for D on a device with smem_optin bytes of shared memory a block:
// out = {wide, panel, resident}.
void emu_backward_plan(int kind, int64_t D, int64_t smem_optin, int* out) {
  LseParams p;
  p.D = D;
  plan_backward(p, kind <= 1 ? 2 : 4, size_t(smem_optin));
  out[0] = p.wide;
  out[1] = p.panel;
  out[2] = p.resident;
}

}  // extern "C"
