// CPU kernels for one decoding step at batch 1 (or a few rows), fp32: model.py's decode path calls them
// through moe_kernels/decode.py, which also holds the plain-torch meaning of each op.
//
// Why: decoding one token reads every weight once and does 2 flops per weight read, so it runs at the speed
// memory delivers the weights. Profiled eagerly on SmolLM2-135M at 1 thread (67 ms per token): MKL's
// batch-1 sgemv read the 538 MB at ~12.5 GB/s (43 ms), and the ~25 small torch ops per layer around it
// (norms, RoPE, masked attention over the whole cache, SwiGLU, the chosen experts' loop) took the rest.
// So every op here does a whole piece of a layer in one call (decode_layers: the whole step), and its
// matrix-vector products use matvec below, which reads each weight row from start to end with 4 vector
// accumulators, two rows far apart at a time (rows_in_streams says why; a standalone test over SmolLM2's weight
// shapes, one thread of this 2-core box: 4 or 8 adjacent rows at a time read slower, 13-20 GB/s). The weights
// also move to 2 MB pages (huge_page_pack).
//
// Ops (all tensors fp32 CPU; weights contiguous, as a model's are; T = rows of x, usually 1):
//   decode_linear    (x (T, d), norm_w (d,)?, eps, w (n, d))                         -> (T, n)  = norm(x) w^T
//   decode_swiglu    (x, norm_w?, eps, w_gate (h, d), w_up (h, d), w_down (d, h))     -> x + SwiGLU FFN(norm(x))
//   decode_experts   (x, ids (T, k), weights (T, k), gate_up (E, 2 d_e, d), down (E, d, d_e)) -> (T, d)
//   decode_moe       (x, norm_w?, eps, the gate's weights and bias, k, ..., gate_up, down, shared block?)
//                    -> x + MoE(norm(x)): routing + decode_experts + the shared SwiGLU
//   decode_attention (x (B, d), norm_w?, eps, wq, wk, wv, wo, cos (hd,), sin (hd,), cache_k, cache_v
//                     (B, Hkv, L, hd), pos (1,) int64) -> x + attention(norm(x)), writing the new key/value at pos
//   decode_layers    (x, every block's weights, ..., caches, pos, final norm, lm_head) -> logits (T, vocab): a whole step
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

// Rows r0..r1 visited as two interleaved runs: r0, r0 + m, r0 + 1, r0 + m + 1, ... (m = half the rows), then the odd
// one left. Why: one core reads memory as fast as its hardware prefetchers keep requests in flight, and they follow
// each sequential stream on its own, so two streams far apart keep about twice as many going. Measured on this box
// (one thread, a (49152, 576) matrix like SmolLM2's output layer, 2 MB pages): one stream 20.0-21.0 GB/s, two
// 23.7-24.8, three or four 22.5-27.1 (noisier). SwiGLU's gate and up rows are already two streams.
constexpr int64_t kStreams = 2;

template <class F>
void rows_in_streams(int64_t r0, int64_t r1, const F& row) {
  const int64_t m = (r1 - r0) / kStreams;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t s = 0; s < kStreams; ++s) row(r0 + s * m + r);
  for (int64_t r = r0 + kStreams * m; r < r1; ++r) row(r);
}

void matvec(const float* W, int64_t n, int64_t d, const float* X, int64_t T, float* Y) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t r0, int64_t r1) {
    rows_in_streams(r0, r1, [&](int64_t r) {
      for (int64_t t = 0; t < T; ++t) Y[t * n + r] = dot(W + r * d, X + t * d, d);
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Scratch memory: every buffer a step needs (normed rows, activations, scores, ...) is one of these, kept per
// thread and grown, never shrunk, so that after the first step decoding allocates nothing but its outputs. (With
// an allocation and a few dispatched tensor ops per buffer, a block cost ~15 us more: ~3% of an MoE's step.)
// Each buffer has one user at a time; worker threads get their slices from the pointer taken before the fork.
// ---------------------------------------------------------------------------------------------

enum Buf { kNormed, kBlockOut, kShared, kAct, kLogits, kOrder, kIds, kWeights, kQ, kK, kV, kHeads, kScores, kNumBufs };

template <class T>
T* scratch(Buf b, int64_t n) {
  thread_local std::vector<T> bufs[kNumBufs];
  auto& v = bufs[b];
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

// ---------------------------------------------------------------------------------------------
// The pieces of a block, on raw rows: x (T, d) contiguous, weights contiguous and already checked
// ---------------------------------------------------------------------------------------------

// out (T, d) = x / rms(x) * w per row, as model.RMSNorm computes it; a copy of x when w is null.
void rms_norm_rows(const float* x, const float* w, float eps, int64_t T, int64_t d, float* out) {
  if (!w) return (void)std::copy(x, x + T * d, out);
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * d;
    const float r = 1.f / std::sqrt(dot(xt, xt, d) / static_cast<float>(d) + eps);
    for (int64_t i = 0; i < d; ++i) out[t * d + i] = w[i] * (xt[i] * r);
  }
}

// y (T, d) = W_down (silu(W_gate x) * W_up x): the gate and up rows of one neuron are read together.
void swiglu_rows(const float* x, int64_t T, int64_t d, int64_t h, const float* wg, const float* wu, const float* wd,
                 float* y) {
  float* act = scratch<float>(kAct, T * h);  // silu(gate) * up, (T, h)
  at::parallel_for(0, h, grain_rows(2 * d), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t t = 0; t < T; ++t) act[t * h + i] = silu(dot(wg + i * d, x + t * d, d)) * dot(wu + i * d, x + t * d, d);
  });
  matvec(wd, d, h, act, T, y);
}

// y (T, d) = sum_j wts[t, j] * Expert_{ids[t, j]}(x[t]), ids (T, k) in range; gate_up (E, 2 d_e, d), down (E, d, d_e):
// only the chosen experts' rows are read. Two passes, one parallel region each: the activations (T*k, d_e) of every
// (token, expert) pair, then the down products, each thread on a block of output rows for every pair (an expert's
// rows are read in order).
void expert_rows(const float* x, int64_t T, int64_t d, const int64_t* ids, const float* wts, int64_t k,
                 const float* gate_up, const float* down, int64_t d_e, float* y) {
  const int64_t P = T * k;
  float* act = scratch<float>(kAct, P * d_e);  // pair p = t * k + j
  at::parallel_for(0, P * d_e, grain_rows(2 * d), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t p = q / d_e, i = q % d_e;
      const float* g_row = gate_up + (ids[p] * 2 * d_e + i) * d;  // row i of the expert's W_gate; W_up's is d_e rows on
      act[q] = silu(dot(g_row, x + (p / k) * d, d)) * dot(g_row + d_e * d, x + (p / k) * d, d);
    }
  });
  std::fill(y, y + T * d, 0.f);
  at::parallel_for(0, d, grain_rows(k * d_e), [&](int64_t r0, int64_t r1) {
    for (int64_t p = 0; p < P; ++p) {  // pairs in order: y[t] gets its k experts added j = 0, 1, ...
      const float* w_down = down + ids[p] * d * d_e;
      rows_in_streams(r0, r1, [&](int64_t r) { y[(p / k) * d + r] += wts[p] * dot(w_down + r * d_e, act + p * d_e, d_e); });
    }
  });
}

// One block's feed-forward half: routed experts (gate != null: an MoE block), plus a SwiGLU block (sw_gate != null:
// the dense FFN, or the MoE's always-on shared block, unscaled).
struct Ffn {
  const float* norm = nullptr;                                                                 // (d,) or null
  const float *gate = nullptr, *gate2 = nullptr, *bias = nullptr, *gate_up = nullptr, *down = nullptr;
  int64_t E = 0, d_e = 0, k = 0;
  bool unit_weights = false;
  float score_scale = 1.f;
  const float *sw_gate = nullptr, *sw_up = nullptr, *sw_down = nullptr;
  int64_t h = 0;
};

// model.MoEFeedForward.decode's routing (TopKGate.route in eval mode) of rows x (T, d): logits = W_gate x, or
// W_2 tanh(W_1 x) for the "mlp" gate; the k largest of logits + expert_bias, larger first, ties to the lower id;
// weights = softmax of the chosen unbiased logits, or 1 with unit_weights; times score_scale.
void route_rows(const Ffn& f, const float* x, int64_t T, int64_t d, int64_t* ids, float* wts) {
  const int64_t E = f.E, k = f.k;
  float* logits = scratch<float>(kLogits, 2 * T * E);
  matvec(f.gate, E, d, x, T, logits);
  if (f.gate2) {  // the "mlp" gate: Linear(d, E) -> tanh -> Linear(E, E)
    float* hidden = logits + T * E;
    for (int64_t i = 0; i < T * E; ++i) hidden[i] = std::tanh(logits[i]);
    matvec(f.gate2, E, E, hidden, T, logits);
  }
  int64_t* order = scratch<int64_t>(kOrder, E);
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order, order + k, order + E, [&](int64_t a, int64_t b) {
      const float va = l[a] + f.bias[a], vb = l[b] + f.bias[b];
      return va > vb || (va == vb && a < b);
    });
    float m = -INFINITY, sum = 0.f;
    for (int64_t j = 0; j < k; ++j) m = std::max(m, l[order[j]]);
    for (int64_t j = 0; j < k; ++j) sum += (wts[t * k + j] = std::exp(l[order[j]] - m));
    for (int64_t j = 0; j < k; ++j) {
      ids[t * k + j] = order[j];
      wts[t * k + j] = (f.unit_weights ? 1.f : wts[t * k + j] / sum) * f.score_scale;
    }
  }
}

// x (T, d) += FFN(norm(x)), the residual added as model.Block.decode adds it (one add per element).
void ffn_half(const Ffn& f, float eps, float* x, int64_t T, int64_t d) {
  float* xn = scratch<float>(kNormed, T * d);
  float* y = scratch<float>(kBlockOut, T * d);
  rms_norm_rows(x, f.norm, eps, T, d, xn);
  if (f.gate) {
    int64_t* ids = scratch<int64_t>(kIds, T * f.k);
    float* wts = scratch<float>(kWeights, T * f.k);
    route_rows(f, xn, T, d, ids, wts);
    expert_rows(xn, T, d, ids, wts, f.k, f.gate_up, f.down, f.d_e, y);
  }
  if (f.sw_gate) {
    float* s = f.gate ? scratch<float>(kShared, T * d) : y;
    swiglu_rows(xn, T, d, f.h, f.sw_gate, f.sw_up, f.sw_down, s);
    if (f.gate)
      for (int64_t i = 0; i < T * d; ++i) y[i] += s[i];
  }
  for (int64_t i = 0; i < T * d; ++i) x[i] = x[i] + y[i];
}

// One block's attention half: B rows, one new position each, at pos of a (B, Hkv, L, hd) cache.
struct Attn {
  const float *norm = nullptr, *wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
  int64_t H = 0, Hkv = 0, hd = 0, L = 0;
  float *cache_k = nullptr, *cache_v = nullptr;
};

// x (B, d) += attention(norm(x)): q, k, v projections, RoPE (rotate-half layout, as model.apply_rope), the new key
// and value written into the cache at pos, each query head attending over cached positions 0..pos only (the rest
// do not exist yet), the output projection.
void attention_half(const Attn& a, float eps, const float* cos, const float* sin, int64_t pos, float* x, int64_t B,
                    int64_t d) {
  const int64_t H = a.H, Hkv = a.Hkv, hd = a.hd, L = a.L;
  float* xn = scratch<float>(kNormed, B * d);
  rms_norm_rows(x, a.norm, eps, B, d, xn);
  float *q = scratch<float>(kQ, B * H * hd), *k = scratch<float>(kK, B * Hkv * hd), *v = scratch<float>(kV, B * Hkv * hd);
  matvec(a.wq, H * hd, d, xn, B, q);
  matvec(a.wk, Hkv * hd, d, xn, B, k);
  matvec(a.wv, Hkv * hd, d, xn, B, v);

  // RoPE on every head of q and k: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), halves hd/2 apart,
  // computed as apply_rope does (x * cos + rotate_half(x) * sin).
  const int64_t half = hd / 2;
  auto rope = [&](float* head) {
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = head[i], x2 = head[i + half];
      head[i] = x1 * cos[i] + (-x2) * sin[i];
      head[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
  };
  for (int64_t r = 0; r < B * H; ++r) rope(q + r * hd);
  for (int64_t r = 0; r < B * Hkv; ++r) {  // row r = (b, g): the cache's (b, g, pos, :)
    rope(k + r * hd);
    std::copy(k + r * hd, k + (r + 1) * hd, a.cache_k + (r * L + pos) * hd);
    std::copy(v + r * hd, v + (r + 1) * hd, a.cache_v + (r * L + pos) * hd);
  }

  // Query heads h = g * G .. g * G + G - 1 of row b attend with key/value head g (grouped-query attention,
  // G = H / Hkv): one task per (b, g), so each cached key and value row is read once for its G heads.
  const int64_t G = H / Hkv, n = pos + 1;
  float* heads = scratch<float>(kHeads, B * H * hd);  // the heads' outputs side by side, (B, H * hd)
  float* scores = scratch<float>(kScores, B * Hkv * G * n);  // per task: G heads' scores over positions 0..pos
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  at::parallel_for(0, B * Hkv, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)  // r = b * Hkv + g: query heads r * G.., cache rows (b, g)
      attend(q + r * G * hd, G, a.cache_k + r * L * hd, a.cache_v + r * L * hd, n, hd, scale, scores + r * G * n,
             heads + r * G * hd);
  });
  float* o = scratch<float>(kBlockOut, B * d);
  matvec(a.wo, d, H * hd, heads, B, o);
  for (int64_t i = 0; i < B * d; ++i) x[i] = x[i] + o[i];
}

// ---------------------------------------------------------------------------------------------
// Argument checks, once per op call: every tensor a float32 CPU one, weights contiguous, shapes that fit
// ---------------------------------------------------------------------------------------------

void check_f32(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// w's data, checked: float32 CPU, contiguous (a model's weights are), of the given shape (-1: any size there).
const float* weight(const at::Tensor& w, std::initializer_list<int64_t> shape, const char* op, const char* name) {
  check_f32(w, op, name);
  bool fits = w.dim() == static_cast<int64_t>(shape.size());
  for (int64_t i = 0; fits && i < w.dim(); ++i) fits = shape.begin()[i] < 0 || shape.begin()[i] == w.size(i);
  TORCH_CHECK(fits, op, ": ", name, " must have shape ", at::IntArrayRef(shape), " (-1: any), got ", w.sizes());
  TORCH_CHECK(w.is_contiguous(), op, ": ", name, " must be contiguous");
  return w.data_ptr<float>();
}

// d_e of an experts' gate_up weight (E, 2 d_e, d), checked to have that form.
int64_t expert_width(const at::Tensor& gate_up, const char* op) {
  TORCH_CHECK(gate_up.dim() == 3 && gate_up.size(1) % 2 == 0, op, ": gate_up must be (E, 2 d_e, d), got ",
              gate_up.sizes());
  return gate_up.size(1) / 2;
}

const float* norm_weight(const std::optional<at::Tensor>& w, int64_t d, const char* op) {
  return w ? weight(*w, {d}, op, "norm_weight") : nullptr;
}

// A contiguous fp32 (T, d) copy of x (T, d) or (T, 1, d): the residual stream the halves add into.
at::Tensor rows_copy(const at::Tensor& x, int64_t d, const char* op) {
  check_f32(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == d, op, ": x has ", x.size(-1), " features, the weights expect ", d);
  return x.reshape({-1, d}).clone(at::MemoryFormat::Contiguous);
}

Ffn ffn_weights(int64_t d, const std::optional<at::Tensor>& norm_w, const std::optional<at::Tensor>& gate_w,
                const std::optional<at::Tensor>& gate_w2, const std::optional<at::Tensor>& bias, int64_t k,
                bool unit_weights, double score_scale, const std::optional<at::Tensor>& gate_up,
                const std::optional<at::Tensor>& down, const std::optional<at::Tensor>& w_gate,
                const std::optional<at::Tensor>& w_up, const std::optional<at::Tensor>& w_down, const char* op) {
  TORCH_CHECK(gate_w || w_gate, op, ": a feed-forward needs routed experts, a SwiGLU block or both");
  Ffn f;
  f.norm = norm_weight(norm_w, d, op);
  if (gate_w) {
    TORCH_CHECK(bias && gate_up && down, op, ": routed experts need expert_bias, gate_up and down");
    f.d_e = expert_width(*gate_up, op), f.E = gate_up->size(0), f.k = k;
    TORCH_CHECK(1 <= k && k <= f.E, op, ": k = ", k, " must be in 1..", f.E);
    f.gate_up = weight(*gate_up, {f.E, 2 * f.d_e, d}, op, "gate_up");
    f.down = weight(*down, {f.E, d, f.d_e}, op, "down");
    f.gate = weight(*gate_w, {f.E, d}, op, "gate_weight");
    f.gate2 = gate_w2 ? weight(*gate_w2, {f.E, f.E}, op, "gate_weight2") : nullptr;
    f.bias = weight(*bias, {f.E}, op, "expert_bias");
    f.unit_weights = unit_weights, f.score_scale = static_cast<float>(score_scale);
  }
  if (w_gate) {
    TORCH_CHECK(w_up && w_down, op, ": a SwiGLU block needs all three weights");
    f.h = w_gate->dim() == 2 ? w_gate->size(0) : -1;
    f.sw_gate = weight(*w_gate, {f.h, d}, op, "w_gate");
    f.sw_up = weight(*w_up, {f.h, d}, op, "w_up");
    f.sw_down = weight(*w_down, {d, f.h}, op, "w_down");
  }
  return f;
}

// The attention weights and caches checked against each other, x's width d and its B rows; pos read and checked.
Attn attn_weights(int64_t d, int64_t B, const std::optional<at::Tensor>& norm_w, const at::Tensor& wq,
                  const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& wo, const at::Tensor& cache_k,
                  const at::Tensor& cache_v, const char* op) {
  check_f32(cache_k, op, "cache_k"), check_f32(cache_v, op, "cache_v");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() && cache_k.is_contiguous() &&
              cache_v.is_contiguous(), op, ": the caches must be contiguous (B, Hkv, L, hd), got ", cache_k.sizes());
  Attn a;
  a.Hkv = cache_k.size(1), a.L = cache_k.size(2), a.hd = cache_k.size(3);
  TORCH_CHECK(cache_k.size(0) == B, op, ": x has ", B, " rows but the cache ", cache_k.size(0));
  TORCH_CHECK(a.hd % 2 == 0 && wq.dim() == 2 && wq.size(0) % a.hd == 0 && (wq.size(0) / a.hd) % a.Hkv == 0, op,
              ": wq ", wq.sizes(), " does not fit a cache of ", cache_k.sizes());
  a.H = wq.size(0) / a.hd;
  a.norm = norm_weight(norm_w, d, op);
  a.wq = weight(wq, {a.H * a.hd, d}, op, "wq");
  a.wk = weight(wk, {a.Hkv * a.hd, d}, op, "wk");
  a.wv = weight(wv, {a.Hkv * a.hd, d}, op, "wv");
  a.wo = weight(wo, {d, a.H * a.hd}, op, "wo");
  a.cache_k = cache_k.data_ptr<float>(), a.cache_v = cache_v.data_ptr<float>();
  return a;
}

int64_t position(const at::Tensor& pos, const at::Tensor& cos, const at::Tensor& sin, const Attn& a, const char* op) {
  TORCH_CHECK(pos.numel() == 1 && pos.device().is_cpu() && pos.scalar_type() == at::kLong, op,
              ": pos must be a one-element int64 CPU tensor");
  const int64_t p = *pos.data_ptr<int64_t>();
  TORCH_CHECK(0 <= p && p < a.L, op, ": pos ", p, " is outside the cache's ", a.L, " positions");
  check_f32(cos, op, "cos"), check_f32(sin, op, "sin");
  TORCH_CHECK(cos.numel() == a.hd && sin.numel() == a.hd && cos.is_contiguous() && sin.is_contiguous(), op,
              ": cos and sin must be contiguous and hold hd = ", a.hd, " values");
  return p;
}

// ---------------------------------------------------------------------------------------------
// The ops
// ---------------------------------------------------------------------------------------------

at::Tensor decode_linear(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                         const at::Tensor& w_in) {
  const char* op = "decode_linear";
  const float* w = weight(w_in, {-1, -1}, op, "w");
  const int64_t n = w_in.size(0), d = w_in.size(1);
  auto x = rows_copy(x_in, d, op);
  const int64_t T = x.size(0);
  float* xn = scratch<float>(kNormed, T * d);
  rms_norm_rows(x.data_ptr<float>(), norm_weight(norm_w, d, op), static_cast<float>(eps), T, d, xn);
  auto y = at::empty({T, n}, x.options());
  matvec(w, n, d, xn, T, y.data_ptr<float>());
  return y;
}

at::Tensor ffn_op(const at::Tensor& x_in, double eps, const Ffn& f, const char* op) {
  auto x = rows_copy(x_in, x_in.size(-1), op);
  ffn_half(f, static_cast<float>(eps), x.data_ptr<float>(), x.size(0), x.size(1));
  return x.view(x_in.sizes());
}

at::Tensor decode_swiglu(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                         const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down) {
  const char* op = "decode_swiglu";
  return ffn_op(x_in, eps, ffn_weights(x_in.size(-1), norm_w, {}, {}, {}, 0, false, 1.0, {}, {}, w_gate, w_up, w_down, op), op);
}

at::Tensor decode_moe(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                      const at::Tensor& gate_w, const std::optional<at::Tensor>& gate_w2, const at::Tensor& bias,
                      int64_t k, bool unit_weights, double score_scale, const at::Tensor& gate_up,
                      const at::Tensor& down, const std::optional<at::Tensor>& shared_gate,
                      const std::optional<at::Tensor>& shared_up, const std::optional<at::Tensor>& shared_down) {
  const char* op = "decode_moe";
  return ffn_op(x_in, eps, ffn_weights(x_in.size(-1), norm_w, gate_w, gate_w2, bias, k, unit_weights, score_scale,
                                       gate_up, down, shared_gate, shared_up, shared_down, op), op);
}

at::Tensor decode_experts(const at::Tensor& x_in, const at::Tensor& ids_in, const at::Tensor& weights_in,
                          const at::Tensor& gate_up_in, const at::Tensor& down_in) {
  const char* op = "decode_experts";
  const int64_t d_e = expert_width(gate_up_in, op), E = gate_up_in.size(0), d = gate_up_in.size(2);
  const float* gu = weight(gate_up_in, {E, 2 * d_e, d}, op, "gate_up");
  const float* wd = weight(down_in, {E, d, d_e}, op, "down");
  auto x = rows_copy(x_in, d, op);
  const int64_t T = x.size(0);
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
  auto y = at::empty({T, d}, x.options());
  expert_rows(x.data_ptr<float>(), T, d, idp, wts.data_ptr<float>(), ids.size(1), gu, wd, d_e, y.data_ptr<float>());
  return y;
}

at::Tensor decode_attention(const at::Tensor& x_in, const std::optional<at::Tensor>& norm_w, double eps,
                            const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv, const at::Tensor& wo,
                            const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache_k, at::Tensor& cache_v,
                            const at::Tensor& pos) {
  const char* op = "decode_attention";
  TORCH_CHECK(wq.dim() == 2, op, ": wq must be (H * hd, d), got ", wq.sizes());
  const int64_t d = wq.size(1);
  auto x = rows_copy(x_in, d, op);
  const Attn a = attn_weights(d, x.size(0), norm_w, wq, wk, wv, wo, cache_k, cache_v, op);
  const int64_t p = position(pos, cos, sin, a, op);
  attention_half(a, static_cast<float>(eps), cos.data_ptr<float>(), sin.data_ptr<float>(), p, x.data_ptr<float>(),
                 x.size(0), d);
  return x.view(x_in.sizes());
}

// A whole decoding step after the embedding, in one call: every block (attention_half, then ffn_half on the same
// residual rows), the final norm and the output layer -> logits (B, vocab). As separate ops each half cost ~20 us
// of Python and dispatching around it: ~1.2 ms per token for SmolLM2-135M's 60 halves, ~4% of its step.
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
  const char* op = "decode_layers";
  const int64_t L = static_cast<int64_t>(weights.size()) / kLayerSlots;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kLayerSlots && static_cast<int64_t>(top_k.size()) == L &&
              static_cast<int64_t>(unit_weights.size()) == L && static_cast<int64_t>(score_scale.size()) == L &&
              static_cast<int64_t>(caches.size()) == 2 * L, op, ": need ", kLayerSlots, " weights, one top_k, "
              "unit_weights and score_scale and two caches per block; got ", weights.size(), " weights, ",
              top_k.size(), ", ", unit_weights.size(), ", ", score_scale.size(), " and ", caches.size(), " caches");
  const float* head = weight(lm_head, {-1, -1}, op, "lm_head");
  const int64_t d = lm_head.size(1), vocab = lm_head.size(0);
  auto x = rows_copy(x_in, d, op);  // (B, d): the residual stream
  const int64_t B = x.size(0);
  float* xp = x.data_ptr<float>();
  auto w = [&](int64_t l, Slot s) -> std::optional<at::Tensor> { return weights.get(l * kLayerSlots + s); };
  auto need = [&](int64_t l, Slot s) -> at::Tensor {
    auto t = w(l, s);
    TORCH_CHECK(t, op, ": block ", l, " lacks weight slot ", static_cast<int>(s));
    return *t;
  };
  for (int64_t l = 0; l < L; ++l) {
    const Attn a = attn_weights(d, B, w(l, kAttnNorm), need(l, kWq), need(l, kWk), need(l, kWv), need(l, kWo),
                                caches[2 * l], caches[2 * l + 1], op);
    const int64_t p = position(pos, cos, sin, a, op);
    attention_half(a, static_cast<float>(eps), cos.data_ptr<float>(), sin.data_ptr<float>(), p, xp, B, d);
    const Ffn f = ffn_weights(d, w(l, kFfnNorm), w(l, kGate), w(l, kGate2), w(l, kBias), top_k[l], unit_weights[l] != 0,
                              score_scale[l], w(l, kGateUp), w(l, kDown), w(l, kSwiGate), w(l, kSwiUp), w(l, kSwiDown), op);
    ffn_half(f, static_cast<float>(eps), xp, B, d);
  }
  float* xn = scratch<float>(kNormed, B * d);
  rms_norm_rows(xp, final_norm ? weight(*final_norm, {d}, op, "final_norm") : nullptr, static_cast<float>(eps), B, d, xn);
  auto logits = at::empty({B, vocab}, x.options());
  matvec(head, vocab, d, xn, B, logits.data_ptr<float>());
  return logits;
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
