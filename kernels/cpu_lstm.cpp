// Fused CPU LSTM: one layer and direction over a whole sequence, forward and backward, in one C++
// time loop (the Python side and the contract: kernels/cpu_kernel.py).
//
// Forward, step k (n rows advance):
//   region 1, one block of U units per thread: pre = d_{k}·W_hhᵀ for the block's 4U gate columns
//     (one GEMM), then the gate math of those units for every row in one vectorised pass
//   region 2, projection only, one block of P columns per thread: h = h_raw·W_hrᵀ
// Backward, step k:
//   region 1, unit blocks: ∂h_raw = ∂h·W_hr for the block's units (projection only), then the gate
//     derivatives of those units: ∂pre_k, ∂c_{k−1}
//   region 2, column blocks of P: ∂h_{k−1} = (∂pre_k·W_hh) ⊙ m + z^h ⊙ ∂h̃_k + ∂L/∂hs[k]
// The blocks of a region are independent, so each region is one at::parallel_for and the only
// synchronisation is its end. W_hhᵀ is permuted once per call so that a unit block's four gates are
// adjacent columns: one GEMM per block per step.
//
// B: batch  T: time  H: hidden  P: proj_size or H  G = 4H: stacked gates (i, f, g, o)
// U: hidden units per block  V: lanes of at::vec::Vectorized<scalar_t>  acc: scalar_t (fp32 or fp64)

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <torch/library.h>
#include <torch/version.h>
#if !defined(TORCH_VERSION_MAJOR) || !defined(TORCH_VERSION_MINOR)
#error "torch/version.h defines no TORCH_VERSION_MAJOR/MINOR: the GEMM choice below needs them"
#endif

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

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
  const scalar_t* gx;    // [T, B, G]
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
  scalar_t* pre;         // [B, G] scratch: the GEMM's output in the permuted column order
  const scalar_t* w_p;   // [P, G] W_hhᵀ, columns permuted unit block by unit block
  const scalar_t* w_hr_t;  // [H, P] W_hrᵀ (projection)
};

// Step k, rows < n, units [u0, u0 + ub) of one block: gates, c, and h (or h_raw); rows ≥ n carry.
template <typename scalar_t>
void forward_block(const Forward<scalar_t>& a, int64_t k, int64_t n, int64_t u0, int64_t ub) {
  using V = Vectorized<scalar_t>;
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, f = a.flags;
  const bool proj = a.h_raw != nullptr;
  const scalar_t* d_prev = (f & RECURRENT_DROPOUT) ? a.dbuf + (k % 2) * B * P : a.hs + k * B * P;
  // one GEMM: the block's 4·ub gate columns, i, f, g, o of its units side by side
  gemm(n, 4 * ub, P, d_prev, P, a.w_p + 4 * u0, G, a.pre + 4 * u0, G);
  V pi(0), pf(0), po(0);
  for (int64_t r = 0; r < B; ++r) {
    const int64_t row = k * B + r;  // of [T, B, ·] tensors
    scalar_t* c_out = a.cs + (row + B) * H + u0;
    const scalar_t* c_in = a.cs + row * H + u0;
    scalar_t* h_out = proj ? a.h_raw + k * a.h_raw_step + r * H + u0 : a.hs + (row + B) * P + u0;
    const scalar_t* h_in = a.hs + row * P + u0;  // P = H without projection
    scalar_t* g_out = a.gates ? a.gates + row * G + u0 : nullptr;
    scalar_t* dnext = (f & RECURRENT_DROPOUT) ? a.dbuf + ((k + 1) % 2) * B * P + r * P + u0 : nullptr;
    if (r >= n) {  // a row that does not advance: carries c and h, has no gates
      std::copy(c_in, c_in + ub, c_out);
      if (proj) {
        std::fill(h_out, h_out + ub, scalar_t(0));  // rows that did not step add nothing to ∂W_hr
      } else {
        std::copy(h_in, h_in + ub, h_out);
        if (dnext) std::copy(a.dbuf + (k % 2) * B * P + r * P + u0, a.dbuf + (k % 2) * B * P + r * P + u0 + ub, dnext);
      }
      if (g_out)
        for (int q = 0; q < 4; ++q) std::fill(g_out + q * H, g_out + q * H + ub, scalar_t(0));
      if (a.c_new) std::fill(a.c_new + row * H + u0, a.c_new + row * H + u0 + ub, scalar_t(0));
      continue;
    }
    const scalar_t* p_r = a.pre + r * G + 4 * u0;
    const scalar_t* x_r = a.gx + row * G + u0;
    const uint8_t* z_r = a.zone ? a.zone + row * 2 * H + u0 : nullptr;
    for (int64_t j = 0; j < ub; j += V::size()) {
      const int64_t cnt = std::min<int64_t>(V::size(), ub - j);
      V a_i = load<V>(p_r + j, cnt) + load<V>(x_r + j, cnt);
      V a_f = load<V>(p_r + ub + j, cnt) + load<V>(x_r + H + j, cnt);
      V a_g = load<V>(p_r + 2 * ub + j, cnt) + load<V>(x_r + 2 * H + j, cnt);
      V a_o = load<V>(p_r + 3 * ub + j, cnt) + load<V>(x_r + 3 * H + j, cnt);
      V c_prev = load<V>(c_in + j, cnt);
      if (f & PEEPHOLES) {
        pi = load<V>(a.peep + u0 + j, cnt);
        pf = load<V>(a.peep + H + u0 + j, cnt);
        po = load<V>(a.peep + 2 * H + u0 + j, cnt);
        a_i = a_i + pi * c_prev;
        a_f = a_f + pf * c_prev;
      }
      V i = (f & NO_INPUT_GATE) ? V(1) : sigmoid(a_i);
      V fg = (f & CIFG) ? V(1) - i : (f & NO_FORGET_GATE) ? V(1) : sigmoid(a_f);
      V g = (f & NO_INPUT_ACTIVATION) ? a_g : tanh_(a_g);
      V c = fg * c_prev + i * g;  // c̃
      if (f & PEEPHOLES) a_o = a_o + po * c;
      V o = (f & NO_OUTPUT_GATE) ? V(1) : sigmoid(a_o);
      V h = o * ((f & NO_OUTPUT_ACTIVATION) ? c : tanh_(c));  // h̃
      if (g_out) {
        store(i, g_out + j, cnt);
        store(fg, g_out + H + j, cnt);
        store(g, g_out + 2 * H + j, cnt);
        store(o, g_out + 3 * H + j, cnt);
      }
      if (f & ZONEOUT_C) {
        if (a.c_new) store(c, a.c_new + row * H + u0 + j, cnt);
        c = V::blendv(c, c_prev, keep_mask<V, scalar_t>(z_r + j, cnt));
      }
      if (f & ZONEOUT_H) h = V::blendv(h, load<V>(h_in + j, cnt), keep_mask<V, scalar_t>(z_r + H + j, cnt));
      store(c, c_out + j, cnt);
      store(h, h_out + j, cnt);
      if (dnext && !proj) store(h * load<V>(a.drop + r * P + u0 + j, cnt), dnext + j, cnt);
    }
  }
}

// Projection, step k, columns [p0, p0 + pb): hs[k + 1] = h_raw·W_hrᵀ for rows < n, carried for the rest.
template <typename scalar_t>
void project_block(const Forward<scalar_t>& a, int64_t k, int64_t n, int64_t p0, int64_t pb) {
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
}

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& gx, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                     const std::vector<int64_t>& sizes, int64_t flags,
                                     const std::optional<at::Tensor>& peephole,
                                     const std::optional<at::Tensor>& zoneout,
                                     const std::optional<at::Tensor>& dropout, bool save, bool poison) {
  using V = Vectorized<scalar_t>;
  const int64_t T = gx.size(0), B = gx.size(1), G = gx.size(2), H = G / 4, P = w_hh.size(1);
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

  const Blocks units(H, max_blocks<scalar_t>(B, 4 * H, P), V::size());
  const Blocks cols(P, max_blocks<scalar_t>(B, P, H), V::size());
  // W_hhᵀ [P, G] with the columns of block b at [4·u0, 4·(u0 + ub)): i, f, g, o of its units
  auto w_p = alloc({P, G}, dt, poison);
  {
    auto w_t = w_hh.t();  // [P, G]
    for (int64_t b = 0; b < units.count; ++b) {
      const int64_t u0 = units.begin(b), ub = units.width(b);
      for (int64_t q = 0; q < 4; ++q)
        w_p.narrow(1, 4 * u0 + q * ub, ub).copy_(w_t.narrow(1, q * H + u0, ub));
    }
  }
  auto pre = alloc({B, G}, dt, poison);
  auto w_hr_t = proj ? w_hr->t().contiguous() : at::Tensor();
  auto dbuf = (flags & RECURRENT_DROPOUT) ? alloc({2, B, P}, dt, poison) : at::Tensor();
  if (dbuf.defined()) {
    auto slot0 = dbuf[0];
    at::mul_out(slot0, hs[0], *dropout);
  }

  Forward<scalar_t> a{T, B, H, P, G, flags,
                      gx.data_ptr<scalar_t>(), hs.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                      save ? gates.data_ptr<scalar_t>() : nullptr,
                      proj ? h_raw.data_ptr<scalar_t>() : nullptr, save ? B * H : 0,
                      c_new.numel() ? c_new.data_ptr<scalar_t>() : nullptr,
                      ptr_or_null<scalar_t>(peephole), ptr_or_null<uint8_t>(zoneout), ptr_or_null<scalar_t>(dropout),
                      dbuf.defined() ? dbuf.data_ptr<scalar_t>() : nullptr, pre.data_ptr<scalar_t>(),
                      w_p.data_ptr<scalar_t>(), proj ? w_hr_t.data_ptr<scalar_t>() : nullptr};
  for (int64_t k = 0; k < T; ++k) {
    const int64_t n = sizes[k];
    at::parallel_for(0, units.count, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) forward_block(a, k, n, units.begin(b), units.width(b));
    });
    if (proj)
      at::parallel_for(0, cols.count, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) project_block(a, k, n, cols.begin(b), cols.width(b));
      });
  }
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
  const scalar_t* w_hh;   // [G, P]
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
  scalar_t* rec;          // [B, P] scratch: ∂pre_k·W_hh
};

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
}

// Step k, columns [p0, p0 + pb): ∂L/∂hs[k] from step k's ∂pre (rows < n) or carried (rows ≥ n),
// plus the gradient from outside; with a projection also d_hp[k − 1] = ∂L/∂hs[k].
template <typename scalar_t>
void grad_h_block(const Backward<scalar_t>& a, int64_t k, int64_t n, int64_t n_prev, int64_t p0, int64_t pb) {
  using V = Vectorized<scalar_t>;
  const int64_t B = a.B, H = a.H, P = a.P, G = a.G, f = a.flags;
  gemm(n, pb, G, a.d_pre + k * B * G, G, a.w_hh + p0, P, a.rec + p0, P);
  const scalar_t* ext = a.d_hs + k * B * P;
  for (int64_t r = 0; r < B; ++r) {
    scalar_t* dh_r = a.dh + r * P + p0;
    for (int64_t j = 0; j < pb; j += V::size()) {
      const int64_t cnt = std::min<int64_t>(V::size(), pb - j);
      const int64_t o = r * P + p0 + j;
      V d = load<V>(dh_r + j, cnt);
      if (r < n) {
        d = load<V>(a.rec + o, cnt);
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
                                      const std::optional<at::Tensor>& w_hr, const std::vector<int64_t>& sizes,
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
  auto rec = alloc({B, P}, dt, poison);
  if (proj && T > 0) {  // d_hp[T − 1] = ∂L/∂hs[T] where rows advanced at the last step
    const int64_t n = sizes[T - 1];
    d_hp[T - 1].narrow(0, 0, n).copy_(dh.narrow(0, 0, n));
    d_hp[T - 1].narrow(0, n, B - n).zero_();
  }
  const Blocks units(H, max_blocks<scalar_t>(B, 4 * H, P), V::size());
  const Blocks cols(P, max_blocks<scalar_t>(B, P, 4 * H), V::size());
  Backward<scalar_t> a{T, B, H, P, G, flags,
                       d_hs.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), cs.data_ptr<scalar_t>(),
                       (flags & ZONEOUT_C) ? c_new.data_ptr<scalar_t>() : cs.data_ptr<scalar_t>() + B * H,
                       w_hh.data_ptr<scalar_t>(), proj ? w_hr->data_ptr<scalar_t>() : nullptr,
                       ptr_or_null<scalar_t>(peephole), ptr_or_null<uint8_t>(zoneout), ptr_or_null<scalar_t>(dropout),
                       d_pre.data_ptr<scalar_t>(), proj ? d_hp.data_ptr<scalar_t>() : nullptr,
                       dh.data_ptr<scalar_t>(), dc.data_ptr<scalar_t>(),
                       proj ? dh_raw.data_ptr<scalar_t>() : nullptr,
                       carry.defined() ? carry.data_ptr<scalar_t>() : nullptr, rec.data_ptr<scalar_t>()};
  for (int64_t k = T - 1; k >= 0; --k) {
    const int64_t n = sizes[k], n_prev = k > 0 ? sizes[k - 1] : 0;
    at::parallel_for(0, units.count, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) backward_block(a, k, n, units.begin(b), units.width(b));
    });
    at::parallel_for(0, cols.count, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) grad_h_block(a, k, n, n_prev, cols.begin(b), cols.width(b));
    });
  }
  return {d_pre, dh, dc, d_hp};
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

void check_flags(int64_t flags) {
  TORCH_CHECK(!(flags & LAYER_NORM), "the fused CPU kernel has no layer norm (flag LAYER_NORM)");
  TORCH_CHECK(flags >= 0 && !(flags & ~SUPPORTED), "unknown flag bits ", flags & ~SUPPORTED);
}

std::vector<at::Tensor> sequence_forward(const at::Tensor& gx, const at::Tensor& h0, const at::Tensor& c0,
                                         const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
                                         const std::optional<at::Tensor>& batch_sizes, int64_t flags,
                                         const std::optional<at::Tensor>& peephole,
                                         const std::optional<at::Tensor>& zoneout,
                                         const std::optional<at::Tensor>& dropout, bool save, bool poison) {
  check_flags(flags);
  TORCH_CHECK(gx.dim() == 3 && gx.size(2) % 4 == 0, "gx must be [T, B, 4H], got ", gx.sizes());
  const auto sizes = step_sizes(batch_sizes, gx.size(0), gx.size(1));
  auto gx_c = gx.contiguous(), w = w_hh.contiguous();
  auto w_r = contiguous(w_hr), pe = contiguous(peephole), z = contiguous(zoneout), d = contiguous(dropout);
  if (gx.scalar_type() == at::kDouble)
    return forward_impl<double>(gx_c, h0, c0, w, w_r, sizes, flags, pe, z, d, save, poison);
  TORCH_CHECK(gx.scalar_type() == at::kFloat, "the fused CPU kernel runs fp32 and fp64, got ", gx.scalar_type());
  return forward_impl<float>(gx_c, h0, c0, w, w_r, sizes, flags, pe, z, d, save, poison);
}

std::vector<at::Tensor> sequence_backward(const at::Tensor& d_hs, const at::Tensor& d_cn, const at::Tensor& gates,
                                          const at::Tensor& cs, const at::Tensor& c_new, const at::Tensor& w_hh,
                                          const std::optional<at::Tensor>& w_hr,
                                          const std::optional<at::Tensor>& batch_sizes, int64_t flags,
                                          const std::optional<at::Tensor>& peephole,
                                          const std::optional<at::Tensor>& zoneout,
                                          const std::optional<at::Tensor>& dropout, bool poison) {
  check_flags(flags);
  TORCH_CHECK(gates.dim() == 3 && gates.size(2) % 4 == 0, "gates must be [T, B, 4H], got ", gates.sizes());
  const auto sizes = step_sizes(batch_sizes, gates.size(0), gates.size(1));
  auto dhs = d_hs.contiguous(), g = gates.contiguous(), c = cs.contiguous(), cn = c_new.contiguous();
  auto w = w_hh.contiguous();
  auto w_r = contiguous(w_hr), pe = contiguous(peephole), z = contiguous(zoneout), d = contiguous(dropout);
  if (gates.scalar_type() == at::kDouble)
    return backward_impl<double>(dhs, d_cn, g, c, cn, w, w_r, sizes, flags, pe, z, d, poison);
  TORCH_CHECK(gates.scalar_type() == at::kFloat, "the fused CPU kernel runs fp32 and fp64, got ",
              gates.scalar_type());
  return backward_impl<float>(dhs, d_cn, g, c, cn, w, w_r, sizes, flags, pe, z, d, poison);
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
      "sequence_forward(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, Tensor? batch_sizes, "
      "int flags, Tensor? peephole, Tensor? zoneout, Tensor? dropout, bool save, bool poison) "
      "-> Tensor[]");
  m.def(
      "sequence_backward(Tensor d_hs, Tensor d_cn, Tensor gates, Tensor cs, Tensor c_new, Tensor w_hh, "
      "Tensor? w_hr, Tensor? batch_sizes, int flags, Tensor? peephole, Tensor? zoneout, Tensor? dropout, "
      "bool poison) -> Tensor[]");
  m.def("flag_bits() -> int[]", flag_bits);
  m.def("vec_isa() -> str", vec_isa);
}

TORCH_LIBRARY_IMPL(lstmlab_cpu, CPU, m) {
  m.impl("sequence_forward", sequence_forward);
  m.impl("sequence_backward", sequence_backward);
}
