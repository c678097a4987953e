// Fused CPU LSTM: one layer and direction over a whole sequence, forward and backward, in one C++
// time loop (the Python side and the contract: kernels/cpu_kernel.py).
//
// Forward, step k (n rows advance):
//   (fused input projection: [x_k | d_k] rows copied into one [B, I + P] operand)
//   region 1, one block of units per thread, walked by panels of L = V::size() units and tiles of R
//     rows: the tile's products [x_k | d_k]·[W_ih | W_hh]ᵀ + b (or d_k·W_hhᵀ, gx added later) for
//     the panel's 4L gate columns accumulate in R × 4 vector registers (panel_tile, our own
//     micro-kernel, the weights packed by panels once per call), then the gate math of each row
//   region 2, projection only, one block of P columns per thread: h = h_raw·W_hrᵀ
// Backward, step k (∂W fused: [x_k | h_{k−1} ⊙ m] packed by panels first):
//   region 1, unit blocks: ∂h_raw = ∂h·W_hr for the block's units (projection only), then the gate
//     derivatives of those units: ∂pre_k, ∂c_{k−1}; then ∂W[the block's gate rows] +=
//     ∂pre_kᵀ·[x_k | h_{k−1} ⊙ m] (panel_tile again, accumulating)
//   region 2, column blocks of I + P: [∂x_k | r] = ∂pre_k·[W_ih | W_hh] (panel_tile), ∂x_k stored,
//     ∂h_{k−1} = r ⊙ m + z^h ⊙ ∂h̃_k + ∂L/∂hs[k]
// The blocks of a region are independent, so a region's only synchronisation is its end: a barrier
// of the one OpenMP team that runs the whole loop (run_steps).
//
// B: batch  T: time  H: hidden  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
// U: hidden units per block  V: lanes of at::vec::Vectorized<scalar_t>  acc: scalar_t (fp32 or fp64)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <c10/util/ParallelGuard.h>
#include <torch/library.h>
#include <torch/version.h>
#if !defined(TORCH_VERSION_MAJOR) || !defined(TORCH_VERSION_MINOR)
#error "torch/version.h defines no TORCH_VERSION_MAJOR/MINOR: the GEMM choice below needs them"
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace {

// variants.py's bits; cpu_kernel.py checks them against variants.py when it loads the library
constexpr int64_t PEEPHOLES = 1 << 0;
constexpr int64_t CIFG = 1 << 1;
constexpr int64_t NO_INPUT_GATE = 1 << 2;
constexpr int64_t NO_FORGET_GATE = 1 << 3;
constexpr int64_t NO_OUTPUT_GATE = 1 << 4;
constexpr int64_t NO_INPUT_ACTIVATION = 1 << 5;
constexpr int64_t NO_OUTPUT_ACTIVATION = 1 << 6;
constexpr int64_t LAYER_NORM = 1 << 7;
constexpr int64_t ZONEOUT_C = 1 << 8;
constexpr int64_t ZONEOUT_H = 1 << 9;
constexpr int64_t RECURRENT_DROPOUT = 1 << 10;
constexpr int64_t SUPPORTED = (1 << 11) - 1 - LAYER_NORM;

// Multiply-adds per step and thread below which a step stays on one thread (each region is an OpenMP
// fork/join). Measured on the shared 2-core EPYC, kernel alone, T = 100: two threads took 0.70× the
// time of one at B16 H64, 0.55× at B16 H128 and H256, 0.55× at B64 H256, but 1.3× at B64 H64
// (not understood); B8–16 H32 stay on one thread (docs/benchmarks/cpu-2026-12-06-cpp-kernel.md).
constexpr int64_t MIN_MACS_PER_BLOCK = 1 << 17;

using at::vec::Vectorized;

// Rows of one register tile of the fused forward step: R rows × 4 gate vectors of accumulators, the
// four W vectors and a broadcast must fit the vector registers: 32 with AVX-512 (R = 6: 29), 16
// with AVX2 and the portable build (R = 2: 13).
template <typename V>
constexpr int TILE_ROWS = sizeof(V) >= 64 ? 6 : 2;

// Rows whose gate math runs side by side (gate_rows).
constexpr int GATE_ROWS = 2;

// Rows of ∂pre (steps × batch) summed into ∂W per pass in the backward: enough that ∂W, which may
// not fit L2, is read and written once per 128 rows of products rather than once per step.
constexpr int64_t DW_ROWS = 128;

// σ(x) = 1 / (1 + e^{−x}), never inf or NaN for finite x: for x ≪ 0, e^{−x} is inf (Sleef's exp,
// fp64) or clamped to FLT_MAX (exp_u20) and σ is 0. fp32 takes ATen's inlined exp_u20 (≤ 20 ulp):
// Sleef's exp is an out-of-line call that spills every live vector register, and the gate pass
// took twice as long with it. exp_u20 clamps NaN to a number: the blend keeps NaN a NaN.
template <typename V>
inline V sigmoid(V x) {
  if constexpr (std::is_same_v<V, Vectorized<float>>) {
    return V::blendv(V(1) / (V(1) + x.neg().exp_u20()), x, x.isnan());
  } else {
    return V(1) / (V(1) + x.neg().exp());
  }
}

// tanh(x) = 2σ(2x) − 1: bounded for every x (Vectorized::tanh is Sleef's, several times slower)
template <typename V>
inline V tanh_(V x) {
  return V(2) * sigmoid(x + x) - V(1);
}

template <typename V, typename T>
inline V load(const T* p, int64_t count) {
  return count == V::size() ? V::loadu(p) : V::loadu(p, count);
}

template <typename V, typename T>
inline void store(const V& v, T* p, int64_t count) {
  if (count == V::size()) {
    v.store(p);
  } else {
    v.store(p, count);
  }
}

// uint8 zoneout masks of `count` units as a lane mask (all bits set where the mask is 1)
template <typename V, typename T>
inline V keep_mask(const uint8_t* z, int64_t count) {
  alignas(64) T tmp[V::size()] = {};
  for (int64_t j = 0; j < count; ++j) tmp[j] = z[j] ? T(1) : T(0);
  return V::loadu(tmp) != V(0);
}

// C[M, N] = A[M, K]·B[K, N], row-major with leading dimensions. fp32: ATen's oneDNN brgemm
// micro-kernel (it falls back to the BLAS without oneDNN's ukernels); measured 1.2–2× faster than
// at::mm_out (MKL) at the per-step shapes here. fp64: at::mm_out (MKL) on views of the buffers.
template <typename T>
inline void gemm_mm_out(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                        int64_t ldc) {
  auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opt);
  auto b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opt);
  auto c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
  at::mm_out(c, a, b);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                 float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, /*add_C=*/false, A, B, C);
#else  // the fp32 brgemm overload is checked on torch 2.13 only: older torch takes the BLAS
  gemm_mm_out(M, N, K, A, lda, B, ldb, C, ldc);
#endif
}

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                 double* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  gemm_mm_out(M, N, K, A, lda, B, ldb, C, ldc);
}

// A split of `n` columns into blocks of a multiple of `lanes`, at most `max_blocks` of them.
struct Blocks {
  int64_t count, size, n;
  Blocks(int64_t n_, int64_t max_blocks, int64_t lanes) : n(n_) {
    int64_t want = std::max<int64_t>(1, std::min<int64_t>(max_blocks, (n + lanes - 1) / lanes));
    size = (n + want - 1) / want;
    size = (size + lanes - 1) / lanes * lanes;
    count = std::max<int64_t>(1, (n + size - 1) / size);
  }
  int64_t begin(int64_t b) const { return std::min(n, b * size); }
  int64_t width(int64_t b) const { return std::min(n, (b + 1) * size) - begin(b); }
};

// Threads worth using for a step of M rows, N columns and K reduced (fp64 runs on one: its GEMM is
// at::mm_out, which must not run inside a parallel region).
template <typename scalar_t>
int64_t max_blocks(int64_t M, int64_t N, int64_t K) {
  if (!std::is_same_v<scalar_t, float> || at::in_parallel_region()) return 1;
  int64_t by_work = std::max<int64_t>(1, M * N * K / MIN_MACS_PER_BLOCK);
  return std::min<int64_t>(at::get_num_threads(), by_work);
}

// Runs a time loop whose steps are regions of independent blocks: `steps(region)` calls
// region(count, fn) once per region and step, which runs fn(b) for every block b < count and returns
// when all have run. With OpenMP and `blocks` > 1, one team of threads runs the whole loop and a
// region ends at a barrier: a fork and join per region (at::parallel_for) cost more than a barrier,
// T times per call. A block's exception is kept and rethrown after the loop (a thread must still
// meet every barrier); the outputs are then not used.
template <typename Steps>
void run_steps(int64_t blocks, const Steps& steps) {
#ifdef _OPENMP
  if (blocks > 1 && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    std::atomic_flag failed = ATOMIC_FLAG_INIT;
    std::exception_ptr error;
    // no num_threads clause: ATen's own regions avoid it (GOMP's thread pool, pytorch#32008), and
    // the team is then the one at::parallel_for uses; threads beyond `blocks` meet the barriers
#pragma omp parallel
    {
      const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
      at::internal::ThreadIdGuard tid_guard(tid);
      c10::ParallelGuard guard(true);
      auto region = [&](int64_t count, const auto& fn) {
        for (int64_t b = tid; b < count; b += nt) {
          try {
            fn(b);
          } catch (...) {
            if (!failed.test_and_set()) error = std::current_exception();
          }
        }
#pragma omp barrier
      };
      steps(region);
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  auto region = [](int64_t count, const auto& fn) {
    at::parallel_for(0, count, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) fn(b);
    });
  };
  steps(region);
}

at::Tensor alloc(at::IntArrayRef shape, at::ScalarType dtype, bool poison) {
  auto t = at::empty(shape, at::TensorOptions().dtype(dtype));
  if (poison && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

std::vector<int64_t> step_sizes(const std::optional<at::Tensor>& batch_sizes, int64_t T, int64_t B) {
  std::vector<int64_t> sizes(T, B);
  if (batch_sizes.has_value()) {
    auto s = batch_sizes->contiguous();
    TORCH_CHECK(s.scalar_type() == at::kLong && s.dim() == 1 && s.numel() == T,
                "batch_sizes must be int64 [", T, "], got ", s.scalar_type(), " ", s.sizes());
    const int64_t* p = s.data_ptr<int64_t>();
    for (int64_t k = 0; k < T; ++k) {
      TORCH_CHECK(p[k] >= 0 && p[k] <= B, "batch_sizes[", k, "] = ", p[k], " is outside [0, ", B, "]");
      sizes[k] = p[k];
    }
  }
  return sizes;
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// ---- forward ----

template <typename scalar_t>
struct Forward {
  int64_t T, B, H, P, G, flags;
  const scalar_t* gx;    // [T, B, G] input projection incl. biases, or nullptr: fused (x, I, bias_panels)
  const scalar_t* x;     // [T, B, I] input, when the input projection is fused into the step's product
  int64_t sxt, sxb;      // x's step and batch strides: element (t, b, i) at x[t·sxt + b·sxb + i]
  int64_t I;             // input features (0 when gx is given)
  const scalar_t* bias_panels;  // [⌈H/L⌉, 4L] b_ih + b_hh by panels (fused, with a bias) or nullptr
  scalar_t* xd;          // [2, B, I + P] (fused) or nullptr: [x_k | d_k] rows of step k in slot k % 2
  scalar_t* hs;          // [T + 1, B, P]
  scalar_t* cs;          // [T + 1, B, H]
  scalar_t* gates;       // [T, B, G] or nullptr (save = false)
  scalar_t* h_raw;       // [T, B, H] (projection; a [B, H] scratch when save = false) or nullptr
  int64_t h_raw_step;    // elements between steps of h_raw: B·H, or 0 for the scratch
  scalar_t* c_new;       // [T, B, H] (ZONEOUT_C and save) or nullptr
  const scalar_t* peep;  // [3, H] (PEEPHOLES)
  const uint8_t* zone;   // [T, B, 2, H] (ZONEOUT_*)
  const scalar_t* drop;  // [B, P] (RECURRENT_DROPOUT)
  scalar_t* dbuf;        // [2, B, P]: h ⊙ m, slot k % 2 is step k's GEMM operand (RECURRENT_DROPOUT)
  const scalar_t* w_panels;  // [⌈H/L⌉, I + P, 4L] [W_ih | W_hh]ᵀ by panels of L units: i, f, g, o of those units
  const scalar_t* w_hr_t;  // [H, P] W_hrᵀ (projection)
};

// The gate math of N rows from r (rows < n) and `cnt` ≤ L units from u, given the recurrent
// products of those units' four gates, rec [N, 4L] (row stride 4L): c, h (or h_raw), and the saved
// gates. The N rows' chains are independent and written side by side: a row alone is a chain of
// two dependent exponentials and divisions (σ(o) waits for c, tanh(c) for c), and the core ran one
// row's chain at a time (the transcendentals were 11–17 % of a B16 H64–H128 forward).
template <int N, typename scalar_t>
inline void gate_rows(const Forward<scalar_t>& a, int64_t k, int64_t r, int64_t u, int64_t cnt, const scalar_t* rec) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t L = V::size();
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, f = a.flags;
  const bool proj = a.h_raw != nullptr;
  const int64_t row = k * B + r;  // of [T, B, ·] tensors, the first of the N
  V a_i[N], a_f[N], a_g[N], a_o[N], c_prev[N], i[N], fg[N], g[N], c[N], o[N], h[N];
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j) {
    const scalar_t* rj = rec + j * 4 * L;
    a_i[j] = V::loadu(rj), a_f[j] = V::loadu(rj + L), a_g[j] = V::loadu(rj + 2 * L), a_o[j] = V::loadu(rj + 3 * L);
    if (a.gx) {  // else the product included x_t·W_ihᵀ + b
      const scalar_t* x_r = a.gx + (row + j) * G + u;
      a_i[j] = a_i[j] + load<V>(x_r, cnt);
      a_f[j] = a_f[j] + load<V>(x_r + H, cnt);
      a_g[j] = a_g[j] + load<V>(x_r + 2 * H, cnt);
      a_o[j] = a_o[j] + load<V>(x_r + 3 * H, cnt);
    }
    c_prev[j] = load<V>(a.cs + (row + j) * H + u, cnt);
  }
  V pi(0), pf(0), po(0);
  if (f & PEEPHOLES) {
    pi = load<V>(a.peep + u, cnt);
    pf = load<V>(a.peep + H + u, cnt);
    po = load<V>(a.peep + 2 * H + u, cnt);
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) a_i[j] = a_i[j] + pi * c_prev[j], a_f[j] = a_f[j] + pf * c_prev[j];
  }
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j) {
    i[j] = (f & NO_INPUT_GATE) ? V(1) : sigmoid(a_i[j]);
    fg[j] = (f & CIFG) ? V(1) - i[j] : (f & NO_FORGET_GATE) ? V(1) : sigmoid(a_f[j]);
    g[j] = (f & NO_INPUT_ACTIVATION) ? a_g[j] : tanh_(a_g[j]);
    if (!(f & PEEPHOLES)) o[j] = (f & NO_OUTPUT_GATE) ? V(1) : sigmoid(a_o[j]);  // needs no c
  }
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j) c[j] = fg[j] * c_prev[j] + i[j] * g[j];  // c̃
  if (f & PEEPHOLES)
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) o[j] = (f & NO_OUTPUT_GATE) ? V(1) : sigmoid(a_o[j] + po * c[j]);
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j) h[j] = o[j] * ((f & NO_OUTPUT_ACTIVATION) ? c[j] : tanh_(c[j]));  // h̃
#pragma GCC unroll 4
  for (int j = 0; j < N; ++j) {
    const int64_t rj = row + j;
    if (a.gates) {
      scalar_t* g_out = a.gates + rj * G + u;
      store(i[j], g_out, cnt);
      store(fg[j], g_out + H, cnt);
      store(g[j], g_out + 2 * H, cnt);
      store(o[j], g_out + 3 * H, cnt);
    }
    const uint8_t* z_r = a.zone ? a.zone + rj * 2 * H + u : nullptr;
    if (f & ZONEOUT_C) {
      if (a.c_new) store(c[j], a.c_new + rj * H + u, cnt);
      c[j] = V::blendv(c[j], c_prev[j], keep_mask<V, scalar_t>(z_r, cnt));
    }
    if (f & ZONEOUT_H) h[j] = V::blendv(h[j], load<V>(a.hs + rj * P + u, cnt), keep_mask<V, scalar_t>(z_r + H, cnt));
    store(c[j], a.cs + (rj + B) * H + u, cnt);
    if (proj) {
      store(h[j], a.h_raw + k * a.h_raw_step + (r + j) * H + u, cnt);
    } else {
      store(h[j], a.hs + (rj + B) * P + u, cnt);
      if (f & RECURRENT_DROPOUT)  // the next step's GEMM operand, h ⊙ m
        store(h[j] * load<V>(a.drop + (r + j) * P + u, cnt), a.dbuf + ((k + 1) % 2) * B * P + (r + j) * P + u, cnt);
    }
  }
}

// A tile of R rows of `a` (element (i, kk) at a[i·lda + kk·ldk]) times the first Q vectors of one
// packed panel [K, 4L]: out[i·ldo + c] = init + Σ_kk a(i, kk)·w[kk·4L + c] for i < R, c < Q·L, where
// init is bias[c], or out itself (accumulate), or 0. The products stay in R × Q vector registers
// over the whole contraction (our micro-kernel: W streams Q vectors per kk, `a` is broadcast).
// Q < 4 is a panel's tail: a product whose last panel holds 2 of 4L columns costs 1 vector, not 4.
// The results go through memory (an L1 tile or a scratch row): handing the registers on to the gate
// math directly made GCC keep a copy of every accumulator in memory, stored at each kk (2× slower).
template <int R, int Q, typename scalar_t>
inline void panel_tile(const scalar_t* a, int64_t lda, int64_t ldk, const scalar_t* w, int64_t K,
                       const scalar_t* bias, scalar_t* out, int64_t ldo, bool accumulate) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t L = V::size();
  V acc[R][Q];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q)
      acc[i][q] = accumulate ? V::loadu(out + i * ldo + q * L) : bias ? V::loadu(bias + q * L) : V(0);
  // the Q vectors spelled out, as the four were before tails had their own width: the four-vector
  // tile keeps the code its measurements were made with
  for (int64_t kk = 0; kk < K; ++kk) {
    const scalar_t* wk = w + kk * 4 * L;
    const scalar_t* ak = a + kk * ldk;
    const V w0 = V::loadu(wk);
    const V w1 = Q > 1 ? V::loadu(wk + L) : w0, w2 = Q > 2 ? V::loadu(wk + 2 * L) : w0;
    const V w3 = Q > 3 ? V::loadu(wk + 3 * L) : w0;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V ai(ak[i * lda]);
      acc[i][0] = at::vec::fmadd(ai, w0, acc[i][0]);
      if constexpr (Q > 1) acc[i][1] = at::vec::fmadd(ai, w1, acc[i][1]);
      if constexpr (Q > 2) acc[i][2] = at::vec::fmadd(ai, w2, acc[i][2]);
      if constexpr (Q > 3) acc[i][3] = at::vec::fmadd(ai, w3, acc[i][3]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) acc[i][q].store(out + i * ldo + q * L);
}

// panel_tile for `rows` < R rows: a tile of exactly that many.
template <int R, int Q, typename scalar_t>
inline void panel_tail(int64_t rows, const scalar_t* a, int64_t lda, int64_t ldk, const scalar_t* w, int64_t K,
                       const scalar_t* bias, scalar_t* out, int64_t ldo, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R) {
      panel_tile<R, Q>(a, lda, ldk, w, K, bias, out, ldo, accumulate);
    } else {
      panel_tail<R - 1, Q>(rows, a, lda, ldk, w, K, bias, out, ldo, accumulate);
    }
  }
}

template <int Q, typename scalar_t>
void panel_rows(int64_t n, const scalar_t* a, int64_t lda, int64_t ldk, const scalar_t* w, int64_t K,
                const scalar_t* bias, scalar_t* out, int64_t ldo, bool accumulate) {
  constexpr int R = TILE_ROWS<Vectorized<scalar_t>>;
  int64_t r = 0;
  for (; r + R <= n; r += R) panel_tile<R, Q>(a + r * lda, lda, ldk, w, K, bias, out + r * ldo, ldo, accumulate);
  panel_tail<R - 1, Q>(n - r, a + r * lda, lda, ldk, w, K, bias, out + r * ldo, ldo, accumulate);
}

// out [n, width] (row stride ldo) = (out if accumulate) + a [n, K]·panel [K, 4L][:, :width] (+ bias),
// any n, width ≤ 4L rounded up to whole vectors (the columns beyond width up to the vector are
// written too: the packed panel holds zeros there); a's element (i, kk) at a[i·lda + kk·ldk].
template <typename scalar_t>
void panel_product(int64_t n, const scalar_t* a, int64_t lda, int64_t ldk, const scalar_t* w, int64_t K,
                   const scalar_t* bias, scalar_t* out, int64_t ldo, bool accumulate = false,
                   int64_t width = 4 * Vectorized<scalar_t>::size()) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  switch ((std::min<int64_t>(width, 4 * L) + L - 1) / L) {
    case 1: return panel_rows<1>(n, a, lda, ldk, w, K, bias, out, ldo, accumulate);
    case 2: return panel_rows<2>(n, a, lda, ldk, w, K, bias, out, ldo, accumulate);
    case 3: return panel_rows<3>(n, a, lda, ldk, w, K, bias, out, ldo, accumulate);
    default: return panel_rows<4>(n, a, lda, ldk, w, K, bias, out, ldo, accumulate);
  }
}

// The layouts panel_tile streams, written by plain loops: as ATen views (pad, permute, contiguous)
// the packing was a strided copy that cost more than a whole step's product at T = 1.

// dst[c·ld_dst + r] = src[r·ld_src + c] for r < rows, c < cols (each ≤ L). ATen's transpose_mxn
// zero-fills a block on the stack and branches on the sizes: 17 % of its time was the fill. The full
// 16 × 16 fp32 block, every block but a panel's edges, is a register network instead: interleave
// 32-bit pairs of rows, then 64-bit pairs, then 128-bit lanes twice; row k of the result is column k.
template <typename scalar_t>
inline void transpose_block(const scalar_t* src, int64_t ld_src, scalar_t* dst, int64_t ld_dst, int64_t rows,
                            int64_t cols) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (rows == 16 && cols == 16) {
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
      for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4) {
        const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
        const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
        r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
      }
      for (int i = 0; i < 4; ++i) {  // 0x88: lanes 0 and 2 of each operand, 0xdd: lanes 1 and 3
        t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
      }
      for (int i = 0; i < 8; ++i) {
        _mm512_storeu_ps(dst + i * ld_dst, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
        _mm512_storeu_ps(dst + (i + 8) * ld_dst, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd));
      }
      return;
    }
  }
#endif
  at::vec::transpose_mxn<scalar_t>(src, ld_src, dst, ld_dst, rows, cols);
}

// The forward's weight: [W_ih | W_hh] (w_ih [4H, I] or none, w_hh [4H, P]) by panels of L units,
// [⌈H/L⌉, I + P, 4, L]: panel p, row k, gate q, lane l holds W[q·H + pL + l, k], zero beyond H.
// pack_gate_panels writes panels [p0, p1) of it into o; wi [4H, I] (I = 0: none) and wh [4H, P]
// contiguous. A transpose, packed anew by every call (the weights may have changed) and by each block
// of units for its own panels, by blocks of L rows × L columns (transpose_block). Element by element,
// a row of W at a time scattered K destination lines apart, it was 2.7 % of a B16 H128–H256 T100
// forward; a B1 T1 forward call at H = 256, packing included, took 430 µs then and 120 µs by blocks.
template <typename scalar_t>
void pack_gate_panels(const scalar_t* wi, int64_t I, const scalar_t* wh, int64_t P, int64_t H, int64_t L,
                      scalar_t* o, int64_t p0, int64_t p1) {
  const int64_t K = I + P;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t lanes = std::min(L, H - p * L);
    for (int64_t q = 0; q < 4; ++q) {
      scalar_t* panel = o + (p * K * 4 + q) * L;  // element (k, l) of this panel and gate at panel[k·4L + l]
      // the panel's rows of one weight w [4H, cols], by blocks of L columns, into rows k0 + c
      auto transpose = [&](const scalar_t* w, int64_t cols, int64_t k0) {
        for (int64_t c = 0; c < cols; c += L)
          transpose_block(w + (q * H + p * L) * cols + c, cols, panel + (k0 + c) * 4 * L, 4 * L, lanes,
                          std::min(L, cols - c));
      };
      if (I) transpose(wi, I, 0);
      transpose(wh, P, I);
      if (lanes < L)  // the last panel's lanes beyond H
        for (int64_t k = 0; k < K; ++k) std::fill(panel + k * 4 * L + lanes, panel + k * 4 * L + L, scalar_t(0));
    }
  }
}

// The backward's weight: [W_ih | W_hh] as output columns, by panels of 4L of its I + P columns,
// [⌈(I + P)/4L⌉, 4H, 4L]: panel p, row g holds columns [4L·p, 4L·p + 4L) of row g, zero beyond.
template <typename scalar_t>
at::Tensor pack_column_panels(const std::optional<at::Tensor>& w_ih, const at::Tensor& w_hh, int64_t L4) {
  const int64_t G = w_hh.size(0), I = w_ih.has_value() ? w_ih->size(1) : 0, P = w_hh.size(1), N = I + P;
  const int64_t panels = (N + L4 - 1) / L4;
  auto out = at::zeros({panels, G, L4}, w_hh.options());
  scalar_t* o = out.data_ptr<scalar_t>();
  const scalar_t* wi = I ? w_ih->data_ptr<scalar_t>() : nullptr;
  const scalar_t* wh = w_hh.data_ptr<scalar_t>();
  for (int64_t g = 0; g < G; ++g)
    for (int64_t c = 0; c < N;) {  // runs of columns inside one panel and one of the two weights
      const int64_t end = std::min({N, (c / L4 + 1) * L4, c < I ? I : N});
      const scalar_t* src = c < I ? wi + g * I + c : wh + g * P + (c - I);
      std::copy(src, src + (end - c), o + ((c / L4) * G + g) * L4 + c % L4);
      c = end;
    }
  return out;
}

// Rows [r0, r0 + R) (R ≤ TILE_ROWS), the L units of one panel from u: the pre-activations of their
// four gates, [x_t | d_t]·W_panel [I + P, 4L] + b (fused input projection) or d_t·W_panel [P, 4L]
// (gx added in gate_rows), then the gate math of the rows.
template <int R, typename scalar_t>
inline void step_tile(const Forward<scalar_t>& a, int64_t k, const scalar_t* d, int64_t r0, int64_t u, int64_t cnt,
                      const scalar_t* w) {
  constexpr int64_t L = Vectorized<scalar_t>::size();
  const int64_t K = a.I + a.P;  // d holds [x_t | d_t] rows with the fused projection, else d_t
  const scalar_t* bias = a.bias_panels ? a.bias_panels + (u / L) * 4 * L : nullptr;
  alignas(64) scalar_t rec[R][4 * L];
  panel_tile<R, 4>(d + r0 * K, K, 1, w, K, bias, rec[0], 4 * L, false);
  int i = 0;
  for (; i + GATE_ROWS <= R; i += GATE_ROWS) gate_rows<GATE_ROWS>(a, k, r0 + i, u, cnt, rec[i]);
  for (; i < R; ++i) gate_rows<1>(a, k, r0 + i, u, cnt, rec[i]);
}

// The last n − r0 < R rows of a panel, as one tile of exactly that many rows.
template <int R, typename scalar_t>
inline void step_tail(const Forward<scalar_t>& a, int64_t k, const scalar_t* d, int64_t r0, int64_t rows, int64_t u,
                      int64_t cnt, const scalar_t* w) {
  if constexpr (R > 0) {
    if (rows == R) {
      step_tile<R>(a, k, d, r0, u, cnt, w);
    } else {
      step_tail<R - 1>(a, k, d, r0, rows, u, cnt, w);
    }
  }
}

// Step k, block b of nb (fused projection): stages step k + 1's operand in slot (k + 1) % 2 of xd,
// the block's own columns [c0, c0 + cw) of d_{k+1} (final once this block has run) for every row,
// and with `x_rows` its share of the rows of x_{k+1}. Each block writes only what it owns, so the
// next step's operand is complete at the end of the region, with no serial copy between steps.
template <typename scalar_t>
void stage_next(const Forward<scalar_t>& a, int64_t k, int64_t c0, int64_t cw, int64_t b, int64_t nb, bool x_rows) {
  const int64_t B = a.B, P = a.P, I = a.I, K = I + P;
  scalar_t* next = a.xd + ((k + 1) % 2) * B * K;
  const scalar_t* d = (a.flags & RECURRENT_DROPOUT) ? a.dbuf + ((k + 1) % 2) * B * P : a.hs + (k + 1) * B * P;
  for (int64_t r = 0; r < B; ++r) std::copy(d + r * P + c0, d + r * P + c0 + cw, next + r * K + I + c0);
  if (x_rows && k + 1 < a.T)
    for (int64_t r = B * b / nb; r < B * (b + 1) / nb; ++r)
      std::copy_n(a.x + (k + 1) * a.sxt + r * a.sxb, I, next + r * K);
}

// Step k, rows < n, units [u0, u0 + ub) of one block (whole panels): gates, c, and h (or h_raw);
// rows ≥ n carry. Block b of nb (stage_next).
template <typename scalar_t>
void forward_block(const Forward<scalar_t>& a, int64_t k, int64_t n, int64_t u0, int64_t ub, int64_t b, int64_t nb) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t L = V::size();
  constexpr int R = TILE_ROWS<V>;
  const int64_t B = a.B, H = a.H, P = a.P, f = a.flags;
  const bool proj = a.h_raw != nullptr;
  // the product's left operand: [x_k | d_k] rows (fused projection, staged by step k − 1), else d_k
  const scalar_t* d_prev = a.xd ? a.xd + (k % 2) * B * (a.I + P)
                                : (f & RECURRENT_DROPOUT) ? a.dbuf + (k % 2) * B * P : a.hs + k * B * P;
  for (int64_t u = u0; u < u0 + ub; u += L) {
    const int64_t cnt = std::min<int64_t>(L, H - u);
    const scalar_t* w = a.w_panels + (u / L) * (a.I + P) * 4 * L;
    int64_t r = 0;
    for (; r + R <= n; r += R) step_tile<R>(a, k, d_prev, r, u, cnt, w);
    step_tail<R - 1>(a, k, d_prev, r, n - r, u, cnt, w);
  }
  for (int64_t r = n; r < B; ++r) {  // a row that does not advance: carries c and h, has no gates
    const int64_t row = k * B + r;
    const scalar_t* c_in = a.cs + row * H + u0;
    std::copy(c_in, c_in + ub, a.cs + (row + B) * H + u0);
    if (proj) {
      scalar_t* h_out = a.h_raw + k * a.h_raw_step + r * H + u0;
      std::fill(h_out, h_out + ub, scalar_t(0));  // rows that did not step add nothing to ∂W_hr
    } else {
      const scalar_t* h_in = a.hs + row * P + u0;
      std::copy(h_in, h_in + ub, a.hs + (row + B) * P + u0);
      if (f & RECURRENT_DROPOUT) {
        const scalar_t* d_in = a.dbuf + (k % 2) * B * P + r * P + u0;
        std::copy(d_in, d_in + ub, a.dbuf + ((k + 1) % 2) * B * P + r * P + u0);
      }
    }
    if (a.gates)
      for (int q = 0; q < 4; ++q) std::fill(a.gates + row * a.G + q * H + u0, a.gates + row * a.G + q * H + u0 + ub, scalar_t(0));
    if (a.c_new) std::fill(a.c_new + row * H + u0, a.c_new + row * H + u0 + ub, scalar_t(0));
  }
  if (a.xd) stage_next(a, k, proj ? 0 : u0, proj ? 0 : ub, b, nb, true);  // with a projection d comes later
}

// Projection, step k, columns [p0, p0 + pb): hs[k + 1] = h_raw·W_hrᵀ for rows < n, carried for the rest.
template <typename scalar_t>
void project_block(const Forward<scalar_t>& a, int64_t k, int64_t n, int64_t p0, int64_t pb, int64_t b, int64_t nb) {
  using V = Vectorized<scalar_t>;
  const int64_t B = a.B, H = a.H, P = a.P;
  scalar_t* h_out = a.hs + (k + 1) * B * P;
  gemm(n, pb, H, a.h_raw + k * a.h_raw_step, H, a.w_hr_t + p0, P, h_out + p0, P);
  for (int64_t r = n; r < B; ++r) std::copy(h_out - B * P + r * P + p0, h_out - B * P + r * P + p0 + pb, h_out + r * P + p0);
  if (a.flags & RECURRENT_DROPOUT) {
    scalar_t* dnext = a.dbuf + ((k + 1) % 2) * B * P;
    for (int64_t r = 0; r < B; ++r)
      for (int64_t j = 0; j < pb; j += V::size()) {
        const int64_t cnt = std::min<int64_t>(V::size(), pb - j);
        const int64_t o = r * P + p0 + j;
        store(load<V>(h_out + o, cnt) * load<V>(a.drop + o, cnt), dnext + o, cnt);
      }
  }
  if (a.xd) stage_next(a, k, p0, pb, b, nb, false);
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& gx, const std::optional<at::Tensor>& w_ih,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                     const std::vector<int64_t>& sizes, int64_t flags,
                                     const std::optional<at::Tensor>& peephole,
                                     const std::optional<at::Tensor>& zoneout,
                                     const std::optional<at::Tensor>& dropout, bool save, bool poison) {
  using V = Vectorized<scalar_t>;
  // with w_ih, `gx` is the input x [T, B, I] and the projection is fused into each step's product
  const bool fused = w_ih.has_value();
  const int64_t T = gx.size(0), B = gx.size(1), G = w_hh.size(0), H = G / 4, P = w_hh.size(1);
  const int64_t I = fused ? gx.size(2) : 0;
  const auto dt = gx.scalar_type();
  const bool proj = w_hr.has_value();
  TORCH_CHECK(!(proj && (flags & ZONEOUT_H)), "zoneout on h needs P = H: it mixes h_{t-1} [B, P] with h~ [B, H]");
  auto hs = alloc({T + 1, B, P}, dt, poison);
  auto cs = alloc({T + 1, B, H}, dt, poison);
  auto gates = save ? alloc({T, B, G}, dt, poison) : alloc({0}, dt, false);
  auto h_raw = proj ? alloc({save ? T : 1, B, H}, dt, poison) : alloc({0}, dt, false);
  auto c_new = save && (flags & ZONEOUT_C) ? alloc({T, B, H}, dt, poison) : alloc({0}, dt, false);
  hs[0].copy_(h0);
  cs[0].copy_(c0);

  const Blocks units(H, max_blocks<scalar_t>(B, 4 * H, I + P), V::size());
  const Blocks cols(P, max_blocks<scalar_t>(B, P, H), V::size());
  // [W_ih | W_hh]ᵀ by panels of L units (pack_gate_panels: each block packs its own units' panels in
  // the loop's team); the bias likewise, as a weight of K = 1
  constexpr int64_t L = V::size();
  const int64_t panels = (H + L - 1) / L;
  at::Tensor w_panels = at::empty({panels, I + P, 4, L}, w_hh.options());
  auto xd = fused ? alloc({2, B, I + P}, dt, poison) : at::Tensor();
  at::Tensor bias_panels = fused && bias.has_value() ? at::empty({panels, 1, 4, L}, w_hh.options()) : at::Tensor();
  if (bias_panels.defined())
    pack_gate_panels<scalar_t>(nullptr, 0, bias->data_ptr<scalar_t>(), 1, H, L, bias_panels.data_ptr<scalar_t>(), 0,
                               panels);
  auto w_hr_t = proj ? w_hr->t().contiguous() : at::Tensor();
  auto dbuf = (flags & RECURRENT_DROPOUT) ? alloc({2, B, P}, dt, poison) : at::Tensor();
  if (dbuf.defined()) {
    auto slot0 = dbuf[0];
    at::mul_out(slot0, hs[0], *dropout);
  }

  Forward<scalar_t> a{T, B, H, P, G, flags,
                      fused ? nullptr : gx.data_ptr<scalar_t>(), fused ? gx.data_ptr<scalar_t>() : nullptr,
                      fused ? gx.stride(0) : 0, fused ? gx.stride(1) : 0, I,
                      bias_panels.defined() ? bias_panels.data_ptr<scalar_t>() : nullptr,
                      xd.defined() ? xd.data_ptr<scalar_t>() : nullptr, hs.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                      save ? gates.data_ptr<scalar_t>() : nullptr,
                      proj ? h_raw.data_ptr<scalar_t>() : nullptr, save ? B * H : 0,
                      c_new.numel() ? c_new.data_ptr<scalar_t>() : nullptr,
                      ptr_or_null<scalar_t>(peephole), ptr_or_null<uint8_t>(zoneout), ptr_or_null<scalar_t>(dropout),
                      dbuf.defined() ? dbuf.data_ptr<scalar_t>() : nullptr, w_panels.data_ptr<scalar_t>(),
                      proj ? w_hr_t.data_ptr<scalar_t>() : nullptr};
  if (a.xd && T > 0) {  // slot 0: [x_0 | d_0]; later slots are staged by the blocks (stage_next)
    const scalar_t* d0 = (flags & RECURRENT_DROPOUT) ? a.dbuf : a.hs;
    for (int64_t r = 0; r < B; ++r) {
      std::copy_n(a.x + r * a.sxb, I, a.xd + r * (I + P));
      std::copy_n(d0 + r * P, P, a.xd + r * (I + P) + I);
    }
  }
  run_steps(std::max(units.count, proj ? cols.count : 1), [&](const auto& region) {
    region(units.count, [&](int64_t b) {
      pack_gate_panels(fused ? w_ih->data_ptr<scalar_t>() : nullptr, I, w_hh.data_ptr<scalar_t>(), P, H, L,
                       w_panels.data_ptr<scalar_t>(), units.begin(b) / L, (units.begin(b) + units.width(b) + L - 1) / L);
    });
    for (int64_t k = 0; k < T; ++k) {
      const int64_t n = sizes[k];
      region(units.count, [&](int64_t b) { forward_block(a, k, n, units.begin(b), units.width(b), b, units.count); });
      if (proj) region(cols.count, [&](int64_t b) { project_block(a, k, n, cols.begin(b), cols.width(b), b, cols.count); });
    }
  });
  if (!save && proj) h_raw = alloc({0}, dt, false);
  return {hs, cs, gates, h_raw, c_new};
}

// ---- backward ----

template <typename scalar_t>
struct Backward {
  int64_t T, B, H, P, G, flags;
  const scalar_t* d_hs;   // [T + 1, B, P]
  const scalar_t* gates;  // [T, B, G]
  const scalar_t* cs;     // [T + 1, B, H]
  const scalar_t* c_til;  // [T, B, H]: c̃ (c_new under ZONEOUT_C, else cs + B·H)
  const scalar_t* w_panels;  // [⌈(I + P)/4L⌉, G, 4L] [W_ih | W_hh] packed by panels of output columns
  int64_t I;              // input features when ∂x is fused into the product (w_ih given), else 0
  int64_t ldr;            // row stride of rec: the packed columns, ⌈(I + P)/4L⌉·4L
  int64_t Iw;             // input features of ∂W_ih when ∂W is in the loop (x given), else 0
  const scalar_t* w_hr;   // [P, H] (projection) or nullptr
  const scalar_t* peep;   // [3, H]
  const uint8_t* zone;    // [T, B, 2, H]
  const scalar_t* drop;   // [B, P]
  scalar_t* d_pre;        // [T, B, G] out
  scalar_t* d_hp;         // [T, B, P] out (projection)
  scalar_t* dh;           // [B, P] state: ∂L/∂hs[k + 1], then ∂L/∂hs[k]
  scalar_t* dc;           // [B, H] state: ∂L/∂cs[k + 1], then ∂L/∂cs[k]
  scalar_t* dh_raw;       // [B, H] scratch: ∂L/∂h̃ before the projection (projection only)
  scalar_t* carry;        // [B, H] scratch: z^h ⊙ ∂L/∂h_k, what reaches h_{k−1} directly (ZONEOUT_H)
  scalar_t* rec;          // [B, ldr] scratch: ∂pre_k·[W_ih | W_hh] = [∂x_k | ∂L/∂(h_{k−1} ⊙ m)]
  scalar_t* d_x;          // [T, B, I] out (∂x fused) or nullptr
  // ∂W accumulated step by step (∂W fused), else nullptr:
  const scalar_t* x;      // [T, B, I] the layer input (Iw > 0)
  int64_t sxt, sxb;       // x's step and batch strides: element (t, b, i) at x[t·sxt + b·sxb + i]
  const scalar_t* hs;     // [T + 1, B, P] the forward's h
  int64_t chunk;          // steps whose ∂W products are summed in one pass (chunk·B ≥ DW_ROWS rows)
  int64_t ldw;            // row stride of d_w: ⌈(Iw + P)/4L⌉·4L
  scalar_t* xh_panels;    // [⌈(Iw + P)/4L⌉, chunk·B, 4L] scratch: [x_k | h_{k−1} ⊙ m] of the chunk's steps
  scalar_t* d_w;          // [G, ldw] out: Σ_k ∂pre_kᵀ·[x_k | h_{k−1} ⊙ m], ∂[W_ih | W_hh] (padded columns)
  scalar_t* d_b;          // [G] out: Σ_k Σ_rows ∂pre_k, ∂b (with d_w)
};

// Step k, rows [r0, r1): [x_k | h_{k−1} ⊙ m] into slot k % chunk of xh_panels, the right operand of
// the chunk's ∂W product. Rows that did not step have ∂pre = 0 and add nothing.
template <typename scalar_t>
void pack_inputs(const Backward<scalar_t>& a, int64_t k, int64_t r0, int64_t r1) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t L4 = 4 * V::size();
  const int64_t B = a.B, P = a.P, I = a.Iw, rows = a.chunk * B;
  for (int64_t r = r0; r < r1; ++r) {
    scalar_t* out = a.xh_panels + ((k % a.chunk) * B + r) * L4;  // column c at (c / 4L)·rows·4L + c % 4L
    const scalar_t* h_r = a.hs + (k * B + r) * P;                 // hs[k] = h_{k−1}
    const scalar_t* m_r = (a.flags & RECURRENT_DROPOUT) ? a.drop + r * P : nullptr;
    // runs of columns that stay inside one panel: contiguous on both sides
    for (int64_t c = 0; c < I + P;) {
      const int64_t end = std::min({I + P, (c / L4 + 1) * L4, c < I ? I : I + P});
      scalar_t* dst = out + (c / L4) * rows * L4 + c % L4;
      if (c < I) {
        std::copy(a.x + k * a.sxt + r * a.sxb + c, a.x + k * a.sxt + r * a.sxb + end, dst);
      } else if (!m_r) {
        std::copy(h_r + c - I, h_r + end - I, dst);
      } else {
        for (int64_t j = 0; j < end - c; j += V::size()) {
          const int64_t cnt = std::min<int64_t>(V::size(), end - c - j);
          store(load<V>(h_r + c - I + j, cnt) * load<V>(m_r + c - I + j, cnt), dst + j, cnt);
        }
      }
      c = end;
    }
  }
}

// The gate rows of units [u0, u0 + ub), once step k completes its chunk (steps [k, k + steps)):
// ∂W[rows, :] += Σ over the chunk's steps of ∂pre_s[:, rows]ᵀ·[x_s | h_{s−1} ⊙ m]. One pass per
// chunk, not per step: ∂W [4H, I + P] is read and written once per chunk·B rows of ∂pre, so it
// need not stay in L2 (it does not at H = 256: 2 MB).
template <typename scalar_t>
void accumulate_dw(const Backward<scalar_t>& a, int64_t k, int64_t u0, int64_t ub) {
  constexpr int64_t L4 = 4 * Vectorized<scalar_t>::size();
  const int64_t B = a.B, H = a.H, G = a.G;
  if (k % a.chunk != 0) return;  // the chunk's lowest step comes last (the loop runs backwards)
  using V = Vectorized<scalar_t>;
  const int64_t steps = std::min(a.chunk, a.T - k), rows = a.chunk * B;
  const scalar_t* d_pre = a.d_pre + k * B * G;  // [steps·B, G] the chunk's rows
  for (int64_t q = 0; q < 4; ++q) {
    const int64_t g0 = q * H + u0;  // ub rows of ∂W; row i reads column g0 + i of ∂pre
    for (int64_t c = 0; c < a.Iw + a.P; c += L4)
      panel_product(ub, d_pre + g0, 1, G, a.xh_panels + (c / L4) * rows * L4, steps * B,
                    (const scalar_t*)nullptr, a.d_w + g0 * a.ldw + c, a.ldw, /*accumulate=*/true,
                    /*width=*/a.Iw + a.P - c);
    for (int64_t j = 0; j < ub; j += V::size()) {  // ∂b: the same rows summed
      const int64_t cnt = std::min<int64_t>(V::size(), ub - j);
      V sum = load<V>(a.d_b + g0 + j, cnt);
      for (int64_t r = 0; r < steps * B; ++r) sum = sum + load<V>(d_pre + r * G + g0 + j, cnt);
      store(sum, a.d_b + g0 + j, cnt);
    }
  }
}

// Step k, units [u0, u0 + ub): ∂pre_k of rows < n (0 for the rest) and ∂c_{k−1} in place.
template <typename scalar_t>
void backward_block(const Backward<scalar_t>& a, int64_t k, int64_t n, int64_t u0, int64_t ub) {
  using V = Vectorized<scalar_t>;
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, f = a.flags;
  const scalar_t* dh_src = a.dh;  // P = H without projection
  if (a.w_hr) {
    gemm(n, ub, P, a.dh, P, a.w_hr + u0, H, a.dh_raw + u0, H);
    dh_src = a.dh_raw;
  }
  const V zero(0), one(1);
  V pi(0), pf(0), po(0);
  for (int64_t r = 0; r < B; ++r) {
    const int64_t row = k * B + r;
    scalar_t* dp = a.d_pre + row * G + u0;
    if (r >= n) {
      for (int q = 0; q < 4; ++q) std::fill(dp + q * H, dp + q * H + ub, scalar_t(0));
      continue;
    }
    const scalar_t* g_r = a.gates + row * G + u0;
    const scalar_t* ct_r = a.c_til + row * H + u0;
    const scalar_t* cp_r = a.cs + row * H + u0;
    const scalar_t* dh_r = dh_src + r * H + u0;
    scalar_t* dc_r = a.dc + r * H + u0;
    const uint8_t* z_r = a.zone ? a.zone + row * 2 * H + u0 : nullptr;
    for (int64_t j = 0; j < ub; j += V::size()) {
      const int64_t cnt = std::min<int64_t>(V::size(), ub - j);
      V i = load<V>(g_r + j, cnt), fg = load<V>(g_r + H + j, cnt);
      V g = load<V>(g_r + 2 * H + j, cnt), o = load<V>(g_r + 3 * H + j, cnt);
      V c = load<V>(ct_r + j, cnt), c_prev = load<V>(cp_r + j, cnt);
      V dh = load<V>(dh_r + j, cnt), dc = load<V>(dc_r + j, cnt);
      V dh_new = dh, dc_new = dc;  // ∂L/∂h̃, ∂L/∂c̃: before zoneout
      V keep_c;
      if (f & ZONEOUT_H) {
        V keep_h = keep_mask<V, scalar_t>(z_r + H + j, cnt);
        store(V::blendv(zero, dh, keep_h), a.carry + r * H + u0 + j, cnt);
        dh_new = V::blendv(dh, zero, keep_h);
      }
      if (f & ZONEOUT_C) {
        keep_c = keep_mask<V, scalar_t>(z_r + j, cnt);
        dc_new = V::blendv(dc, zero, keep_c);
      }
      V d_o;
      if (f & NO_OUTPUT_ACTIVATION) {
        d_o = dh_new * c;
        dc_new = dc_new + dh_new * o;
      } else {
        V th = tanh_(c);
        d_o = dh_new * th;
        dc_new = dc_new + dh_new * o * (one - th * th);
      }
      d_o = (f & NO_OUTPUT_GATE) ? zero : d_o * o * (one - o);
      if (f & PEEPHOLES) {
        pi = load<V>(a.peep + u0 + j, cnt);
        pf = load<V>(a.peep + H + u0 + j, cnt);
        po = load<V>(a.peep + 2 * H + u0 + j, cnt);
        dc_new = dc_new + po * d_o;
      }
      V d_i = dc_new * g, d_f = dc_new * c_prev, d_g = dc_new * i, dc_prev = dc_new * fg;
      if (f & ZONEOUT_C) dc_prev = dc_prev + V::blendv(zero, dc, keep_c);
      if (f & CIFG) {  // f = 1 − i
        d_i = d_i - d_f;
        d_f = zero;
      } else {
        d_f = (f & NO_FORGET_GATE) ? zero : d_f * fg * (one - fg);
      }
      d_i = (f & NO_INPUT_GATE) ? zero : d_i * i * (one - i);
      if (!(f & NO_INPUT_ACTIVATION)) d_g = d_g * (one - g * g);
      if (f & PEEPHOLES) dc_prev = dc_prev + pi * d_i + pf * d_f;
      store(d_i, dp + j, cnt);
      store(d_f, dp + H + j, cnt);
      store(d_g, dp + 2 * H + j, cnt);
      store(d_o, dp + 3 * H + j, cnt);
      store(dc_prev, dc_r + j, cnt);
    }
  }
  if (a.d_w) accumulate_dw(a, k, u0, ub);  // this block's ∂pre columns are final
}

// Step k, output columns [c0, c0 + cw) of [∂x_k | ∂h] (whole panels of 4L columns): the product
// ∂pre_k·[W_ih | W_hh] for rows < n; then ∂x_k (columns < I; 0 in rows that did not step) and
// ∂L/∂hs[k] (columns ≥ I) from it (rows < n) or carried (rows ≥ n), plus the gradient from
// outside; with a projection also d_hp[k − 1] = ∂L/∂hs[k].
template <typename scalar_t>
void grad_h_block(const Backward<scalar_t>& a, int64_t k, int64_t n, int64_t n_prev, int64_t c0, int64_t cw) {
  using V = Vectorized<scalar_t>;
  constexpr int64_t L4 = 4 * V::size();
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, I = a.I, f = a.flags;
  const int64_t c1 = std::min(c0 + cw, I + P);
  for (int64_t c = c0; c < c1; c += L4)
    panel_product(n, a.d_pre + k * B * G, G, 1, a.w_panels + (c / L4) * G * L4, G, (const scalar_t*)nullptr,
                  a.rec + c, a.ldr, /*accumulate=*/false, /*width=*/c1 - c);
  if (a.d_x && c0 < I) {  // ∂x_k [B, I], columns [c0, min(c1, I))
    const int64_t xe = std::min(c1, I);
    for (int64_t r = 0; r < B; ++r) {
      scalar_t* dx_r = a.d_x + (k * B + r) * I;
      if (r < n) {
        std::copy(a.rec + r * a.ldr + c0, a.rec + r * a.ldr + xe, dx_r + c0);
      } else {
        std::fill(dx_r + c0, dx_r + xe, scalar_t(0));
      }
    }
  }
  const int64_t p0 = std::max(c0, I) - I, pb = c1 - I - p0;  // the ∂h columns [p0, p0 + pb) of P
  const scalar_t* ext = a.d_hs + k * B * P;
  for (int64_t r = 0; pb > 0 && r < B; ++r) {
    scalar_t* dh_r = a.dh + r * P + p0;
    const scalar_t* rec_r = a.rec + r * a.ldr + I + p0;
    for (int64_t j = 0; j < pb; j += V::size()) {
      const int64_t cnt = std::min<int64_t>(V::size(), pb - j);
      const int64_t o = r * P + p0 + j;
      V d = load<V>(dh_r + j, cnt);
      if (r < n) {
        d = load<V>(rec_r + j, cnt);
        if (f & RECURRENT_DROPOUT) d = d * load<V>(a.drop + o, cnt);
        if (f & ZONEOUT_H) d = d + load<V>(a.carry + r * H + p0 + j, cnt);  // P = H
      }
      d = d + load<V>(ext + o, cnt);
      store(d, dh_r + j, cnt);
      if (a.d_hp && k > 0) store(r < n_prev ? d : V(0), a.d_hp + (k - 1) * B * P + o, cnt);
    }
  }
}

template <typename scalar_t>
std::vector<at::Tensor> backward_impl(const at::Tensor& d_hs, const at::Tensor& d_cn, const at::Tensor& gates,
                                      const at::Tensor& cs, const at::Tensor& c_new, const at::Tensor& w_hh,
                                      const std::optional<at::Tensor>& w_ih, const std::optional<at::Tensor>& w_hr,
                                      const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& hs,
                                      const std::vector<int64_t>& sizes,
                                      int64_t flags, const std::optional<at::Tensor>& peephole,
                                      const std::optional<at::Tensor>& zoneout,
                                      const std::optional<at::Tensor>& dropout, bool poison) {
  using V = Vectorized<scalar_t>;
  const int64_t T = gates.size(0), B = gates.size(1), G = gates.size(2), H = G / 4, P = w_hh.size(1);
  const auto dt = gates.scalar_type();
  const bool proj = w_hr.has_value();
  auto d_pre = alloc({T, B, G}, dt, poison);
  auto d_hp = proj ? alloc({T, B, P}, dt, poison) : alloc({0}, dt, false);
  auto dh = alloc({B, P}, dt, poison);
  auto dc = alloc({B, H}, dt, poison);
  dh.copy_(d_hs[T]);
  dc.copy_(d_cn);
  auto dh_raw = proj ? alloc({B, H}, dt, poison) : at::Tensor();
  auto carry = (flags & ZONEOUT_H) ? alloc({B, H}, dt, poison) : at::Tensor();
  // [W_ih | W_hh] as a weight of output columns [I + P, G], packed by panels: ∂x fused with ∂h
  const int64_t I = w_ih.has_value() ? w_ih->size(1) : 0;
  at::Tensor w_panels = pack_column_panels<scalar_t>(w_ih, w_hh, 4 * V::size());  // [⌈(I+P)/4L⌉, G, 4L]
  const int64_t ldr = w_panels.size(0) * 4 * V::size();
  auto rec = alloc({B, ldr}, dt, poison);
  auto d_x = I ? alloc({T, B, I}, dt, poison) : alloc({0}, dt, false);
  // ∂W in the loop when the forward's h (and, for ∂W_ih, x) are given; its x columns need not be
  // the product's (∂W_ih without ∂x: the product then has only ∂h's P columns)
  const bool fuse_dw = hs.has_value();
  TORCH_CHECK(fuse_dw || !x.has_value(), "x (for ∂W_ih) goes with hs (∂W in the loop)");
  const int64_t Iw = x.has_value() ? x->size(2) : 0, L4 = 4 * V::size();
  const int64_t ldw = (Iw + P + L4 - 1) / L4 * L4;
  at::Tensor d_w = fuse_dw ? at::zeros({G, ldw}, gates.options()) : alloc({0}, dt, false);
  at::Tensor d_b = fuse_dw ? at::zeros({G}, gates.options()) : alloc({0}, dt, false);
  const int64_t chunk = std::max<int64_t>(1, (DW_ROWS + B - 1) / std::max<int64_t>(B, 1));
  at::Tensor xh_panels = fuse_dw ? at::empty({ldw / L4, chunk * B, L4}, gates.options()) : at::Tensor();
  if (fuse_dw) xh_panels.zero_();  // the padding columns beyond I + P are never written
  if (proj && T > 0) {  // d_hp[T − 1] = ∂L/∂hs[T] where rows advanced at the last step
    const int64_t n = sizes[T - 1];
    d_hp[T - 1].narrow(0, 0, n).copy_(dh.narrow(0, 0, n));
    d_hp[T - 1].narrow(0, n, B - n).zero_();
  }
  const Blocks units(H, max_blocks<scalar_t>(B, 4 * H, P), V::size());
  const Blocks cols(I + P, max_blocks<scalar_t>(B, I + P, 4 * H), 4 * V::size());
  Backward<scalar_t> a{T, B, H, P, G, flags,
                       d_hs.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                       (flags & ZONEOUT_C) ? c_new.data_ptr<scalar_t>() : cs.data_ptr<scalar_t>() + B * H,
                       w_panels.data_ptr<scalar_t>(), I, ldr, Iw, proj ? w_hr->data_ptr<scalar_t>() : nullptr,
                       ptr_or_null<scalar_t>(peephole), ptr_or_null<uint8_t>(zoneout), ptr_or_null<scalar_t>(dropout),
                       d_pre.data_ptr<scalar_t>(), proj ? d_hp.data_ptr<scalar_t>() : nullptr,
                       dh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                       proj ? dh_raw.data_ptr<scalar_t>() : nullptr,
                       carry.defined() ? carry.data_ptr<scalar_t>() : nullptr, rec.data_ptr<scalar_t>(),
                       I ? d_x.data_ptr<scalar_t>() : nullptr, x.has_value() ? x->data_ptr<scalar_t>() : nullptr,
                       x.has_value() ? x->stride(0) : 0, x.has_value() ? x->stride(1) : 0,
                       fuse_dw ? hs->data_ptr<scalar_t>() : nullptr,
                       chunk, ldw, fuse_dw ? xh_panels.data_ptr<scalar_t>() : nullptr,
                       fuse_dw ? d_w.data_ptr<scalar_t>() : nullptr, fuse_dw ? d_b.data_ptr<scalar_t>() : nullptr};
  if (fuse_dw && T > 0) pack_inputs(a, T - 1, 0, B);  // later steps are packed by the previous step
  run_steps(std::max(units.count, cols.count), [&](const auto& region) {
    for (int64_t k = T - 1; k >= 0; --k) {
      const int64_t n = sizes[k], n_prev = k > 0 ? sizes[k - 1] : 0;
      region(units.count, [&](int64_t b) { backward_block(a, k, n, units.begin(b), units.width(b)); });
      region(cols.count, [&](int64_t b) {
        grad_h_block(a, k, n, n_prev, cols.begin(b), cols.width(b));
        // step k − 1's ∂W operand, this block's share of the rows: its inputs are the forward's, and
        // its slot is free (the chunk that used it last was summed in this step's first region)
        if (fuse_dw && k > 0) pack_inputs(a, k - 1, B * b / cols.count, B * (b + 1) / cols.count);
      });
    }
  });
  if (fuse_dw) d_w = d_w.narrow(1, 0, Iw + P);  // [G, Iw + P]: ∂W_ih | ∂W_hh
  return {d_pre, dh, dc, d_hp, d_x, d_w, d_b};
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// The input x [T, B, I] as the kernel reads it: rows of I elements, any step and batch strides. A
// batch-first input's transpose is read where it lies, not copied ([T, B, I] once per pass).
at::Tensor rows_contiguous(const at::Tensor& x) {
  return x.size(2) <= 1 || x.stride(2) == 1 ? x : x.contiguous();
}

void check_flags(int64_t flags) {
  TORCH_CHECK(!(flags & LAYER_NORM), "the fused CPU kernel has no layer norm (flag LAYER_NORM)");
  TORCH_CHECK(flags >= 0 && !(flags & ~SUPPORTED), "unknown flag bits ", flags & ~SUPPORTED);
}

std::vector<at::Tensor> sequence_forward(const at::Tensor& gx, const std::optional<at::Tensor>& w_ih,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& h0, const at::Tensor& c0,
                                         const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                         const std::optional<at::Tensor>& batch_sizes, int64_t flags,
                                         const std::optional<at::Tensor>& peephole,
                                         const std::optional<at::Tensor>& zoneout,
                                         const std::optional<at::Tensor>& dropout, bool save, bool poison) {
  check_flags(flags);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0, "w_hh must be [4H, P], got ", w_hh.sizes());
  if (w_ih.has_value()) {
    TORCH_CHECK(gx.dim() == 3 && w_ih->dim() == 2 && w_ih->size(0) == w_hh.size(0) && w_ih->size(1) == gx.size(2),
                "with w_ih, x must be [T, B, I] and w_ih [4H, I]; got x ", gx.sizes(), ", w_ih ", w_ih->sizes(),
                ", w_hh ", w_hh.sizes());
    TORCH_CHECK(!bias.has_value() || bias->numel() == w_hh.size(0), "bias must be [4H], got ", bias->sizes());
  } else {
    TORCH_CHECK(gx.dim() == 3 && gx.size(2) == w_hh.size(0), "gx must be [T, B, 4H] (4H = ", w_hh.size(0),
                "), got ", gx.sizes());
    TORCH_CHECK(!bias.has_value(), "a bias goes with w_ih (the fused input projection); gx includes it");
  }
  const auto sizes = step_sizes(batch_sizes, gx.size(0), gx.size(1));
  auto gx_c = w_ih.has_value() ? rows_contiguous(gx) : gx.contiguous();
  auto w = w_hh.contiguous();
  auto w_i = contiguous(w_ih), b = contiguous(bias);
  auto w_r = contiguous(w_hr), pe = contiguous(peephole), z = contiguous(zoneout), d = contiguous(dropout);
  if (gx.scalar_type() == at::kDouble)
    return forward_impl<double>(gx_c, w_i, b, h0, c0, w, w_r, sizes, flags, pe, z, d, save, poison);
  TORCH_CHECK(gx.scalar_type() == at::kFloat, "the fused CPU kernel runs fp32 and fp64, got ", gx.scalar_type());
  return forward_impl<float>(gx_c, w_i, b, h0, c0, w, w_r, sizes, flags, pe, z, d, save, poison);
}

std::vector<at::Tensor> sequence_backward(const at::Tensor& d_hs, const at::Tensor& d_cn, const at::Tensor& gates,
                                          const at::Tensor& cs, const at::Tensor& c_new, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& w_ih, const std::optional<at::Tensor>& w_hr,
                                          const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& hs,
                                          const std::optional<at::Tensor>& batch_sizes, int64_t flags,
                                          const std::optional<at::Tensor>& peephole,
                                          const std::optional<at::Tensor>& zoneout,
                                          const std::optional<at::Tensor>& dropout, bool poison) {
  check_flags(flags);
  TORCH_CHECK(gates.dim() == 3 && gates.size(2) % 4 == 0, "gates must be [T, B, 4H], got ", gates.sizes());
  const auto sizes = step_sizes(batch_sizes, gates.size(0), gates.size(1));
  auto dhs = d_hs.contiguous(), g = gates.contiguous(), c = cs.contiguous(), cn = c_new.contiguous();
  auto w = w_hh.contiguous();
  TORCH_CHECK(!w_ih.has_value() || (w_ih->dim() == 2 && w_ih->size(0) == w_hh.size(0)),
              "w_ih must be [4H, I] with 4H = ", w_hh.size(0), ", got ", w_ih.has_value() ? w_ih->sizes() : at::IntArrayRef{});
  auto w_i = contiguous(w_ih), hs_c = contiguous(hs);
  auto x_c = x.has_value() ? std::optional<at::Tensor>(rows_contiguous(*x)) : std::nullopt;
  TORCH_CHECK(!x.has_value() || (x->dim() == 3 && x->size(0) == gates.size(0) && x->size(1) == gates.size(1) &&
                                 (!w_ih.has_value() || x->size(2) == w_ih->size(1))),
              "x must be [T, B, I] (I = w_ih.size(1) when w_ih is given)");
  TORCH_CHECK(!hs.has_value() || (hs->dim() == 3 && hs->size(0) == gates.size(0) + 1 && hs->size(1) == gates.size(1) &&
                                  hs->size(2) == w_hh.size(1)),
              "hs must be [T + 1, B, P]");
  auto w_r = contiguous(w_hr), pe = contiguous(peephole), z = contiguous(zoneout), d = contiguous(dropout);
  if (gates.scalar_type() == at::kDouble)
    return backward_impl<double>(dhs, d_cn, g, c, cn, w, w_i, w_r, x_c, hs_c, sizes, flags, pe, z, d, poison);
  TORCH_CHECK(gates.scalar_type() == at::kFloat, "the fused CPU kernel runs fp32 and fp64, got ",
              gates.scalar_type());
  return backward_impl<float>(dhs, d_cn, g, c, cn, w, w_i, w_r, x_c, hs_c, sizes, flags, pe, z, d, poison);
}

std::vector<int64_t> flag_bits() {
  return {PEEPHOLES, CIFG, NO_INPUT_GATE, NO_FORGET_GATE, NO_OUTPUT_GATE, NO_INPUT_ACTIVATION,
          NO_OUTPUT_ACTIVATION, LAYER_NORM, ZONEOUT_C, ZONEOUT_H, RECURRENT_DROPOUT};
}

// which at::vec implementation this build compiled (cpu_kernel.py reports it)
std::string vec_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "AVX512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "AVX2";
#else
  return "DEFAULT";
#endif
}

}  // namespace

TORCH_LIBRARY(lstmlab_cpu, m) {
  m.def(
      "sequence_forward(Tensor gx, Tensor? w_ih, Tensor? bias, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "int flags, Tensor? peephole, Tensor? zoneout, Tensor? dropout, bool save, bool poison) "
      "-> Tensor[]");
  m.def(
      "sequence_backward(Tensor d_hs, Tensor d_cn, Tensor gates, Tensor cs, Tensor c_new, Tensor w_hh, "
      "Tensor? w_ih, Tensor? w_hr, Tensor? x, Tensor? hs, Tensor? batch_sizes, int flags, Tensor? peephole, Tensor? zoneout, Tensor? dropout, "
      "bool poison) -> Tensor[]");
  m.def("flag_bits() -> int[]", flag_bits);
  m.def("vec_isa() -> str", vec_isa);
}

TORCH_LIBRARY_IMPL(lstmlab_cpu, CPU, m) {
  m.impl("sequence_forward", sequence_forward);
  m.impl("sequence_backward", sequence_backward);
}
