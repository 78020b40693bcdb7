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

#include "row_math.h"

namespace normkit {
namespace {

using at::Tensor;

#pragma omp declare simd notinbranch
NORMKIT_INLINE float fast_exp(float x) {
  x = std::min(std::max(x, -87.3365478515625f), 88.3762626647949f);
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - fx * 0.693359375f - fx * -2.12194440e-4f;
  const float y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
                    1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
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
  const GradMeans<float, float> m = grad_means<float, float>(x_hat, g, n, RowStats<float>{0.0f, 1.0f}, ones);
  #pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = rstd * (g[j] - m.g - x_hat[j] * m.g_shat);
}

struct LstmBuffers {
  const float* xg;
  float* a;  // in: the recurrent product; out: its normalized value
  float* rstd_a;
  float* gates;
  float* chat;
  float* rstd_c;
  float* tc;
  float* out;
  float* hprev;
  float* cprev;
  float* h_state;
  float* c_state;
  const float* w_h;
  const float* w_c;
  const float* b_c;
  float* dout;
  float* dh_state;
  float* dc_state;
  float* dxg;
  float* da;
  float* dchat;
  const float* ones;  // max(G, H) ones
  int64_t H;
  float eps;
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
  const float* xg;
  float* a;
  float* rstd_a;
  float* gates;
  float* out;
  float* hprev;
  float* h_state;
  const float* w_h;
  const float* b_h;
  float* dout;
  float* dh_state;
  float* dxg;
  float* dgh;
  float* da;
  const float* ones;
  int64_t H;
  float eps;
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

void check_f32(const Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.is_contiguous(),
              "normkit._C rnn: ", name, " must be a contiguous float32 CPU tensor");
}

using Steps = std::vector<std::pair<int64_t, int64_t>>;  // (offset, batch size) in processing order

// The LN-LSTM forward over all steps. In: xg (N, 4H), h0 / c0 (B, H), w_hh (4H, H), gains w_h
// (4H,), w_c (H,), bias b_c (H,). Out: [out, h_n, c_n, a_hat, rstd_a, gates, chat, rstd_c, tc, hprev, cprev].
std::vector<Tensor> lstm_forward(const Tensor& xg, const Tensor& h0, const Tensor& c0, const Tensor& w_hh,
                                 const Tensor& w_h, const Tensor& w_c, const Tensor& b_c, const Steps& steps,
                                 double eps) {
  check_f32(xg, "xg");
  check_f32(w_h, "w_h");
  check_f32(w_c, "w_c");
  check_f32(b_c, "b_c");
  const int64_t N = xg.size(0), G = xg.size(1), H = G / 4;
  auto opts = xg.options();
  Tensor a = at::empty({N, G}, opts), gates = at::empty({N, G}, opts), rstd_a = at::empty({N}, opts),
         rstd_c = at::empty({N}, opts);
  Tensor chat = at::empty({N, H}, opts), tc = at::empty({N, H}, opts), out = at::empty({N, H}, opts),
         hprev = at::empty({N, H}, opts), cprev = at::empty({N, H}, opts);
  Tensor h_state = h0.contiguous().clone(), c_state = c0.contiguous().clone();
  check_f32(h_state, "h0");
  check_f32(c_state, "c0");
  Tensor w_t = w_hh.t();
  LstmBuffers b{xg.data_ptr<float>(), a.data_ptr<float>(), rstd_a.data_ptr<float>(), gates.data_ptr<float>(),
                chat.data_ptr<float>(), rstd_c.data_ptr<float>(), tc.data_ptr<float>(), out.data_ptr<float>(),
                hprev.data_ptr<float>(), cprev.data_ptr<float>(), h_state.data_ptr<float>(), c_state.data_ptr<float>(),
                w_h.data_ptr<float>(), w_c.data_ptr<float>(), b_c.data_ptr<float>(), nullptr, nullptr, nullptr,
                nullptr, nullptr, nullptr, nullptr, H, static_cast<float>(eps)};
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
std::vector<Tensor> lstm_backward(const Tensor& dout, const Tensor& dh_n, const Tensor& dc_n, const Tensor& w_hh,
                                  const Tensor& w_h, const Tensor& w_c, const Tensor& a_hat, const Tensor& rstd_a,
                                  const Tensor& gates, const Tensor& chat, const Tensor& rstd_c, const Tensor& tc,
                                  const Tensor& cprev, const Steps& steps) {
  const int64_t N = a_hat.size(0), G = a_hat.size(1), H = G / 4;
  auto opts = a_hat.options();
  Tensor dout_c = dout.contiguous(), dh_state = dh_n.contiguous().clone(), dc_state = dc_n.contiguous().clone();
  check_f32(dout_c, "dout");
  check_f32(dh_state, "dh_n");
  check_f32(dc_state, "dc_n");
  Tensor dxg = at::empty({N, G}, opts), da = at::empty({N, G}, opts), dchat = at::empty({N, H}, opts);
  Tensor ones = at::ones({G}, opts);
  LstmBuffers b{nullptr, a_hat.data_ptr<float>(), rstd_a.data_ptr<float>(), gates.data_ptr<float>(),
                chat.data_ptr<float>(), rstd_c.data_ptr<float>(), tc.data_ptr<float>(), nullptr, nullptr,
                cprev.data_ptr<float>(), nullptr, nullptr, w_h.data_ptr<float>(), w_c.data_ptr<float>(), nullptr,
                dout_c.data_ptr<float>(), dh_state.data_ptr<float>(), dc_state.data_ptr<float>(),
                dxg.data_ptr<float>(), da.data_ptr<float>(), dchat.data_ptr<float>(), ones.data_ptr<float>(), H, 0.0f};
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
std::vector<Tensor> gru_forward(const Tensor& xg, const Tensor& h0, const Tensor& w_hh, const Tensor& w_h,
                                const Tensor& b_h, const Steps& steps, double eps) {
  check_f32(xg, "xg");
  check_f32(w_h, "w_h");
  check_f32(b_h, "b_h");
  const int64_t N = xg.size(0), G = xg.size(1), H = G / 3;
  auto opts = xg.options();
  Tensor a = at::empty({N, G}, opts), gates = at::empty({N, G}, opts), rstd_a = at::empty({N}, opts);
  Tensor out = at::empty({N, H}, opts), hprev = at::empty({N, H}, opts);
  Tensor h_state = h0.contiguous().clone();
  check_f32(h_state, "h0");
  Tensor w_t = w_hh.t();
  GruBuffers b{xg.data_ptr<float>(), a.data_ptr<float>(), rstd_a.data_ptr<float>(), gates.data_ptr<float>(),
               out.data_ptr<float>(), hprev.data_ptr<float>(), h_state.data_ptr<float>(), w_h.data_ptr<float>(),
               b_h.data_ptr<float>(), nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, H, static_cast<float>(eps)};
  for (const auto& step : steps) {
    const int64_t off = step.first, bs = step.second;
    Tensor a_rows = a.narrow(0, off, bs);
    at::mm_out(a_rows, h_state.narrow(0, 0, bs), w_t);
    over_rows(bs, G, [&](int64_t lo, int64_t hi) { gru_fwd_rows(b, off, lo, hi); });
  }
  return {out, h_state, a, rstd_a, gates, hprev};
}

// [dxg, dh_0, da, dgh].
std::vector<Tensor> gru_backward(const Tensor& dout, const Tensor& dh_n, const Tensor& w_hh, const Tensor& w_h,
                                 const Tensor& b_h, const Tensor& a_hat, const Tensor& rstd_a, const Tensor& gates,
                                 const Tensor& hprev, const Steps& steps) {
  const int64_t N = a_hat.size(0), G = a_hat.size(1), H = G / 3;
  auto opts = a_hat.options();
  Tensor dout_c = dout.contiguous(), dh_state = dh_n.contiguous().clone();
  check_f32(dout_c, "dout");
  check_f32(dh_state, "dh_n");
  Tensor dxg = at::empty({N, G}, opts), dgh = at::empty({N, G}, opts), da = at::empty({N, G}, opts);
  Tensor ones = at::ones({G}, opts);
  GruBuffers b{nullptr, a_hat.data_ptr<float>(), rstd_a.data_ptr<float>(), gates.data_ptr<float>(), nullptr,
               hprev.data_ptr<float>(), nullptr, w_h.data_ptr<float>(), b_h.data_ptr<float>(),
               dout_c.data_ptr<float>(), dh_state.data_ptr<float>(), dxg.data_ptr<float>(), dgh.data_ptr<float>(),
               da.data_ptr<float>(), ones.data_ptr<float>(), H, 0.0f};
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

Tensor column_dot(const Tensor& u, const c10::optional<Tensor>& v) {
  check_f32(u, "u");
  if (v.has_value()) check_f32(*v, "v");
  const int64_t n = u.size(0), g = u.size(1);
  Tensor out = at::empty({g}, u.options());
  const float* vp = v.has_value() ? v->data_ptr<float>() : nullptr;
  at::parallel_for(0, g, std::max<int64_t>(64, (1 << 16) / std::max<int64_t>(n, 1)), [&](int64_t lo, int64_t hi) {
    column_dot_block(u.data_ptr<float>(), vp, n, g, lo, hi, out.data_ptr<float>());
  });
  return out;
}

}  // namespace

void register_rnn(py::module& m) {
  m.def("lstm_forward", &lstm_forward, "LN-LSTM forward over a packed sequence (float32)");
  m.def("lstm_backward", &lstm_backward, "LN-LSTM backward through time (float32)");
  m.def("gru_forward", &gru_forward, "LN-GRU forward over a packed sequence (float32)");
  m.def("gru_backward", &gru_backward, "LN-GRU backward through time (float32)");
  m.def("column_dot", &column_dot, "sum over rows of u * v (or of u), float64 accumulation");
}

}  // namespace normkit
