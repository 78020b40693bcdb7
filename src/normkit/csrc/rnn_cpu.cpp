// The LN-LSTM / LN-GRU time loops of normkit.nn.rnn.sequence in C++ (float32, CPU): per step the
// recurrent product (at::mm_out, MKL) and one fused step over the active rows (both layer
// norms, the gates, the cell update), spread over torch's threads by rows. The quantities and
// buffers are those of the plain-torch steps in sequence.py (lstm_fwd_step_torch, ...), which
// define them; the layer-norm statistics come from row_math.h, shared with the norm kernels.
//
// exp is a branch-free Cephes-style polynomial (the 2^n factor built from the exponent bits), so
// the sigmoid / tanh loops vectorize: max relative error ~6e-8 for exp, absolute ~1.2e-7 for
// sigmoid and tanh(x) = 1 - 2 / (e^{2x} + 1). Inputs are clamped to exp's finite range, so
// +-inf give the limits and NaN propagates.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "arg_checks.h"
#include "row_math.h"

namespace normkit {
namespace {

using at::Tensor;

#pragma omp declare simd notinbranch
NORMKIT_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.3365478515625f), 88.3762626647949f);  // NaN passes both (comparisons are false)
  // The exponent n = round(x / ln 2), kept in [-126, 127] so 2^n is a normal float (at the top
  // of the range round() gives 128, whose bits are +inf; with n = 127 the polynomial takes the
  // rest, r <= ln 2, and the result stays finite). A NaN x: n is taken as 0 (the conversion of NaN
  // to int is undefined behaviour), and r, hence the result, is NaN. Branch-free selects, so the
  // loops calling this still vectorize.
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  const float n = x == x ? std::min(std::max(fx, -126.0f), 127.0f) : 0.0f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  const float y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                    1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

NORMKIT_INLINE float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
NORMKIT_INLINE float tanh_(float x) { return 1.0f - 2.0f / (fast_exp(2.0f * x) + 1.0f); }

// v <- (v - mean) * rstd in place (the statistics of normkit.reference); returns rstd.
NORMKIT_INLINE float normalize_inplace(float* v, int64_t n, float eps) {
  const RowStats<float> st = row_stats<float, float>(v, n, eps, false);
  #pragma omp simd
  for (int64_t j = 0; j < n; ++j) v[j] = ((v[j] - st.mean) - st.lo) * st.rstd;
  return st.rstd;
}

// out <- rstd * (g - mean(g) - x_hat * mean(g * x_hat)); out may alias g.
NORMKIT_INLINE void norm_backward(const float* g, const float* x_hat, float rstd, int64_t n, float* out, const float* ones) {
  const GradMeans<float, float> m = grad_means<float, float>(x_hat, GainedGrad<float, float>{g, ones}, n, RowStats<float>{0.0f, 1.0f});
  #pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = rstd * (g[j] - m.g - x_hat[j] * m.g_shat);
}

struct LstmBuffers {
  const float* xg = nullptr;
  float* a = nullptr;  // in: the recurrent product; out: its normalized value
  float* rstd_a = nullptr;
  float* gates = nullptr;
  float* chat = nullptr;
  float* rstd_c = nullptr;
  float* tc = nullptr;
  float* out = nullptr;
  float* hprev = nullptr;
  float* cprev = nullptr;
  float* h_state = nullptr;
  float* c_state = nullptr;
  const float* w_h = nullptr;
  const float* w_c = nullptr;
  const float* b_c = nullptr;
  float* dout = nullptr;
  float* dh_state = nullptr;
  float* dc_state = nullptr;
  float* dxg = nullptr;
  float* da = nullptr;
  float* dchat = nullptr;
  const float* ones = nullptr;  // max(G, H) ones
  int64_t H = 0;
  float eps = 0.0f;
};

NORMKIT_CLONES void lstm_fwd_rows(const LstmBuffers& b, int64_t off, int64_t lo, int64_t hi) {
  const int64_t H = b.H, G = 4 * H;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t row = off + r;
    float* hs = b.h_state + r * H;
    float* cs = b.c_state + r * H;
    std::memcpy(b.hprev + row * H, hs, H * sizeof(float));
    std::memcpy(b.cprev + row * H, cs, H * sizeof(float));
    float* ah = b.a + row * G;
    b.rstd_a[row] = normalize_inplace(ah, G, b.eps);
    float* g = b.gates + row * G;
    const float* x = b.xg + row * G;
    #pragma omp simd
    for (int64_t j = 0; j < G; ++j) g[j] = ah[j] * b.w_h[j] + x[j];
    #pragma omp simd
    for (int64_t j = 0; j < 2 * H; ++j) g[j] = sigmoid(g[j]);
    #pragma omp simd
    for (int64_t j = 2 * H; j < 3 * H; ++j) g[j] = tanh_(g[j]);
    #pragma omp simd
    for (int64_t j = 3 * H; j < G; ++j) g[j] = sigmoid(g[j]);
    const float *si = g, *sf = g + H, *tg = g + 2 * H, *so = g + 3 * H;
    float* ch = b.chat + row * H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      cs[j] = sf[j] * cs[j] + si[j] * tg[j];
      ch[j] = cs[j];
    }
    b.rstd_c[row] = normalize_inplace(ch, H, b.eps);
    float* t = b.tc + row * H;
    float* o = b.out + row * H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      t[j] = tanh_(ch[j] * b.w_c[j] + b.b_c[j]);
      hs[j] = so[j] * t[j];
      o[j] = hs[j];
    }
  }
}

NORMKIT_CLONES void lstm_bwd_rows(const LstmBuffers& b, int64_t off, int64_t lo, int64_t hi, float* tmp) {
  const int64_t H = b.H, G = 4 * H;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t row = off + r;
    const float* g = b.gates + row * G;
    const float *si = g, *sf = g + H, *tg = g + 2 * H, *so = g + 3 * H;
    float* dx = b.dxg + row * G;
    float *di = dx, *df = dx + H, *dg = dx + 2 * H, *d_o = dx + 3 * H;
    const float* t = b.tc + row * H;
    float* dch = b.dchat + row * H;
    float* dh_r = b.dh_state + r * H;
    const float* dy = b.dout + row * H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float dh = dh_r[j] + dy[j];
      d_o[j] = dh * t[j] * so[j] * (1.0f - so[j]);
      dch[j] = dh * so[j] * (1.0f - t[j] * t[j]);
      tmp[j] = dch[j] * b.w_c[j];
    }
    norm_backward(tmp, b.chat + row * H, b.rstd_c[row], H, tmp, b.ones);
    float* dc_r = b.dc_state + r * H;
    const float* cp = b.cprev + row * H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float dc = dc_r[j] + tmp[j];
      di[j] = dc * tg[j] * si[j] * (1.0f - si[j]);
      df[j] = dc * cp[j] * sf[j] * (1.0f - sf[j]);
      dg[j] = dc * si[j] * (1.0f - tg[j] * tg[j]);
      dc_r[j] = dc * sf[j];
    }
    float* d = b.da + row * G;
    #pragma omp simd
    for (int64_t j = 0; j < G; ++j) d[j] = dx[j] * b.w_h[j];
    norm_backward(d, b.a + row * G, b.rstd_a[row], G, d, b.ones);
  }
}

struct GruBuffers {
  const float* xg = nullptr;
  float* a = nullptr;
  float* rstd_a = nullptr;
  float* gates = nullptr;
  float* out = nullptr;
  float* hprev = nullptr;
  float* h_state = nullptr;
  const float* w_h = nullptr;
  const float* b_h = nullptr;
  float* dout = nullptr;
  float* dh_state = nullptr;
  float* dxg = nullptr;
  float* dgh = nullptr;
  float* da = nullptr;
  const float* ones = nullptr;
  int64_t H = 0;
  float eps = 0.0f;
};

NORMKIT_CLONES void gru_fwd_rows(const GruBuffers& b, int64_t off, int64_t lo, int64_t hi) {
  const int64_t H = b.H, G = 3 * H;
  const float *wn = b.w_h + 2 * H, *bn = b.b_h + 2 * H;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t row = off + r;
    float* hs = b.h_state + r * H;
    std::memcpy(b.hprev + row * H, hs, H * sizeof(float));
    float* ah = b.a + row * G;
    b.rstd_a[row] = normalize_inplace(ah, G, b.eps);
    float* g = b.gates + row * G;
    const float* x = b.xg + row * G;
    #pragma omp simd
    for (int64_t j = 0; j < 2 * H; ++j) g[j] = sigmoid(x[j] + ah[j] * b.w_h[j] + b.b_h[j]);
    const float *rr = g, *z = g + H;
    float* n = g + 2 * H;
    const float *xn = x + 2 * H, *an = ah + 2 * H;
    float* o = b.out + row * H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      n[j] = tanh_(xn[j] + rr[j] * (an[j] * wn[j] + bn[j]));
      hs[j] = (1.0f - z[j]) * n[j] + z[j] * hs[j];
      o[j] = hs[j];
    }
  }
}

NORMKIT_CLONES void gru_bwd_rows(const GruBuffers& b, int64_t off, int64_t lo, int64_t hi) {
  const int64_t H = b.H, G = 3 * H;
  const float *wn = b.w_h + 2 * H, *bn = b.b_h + 2 * H;
  for (int64_t r = lo; r < hi; ++r) {
    const int64_t row = off + r;
    const float* g = b.gates + row * G;
    const float *rr = g, *z = g + H, *n = g + 2 * H;
    const float* an = b.a + row * G + 2 * H;
    float* dx = b.dxg + row * G;
    float* dg = b.dgh + row * G;
    float* dh_r = b.dh_state + r * H;
    const float* dy = b.dout + row * H;
    const float* hp = b.hprev + row * H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const float dh = dh_r[j] + dy[j];
      const float dnp = dh * (1.0f - z[j]) * (1.0f - n[j] * n[j]);
      const float dz = dh * (hp[j] - n[j]) * z[j] * (1.0f - z[j]);
      const float dr = dnp * (an[j] * wn[j] + bn[j]) * rr[j] * (1.0f - rr[j]);
      dh_r[j] = dh * z[j];
      dx[j] = dr;
      dx[H + j] = dz;
      dx[2 * H + j] = dnp;
      dg[j] = dr;
      dg[H + j] = dz;
      dg[2 * H + j] = dnp * rr[j];
    }
    float* d = b.da + row * G;
    #pragma omp simd
    for (int64_t j = 0; j < G; ++j) d[j] = dg[j] * b.w_h[j];
    norm_backward(d, b.a + row * G, b.rstd_a[row], G, d, b.ones);
  }
}

// f(lo, hi) over rows 0..bs-1, in parallel when the step is big enough to pay for a fork.
template <typename F>
void over_rows(int64_t bs, int64_t width, const F& f) {
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(width, 1));
  if (bs <= grain || at::get_num_threads() == 1) {
    f(0, bs);
    return;
  }
  at::parallel_for(0, bs, grain, f);
}

// A float32 CPU tensor of exactly `sizes`, as the kernels read it: contiguous, without the
// negative bit (a resolved copy where needed).
Tensor f32(const Tensor& t, const char* name, at::IntArrayRef sizes) {
  check_tensor(t, name, static_cast<int64_t>(sizes.size()), false);
  check_dtype(t, name, at::kFloat);
  check_sizes(t, name, sizes);
  return resolved(t.contiguous());
}

// The gate width G of a (N, G) buffer: `gates` * H with H >= 1; returns H.
int64_t hidden_size(const Tensor& t, const char* name, int64_t gates) {
  check_tensor(t, name, 2, false);
  TORCH_CHECK(t.size(1) >= gates && t.size(1) % gates == 0, name, ": expected ", gates,
              " * hidden_size columns (hidden_size >= 1), got sizes ", t.sizes());
  return t.size(1) / gates;
}

using Steps = std::vector<std::pair<int64_t, int64_t>>;  // (offset, batch size) in processing order

// steps: a sequence of (offset, batch size) pairs; each step's rows [offset, offset + batch size)
// must lie within the N packed rows, and its batch size within the B rows of the state.
Steps parse_steps(py::handle obj, int64_t N, int64_t B) {
  TORCH_CHECK_TYPE(PySequence_Check(obj.ptr()) && !PyUnicode_Check(obj.ptr()),
                   "steps: expected a sequence of (offset, batch_size) pairs, got ", type_name(obj));
  py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
  Steps steps;
  steps.reserve(seq.size());
  for (size_t i = 0; i < seq.size(); ++i) {
    py::object item = seq[i];
    TORCH_CHECK_TYPE(PySequence_Check(item.ptr()) && PySequence_Size(item.ptr()) == 2,
                     "steps: expected (offset, batch_size) pairs, got ", type_name(item), " at step ", i);
    py::sequence pair = py::reinterpret_borrow<py::sequence>(item);
    const int64_t off = arg_int(pair[0], "steps offset"), bs = arg_int(pair[1], "steps batch_size");
    TORCH_CHECK_VALUE(bs >= 0 && bs <= B, "steps: expected batch sizes in [0, ", B, "] (the rows of the state), got ", bs,
                      " at step ", i);
    TORCH_CHECK_VALUE(off >= 0 && off <= N - bs, "steps: expected rows [offset, offset + batch_size) within the ", N,
                      " packed rows, got offset ", off, " and batch size ", bs, " at step ", i);
    steps.emplace_back(off, bs);
  }
  return steps;
}

// The LN-LSTM forward over all steps. In: xg (N, 4H), h0 / c0 (B, H), w_hh (4H, H), gains w_h
// (4H,), w_c (H,), bias b_c (H,). Out: [out, h_n, c_n, a_hat, rstd_a, gates, chat, rstd_c, tc, hprev, cprev].
std::vector<Tensor> lstm_forward(const Tensor& xg_in, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                                 const Tensor& w_h_in, const Tensor& w_c_in, const Tensor& b_c_in, py::handle steps_obj,
                                 double eps) {
  const int64_t H = hidden_size(xg_in, "xg", 4), N = xg_in.size(0), G = 4 * H;
  const Tensor xg = f32(xg_in, "xg", {N, G});
  check_tensor(h0, "h0", 2, false);
  const int64_t B = h0.size(0);
  Tensor h_state = f32(h0, "h0", {B, H}).clone(), c_state = f32(c0, "c0", {B, H}).clone();
  check_tensor(w_hh, "w_hh", 2, false);
  check_dtype(w_hh, "w_hh", at::kFloat);
  check_sizes(w_hh, "w_hh", {G, H});
  const Tensor w_h = f32(w_h_in, "w_h", {G}), w_c = f32(w_c_in, "w_c", {H}), b_c = f32(b_c_in, "b_c", {H});
  check_eps(eps);
  const Steps steps = parse_steps(steps_obj, N, B);
  auto opts = xg.options();
  Tensor a = at::empty({N, G}, opts), gates = at::empty({N, G}, opts), rstd_a = at::empty({N}, opts),
         rstd_c = at::empty({N}, opts);
  Tensor chat = at::empty({N, H}, opts), tc = at::empty({N, H}, opts), out = at::empty({N, H}, opts),
         hprev = at::empty({N, H}, opts), cprev = at::empty({N, H}, opts);
  Tensor w_t = w_hh.t();
  LstmBuffers b{.xg = xg.data_ptr<float>(),
                .a = a.data_ptr<float>(),
                .rstd_a = rstd_a.data_ptr<float>(),
                .gates = gates.data_ptr<float>(),
                .chat = chat.data_ptr<float>(),
                .rstd_c = rstd_c.data_ptr<float>(),
                .tc = tc.data_ptr<float>(),
                .out = out.data_ptr<float>(),
                .hprev = hprev.data_ptr<float>(),
                .cprev = cprev.data_ptr<float>(),
                .h_state = h_state.data_ptr<float>(),
                .c_state = c_state.data_ptr<float>(),
                .w_h = w_h.data_ptr<float>(),
                .w_c = w_c.data_ptr<float>(),
                .b_c = b_c.data_ptr<float>(),
                .H = H,
                .eps = static_cast<float>(eps)};
  for (const auto& step : steps) {
    const int64_t off = step.first, bs = step.second;
    Tensor a_rows = a.narrow(0, off, bs);
    at::mm_out(a_rows, h_state.narrow(0, 0, bs), w_t);
    over_rows(bs, G, [&](int64_t lo, int64_t hi) { lstm_fwd_rows(b, off, lo, hi); });
  }
  return {out, h_state, c_state, a, rstd_a, gates, chat, rstd_c, tc, hprev, cprev};
}

// Backward through time: [dxg, dh_0, dc_0, da, dchat]; dW_hh and the gain gradients are formed
// by the caller from da / dxg / dchat after the loop.
std::vector<Tensor> lstm_backward(const Tensor& dout_in, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                                  const Tensor& w_h_in, const Tensor& w_c_in, const Tensor& a_hat_in,
                                  const Tensor& rstd_a_in, const Tensor& gates_in, const Tensor& chat_in,
                                  const Tensor& rstd_c_in, const Tensor& tc_in, const Tensor& cprev_in,
                                  py::handle steps_obj) {
  const int64_t H = hidden_size(a_hat_in, "a_hat", 4), N = a_hat_in.size(0), G = 4 * H;
  const Tensor a_hat = f32(a_hat_in, "a_hat", {N, G}), rstd_a = f32(rstd_a_in, "rstd_a", {N}),
               gates = f32(gates_in, "gates", {N, G}), chat = f32(chat_in, "chat", {N, H}),
               rstd_c = f32(rstd_c_in, "rstd_c", {N}), tc = f32(tc_in, "tc", {N, H}), cprev = f32(cprev_in, "cprev", {N, H});
  const Tensor dout_c = f32(dout_in, "dout", {N, H});
  check_tensor(dh_n, "dh_n", 2, false);
  const int64_t B = dh_n.size(0);
  Tensor dh_state = f32(dh_n, "dh_n", {B, H}).clone(), dc_state = f32(dc_n, "dc_n", {B, H}).clone();
  check_tensor(w_hh, "w_hh", 2, false);
  check_dtype(w_hh, "w_hh", at::kFloat);
  check_sizes(w_hh, "w_hh", {G, H});
  const Tensor w_h = f32(w_h_in, "w_h", {G}), w_c = f32(w_c_in, "w_c", {H});
  const Steps steps = parse_steps(steps_obj, N, B);
  auto opts = a_hat.options();
  Tensor dxg = at::empty({N, G}, opts), da = at::empty({N, G}, opts), dchat = at::empty({N, H}, opts);
  Tensor ones = at::ones({G}, opts);
  LstmBuffers b{.a = a_hat.data_ptr<float>(),
                .rstd_a = rstd_a.data_ptr<float>(),
                .gates = gates.data_ptr<float>(),
                .chat = chat.data_ptr<float>(),
                .rstd_c = rstd_c.data_ptr<float>(),
                .tc = tc.data_ptr<float>(),
                .cprev = cprev.data_ptr<float>(),
                .w_h = w_h.data_ptr<float>(),
                .w_c = w_c.data_ptr<float>(),
                .dout = dout_c.data_ptr<float>(),
                .dh_state = dh_state.data_ptr<float>(),
                .dc_state = dc_state.data_ptr<float>(),
                .dxg = dxg.data_ptr<float>(),
                .da = da.data_ptr<float>(),
                .dchat = dchat.data_ptr<float>(),
                .ones = ones.data_ptr<float>(),
                .H = H};
  for (const auto& step : steps) {
    const int64_t off = step.first, bs = step.second;
    over_rows(bs, G, [&](int64_t lo, int64_t hi) {
      std::vector<float> tmp(H);
      lstm_bwd_rows(b, off, lo, hi, tmp.data());
    });
    Tensor dh_rows = dh_state.narrow(0, 0, bs);
    at::mm_out(dh_rows, da.narrow(0, off, bs), w_hh);
  }
  return {dxg, dh_state, dc_state, da, dchat};
}

// The LN-GRU forward: [out, h_n, a_hat, rstd_a, gates, hprev].
std::vector<Tensor> gru_forward(const Tensor& xg_in, const Tensor& h0, const Tensor& w_hh, const Tensor& w_h_in,
                                const Tensor& b_h_in, py::handle steps_obj, double eps) {
  const int64_t H = hidden_size(xg_in, "xg", 3), N = xg_in.size(0), G = 3 * H;
  const Tensor xg = f32(xg_in, "xg", {N, G});
  check_tensor(h0, "h0", 2, false);
  const int64_t B = h0.size(0);
  Tensor h_state = f32(h0, "h0", {B, H}).clone();
  check_tensor(w_hh, "w_hh", 2, false);
  check_dtype(w_hh, "w_hh", at::kFloat);
  check_sizes(w_hh, "w_hh", {G, H});
  const Tensor w_h = f32(w_h_in, "w_h", {G}), b_h = f32(b_h_in, "b_h", {G});
  check_eps(eps);
  const Steps steps = parse_steps(steps_obj, N, B);
  auto opts = xg.options();
  Tensor a = at::empty({N, G}, opts), gates = at::empty({N, G}, opts), rstd_a = at::empty({N}, opts);
  Tensor out = at::empty({N, H}, opts), hprev = at::empty({N, H}, opts);
  Tensor w_t = w_hh.t();
  GruBuffers b{.xg = xg.data_ptr<float>(),
               .a = a.data_ptr<float>(),
               .rstd_a = rstd_a.data_ptr<float>(),
               .gates = gates.data_ptr<float>(),
               .out = out.data_ptr<float>(),
               .hprev = hprev.data_ptr<float>(),
               .h_state = h_state.data_ptr<float>(),
               .w_h = w_h.data_ptr<float>(),
               .b_h = b_h.data_ptr<float>(),
               .H = H,
               .eps = static_cast<float>(eps)};
  for (const auto& step : steps) {
    const int64_t off = step.first, bs = step.second;
    Tensor a_rows = a.narrow(0, off, bs);
    at::mm_out(a_rows, h_state.narrow(0, 0, bs), w_t);
    over_rows(bs, G, [&](int64_t lo, int64_t hi) { gru_fwd_rows(b, off, lo, hi); });
  }
  return {out, h_state, a, rstd_a, gates, hprev};
}

// [dxg, dh_0, da, dgh].
std::vector<Tensor> gru_backward(const Tensor& dout_in, const Tensor& dh_n, const Tensor& w_hh, const Tensor& w_h_in,
                                 const Tensor& b_h_in, const Tensor& a_hat_in, const Tensor& rstd_a_in,
                                 const Tensor& gates_in, const Tensor& hprev_in, py::handle steps_obj) {
  const int64_t H = hidden_size(a_hat_in, "a_hat", 3), N = a_hat_in.size(0), G = 3 * H;
  const Tensor a_hat = f32(a_hat_in, "a_hat", {N, G}), rstd_a = f32(rstd_a_in, "rstd_a", {N}),
               gates = f32(gates_in, "gates", {N, G}), hprev = f32(hprev_in, "hprev", {N, H});
  const Tensor dout_c = f32(dout_in, "dout", {N, H});
  check_tensor(dh_n, "dh_n", 2, false);
  const int64_t B = dh_n.size(0);
  Tensor dh_state = f32(dh_n, "dh_n", {B, H}).clone();
  check_tensor(w_hh, "w_hh", 2, false);
  check_dtype(w_hh, "w_hh", at::kFloat);
  check_sizes(w_hh, "w_hh", {G, H});
  const Tensor w_h = f32(w_h_in, "w_h", {G}), b_h = f32(b_h_in, "b_h", {G});
  const Steps steps = parse_steps(steps_obj, N, B);
  auto opts = a_hat.options();
  Tensor dxg = at::empty({N, G}, opts), dgh = at::empty({N, G}, opts), da = at::empty({N, G}, opts);
  Tensor ones = at::ones({G}, opts);
  GruBuffers b{.a = a_hat.data_ptr<float>(),
               .rstd_a = rstd_a.data_ptr<float>(),
               .gates = gates.data_ptr<float>(),
               .hprev = hprev.data_ptr<float>(),
               .w_h = w_h.data_ptr<float>(),
               .b_h = b_h.data_ptr<float>(),
               .dout = dout_c.data_ptr<float>(),
               .dh_state = dh_state.data_ptr<float>(),
               .dxg = dxg.data_ptr<float>(),
               .dgh = dgh.data_ptr<float>(),
               .da = da.data_ptr<float>(),
               .ones = ones.data_ptr<float>(),
               .H = H};
  for (const auto& step : steps) {
    const int64_t off = step.first, bs = step.second;
    over_rows(bs, G, [&](int64_t lo, int64_t hi) { gru_bwd_rows(b, off, lo, hi); });
    Tensor dh_rows = dh_state.narrow(0, 0, bs);
    dh_rows.addmm_(da.narrow(0, off, bs), w_hh);
  }
  return {dxg, dh_state, da, dgh};
}

// out[j] = sum_i u[i, j] * v[i, j] (v undefined: sum_i u[i, j]), accumulated in double, parallel
// over columns: the gain / bias gradients over all N packed rows.
NORMKIT_CLONES void column_dot_block(const float* u, const float* v, int64_t n, int64_t g, int64_t lo, int64_t hi,
                                     float* out) {
  std::vector<double> acc(hi - lo, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const float* ui = u + i * g;
    if (v) {
      const float* vi = v + i * g;
      for (int64_t j = lo; j < hi; ++j) acc[j - lo] += static_cast<double>(ui[j] * vi[j]);
    } else {
      for (int64_t j = lo; j < hi; ++j) acc[j - lo] += static_cast<double>(ui[j]);
    }
  }
  for (int64_t j = lo; j < hi; ++j) out[j] = static_cast<float>(acc[j - lo]);
}

Tensor column_dot(const Tensor& u_in, const c10::optional<Tensor>& v_in) {
  check_tensor(u_in, "u", 2, false);
  const int64_t n = u_in.size(0), g = u_in.size(1);
  const Tensor u = f32(u_in, "u", {n, g});
  const Tensor v = v_in.has_value() && v_in->defined() ? f32(*v_in, "v", {n, g}) : Tensor();
  Tensor out = at::empty({g}, u.options());
  const float* vp = v.defined() ? v.data_ptr<float>() : nullptr;
  at::parallel_for(0, g, std::max<int64_t>(64, (1 << 16) / std::max<int64_t>(n, 1)), [&](int64_t lo, int64_t hi) {
    column_dot_block(u.data_ptr<float>(), vp, n, g, lo, hi, out.data_ptr<float>());
  });
  return out;
}

}  // namespace

void register_rnn(py::module& m) {
  m.def("lstm_forward",
        [](const Tensor& xg, const Tensor& h0, const Tensor& c0, const Tensor& w_hh, const Tensor& w_h,
           const Tensor& w_c, const Tensor& b_c, py::handle steps, py::handle eps) {
          return lstm_forward(xg, h0, c0, w_hh, w_h, w_c, b_c, steps, arg_float(eps, "eps"));
        },
        "LN-LSTM forward over a packed sequence (float32)", py::arg("xg"), py::arg("h0"), py::arg("c0"),
        py::arg("w_hh"), py::arg("w_h"), py::arg("w_c"), py::arg("b_c"), py::arg("steps"), py::arg("eps"));
  m.def("lstm_backward", &lstm_backward, "LN-LSTM backward through time (float32)", py::arg("dout"), py::arg("dh_n"),
        py::arg("dc_n"), py::arg("w_hh"), py::arg("w_h"), py::arg("w_c"), py::arg("a_hat"), py::arg("rstd_a"),
        py::arg("gates"), py::arg("chat"), py::arg("rstd_c"), py::arg("tc"), py::arg("cprev"), py::arg("steps"));
  m.def("gru_forward",
        [](const Tensor& xg, const Tensor& h0, const Tensor& w_hh, const Tensor& w_h, const Tensor& b_h,
           py::handle steps, py::handle eps) {
          return gru_forward(xg, h0, w_hh, w_h, b_h, steps, arg_float(eps, "eps"));
        },
        "LN-GRU forward over a packed sequence (float32)", py::arg("xg"), py::arg("h0"), py::arg("w_hh"),
        py::arg("w_h"), py::arg("b_h"), py::arg("steps"), py::arg("eps"));
  m.def("gru_backward", &gru_backward, "LN-GRU backward through time (float32)", py::arg("dout"), py::arg("dh_n"),
        py::arg("w_hh"), py::arg("w_h"), py::arg("b_h"), py::arg("a_hat"), py::arg("rstd_a"), py::arg("gates"),
        py::arg("hprev"), py::arg("steps"));
  m.def("column_dot", &column_dot, "sum over rows of u * v (or of u), float64 accumulation", py::arg("u"),
        py::arg("v") = py::none());
}

}  // namespace normkit
