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
#include <optional>
#include <string>
#include <tuple>

#include "lse_calls.h"
#include "lse_launch.h"

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

// lse_calls.h's buffers and launches: float32 ATen tensors on q's device, kernels on the
// current stream.
struct TensorMem {
  using Buf = Tensor;
  at::TensorOptions f32;
  int dtype;
  bool allow_tf32;
  cudaStream_t stream;

  TensorMem(const Tensor& q, bool tf32)
      : f32(q.options().dtype(at::kFloat)), dtype(dtype_code(q)), allow_tf32(tf32),
        stream(c10::cuda::getCurrentCUDAStream().stream()) {}
  Tensor filled(Shape shape, float v) const { return at::full(shape, v, f32); }
  Tensor uninit(Shape shape) const { return at::empty(shape, f32); }
  Tensor none() const { return at::empty({0}, f32); }
  static float* data(Tensor& t) { return t.data_ptr<float>(); }
  void forward(const LseParams& p) const { launch_lse_forward(p, dtype, allow_tf32, stream); }
  void backward(const LseParams& p, bool for_k) const { launch_lse_backward(p, dtype, allow_tf32, for_k, stream); }
  static Tensor log_add(const Tensor& a, const Tensor& b) { return at::logaddexp(a, b); }
  static Tensor copy(const Tensor& a) { return a.clone(); }
  static void add(Tensor& a, const Tensor& b) { a.add_(b); }
};

std::tuple<Tensor, Tensor> lse_forward_cuda(const Tensor& q, const Tensor& k, const Tensor& scale,
                                            const std::optional<Tensor>& bias, const std::optional<Tensor>& q_labels,
                                            const std::optional<Tensor>& k_labels, int64_t mask_mode,
                                            std::optional<int64_t> exclude_offset, bool with_col, bool symmetric,
                                            bool allow_tf32) {
  LseParams p = make_params(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset);
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(!symmetric || p.N == p.M, "fastnce_cuda: symmetric needs k to be q");
  const DeviceInfo dev = device_info(q.get_device());
  p.resident = forward_rows(int(q.element_size()), p.D, dev);
  TensorMem mem(q, allow_tf32);
  return lse_forward_call(mem, p, with_col, symmetric, dev.num_sms);
}

std::tuple<Tensor, Tensor, Tensor> lse_backward_cuda(
    const Tensor& q, const Tensor& k, const Tensor& scale, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& q_labels, const std::optional<Tensor>& k_labels, int64_t mask_mode,
    std::optional<int64_t> exclude_offset, const Tensor& row_lse, const std::optional<Tensor>& col_lse,
    const std::optional<Tensor>& grad_row, const std::optional<Tensor>& grad_col, bool symmetric, bool need_bias,
    bool need_q, bool need_k, bool allow_tf32) {
  LseParams p = make_params(q, k, scale, bias, q_labels, k_labels, mask_mode, exclude_offset);
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(!symmetric || p.N == p.M, "fastnce_cuda: symmetric needs k to be q");
  check_vector(row_lse, "row_lse", p.M, at::kFloat, q);
  check_vector(grad_row, "grad_row", p.M, at::kFloat, q);
  check_vector(grad_col, "grad_col", p.N, at::kFloat, q);
  if (grad_col.has_value()) {
    TORCH_CHECK(col_lse.has_value() && col_lse->numel() == p.N, "fastnce_cuda: grad_col needs col_lse of shape (",
                p.N, ")");
    check_vector(col_lse, "col_lse", p.N, at::kFloat, q);
  }
  p.row_lse_in = row_lse.data_ptr<float>();
  p.col_lse_in = grad_col.has_value() ? col_lse->data_ptr<float>() : nullptr;
  p.grad_row = grad_row.has_value() ? grad_row->data_ptr<float>() : nullptr;
  p.grad_col = grad_col.has_value() ? grad_col->data_ptr<float>() : nullptr;
  const DeviceInfo dev = device_info(q.get_device());
  plan_backward(p, int(q.element_size()), dev.smem_optin);
  TensorMem mem(q, allow_tf32);
  return lse_backward_call(mem, p, symmetric, need_bias, need_q, need_k, dev.num_sms);
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
