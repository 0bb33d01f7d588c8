// Every kernel of csrc/ once per path (kinds, k is q, masks, bias, split grids, resident or
// streamed rows, backward panels, the wide backward) under the CPU emulation, for a sanitizer:
// built with -fsanitize=thread, a missing __syncthreads / __syncwarp between two threads'
// shared-memory accesses is a reported race (on a GPU a wrong number now and then); with
// -fsanitize=address, an access past a tile or a tensor is reported. The values are checked
// elsewhere (tests/test_cuda.py); here only that the runs are clean. Used by tests/test_cuda.py;
// never part of a build.
//   g++ -std=c++20 -O1 -g -fsanitize=thread -DFASTNCE_EMULATE -include cuda_emu.h -I<cuda>/include \
//       emu_harness.cpp sanitize_main.cpp -o sanitize -pthread && ./sanitize early
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "emu_harness.h"

namespace {

constexpr int64_t kH100Sm = 233472, kH100Optin = 232448, kSmall = 40000;

struct Case {
  int kind;  // 0 fp16, 1 bf16, 2 fp32 as tf32, 3 fp32 FMA
  int64_t M, N, D;
  bool sym, bias;
  int mask;
  int excl;  // -1000: none
  int64_t min_tiles, smem;
};

// The features in the kind's element type, as raw bytes.
std::vector<unsigned char> features(int kind, int64_t n, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  const size_t elem = kind <= 1 ? 2 : 4;
  std::vector<unsigned char> out(size_t(n) * elem);
  for (int64_t i = 0; i < n; ++i) {
    const float v = normal(rng);
    if (kind == 0) {
      const __half h = __float2half(v);
      std::memcpy(&out[i * elem], &h, elem);
    } else if (kind == 1) {
      const __nv_bfloat16 b = __float2bfloat16(v);
      std::memcpy(&out[i * elem], &b, elem);
    } else {
      std::memcpy(&out[i * elem], &v, elem);
    }
  }
  return out;
}

bool run(const Case& c, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int64_t> label(0, 2);
  const int64_t N = c.sym ? c.M : c.N;
  const auto q = features(c.kind, c.M * c.D, rng);
  const auto k = c.sym ? q : features(c.kind, N * c.D, rng);
  const float scale = 2.0f / std::sqrt(float(c.D));
  std::vector<float> bias(N), grad_row(c.M), grad_col(N), row(c.M), col(N), dq(c.M * c.D), dk(N * c.D), db(N);
  std::vector<int64_t> ql(c.M), kl(N);
  for (auto& b : bias) b = normal(rng);
  for (auto& g : grad_row) g = normal(rng);
  for (auto& g : grad_col) g = normal(rng);
  for (auto& l : ql) l = label(rng);
  for (int64_t j = 0; j < N; ++j) kl[j] = c.sym ? ql[j] : label(rng);
  const int vec = -1;  // lse_ops.cpp's rule (use_vec_loads)
  const void* kp = c.sym ? q.data() : k.data();
  const float* bp = c.bias ? bias.data() : nullptr;
  const int64_t* qlp = c.mask ? ql.data() : nullptr;
  const int64_t* klp = c.mask ? kl.data() : nullptr;
  const int has_excl = c.excl != -1000;
  emu_forward(c.kind, q.data(), kp, &scale, bp, qlp, klp, c.mask, has_excl, has_excl ? c.excl : 0, c.M, N, c.D, vec,
              row.data(), col.data(), c.sym, 4, c.min_tiles, c.smem);
  const char* broken = emu_take_violation();
  emu_backward(c.kind, q.data(), kp, &scale, bp, qlp, klp, c.mask, has_excl, has_excl ? c.excl : 0, c.M, N, c.D, vec,
               row.data(), col.data(), grad_row.data(), grad_col.data(), dq.data(), dk.data(),
               c.bias ? db.data() : nullptr, c.sym, /*need_q=*/1, /*need_k=*/1, 4, c.min_tiles,
               c.smem == kH100Sm ? kH100Optin : c.smem);
  if (broken == nullptr) broken = emu_take_violation();
  std::printf("kind %d  %lld x %lld x %lld  sym %d bias %d mask %d excl %d min_tiles %lld smem %lld: %s\n", c.kind,
              (long long)c.M, (long long)N, (long long)c.D, c.sym, c.bias, c.mask, c.excl, (long long)c.min_tiles,
              (long long)c.smem, broken ? broken : "ok");
  return broken == nullptr;
}

}  // namespace

// argv[1] "early": the asynchronous copies land at their issue (cuda_emu.h), so that under
// ThreadSanitizer a copy into a slot that other threads still read is a reported race.
int main(int argc, char** argv) {
  emu_set_copies_land_early(argc > 1 && std::string(argv[1]) == "early");
  const int none = -1000;
  const Case cases[] = {
      // forward resident / streamed, the upper-triangle forward and the mirrored backward
      {1, 70, 70, 64, true, false, 0, 0, 1000, kH100Sm},
      {0, 70, 70, 72, true, false, 1, 0, 1000, kSmall},
      {3, 70, 70, 40, true, false, 2, 0, 1, kH100Sm},  // split grid
      {2, 70, 70, 24, true, false, 0, 0, 1000, kH100Sm},
      // row and column kernels, masks, bias, exclusion off the diagonal, split grids
      {1, 70, 130, 64, false, true, 1, 2, 1, kH100Sm},
      {0, 100, 70, 8, false, true, 2, none, 1000, kH100Sm},
      {3, 70, 100, 70, false, true, 0, -3, 1000, kSmall},  // several backward passes
      {2, 130, 70, 130, false, false, 1, none, 1, kSmall},
      // 16-bit: register and shared-memory accumulators, the wide backward (two and one warps a chunk)
      {1, 70, 90, 200, false, true, 1, none, 1000, kSmall},
      {0, 70, 70, 200, false, false, 0, 0, 1000, kH100Sm},
      {1, 70, 70, 512, true, false, 0, 0, 1000, kH100Sm},
      {0, 70, 100, 300, false, true, 2, none, 1, kH100Sm},
      {1, 70, 70, 130, true, true, 0, 0, 1000, kH100Sm},  // k is q with bias: two kernels and a sum
  };
  std::mt19937 rng(0);
  bool clean = true;
  for (const Case& c : cases) clean = run(c, rng) && clean;
  return clean ? 0 : 1;
}
