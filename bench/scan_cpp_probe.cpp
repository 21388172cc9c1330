// Probe, not part of the library: the SSD recurrence stepped position by position in one fused C++
// loop per (batch, head), forward and backward, to size what a compiled CPU kernel would give
// (bench/scan_cpp_probe.py builds and times it). float32, headdim fixed at 64.
//   h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T   (state stored (N, P): one row per state index)
//   y_t = h_t^T C_t + D x_t
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

constexpr int64_t P = 64;  // headdim: fixed so that the per-position accumulators stay in registers
constexpr int64_t K = 16;  // positions between saved states; the backward pass recomputes K states at a time

// x (b, L, H, P), dt (b, L, H), A (H), B and C (b, L, G, N), D (H) -> y (b, L, H, P) and the state
// before every K-th position, states (b, H, L / K, N, P). L must be a multiple of K.
std::vector<torch::Tensor> forward(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor B,
                                   torch::Tensor C, torch::Tensor D) {
  const int64_t b = x.size(0), L = x.size(1), H = x.size(2), G = B.size(2), N = B.size(3), R = H / G;
  auto y = torch::empty_like(x);
  auto states = torch::empty({b, H, L / K, N, P}, x.options());
  const float *xp = x.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>();
  const float *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>(), *Dp = D.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *sp = states.data_ptr<float>();
  at::parallel_for(0, b * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> h(N * P);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t bi = bh / H, hd = bh % H, g = hd / R;
      std::fill(h.begin(), h.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        if (t % K == 0) std::copy(h.begin(), h.end(), sp + (bh * (L / K) + t / K) * N * P);
        const float d = dtp[(bi * L + t) * H + hd], a = std::exp(d * Ap[hd]);
        const float *xr = xp + ((bi * L + t) * H + hd) * P;
        const float *Br = Bp + ((bi * L + t) * G + g) * N, *Cr = Cp + ((bi * L + t) * G + g) * N;
        float u[P], acc[P];
        for (int64_t p = 0; p < P; ++p) { u[p] = d * xr[p]; acc[p] = Dp[hd] * xr[p]; }
        for (int64_t n = 0; n < N; ++n) {
          float *hr = h.data() + n * P;
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) {
            const float s = a * hr[p] + u[p] * Br[n];
            hr[p] = s;
            acc[p] += s * Cr[n];
          }
        }
        std::copy(acc, acc + P, yp + ((bi * L + t) * H + hd) * P);
      }
    }
  });
  return {y, states};
}

// Gradients of x, dt, A, B, C and D from dy (b, L, H, P) and the saved states.
std::vector<torch::Tensor> backward(torch::Tensor dy, torch::Tensor x, torch::Tensor dt, torch::Tensor A,
                                    torch::Tensor B, torch::Tensor C, torch::Tensor D, torch::Tensor states) {
  const int64_t b = x.size(0), L = x.size(1), H = x.size(2), G = B.size(2), N = B.size(3), R = H / G;
  auto dx = torch::empty_like(x), ddt = torch::empty_like(dt);
  auto dB_head = torch::empty({b, L, H, N}, x.options()), dC_head = torch::empty({b, L, H, N}, x.options());
  auto dA_bh = torch::zeros({b, H}, x.options()), dD_bh = torch::zeros({b, H}, x.options());
  const float *dyp = dy.data_ptr<float>(), *xp = x.data_ptr<float>(), *dtp = dt.data_ptr<float>();
  const float *Ap = A.data_ptr<float>(), *Bp = B.data_ptr<float>(), *Cp = C.data_ptr<float>();
  const float *Dp = D.data_ptr<float>(), *sp = states.data_ptr<float>();
  float *dxp = dx.data_ptr<float>(), *ddtp = ddt.data_ptr<float>(), *dBp = dB_head.data_ptr<float>();
  float *dCp = dC_head.data_ptr<float>(), *dAp = dA_bh.data_ptr<float>(), *dDp = dD_bh.data_ptr<float>();
  at::parallel_for(0, b * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> dh(N * P), hk((K + 1) * N * P);  // dL/dh_t; the states of one block of K positions
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t bi = bh / H, hd = bh % H, g = hd / R;
      std::fill(dh.begin(), dh.end(), 0.f);
      float dA = 0.f, dD = 0.f;
      for (int64_t blk = L / K - 1; blk >= 0; --blk) {
        // hk[0]: the state before the block; hk[k + 1]: the state after its k-th position
        std::copy(sp + (bh * (L / K) + blk) * N * P, sp + (bh * (L / K) + blk + 1) * N * P, hk.begin());
        for (int64_t k = 0; k < K; ++k) {
          const int64_t t = blk * K + k;
          const float d = dtp[(bi * L + t) * H + hd], a = std::exp(d * Ap[hd]);
          const float *xr = xp + ((bi * L + t) * H + hd) * P, *Br = Bp + ((bi * L + t) * G + g) * N;
          const float *prev = hk.data() + k * N * P;
          float *cur = hk.data() + (k + 1) * N * P;
          for (int64_t n = 0; n < N; ++n) {
#pragma omp simd
            for (int64_t p = 0; p < P; ++p) cur[n * P + p] = a * prev[n * P + p] + d * xr[p] * Br[n];
          }
        }
        for (int64_t k = K - 1; k >= 0; --k) {
          const int64_t t = blk * K + k;
          const float d = dtp[(bi * L + t) * H + hd], a = std::exp(d * Ap[hd]);
          const float *xr = xp + ((bi * L + t) * H + hd) * P, *dyr = dyp + ((bi * L + t) * H + hd) * P;
          const float *Br = Bp + ((bi * L + t) * G + g) * N, *Cr = Cp + ((bi * L + t) * G + g) * N;
          const float *prev = hk.data() + k * N * P, *cur = hk.data() + (k + 1) * N * P;
          float *dBr = dBp + ((bi * L + t) * H + hd) * N, *dCr = dCp + ((bi * L + t) * H + hd) * N;
          float u[P], du[P], da_p[P];
          for (int64_t p = 0; p < P; ++p) { u[p] = d * xr[p]; du[p] = 0.f; da_p[p] = 0.f; dD += dyr[p] * xr[p]; }
          for (int64_t n = 0; n < N; ++n) {
            float dCn = 0.f, dBn = 0.f;
            float *dhr = dh.data() + n * P;
            const float *hr = cur + n * P, *pr = prev + n * P;
#pragma omp simd reduction(+ : dCn, dBn)
            for (int64_t p = 0; p < P; ++p) {
              const float gr = dhr[p] + Cr[n] * dyr[p];  // dL/dh_t: carried from t + 1 plus this read-out
              dCn += hr[p] * dyr[p];
              dBn += gr * u[p];
              du[p] += gr * Br[n];
              da_p[p] += gr * pr[p];
              dhr[p] = a * gr;  // becomes dL/dh_{t-1}
            }
            dCr[n] = dCn;
            dBr[n] = dBn;
          }
          float ddt_t = 0.f, da = 0.f;
          float *dxr = dxp + ((bi * L + t) * H + hd) * P;
          for (int64_t p = 0; p < P; ++p) {
            dxr[p] = Dp[hd] * dyr[p] + d * du[p];
            ddt_t += du[p] * xr[p];
            da += da_p[p];
          }
          ddtp[(bi * L + t) * H + hd] = ddt_t + da * a * Ap[hd];
          dA += da * a * d;
        }
      }
      dAp[bh] = dA;
      dDp[bh] = dD;
    }
  });
  return {dx, ddt, dA_bh.sum(0), dB_head.unflatten(2, {G, R}).sum(3), dC_head.unflatten(2, {G, R}).sum(3),
          dD_bh.sum(0)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused sequential SSD scan, forward");
  m.def("backward", &backward, "fused sequential SSD scan, backward");
}
