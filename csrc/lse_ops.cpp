// fastnce CUDA backend: torch op registration (namespace fastnce_cuda).
//
//   fastnce_cuda::lse_forward(q, k, scale, bias?, q_labels?, k_labels?, mask_mode, exclude_offset?,
//                             with_col, symmetric, allow_tf32) -> (row_lse (M,), col_lse (N,) or (0,))
//   fastnce_cuda::lse_backward(q, k, scale, bias?, q_labels?, k_labels?, mask_mode, exclude_offset?,
//                              row_lse, col_lse?, grad_row?, grad_col?, symmetric, need_bias, need_q,
//                              need_k, allow_tf32) -> (dq (M, D) or (0,), dk (N, D) or (0,), dbias (N,) or (0,))
//   need_q / need_k: without them the row / column kernel is not launched (a frozen side costs
//   nothing); symmetric always computes dq.
//
// The launcher contract is fastnce/ops/function.py's: float32 outputs, unscaled gradients
// (dq = G @ k, dk = G^T @ q, dbias = sum_i G[i, :]; symmetric: dq = (G + G^T) @ q, no dk).
// Autograd lives in Python (fastnce::similarity_lse); these ops are plain CUDA kernels.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "lse_launch.h"
#include "lse_plan.h"

namespace fastnce {
namespace {

using at::Tensor;

// Multiprocessor count, opt-in shared memory per block and shared memory per multiprocessor of
// the current device. (Read with the runtime API rather than ATen/cuda/CUDAContext.h, which
// pulls in cuBLAS and cuSPARSE headers that a bare CUDA toolkit may lack.)
struct DeviceInfo {
  int num_sms;
  size_t smem_optin, smem_per_sm;
};

DeviceInfo device_info(int device) {
  int sms = 0, smem = 0, smem_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return {sms, size_t(smem), size_t(smem_sm)};
}

// The forward's rows: forward_resident's choice, or FASTNCE_CUDA_FORWARD_ROWS=resident|streamed
// (read per call) to time both on a GPU (fastnce-bench gpu does). Resident needs one block's
// shared memory to fit.
int forward_rows(int elem_bytes, int64_t D, const DeviceInfo& dev) {
  const char* env = std::getenv("FASTNCE_CUDA_FORWARD_ROWS");
  const std::string want = env != nullptr ? env : "auto";
  if (want == "auto" || want.empty()) return forward_resident(elem_bytes, D, dev.smem_per_sm);
  TORCH_CHECK(want == "resident" || want == "streamed",
              "FASTNCE_CUDA_FORWARD_ROWS must be auto, resident or streamed, got '", want, "'");
  const int w = padded_features(D);
  const bool fits = w <= 1024 && smem_layout(elem_bytes, 0, w).total <= dev.smem_optin;
  return want == "resident" && fits ? w : 0;
}

int dtype_code(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat32;
    default: TORCH_CHECK(false, "fastnce_cuda: q and k must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return kFloat32;
}

void check_vector(const std::optional<Tensor>& t, const char* name, int64_t n, at::ScalarType dtype,
                  const Tensor& q) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == q.device(), "fastnce_cuda: ", name, " must be on ", q.device(), ", got ", t->device());
  TORCH_CHECK(t->dim() == 1 && t->size(0) == n, "fastnce_cuda: ", name, " must have shape (", n, "), got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == dtype, "fastnce_cuda: ", name, " must be ", dtype, ", got ", t->scalar_type());
  TORCH_CHECK(t->is_contiguous(), "fastnce_cuda: ", name, " must be contiguous");
}

// Checks shared by both ops; fills the input half of the kernel parameters.
LseParams make_params(const Tensor& q, const Tensor& k, const Tensor& scale, const std::optional<Tensor>& bias,
                      const std::optional<Tensor>& q_labels, const std::optional<Tensor>& k_labels,
                      int64_t mask_mode, std::optional<int64_t> exclude_offset) {
  TORCH_CHECK(q.is_cuda(), "fastnce_cuda: q must be a CUDA tensor, got ", q.device());
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2, "fastnce_cuda: q and k must be 2-D, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.device() == q.device(), "fastnce_cuda: k must be on ", q.device(), ", got ", k.device());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "fastnce_cuda: k must have q's dtype ", q.scalar_type(), ", got ",
              k.scalar_type());
  TORCH_CHECK(q.size(1) == k.size(1), "fastnce_cuda: q and k must have the same feature dimension, got ", q.size(1),
              " and ", k.size(1));
  TORCH_CHECK(q.size(1) > 0, "fastnce_cuda: the feature dimension must be positive");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "fastnce_cuda: q and k must be contiguous");
  dtype_code(q);
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat && scale.device() == q.device(),
              "fastnce_cuda: scale must be a one-element float32 tensor on ", q.device());
  TORCH_CHECK(mask_mode >= kMaskNone && mask_mode <= kMaskDifferent, "fastnce_cuda: mask_mode must be 0, 1 or 2, got ",
              mask_mode);
  const int64_t M = q.size(0), N = k.size(0);
  check_vector(bias, "bias", N, at::kFloat, q);
  if (mask_mode != kMaskNone) {
    TORCH_CHECK(q_labels.has_value() && k_labels.has_value(), "fastnce_cuda: mask_mode ", mask_mode,
                " needs q_labels and k_labels");
    check_vector(q_labels, "q_labels", M, at::kLong, q);
    check_vector(k_labels, "k_labels", N, at::kLong, q);
  }

  LseParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.scale = scale.data_ptr<float>();
  p.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  p.mask_mode = int(mask_mode);
  if (mask_mode != kMaskNone) {
    p.q_labels = q_labels->data_ptr<int64_t>();
    p.k_labels = k_labels->data_ptr<int64_t>();
  }
  p.has_exclude = exclude_offset.has_value() ? 1 : 0;
  p.exclude_offset = exclude_offset.value_or(0);
  p.M = M;
  p.N = N;
  p.D = q.size(1);
  p.vec_loads = use_vec_loads(int(q.element_size()), p.D, p.q, p.k) ? 1 : 0;
  return p;
}

std::tuple<Tensor, Tensor> lse_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& scale,
                                            const std::optional<Tensor>& bias, const std::optional<Tensor>& q_labels,
                                            const std::optional<Tensor>& k_labels, int64_t mask_mode,
                                            std::optional<int64_t> exclude_offset, bool with_col, bool symmetric,
                                            bool allow_tf32) {
  LseParams p = make_params(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset);
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(!symmetric || p.N == p.M, "fastnce_cuda: symmetric needs k to be q");
  const auto f32 = q.options().dtype(at::kFloat);
  const float neg_inf = -std::numeric_limits<float>::infinity();
  // S symmetric with symmetric masks: the tiles on and above the diagonal, rows below through
  // the column LSEs (then log-added into the row LSEs; col_lse, if asked, is the row LSE)
  p.upper = forward_upper(symmetric, bias.has_value(), exclude_offset.has_value(), exclude_offset.value_or(0));
  const bool cols = with_col || p.upper;
  Tensor col = cols ? at::full({p.N}, neg_inf, f32) : at::empty({0}, f32);
  if (p.M == 0 || p.N == 0) return {at::full({p.M}, neg_inf, f32), col};

  const DeviceInfo dev = device_info(q.get_device());
  choose_splits(p, (p.M + kBM - 1) / kBM, (p.N + kBN - 1) / kBN, dev.num_sms);
  p.resident = forward_rows(int(q.element_size()), p.D, dev);
  Tensor row = p.splits > 1 ? at::full({p.M}, neg_inf, f32) : at::empty({p.M}, f32);
  p.row_lse = row.data_ptr<float>();
  p.col_lse = cols ? col.data_ptr<float>() : nullptr;
  launch_lse_forward(p, dtype_code(q), allow_tf32, c10::cuda::getCurrentCUDAStream().stream());
  if (p.upper) {
    row = at::logaddexp(row, col);
    col = with_col ? row.clone() : at::empty({0}, f32);
  }
  return {row, col};
}

std::tuple<Tensor, Tensor, Tensor> lse_backward_cuda(
    const Tensor& q, const Tensor& k, const Tensor& scale, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& q_labels, const std::optional<Tensor>& k_labels, int64_t mask_mode,
    std::optional<int64_t> exclude_offset, const Tensor& row_lse, const std::optional<Tensor>& col_lse,
    const std::optional<Tensor>& grad_row, const std::optional<Tensor>& grad_col, bool symmetric, bool need_bias,
    bool need_q, bool need_k, bool allow_tf32) {
  LseParams p = make_params(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset);
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t M = p.M, N = p.N, D = p.D;
  TORCH_CHECK(!symmetric || N == M, "fastnce_cuda: symmetric needs k to be q");
  check_vector(row_lse, "row_lse", M, at::kFloat, q);
  check_vector(grad_row, "grad_row", M, at::kFloat, q);
  check_vector(grad_col, "grad_col", N, at::kFloat, q);
  if (grad_col.has_value()) {
    TORCH_CHECK(col_lse.has_value() && col_lse->numel() == N, "fastnce_cuda: grad_col needs col_lse of shape (", N, ")");
    check_vector(col_lse, "col_lse", N, at::kFloat, q);
  }
  const auto f32 = q.options().dtype(at::kFloat);
  const DeviceInfo dev = device_info(q.get_device());
  const int dt = dtype_code(q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  p.row_lse_in = row_lse.data_ptr<float>();
  p.col_lse_in = grad_col.has_value() ? col_lse->data_ptr<float>() : nullptr;
  p.grad_row = grad_row.has_value() ? grad_row->data_ptr<float>() : nullptr;
  p.grad_col = grad_col.has_value() ? grad_col->data_ptr<float>() : nullptr;
  plan_backward(p, int(q.element_size()), dev.smem_optin);

  if (M == 0 || N == 0 || (!grad_row.has_value() && !grad_col.has_value())) {
    return {need_q || symmetric ? at::zeros({M, D}, f32) : at::empty({0}, f32),
            need_k && !symmetric ? at::zeros({N, D}, f32) : at::empty({0}, f32),
            need_bias ? at::zeros({N}, f32) : at::empty({0}, f32)};
  }

  // dq = G @ k: one block per 64 rows, walking the column tiles (or the mirror, see
  // backward_launches); dk = G^T @ q and dbias: one block per 64 columns, walking the row tiles.
  const BackwardLaunches launch = backward_launches(symmetric, bias.has_value(), need_q, need_k, need_bias);
  Tensor dq = at::empty({0}, f32);
  if (launch.rows) {
    LseParams pq = p;
    pq.mirror = launch.mirror;
    choose_splits(pq, (M + kBM - 1) / kBM, (N + kBN - 1) / kBN, dev.num_sms);
    dq = pq.splits > 1 ? at::zeros({M, D}, f32) : at::empty({M, D}, f32);
    pq.out = dq.data_ptr<float>();
    launch_lse_backward(pq, dt, allow_tf32, /*for_k=*/false, stream);
  }
  if (!launch.cols) return {dq, at::empty({0}, f32), at::empty({0}, f32)};  // nothing more wanted, or the mirror

  LseParams pk = p;
  choose_splits(pk, (N + kBN - 1) / kBN, (M + kBM - 1) / kBM, dev.num_sms);
  Tensor dk = pk.splits > 1 ? at::zeros({N, D}, f32) : at::empty({N, D}, f32);
  Tensor dbias = need_bias ? (pk.splits > 1 ? at::zeros({N}, f32) : at::empty({N}, f32)) : at::empty({0}, f32);
  pk.out = dk.data_ptr<float>();
  pk.dbias = need_bias ? dbias.data_ptr<float>() : nullptr;
  launch_lse_backward(pk, dt, allow_tf32, /*for_k=*/true, stream);

  if (launch.add_cols_to_rows) {
    dq.add_(dk);  // (G + G^T) @ q
    dk = at::empty({0}, f32);
  } else if (!need_k) {
    dk = at::empty({0}, f32);  // the column kernel ran for dbias alone
  }
  return {dq, dk, dbias};
}

}  // namespace
}  // namespace fastnce

TORCH_LIBRARY(fastnce_cuda, m) {
  m.def(
      "lse_forward(Tensor q, Tensor k, Tensor scale, Tensor? bias, Tensor? q_labels, Tensor? k_labels, "
      "int mask_mode, int? exclude_offset, bool with_col, bool symmetric, bool allow_tf32) -> (Tensor, Tensor)");
  m.def(
      "lse_backward(Tensor q, Tensor k, Tensor scale, Tensor? bias, Tensor? q_labels, Tensor? k_labels, "
      "int mask_mode, int? exclude_offset, Tensor row_lse, Tensor? col_lse, Tensor? grad_row, Tensor? grad_col, "
      "bool symmetric, bool need_bias, bool need_q, bool need_k, bool allow_tf32) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnce_cuda, CUDA, m) {
  m.impl("lse_forward", &fastnce::lse_forward_cuda);
  m.impl("lse_backward", &fastnce::lse_backward_cuda);
}

// `import fastnce._C` loads this library (and with it the registrations above); the module
// itself is empty. The JIT path loads the library with torch.ops.load_library instead.
#ifdef TORCH_EXTENSION_NAME
#define FASTNCE_CAT_(a, b) a##b
#define FASTNCE_CAT(a, b) FASTNCE_CAT_(a, b)
#define FASTNCE_STR_(a) #a
#define FASTNCE_STR(a) FASTNCE_STR_(a)
PyMODINIT_FUNC FASTNCE_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FASTNCE_STR(TORCH_EXTENSION_NAME), nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
#endif
