// CPU kernels for one decoding step at batch 1 (or a few rows), fp32: model.py's decode path calls them
// through moe_kernels/decode.py, which also holds the plain-torch meaning of each op.
//
// Why: decoding one token reads every weight once and does 2 flops per weight read, so it runs at the speed
// memory delivers the weights. Profiled eagerly on SmolLM2-135M at 1 thread (67 ms per token): MKL's
// batch-1 sgemv read the 538 MB at ~12.5 GB/s (43 ms), and the ~25 small torch ops per layer around it
// (norms, RoPE, masked attention over the whole cache, SwiGLU, the chosen experts' loop) took the rest.
// So every op here does a whole piece of a layer in one call, and its matrix-vector products use matvec
// below, which reads each weight row from start to end with 4 vector accumulators (a standalone test over
// SmolLM2's weight shapes, one thread of this 2-core box: 20-22 GB/s, against 13-15 GB/s for 4 rows at a time
// and 17-20 for 8: one sequential stream beats several). The weights also move to 2 MB pages (huge_page_pack).
//
// Ops (all tensors fp32 CPU; weights any layout, made contiguous; T = rows of x, usually 1):
//   decode_linear    (x (T, d), norm_w (d,)?, eps, w (n, d))                         -> (T, n)  = norm(x) w^T
//   decode_swiglu    (x, norm_w?, eps, w_gate (h, d), w_up (h, d), w_down (d, h))     -> x + SwiGLU FFN(norm(x))
//   decode_experts   (x, ids (T, k), weights (T, k), gate_up (E, 2 d_e, d), down (E, d, d_e)) -> (T, d)
//   decode_moe       (x, norm_w?, eps, the gate's weights and bias, k, ..., gate_up, down, shared block?)
//                    -> x + MoE(norm(x)): routing + decode_experts + the shared SwiGLU
//   decode_attention (x (B, d), norm_w?, eps, wq, wk, wv, wo, cos (hd,), sin (hd,), cache_k, cache_v
//                     (B, Hkv, L, hd), pos (1,) int64) -> x + attention(norm(x)), writing the new key/value at pos
//   huge_page_pack   (ts) -> contiguous copies of ts in one mapping backed by 2 MB pages (Linux), see its comment
// norm_w given: x is first RMS-normalised and scaled by it (the block's RMSNorm), else used as it is. The three
// block halves (swiglu, moe, attention) add their input back (the residual connection) and keep x's shape.
//
// Rounding: sums run in a different order than torch's (and with fused multiply-adds where the CPU has
// them), so results agree with the reference to fp32 rounding, not bit for bit. -ffp-contract=off (the
// whole extension's flag) does not stop the explicit _mm256_fmadd_ps below.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>  // mmap, madvise
#endif
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))  // target attributes are GCC/Clang's
#include <immintrin.h>
#define LLAMA_MOE_X86 1
#endif

namespace {

// ---------------------------------------------------------------------------------------------
// Dot products and axpy: AVX2 + FMA when the CPU has them (checked once at run time), else plain C++.
// ---------------------------------------------------------------------------------------------

float dot_plain(const float* w, const float* x, int64_t n) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;  // four independent sums: no wait on the previous add
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += w[i] * x[i], s1 += w[i + 1] * x[i + 1], s2 += w[i + 2] * x[i + 2], s3 += w[i + 3] * x[i + 3];
  }
  for (; i < n; ++i) s0 += w[i] * x[i];
  return (s0 + s1) + (s2 + s3);
}

void axpy_plain(float a, const float* v, float* out, int64_t n) {  // out += a * v
  for (int64_t i = 0; i < n; ++i) out[i] += a * v[i];
}

#ifdef LLAMA_MOE_X86
__attribute__((target("avx2,fma"))) float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 -> 4
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                           // 4 -> 2
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));                                       // 2 -> 1
  return _mm_cvtss_f32(s);
}

// 32 floats per iteration into 4 accumulators: an FMA takes 4-5 cycles, so one accumulator would make
// every iteration wait for the last; four keep the loads streaming.
__attribute__((target("avx2,fma"))) float dot_avx2(const float* w, const float* x, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += w[i] * x[i];  // the last n % 8
  return s;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float a, const float* v, float* out, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  for (; i < n; ++i) out[i] += a * v[i];
}

// LLAMA_MOE_DECODE_PLAIN=1 (read once) takes the plain C++ loops even here: the tests run them that way.
bool have_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::getenv("LLAMA_MOE_DECODE_PLAIN") == nullptr;
  return ok;
}
#endif

float dot(const float* w, const float* x, int64_t n) {
#ifdef LLAMA_MOE_X86
  if (have_avx2_fma()) return dot_avx2(w, x, n);
#endif
  return dot_plain(w, x, n);
}

void axpy(float a, const float* v, float* out, int64_t n) {
#ifdef LLAMA_MOE_X86
  if (have_avx2_fma()) return axpy_avx2(a, v, out, n);
#endif
  axpy_plain(a, v, out, n);
}

float silu(float g) { return g / (1.f + std::exp(-g)); }

// Softmax of each of the G rows of s (G, n), in place.
void softmax_rows(float* s, int64_t G, int64_t n) {
  for (int64_t h = 0; h < G; ++h) {
    float* row = s + h * n;
    const float m = *std::max_element(row, row + n);
    float sum = 0.f;
    for (int64_t j = 0; j < n; ++j) sum += (row[j] = std::exp(row[j] - m));
    for (int64_t j = 0; j < n; ++j) row[j] /= sum;
  }
}

// G query heads q (G, hd) that share one key/value head attend over its n positions K, V (n, hd):
// out (G, hd) = softmax(q K^T * scale) V; s is (G, n) scratch. Position by position, so that each key and value
// row, once loaded, serves all G heads.
void attend_plain(const float* q, int64_t G, const float* K, const float* V, int64_t n, int64_t hd, float scale,
                  float* s, float* out) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < G; ++h) s[h * n + j] = dot(q + h * hd, K + j * hd, hd) * scale;
  softmax_rows(s, G, n);
  std::fill(out, out + G * hd, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t h = 0; h < G; ++h) axpy(s[h * n + j], V + j * hd, out + h * hd, hd);
}

#ifdef LLAMA_MOE_X86
// The same with the head dimension in 8-float vectors (hd % 8 == 0, as every LLaMA's): no call per position,
// two accumulators per score.
__attribute__((target("avx2,fma"))) void attend_avx2(const float* q, int64_t G, const float* K, const float* V,
                                                     int64_t n, int64_t hd, float scale, float* s, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float* k = K + j * hd;
    for (int64_t h = 0; h < G; ++h) {
      const float* qh = q + h * hd;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t i = 0;
      for (; i + 16 <= hd; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(k + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i + 8), _mm256_loadu_ps(k + i + 8), a1);
      }
      if (i < hd) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + i), _mm256_loadu_ps(k + i), a0);
      s[h * n + j] = hsum(_mm256_add_ps(a0, a1)) * scale;
    }
  }
  softmax_rows(s, G, n);
  std::fill(out, out + G * hd, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float* v = V + j * hd;
    for (int64_t h = 0; h < G; ++h) {
      const __m256 p = _mm256_set1_ps(s[h * n + j]);
      float* o = out + h * hd;
      for (int64_t i = 0; i < hd; i += 8)
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(v + i), _mm256_loadu_ps(o + i)));
    }
  }
}
#endif

void attend(const float* q, int64_t G, const float* K, const float* V, int64_t n, int64_t hd, float scale,
            float* s, float* out) {
#ifdef LLAMA_MOE_X86
  if (have_avx2_fma() && hd % 8 == 0) return attend_avx2(q, G, K, V, n, hd, scale, s, out);
#endif
  attend_plain(q, G, K, V, n, hd, scale, s, out);
}

// ---------------------------------------------------------------------------------------------
// matvec: Y[t, r] = W[r] . X[t] for T rows of X, W (n, d) contiguous. Row r's weights are read once and
// used for every t (they stay in L1 between t's). Threads take blocks of rows; a block holds ~64 KB of
// weights so that a small matrix is not cut finer than a thread's fork/join is worth.
// ---------------------------------------------------------------------------------------------

int64_t grain_rows(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

void matvec(const float* W, int64_t n, int64_t d, const float* X, int64_t T, float* Y) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t t = 0; t < T; ++t) Y[t * n + r] = dot(W + r * d, X + t * d, d);
  });
}

// ---------------------------------------------------------------------------------------------
// Argument checks and the optional RMSNorm
// ---------------------------------------------------------------------------------------------

void check_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// A contiguous fp32 (T, d) copy of x, RMS-normalised as model.RMSNorm does (x / rms(x) * norm_w) if
// norm_w is given; x (T, d) or (T, 1, d).
at::Tensor normed_rows(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                       int64_t d, const char* op) {
  check_f32(x_in, op, "x");
  TORCH_CHECK(x_in.size(-1) == d, op, ": x has ", x_in.size(-1), " features, the weights expect ", d);
  auto x = x_in.reshape({-1, d}).contiguous();
  if (!norm_w) return x;
  check_f32(*norm_w, op, "norm_weight");
  TORCH_CHECK(norm_w->numel() == d, op, ": norm_weight must have ", d, " entries");
  auto w = norm_w->contiguous();
  auto out = at::empty_like(x);
  const float* wp = w.data_ptr<float>();
  for (int64_t t = 0; t < x.size(0); ++t) {
    const float* xp = x.data_ptr<float>() + t * d;
    float* op_ = out.data_ptr<float>() + t * d;
    const float r = 1.f / std::sqrt(dot(xp, xp, d) / static_cast<float>(d) + static_cast<float>(eps));
    for (int64_t i = 0; i < d; ++i) op_[i] = wp[i] * (xp[i] * r);
  }
  return out;
}

// x_in + y, shaped like x_in: the residual connection around a block's half (y (T, d) contiguous). One add, as
// model.Block.decode's own, so the rounding is the same.
at::Tensor plus_residual(const at::Tensor& x_in, at::Tensor y) {
  auto x = x_in.reshape({-1, y.size(1)}).contiguous();
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < y.numel(); ++i) yp[i] = xp[i] + yp[i];
  return y.view(x_in.sizes());
}

at::Tensor weight(const at::Tensor& w, int64_t dim, const char* op, const char* name) {
  check_f32(w, op, name);
  TORCH_CHECK(w.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ", w.sizes());
  return w.contiguous();
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

at::Tensor decode_linear(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                         const at::Tensor& w_in) {
  auto w = weight(w_in, 2, "decode_linear", "w");
  auto x = normed_rows(x_in, norm_w, eps, w.size(1), "decode_linear");
  auto y = at::empty({x.size(0), w.size(0)}, x.options());
  matvec(w.data_ptr<float>(), w.size(0), w.size(1), x.data_ptr<float>(), x.size(0), y.data_ptr<float>());
  return y;
}

// y (T, d) = W_down (silu(W_gate x) * W_up x) for x (T, d) contiguous: the gate and up rows of one neuron are
// read together, and the hidden activations (T, h) never leave this function.
at::Tensor swiglu(const at::Tensor& x, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd) {
  const int64_t h = wg.size(0), d = wg.size(1), T = x.size(0);
  auto act = at::empty({T, h}, x.options());  // silu(gate) * up, (T, h)
  const float *xp = x.data_ptr<float>(), *gp = wg.data_ptr<float>(), *up = wu.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  at::parallel_for(0, h, grain_rows(2 * d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t t = 0; t < T; ++t)
        ap[t * h + i] = silu(dot(gp + i * d, xp + t * d, d)) * dot(up + i * d, xp + t * d, d);
  });
  auto y = at::empty({T, d}, x.options());
  matvec(wd.data_ptr<float>(), d, h, ap, T, y.data_ptr<float>());
  return y;
}

void check_swiglu(const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd, const char* op) {
  TORCH_CHECK(wu.sizes() == wg.sizes() && wd.size(0) == wg.size(1) && wd.size(1) == wg.size(0), op, ": need w_gate, "
              "w_up (h, d) and w_down (d, h); got ", wg.sizes(), ", ", wu.sizes(), ", ", wd.sizes());
}

// y (T, d) = sum_j weights[t, j] * Expert_{ids[t, j]}(x[t]) for x (T, d) contiguous, ids and weights (T, k)
// contiguous, ids in range: only the chosen experts' rows are read. Two passes, one parallel region each: the
// activations a (T*k, d_e) of every (token, expert) pair, then the down products, each thread on a block of
// output rows for every pair (an expert's rows are read in order).
at::Tensor experts(const at::Tensor& x, const int64_t* idp, const float* wp, int64_t k, const at::Tensor& gu,
                   const at::Tensor& wd) {
  const int64_t T = x.size(0), d = x.size(1), d_e = wd.size(2), P = T * k;
  auto act = at::empty({P, d_e}, x.options());  // pair p = t * k + j
  const float *xp = x.data_ptr<float>(), *gup = gu.data_ptr<float>(), *wdp = wd.data_ptr<float>();
  float* ap = act.data_ptr<float>();
  at::parallel_for(0, P * d_e, grain_rows(2 * d), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t p = q / d_e, i = q % d_e;
      const float* g_row = gup + (idp[p] * 2 * d_e + i) * d;  // row i of expert's W_gate; W_up's is d_e rows on
      ap[q] = silu(dot(g_row, xp + (p / k) * d, d)) * dot(g_row + d_e * d, xp + (p / k) * d, d);
    }
  });
  auto y = at::zeros({T, d}, x.options());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, d, grain_rows(k * d_e), [&](int64_t r0, int64_t r1) {
    for (int64_t p = 0; p < P; ++p) {  // pairs in order: y[t] gets its k experts added j = 0, 1, ...
      const float* w_down = wdp + idp[p] * d * d_e;
      for (int64_t r = r0; r < r1; ++r) yp[(p / k) * d + r] += wp[p] * dot(w_down + r * d_e, ap + p * d_e, d_e);
    }
  });
  return y;
}

void check_experts(const at::Tensor& gu, const at::Tensor& wd, const char* op) {
  TORCH_CHECK(gu.size(1) % 2 == 0 && wd.size(0) == gu.size(0) && wd.size(1) == gu.size(2) && wd.size(2) == gu.size(1) / 2,
              op, ": need gate_up (E, 2 d_e, d) and down (E, d, d_e); got ", gu.sizes(), " and ", wd.sizes());
}

at::Tensor decode_experts(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in,
                          const at::Tensor& gate_up_in, const at::Tensor& down_in) {
  const char* op = "decode_experts";
  auto gu = weight(gate_up_in, 3, op, "gate_up"), wd = weight(down_in, 3, op, "down");
  check_experts(gu, wd, op);
  auto x = normed_rows(x_in, std::nullopt, 0.0, gu.size(2), op);
  const int64_t T = x.size(0), E = gu.size(0);
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == T && ids_in.device().is_cpu() &&
              (ids_in.scalar_type() == at::kLong || ids_in.scalar_type() == at::kInt), op,
              ": ids must be a (T, k) int64/int32 CPU tensor with one row per row of x, got ", ids_in.sizes());
  check_f32(weights_in, op, "weights");
  TORCH_CHECK(weights_in.sizes() == ids_in.sizes(), op, ": weights must have the shape of ids, (T, k)");
  auto ids = ids_in.to(at::kLong).contiguous();
  auto wts = weights_in.contiguous();
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t p = 0; p < ids.numel(); ++p)  // an id out of range would read outside the weights
    TORCH_CHECK(0 <= idp[p] && idp[p] < E, op, ": expert id ", idp[p], " is not in [0, ", E, ")");
  return experts(x, idp, wts.data_ptr<float>(), ids.size(1), gu, wd);
}

// The routed experts of model.MoEFeedForward.decode on rows x (T, d), already normed: the gate's eval-mode routing
// (logits = W_gate x, or W_2 tanh(W_1 x) for the "mlp" gate; the k largest of logits + expert_bias, larger first,
// ties to the lower id; weights = softmax of the chosen unbiased logits, or 1 with unit_weights; times score_scale),
// then the chosen experts -> (T, d).
at::Tensor routed_experts(const at::Tensor& x, const at::Tensor& gate_w_in, const std::optional<at::Tensor>& gate_w2_in,
                          const at::Tensor& bias_in, int64_t k, bool unit_weights, double score_scale,
                          const at::Tensor& gu, const at::Tensor& wd, const char* op) {
  const int64_t E = gu.size(0), d = gu.size(2), T = x.size(0);
  auto gw = weight(gate_w_in, 2, op, "gate_weight");
  TORCH_CHECK(gw.size(0) == E && gw.size(1) == d, op, ": gate_weight must be (E, d) = (", E, ", ", d, ")");
  TORCH_CHECK(1 <= k && k <= E, op, ": k = ", k, " must be in 1..", E);
  auto bias = weight(bias_in, 1, op, "expert_bias");
  TORCH_CHECK(bias.size(0) == E, op, ": expert_bias must have E = ", E, " entries");
  auto logits = at::empty({T, E}, x.options());
  matvec(gw.data_ptr<float>(), E, d, x.data_ptr<float>(), T, logits.data_ptr<float>());
  if (gate_w2_in) {  // the "mlp" gate: Linear(d, E) -> tanh -> Linear(E, E)
    auto gw2 = weight(*gate_w2_in, 2, op, "gate_weight2");
    TORCH_CHECK(gw2.size(0) == E && gw2.size(1) == E, op, ": gate_weight2 must be (E, E)");
    auto hidden = logits.tanh();
    matvec(gw2.data_ptr<float>(), E, E, hidden.data_ptr<float>(), T, logits.data_ptr<float>());
  }
  std::vector<int64_t> ids(T * k);
  std::vector<float> wts(T * k);
  std::vector<int64_t> order(E);
  const float *lp = logits.data_ptr<float>(), *bp = bias.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    const float* l = lp + t * E;
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t b) {
      const float va = l[a] + bp[a], vb = l[b] + bp[b];
      return va > vb || (va == vb && a < b);
    });
    float m = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < k; ++j) m = std::max(m, l[order[j]]);
    for (int64_t j = 0; j < k; ++j) sum += (wts[t * k + j] = std::exp(l[order[j]] - m));
    for (int64_t j = 0; j < k; ++j) {
      ids[t * k + j] = order[j];
      wts[t * k + j] = (unit_weights ? 1.f : wts[t * k + j] / sum) * static_cast<float>(score_scale);
    }
  }
  return experts(x, ids.data(), wts.data(), k, gu, wd);
}

// A block's feed-forward half, x + FFN(norm(x)): the routed experts when gate_w is given (an MoE layer), plus a
// SwiGLU block when w_gate is given (the dense FFN, or the MoE's always-on shared block, unscaled). One op
// instead of ~20 small ones.
at::Tensor ffn_half(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                    const std::optional<at::Tensor>& gate_w, const std::optional<at::Tensor>& gate_w2,
                    const std::optional<at::Tensor>& bias, int64_t k, bool unit_weights, double score_scale,
                    const std::optional<at::Tensor>& gate_up_in, const std::optional<at::Tensor>& down_in,
                    const std::optional<at::Tensor>& w_gate, const std::optional<at::Tensor>& w_up,
                    const std::optional<at::Tensor>& w_down, const char* op) {
  TORCH_CHECK(gate_w || w_gate, op, ": a feed-forward needs routed experts, a SwiGLU block or both");
  const int64_t d = x_in.size(-1);
  auto x = normed_rows(x_in, norm_w, eps, d, op);
  std::optional<at::Tensor> y;
  if (gate_w) {
    TORCH_CHECK(bias && gate_up_in && down_in, op, ": routed experts need expert_bias, gate_up and down");
    auto gu = weight(*gate_up_in, 3, op, "gate_up"), wd = weight(*down_in, 3, op, "down");
    check_experts(gu, wd, op);
    TORCH_CHECK(gu.size(2) == d, op, ": x has ", d, " features, the experts expect ", gu.size(2));
    y = routed_experts(x, *gate_w, gate_w2, *bias, k, unit_weights, score_scale, gu, wd, op);
  }
  if (w_gate) {
    TORCH_CHECK(w_up && w_down, op, ": a SwiGLU block needs all three weights");
    auto wg = weight(*w_gate, 2, op, "w_gate"), wu = weight(*w_up, 2, op, "w_up"), wdn = weight(*w_down, 2, op, "w_down");
    check_swiglu(wg, wu, wdn, op);
    TORCH_CHECK(wg.size(1) == d, op, ": x has ", d, " features, the SwiGLU block expects ", wg.size(1));
    auto s = swiglu(x, wg, wu, wdn);
    y = y ? y->add_(s) : s;
  }
  return plus_residual(x_in, *y);
}

at::Tensor decode_swiglu(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                         const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down) {
  return ffn_half(x_in, norm_w, eps, {}, {}, {}, 0, false, 1.0, {}, {}, w_gate, w_up, w_down, "decode_swiglu");
}

at::Tensor decode_moe(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                      const at::Tensor& gate_w, const std::optional<at::Tensor>& gate_w2, const at::Tensor& bias,
                      int64_t k, bool unit_weights, double score_scale, const at::Tensor& gate_up,
                      const at::Tensor& down, const std::optional<at::Tensor>& shared_gate,
                      const std::optional<at::Tensor>& shared_up, const std::optional<at::Tensor>& shared_down) {
  return ffn_half(x_in, norm_w, eps, gate_w, gate_w2, bias, k, unit_weights, score_scale, gate_up, down, shared_gate,
                  shared_up, shared_down, "decode_moe");
}

// Attention for one new position per row: q, k, v projections, RoPE (rotate-half layout, as model.apply_rope),
// the new key and value written into the cache at pos, attention of each query head over cached positions
// 0..pos only (the rest do not exist yet), the output projection, and the residual x added.
at::Tensor decode_attention(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                            const at::Tensor& wq_in, const at::Tensor& wk_in, const at::Tensor& wv_in,
                            const at::Tensor& wo_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                            at::Tensor& cache_k, at::Tensor& cache_v, const at::Tensor& pos_t) {
  const char* op = "decode_attention";
  auto wq = weight(wq_in, 2, op, "wq"), wk = weight(wk_in, 2, op, "wk"), wv = weight(wv_in, 2, op, "wv");
  auto wo = weight(wo_in, 2, op, "wo");
  check_f32(cache_k, op, "cache_k"), check_f32(cache_v, op, "cache_v");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() && cache_k.is_contiguous() &&
              cache_v.is_contiguous(), op, ": the caches must be contiguous (B, Hkv, L, hd), got ", cache_k.sizes());
  const int64_t d = wq.size(1), B = cache_k.size(0), Hkv = cache_k.size(1), L = cache_k.size(2), hd = cache_k.size(3);
  const int64_t H = wq.size(0) / hd;
  TORCH_CHECK(hd % 2 == 0 && wq.size(0) == H * hd && H % Hkv == 0 && wk.size(0) == Hkv * hd && wv.sizes() == wk.sizes()
              && wk.size(1) == d && wo.size(0) == d && wo.size(1) == H * hd, op, ": weight shapes ", wq.sizes(), ", ",
              wk.sizes(), ", ", wv.sizes(), ", ", wo.sizes(), " do not fit a cache of ", cache_k.sizes());
  check_f32(cos_in, op, "cos"), check_f32(sin_in, op, "sin");
  TORCH_CHECK(cos_in.numel() == hd && sin_in.numel() == hd, op, ": cos and sin must hold hd = ", hd, " values");
  TORCH_CHECK(pos_t.numel() == 1 && pos_t.device().is_cpu() && pos_t.scalar_type() == at::kLong, op,
              ": pos must be a one-element int64 CPU tensor");
  const int64_t pos = pos_t.item<int64_t>();
  TORCH_CHECK(0 <= pos && pos < L, op, ": pos ", pos, " is outside the cache's ", L, " positions");
  auto x = normed_rows(x_in, norm_w, eps, d, op);
  TORCH_CHECK(x.size(0) == B, op, ": x has ", x.size(0), " rows but the cache ", B);
  auto cos = cos_in.contiguous(), sin = sin_in.contiguous();

  auto q = at::empty({B, H * hd}, x.options()), k = at::empty({B, Hkv * hd}, x.options());
  auto v = at::empty({B, Hkv * hd}, x.options());
  matvec(wq.data_ptr<float>(), H * hd, d, x.data_ptr<float>(), B, q.data_ptr<float>());
  matvec(wk.data_ptr<float>(), Hkv * hd, d, x.data_ptr<float>(), B, k.data_ptr<float>());
  matvec(wv.data_ptr<float>(), Hkv * hd, d, x.data_ptr<float>(), B, v.data_ptr<float>());

  // RoPE on every head of q and k: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves hd/2 apart,
  // computed as apply_rope does (x * cos + rotate_half(x) * sin).
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t half = hd / 2;
  auto rope = [&](float* head) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = head[i], x2 = head[i + half];
      head[i] = x1 * cp[i] + (-x2) * sp[i];
      head[i + half] = x2 * cp[i + half] + x1 * sp[i + half];
    }
  };
  float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  for (int64_t r = 0; r < B * H; ++r) rope(qp + r * hd);
  float *ck = cache_k.data_ptr<float>(), *cv = cache_v.data_ptr<float>();
  for (int64_t r = 0; r < B * Hkv; ++r) {  // row r = (b, g): the cache's (b, g, pos, :)
    rope(kp + r * hd);
    std::copy(kp + r * hd, kp + (r + 1) * hd, ck + (r * L + pos) * hd);
    std::copy(vp + r * hd, vp + (r + 1) * hd, cv + (r * L + pos) * hd);
  }

  // Query heads h = g * G .. g * G + G - 1 of row b attend with key/value head g (grouped-query attention,
  // G = H / Hkv): one task per (b, g), so each cached key and value row is read once for its G heads.
  auto y = at::empty({B, H * hd}, x.options());  // the heads' outputs side by side, (B, H * hd)
  float* yp = y.data_ptr<float>();
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t G = H / Hkv, n = pos + 1;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> s(G * n);  // scores, then weights, of positions 0..pos for each of the G heads
    for (int64_t r = r0; r < r1; ++r)  // r = b * Hkv + g: query heads r * G.., cache rows (b, g)
      attend(qp + r * G * hd, G, ck + r * L * hd, cv + r * L * hd, n, hd, scale, s.data(), yp + r * G * hd);
  });
  auto o = at::empty({B, d}, x.options());
  matvec(wo.data_ptr<float>(), d, H * hd, yp, B, o.data_ptr<float>());
  return plus_residual(x_in, o);
}

// A whole decoding step after the embedding, in one call: every block (decode_attention, then ffn_half), the final
// norm and the output layer -> logits (B, vocab). Per-call costs (the Python around an op, the dispatcher) were
// ~20 us an op, ~1.5 ms per token for SmolLM2-135M's 60 ops: ~6% of its decoding step.
// weights: kLayerSlots entries per block, in the order below (absent ones None); top_k, unit_weights, score_scale:
// one entry per block (read for MoE blocks only); caches: (cache_k, cache_v) per block, written at pos.
constexpr int64_t kLayerSlots = 14;
enum Slot { kAttnNorm, kWq, kWk, kWv, kWo, kFfnNorm,            // the attention half, the FFN's RMSNorm
            kGate, kGate2, kBias, kGateUp, kDown,              // routed experts (an MoE block), else None
            kSwiGate, kSwiUp, kSwiDown };                      // the dense FFN, or the MoE's shared block, or None

at::Tensor decode_layers(const at::Tensor& x_in, const c10::List<std::optional<at::Tensor>>& weights,
                         at::IntArrayRef top_k, at::IntArrayRef unit_weights, at::ArrayRef<double> score_scale,
                         double eps, const at::Tensor& cos, const at::Tensor& sin, at::TensorList caches,
                         const at::Tensor& pos, const std::optional<at::Tensor>& final_norm, const at::Tensor& lm_head) {
  const int64_t L = static_cast<int64_t>(weights.size()) / kLayerSlots;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kLayerSlots && static_cast<int64_t>(top_k.size()) == L &&
              static_cast<int64_t>(unit_weights.size()) == L && static_cast<int64_t>(score_scale.size()) == L &&
              static_cast<int64_t>(caches.size()) == 2 * L, "decode_layers: need ", kLayerSlots, " weights, one "
              "top_k, unit_weights and score_scale and two caches per block; got ", weights.size(), " weights, ",
              top_k.size(), ", ", unit_weights.size(), ", ", score_scale.size(), " and ", caches.size(), " caches");
  auto w = [&](int64_t l, Slot s) -> std::optional<at::Tensor> { return weights.get(l * kLayerSlots + s); };
  auto need = [&](int64_t l, Slot s) -> at::Tensor {
    auto t = w(l, s);
    TORCH_CHECK(t, "decode_layers: block ", l, " lacks weight slot ", static_cast<int>(s));
    return *t;
  };
  at::Tensor x = x_in;
  for (int64_t l = 0; l < L; ++l) {
    at::Tensor ck = caches[2 * l], cv = caches[2 * l + 1];
    x = decode_attention(x, w(l, kAttnNorm), eps, need(l, kWq), need(l, kWk), need(l, kWv), need(l, kWo), cos, sin,
                         ck, cv, pos);
    x = ffn_half(x, w(l, kFfnNorm), eps, w(l, kGate), w(l, kGate2), w(l, kBias), top_k[l], unit_weights[l] != 0,
                 score_scale[l], w(l, kGateUp), w(l, kDown), w(l, kSwiGate), w(l, kSwiUp), w(l, kSwiDown),
                 "decode_layers");
  }
  return decode_linear(x, final_norm, eps, lm_head);
}

// Contiguous copies of tensors ts, back to back (each start 64-byte aligned) in one mapping that is 2 MB aligned and
// advised as transparent huge pages (Linux; elsewhere plain copies). Why: the weights are read once per token,
// front to back. With 4 KB pages the CPU's hardware prefetcher stops at every page boundary (it works on physical
// addresses) and every page costs a TLB miss; with 2 MB pages it streams on. Measured on this 2-core box, one
// thread, SmolLM2-135M's weight shapes: ~18.5 GB/s on 4 KB pages, ~21 GB/s on 2 MB pages. Packing one block's
// weights together, in the order a decoding step reads them, wastes at most one partly used 2 MB page per pack
// (one per tensor wasted ~1.5 MB for each of SmolLM2's 442 KB k and v weights). The mapping goes back (munmap)
// when the last of its tensors is freed.
std::vector<at::Tensor> huge_page_pack(at::TensorList ts) {
  std::vector<at::Tensor> src, out;
  std::vector<size_t> offset;
  size_t bytes = 0;
  for (const auto& t : ts) {
    src.push_back(t.contiguous());
    offset.push_back(bytes);
    bytes += (src.back().nbytes() + 63) / 64 * 64;
  }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t size = std::max<size_t>(1, (bytes + kHuge - 1) / kHuge) * kHuge;
  // Map one huge page more than needed, then unmap the ends so that what is left starts on a 2 MB boundary.
  char* raw = static_cast<char*>(mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  TORCH_CHECK(raw != MAP_FAILED, "huge_page_pack: mmap of ", size + kHuge, " bytes failed");
  char* p = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(raw) + kHuge - 1) & ~(uintptr_t{kHuge} - 1));
  if (p > raw) munmap(raw, p - raw);
  if (raw + kHuge > p) munmap(p + size, raw + kHuge - p);
  madvise(p, size, MADV_HUGEPAGE);  // advice only: without huge pages available the copies still work
  std::shared_ptr<void> mapping(p, [size](void* q) { munmap(q, size); });  // each tensor below holds a share
  for (size_t i = 0; i < src.size(); ++i) {
    std::memcpy(p + offset[i], src[i].data_ptr(), src[i].nbytes());
    out.push_back(at::from_blob(p + offset[i], src[i].sizes(), [mapping](void*) {}, src[i].options()));
  }
#else
  for (const auto& t : src) out.push_back(t.clone());
#endif
  return out;
}

}  // namespace

// Schemas spelled out (not inferred) so that decode_attention can declare that it writes the caches, and
// so that moe_kernels/decode.py can register shape-only ("fake") versions that torch.compile traces.
TORCH_LIBRARY_FRAGMENT(llama_moe_cpu, m) {
  m.def("decode_linear(Tensor x, Tensor? norm_weight, float eps, Tensor w) -> Tensor");
  m.def("decode_swiglu(Tensor x, Tensor? norm_weight, float eps, Tensor w_gate, Tensor w_up, Tensor w_down) -> Tensor");
  m.def("decode_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor");
  m.def("decode_moe(Tensor x, Tensor? norm_weight, float eps, Tensor gate_weight, Tensor? gate_weight2, "
        "Tensor expert_bias, int k, bool unit_weights, float score_scale, Tensor gate_up, Tensor down, "
        "Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down) -> Tensor");
  m.def("huge_page_pack(Tensor[] ts) -> Tensor[]");
  m.def("decode_layers(Tensor x, Tensor?[] weights, int[] top_k, int[] unit_weights, float[] score_scale, float eps, "
        "Tensor cos, Tensor sin, Tensor(a!)[] caches, Tensor pos, Tensor? final_norm, Tensor lm_head) -> Tensor");
  m.def("decode_attention(Tensor x, Tensor? norm_weight, float eps, Tensor wq, Tensor wk, Tensor wv, Tensor wo, "
        "Tensor cos, Tensor sin, Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor pos) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_moe_cpu, CPU, m) {
  m.impl("decode_linear", &decode_linear);
  m.impl("decode_swiglu", &decode_swiglu);
  m.impl("decode_experts", &decode_experts);
  m.impl("decode_moe", &decode_moe);
  m.impl("huge_page_pack", &huge_page_pack);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_layers", &decode_layers);
}
