// The time loops of fincast.models.grouped_lstm.GroupedLSTM, one LSTM layer for K runs at once (CPU).
//
// Built on first use by torch.utils.cpp_extension (g++ with OpenMP, and ninja; cached per machine). In one parallel
// loop over the runs, each run's whole time loop: per step its matrix product (BLAS, the library torch links) and
// then every elementwise op of the step in one pass over the gates. Run by run, a run's weights and its
// weight-gradient sum stay in cache for all T steps (step by step over all K runs, K x 20 KB of weights went
// through cache every step: 7-11% slower at K = 125). torch's per-op dispatch (~10 ops per step, each a
// separate pass over memory; and ~4 us per small product) is what made the Python loop of the same algorithm
// slower than a run trained alone; see bench/run_axis.py.
//
// Layouts (all contiguous): z [T+1, K, H+F+1, B] holds [h_t; x_t; 1] (the 1 carries the bias, so the bias is
// the last column of w and its gradient comes out of the weight-gradient product); w [K, 4H, H+F+1] is
// [W_hh W_ih b] with gates in nn.LSTM's order (i, f, g, o); sig [T, K, 4, H, B] the gate activations
// (slot 2 unused: act_g holds tanh(g)); cells [T+1, K, H, B]; act_g, tanh_c [T, K, H, B].

#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// exp for float as a polynomial the compiler vectorizes (libm's expf is a call per element). Cephes' expf:
// ~1 ulp. NaN propagates (the comparisons are false for NaN and the polynomial of NaN is NaN).
inline float exp_f(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // n is in [-125, 127] after the clamps, so the exponent field is in [2, 254]; NaN's n becomes 0 (no undefined
  // conversion), and the result is NaN through p
  const int32_t bits = (static_cast<int32_t>(n == n ? n : 0.0f) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_f(double x) { return std::exp(x); }

// The runs' elementwise passes, in parallel over runs when there are several (and threads to run them): an
// OpenMP region per time step costs microseconds, and far more when the cores are busy with other work.
template <typename F>
inline void for_runs(int64_t k_runs, const F& f) {
  if (k_runs == 1 || at::get_num_threads() == 1) {
    f(0, k_runs);
  } else {
    at::parallel_for(0, k_runs, 1, f);
  }
}

template <typename T>
inline T sigmoid(T x) { return T(1) / (T(1) + exp_f(-x)); }

template <typename T>
inline T tanh_(T x) { return T(1) - T(2) / (exp_f(T(2) * x) + T(1)); }

// Fortran BLAS from the library torch itself links (MKL's sgemm_/dgemm_ in torch's CPU builds), called once per run
// and product: at these sizes (e.g. [128 x 39] x [39 x 64]) ATen's dispatch costs about as much as the product, and
// a call per run lets each thread take its runs' products and elementwise passes together, in cache. Weak: where
// a torch build exports no BLAS, the loops below take ATen's batched products instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // (the C entry; mkl_set_num_threads_local is Fortran)
}

// MKL on one thread inside a worker of the runs' parallel loop (the cores are already split by run)
struct SequentialBlas {
  int saved = 0;
  SequentialBlas() { if (MKL_Set_Num_Threads_Local != nullptr) saved = MKL_Set_Num_Threads_Local(1); }
  ~SequentialBlas() { if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(saved); }
};

// Row-major C[m x n] = alpha * op(A) op(B) + beta * C, as the column-major call C^T = op(B)^T op(A)^T.
template <typename T>
bool gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ == nullptr) return false;
    sgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  } else {
    if (dgemm_ == nullptr) return false;
    dgemm_(&tb, &ta, &in, &im, &ik, &alpha, b, &ildb, a, &ilda, &beta, c, &ildc);
  }
  return true;
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) return sgemm_ != nullptr;
  return dgemm_ != nullptr;
}

template <typename T>
void forward_impl(const at::Tensor& w, at::Tensor& z, at::Tensor& pre, at::Tensor& sig, at::Tensor& act_g,
                  at::Tensor& cells, at::Tensor& tanh_c, const bool* live) {
  const int64_t steps = sig.size(0), k_runs = sig.size(1), hid = sig.size(3), b = sig.size(4);
  const int64_t zrows = z.size(2);
  const T* wp = w.data_ptr<T>();
  T* zp = z.data_ptr<T>();
  T* pp = pre.data_ptr<T>();
  T* sp = sig.data_ptr<T>();
  T* gp = act_g.data_ptr<T>();
  T* cp = cells.data_ptr<T>();
  T* tp = tanh_c.data_ptr<T>();
  const int64_t hb = hid * b;
  const bool blas = have_blas<T>();
  // one time step of run k (its product already in pre's slot k when there is no BLAS)
  auto step = [&](int64_t k, int64_t t) {
    T* g = pp + k * 4 * hb;
    if (blas)  // pre_k = w_k z_t,k: [4H x (H+F+1)] x [(H+F+1) x B]
      gemm<T>(false, false, 4 * hid, b, zrows, T(1), wp + k * 4 * hid * zrows, zrows,
              zp + (t * k_runs + k) * zrows * b, b, T(0), g, b);
    T* s = sp + (t * k_runs + k) * 4 * hb;
    T* ag = gp + (t * k_runs + k) * hb;
    const T* c_prev = cp + (t * k_runs + k) * hb;
    T* c = cp + ((t + 1) * k_runs + k) * hb;
    T* tc = tp + (t * k_runs + k) * hb;
    T* h = zp + ((t + 1) * k_runs + k) * zrows * b;  // rows 0..H-1 of z[t+1]
#pragma omp simd
    for (int64_t i = 0; i < hb; ++i) {
      const T si = sigmoid(g[i]), sf = sigmoid(g[hb + i]), gg = tanh_(g[2 * hb + i]), so = sigmoid(g[3 * hb + i]);
      const T cn = sf * c_prev[i] + si * gg;
      const T tcn = tanh_(cn);
      s[i] = si;
      s[hb + i] = sf;
      s[3 * hb + i] = so;
      ag[i] = gg;
      c[i] = cn;
      tc[i] = tcn;
      h[i] = so * tcn;
    }
  };
  if (blas) {  // run by run, each its whole time loop
    for_runs(k_runs, [&](int64_t k0, int64_t k1) {
      SequentialBlas one;
      for (int64_t k = k0; k < k1; ++k)
        if (live == nullptr || live[k])  // (a stopped run: its slot stays, its work is skipped)
          for (int64_t t = 0; t < steps; ++t) step(k, t);
    });
    return;
  }
  for (int64_t t = 0; t < steps; ++t) {  // step by step: one batched product of every run, then their passes
    at::bmm_out(pre, w, z.select(0, t));
    for_runs(k_runs, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k)
        if (live == nullptr || live[k]) step(k, t);
    });
  }
}

template <typename T>
void backward_impl(const at::Tensor& d_out, const at::Tensor& w, const at::Tensor& z, const at::Tensor& sig,
                   const at::Tensor& act_g, const at::Tensor& cells, const at::Tensor& tanh_c, at::Tensor& d_w_t,
                   at::Tensor& d_x, bool x_grad, const bool* live) {
  const int64_t steps = sig.size(0), k_runs = sig.size(1), hid = sig.size(3), b = sig.size(4);
  const int64_t zrows = z.size(2), feats = zrows - hid - 1;
  const int64_t hb = hid * b;
  auto opts = w.options();
  at::Tensor d = at::empty({k_runs, 4 * hid, b}, opts);
  at::Tensor d_c = at::zeros({k_runs, hid, b}, opts);
  // the gradient flowing into h_t (and x_t): rows 0..H-1 of d_z, or a separate [K, H, B]
  at::Tensor d_z = at::zeros({k_runs, x_grad ? hid + feats : hid, b}, opts);
  at::Tensor w_t = w.narrow(2, 0, x_grad ? hid + feats : hid).transpose(1, 2);
  const int64_t dz_rows = d_z.size(1);
  const T* op = d_out.data_ptr<T>();
  const T* sp = sig.data_ptr<T>();
  const T* gp = act_g.data_ptr<T>();
  const T* cp = cells.data_ptr<T>();
  const T* tp = tanh_c.data_ptr<T>();
  const T* wp = w.data_ptr<T>();
  const T* zp = z.data_ptr<T>();
  T* dp = d.data_ptr<T>();
  T* dcp = d_c.data_ptr<T>();
  T* dzp = d_z.data_ptr<T>();
  T* dwp = d_w_t.data_ptr<T>();
  T* dxp = x_grad ? d_x.data_ptr<T>() : nullptr;
  const bool blas = have_blas<T>();
  // one time step of run k, backwards (with BLAS its products too; without, the batched ones follow)
  auto step = [&](int64_t k, int64_t t) {
    if (live != nullptr && !live[k]) {  // a stopped run: zero gradients (d_w_t starts at zero)
      if (x_grad) std::memset(dxp + (t * k_runs + k) * feats * b, 0, sizeof(T) * feats * b);
      return;
    }
    const T* s = sp + (t * k_runs + k) * 4 * hb;
    const T* ag = gp + (t * k_runs + k) * hb;
    const T* c_prev = cp + (t * k_runs + k) * hb;
    const T* tc = tp + (t * k_runs + k) * hb;
    const T* dout = op + (t * k_runs + k) * hb;
    T* dz = dzp + k * dz_rows * b;
    const T* dh_in = dz;
    T* dd = dp + k * 4 * hb;
    T* dc = dcp + k * hb;
#pragma omp simd
    for (int64_t i = 0; i < hb; ++i) {
      const T dh = dh_in[i] + dout[i];
      const T si = s[i], sf = s[hb + i], so = s[3 * hb + i], g = ag[i], th = tc[i];
      const T dcn = dc[i] + dh * so * (T(1) - th * th);
      dd[i] = dcn * g * si * (T(1) - si);
      dd[hb + i] = dcn * c_prev[i] * sf * (T(1) - sf);
      dd[2 * hb + i] = dcn * si * (T(1) - g * g);
      dd[3 * hb + i] = dh * th * so * (T(1) - so);
      dc[i] = dcn * sf;
    }
    if (!blas) return;
    const T* zt = zp + (t * k_runs + k) * zrows * b;
    // d_w^T_k += z_t,k d_k^T: [(H+F+1) x B] x [B x 4H] (transposed: 1.6x the speed of d_w += d z^T)
    gemm<T>(false, true, zrows, 4 * hid, b, T(1), zt, b, dd, b, T(1), dwp + k * zrows * 4 * hid, 4 * hid);
    if (x_grad || t > 0) {  // d_z_k = w[:, :rows]_k^T d_k: [rows x 4H] x [4H x B]
      gemm<T>(true, false, dz_rows, b, 4 * hid, T(1), wp + k * 4 * hid * zrows, zrows, dd, b, T(0), dz, b);
      if (x_grad)
        std::memcpy(dxp + (t * k_runs + k) * feats * b, dz + hid * b, sizeof(T) * feats * b);
    }
  };
  if (blas) {  // run by run, each its whole time loop
    for_runs(k_runs, [&](int64_t k0, int64_t k1) {
      SequentialBlas one;
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t t = steps - 1; t >= 0; --t) step(k, t);
    });
    return;
  }
  for (int64_t t = steps - 1; t >= 0; --t) {  // step by step: every run's pass, then the batched products
    for_runs(k_runs, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) step(k, t);
    });
    d_w_t.baddbmm_(z.select(0, t), d.transpose(1, 2));  // [K, H+F+1, 4H]: 1.6x the speed of d_w += d z^T
    if (x_grad) {
      at::bmm_out(d_z, w_t, d);
      d_x.select(0, t).copy_(d_z.narrow(1, hid, feats));
    } else if (t > 0) {
      at::bmm_out(d_z, w_t, d);
    }
  }
}

const bool* live_runs(const at::Tensor& live, int64_t k_runs) {
  if (!live.defined() || live.numel() == 0) return nullptr;
  TORCH_CHECK(live.scalar_type() == at::kBool && live.is_contiguous() && live.numel() == k_runs && !live.is_cuda(),
              "grouped_lstm: the runs mask is a contiguous bool CPU tensor of one entry per run");
  return live.data_ptr<bool>();
}

void forward_loop(const at::Tensor& w, at::Tensor z, at::Tensor pre, at::Tensor sig, at::Tensor act_g,
                  at::Tensor cells, at::Tensor tanh_c, const at::Tensor& live) {
  TORCH_CHECK(!w.is_cuda(), "grouped_lstm: CPU tensors only");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&w, &z, &pre, &sig, &act_g, &cells, &tanh_c})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == w.scalar_type(), "grouped_lstm: contiguous, one dtype");
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "grouped_lstm_forward",
                             [&] { forward_impl<scalar_t>(w, z, pre, sig, act_g, cells, tanh_c,
                                                          live_runs(live, sig.size(1))); });
}

std::vector<at::Tensor> backward_loop(const at::Tensor& d_out, const at::Tensor& w, const at::Tensor& z, const at::Tensor& sig,
                         const at::Tensor& act_g, const at::Tensor& cells, const at::Tensor& tanh_c, bool x_grad,
                         const at::Tensor& live) {
  at::Tensor dout = d_out.contiguous();
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&dout, &w, &z, &sig, &act_g, &cells, &tanh_c})
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == w.scalar_type(), "grouped_lstm: contiguous, one dtype");
  at::Tensor d_w_t = at::zeros({w.size(0), w.size(2), w.size(1)}, w.options());
  const int64_t hid = sig.size(3);
  at::Tensor d_x = x_grad ? at::empty({sig.size(0), sig.size(1), z.size(2) - hid - 1, sig.size(4)}, w.options())
                          : at::empty({0}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "grouped_lstm_backward", [&] {
    backward_impl<scalar_t>(dout, w, z, sig, act_g, cells, tanh_c, d_w_t, d_x, x_grad, live_runs(live, sig.size(1)));
  });
  return {d_w_t.transpose(1, 2).contiguous(), d_x};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward_loop", &forward_loop, "GroupedLSTM forward time loop (fills the buffers)");
  m.def("backward_loop", &backward_loop, "GroupedLSTM backward time loop -> [d_w, d_x]");
}
