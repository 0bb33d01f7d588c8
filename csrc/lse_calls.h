// fastnce CUDA backend: the launches and buffers of one forward or backward call (host C++).
//
// Written once over a policy `Mem` that owns the buffers and the launches, so that lse_ops.cpp
// (ATen tensors, the GPU) and the CPU emulation's harness (csrc/emu: host vectors, emulated
// launches) take the same steps: the -inf and zero pre-fills a split grid merges into, the
// symmetric forward's log-add of each row's two parts, and which backward kernels run for
// which gradients. Mem provides
//   Buf                                      a float32 buffer
//   Buf filled(shape, float v)               shape {n} or {n, d}, every element v
//   Buf uninit(shape)                        the same, contents undefined
//   Buf none()                               the (0,) buffer of an output not computed
//   float* data(Buf&)
//   void forward(const LseParams&)           launch_lse_forward
//   void backward(const LseParams&, bool for_k)   launch_lse_backward
//   Buf log_add(const Buf& a, const Buf& b)  log(exp(a) + exp(b)) elementwise, as at::logaddexp
//   Buf copy(const Buf&)
//   void add(Buf& a, const Buf& b)           a += b
#pragma once

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>
#include <utility>

#include "lse_plan.h"

namespace fastnce {

using Shape = std::initializer_list<int64_t>;

// The forward visits only the tiles on and above S's diagonal when S and its masks are
// symmetric: k is q, no bias, and at most the pairs (i, i) excluded (LseParams::upper).
inline bool forward_upper(bool symmetric, bool has_bias, bool has_exclude, int64_t exclude_offset) {
  return symmetric && !has_bias && (!has_exclude || exclude_offset == 0);
}

// The backward: the row kernel (dq = G @ k) when dq is wanted or k is q; for k == q without
// bias, its mirror gives dq = (G + G^T) @ q from the same tiles and nothing else runs; else the
// column kernel (dk = G^T @ q and dbias) when dk or dbias is wanted or k is q, whose dk is then
// added into dq. A frozen side costs nothing (MoCo's queue, a locked tower).
struct BackwardLaunches {
  bool rows, mirror, cols, add_cols_to_rows;
};
inline BackwardLaunches backward_launches(bool symmetric, bool has_bias, bool need_q, bool need_k, bool need_bias) {
  BackwardLaunches l;
  l.rows = need_q || symmetric;
  l.mirror = symmetric && !has_bias;
  l.cols = !l.mirror && (symmetric || need_k || need_bias);
  l.add_cols_to_rows = symmetric && l.cols;
  return l;
}

// p: the inputs filled in, p.resident chosen. Returns (row_lse (M,), col_lse (N,) or none()).
// With p.upper the rows' parts from the tiles above them arrive through the column LSEs and are
// log-added into the row LSEs (col_lse, if asked, is then the row LSE).
template <class Mem>
std::pair<typename Mem::Buf, typename Mem::Buf> lse_forward_call(Mem& mem, LseParams p, bool with_col,
                                                                 bool symmetric, int num_sms,
                                                                 int64_t min_tiles = kMinTilesPerSplit) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  p.upper = forward_upper(symmetric, p.bias != nullptr, p.has_exclude != 0, p.exclude_offset);
  const bool cols = with_col || p.upper;
  auto col = cols ? mem.filled({p.N}, neg_inf) : mem.none();
  if (p.M == 0 || p.N == 0) return {mem.filled({p.M}, neg_inf), col};

  choose_splits(p, (p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, num_sms, min_tiles);
  auto row = p.splits > 1 ? mem.filled({p.M}, neg_inf) : mem.uninit({p.M});
  p.row_lse = mem.data(row);
  p.col_lse = cols ? mem.data(col) : nullptr;
  mem.forward(p);
  if (p.upper) {
    row = mem.log_add(row, col);
    col = with_col ? mem.copy(row) : mem.none();
  }
  return {row, col};
}

// p: the inputs, the LSEs and upstream gradients filled in, plan_backward done. Returns (dq (M, D)
// or none(), dk (N, D) or none(), dbias (N,) or none()), unscaled; symmetric: dq = (G + G^T) @ q.
// dq = G @ k: one block per 64 rows walking the column tiles (or the mirror); dk = G^T @ q and
// dbias: one block per 64 columns walking the row tiles.
template <class Mem>
std::tuple<typename Mem::Buf, typename Mem::Buf, typename Mem::Buf> lse_backward_call(
    Mem& mem, const LseParams& p, bool symmetric, bool need_bias, bool need_q, bool need_k, int num_sms,
    int64_t min_tiles = kMinTilesPerSplit) {
  const int64_t M = p.M, N = p.N, D = p.D;
  if (M == 0 || N == 0 || (p.grad_row == nullptr && p.grad_col == nullptr)) {
    return {need_q || symmetric ? mem.filled({M, D}, 0.0f) : mem.none(),
            need_k && !symmetric ? mem.filled({N, D}, 0.0f) : mem.none(),
            need_bias ? mem.filled({N}, 0.0f) : mem.none()};
  }
  // A split grid adds its parts into zeros; one block per output overwrites it.
  const auto output = [&mem](const LseParams& s, Shape shape) {
    return s.splits > 1 ? mem.filled(shape, 0.0f) : mem.uninit(shape);
  };

  const BackwardLaunches launch = backward_launches(symmetric, p.bias != nullptr, need_q, need_k, need_bias);
  auto dq = mem.none();
  if (launch.rows) {
    LseParams pq = p;
    pq.mirror = launch.mirror;
    choose_splits(pq, (M + kBM - 1) / kBM, (N + kBN - 1) / kBN, num_sms, min_tiles);
    dq = output(pq, {M, D});
    pq.out = mem.data(dq);
    mem.backward(pq, /*for_k=*/false);
  }
  if (!launch.cols) return {dq, mem.none(), mem.none()};  // nothing more wanted, or the mirror

  LseParams pk = p;
  choose_splits(pk, (N + kBN - 1) / kBN, (M + kBM - 1) / kBM, num_sms, min_tiles);
  auto dk = output(pk, {N, D});
  auto dbias = need_bias ? output(pk, {N}) : mem.none();
  pk.out = mem.data(dk);
  pk.dbias = need_bias ? mem.data(dbias) : nullptr;
  mem.backward(pk, /*for_k=*/true);

  if (launch.add_cols_to_rows) {
    mem.add(dq, dk);  // (G + G^T) @ q
    dk = mem.none();
  } else if (!need_k) {
    dk = mem.none();  // the column kernel ran for dbias alone
  }
  return {dq, dk, dbias};
}

}  // namespace fastnce
