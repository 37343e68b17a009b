// CPU kernels for permute / unpermute (SPEC.md §7), same meaning as kernels/reference.py.
//
// Both operations are pure memory movement, so the only goal is to touch every byte once:
//   permute   : counting sort of the P = T*k expert ids (histogram + prefix scan, stable), then one
//               row copy straight into its grouped position.
//   unpermute : one pass per token that reads its k rows and writes the weighted sum once.
// Parallelism is at::parallel_for (torch's own OpenMP pool, so it obeys torch.set_num_threads).
// Big output buffers come from empty_cached, a small cache of blocks that stay mapped (performance
// appendix at the end of this file); kernels/experts_cpu.cpp uses it as well.
//
// Built just in time by kernels/ops.py, which validates arguments with friendly messages; the ops are
// also reachable directly as torch.ops.llama_moe_cpu.<name>, so every assumption the loops make (CPU
// tensors, shapes, k >= 1, ids and rows in range) is checked again here with TORCH_CHECK: a bad
// argument is an error, never a read or write outside a buffer. The value checks are serial passes over
// the P ids (8 bytes each), small next to the row copies (d * element size bytes each).
// Registered with TORCH_LIBRARY (no pybind11: the build is much faster).

// Only the headers used (not ATen/ATen.h, which pulls in every operator): halves the build time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>  // madvise
#endif
#if defined(__SSE2__)
#include <emmintrin.h>  // _mm_stream_si128: every x86-64 CPU has it
#endif

namespace llama_moe {
// Uninitialised CPU tensor; big blocks are recycled (see the performance appendix at the end of this file).
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype);
}  // namespace llama_moe

namespace {

using llama_moe::empty_cached;

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------
void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device(),
              " (kernels/ops.py sends CUDA tensors to the CUDA backend)");
}

// unpermute_fwd / unpermute_bwd: y_perm (P, d), row_map (P,) int64 with rows in [0, P), scores (T, k) or
// absent, P = T * top_k.
void check_unpermute_args(const char* op, const at::Tensor& y_perm, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& scores, int64_t top_k) {
  check_cpu(y_perm, op, "y_perm");
  check_cpu(row_map, op, "row_map");
  TORCH_CHECK(top_k >= 1, op, ": top_k must be >= 1, got ", top_k);
  TORCH_CHECK(row_map.dim() == 1 && row_map.scalar_type() == at::kLong && row_map.is_contiguous(), op,
              ": row_map must be a contiguous (P,) int64 tensor");
  const int64_t P = row_map.numel();
  TORCH_CHECK(P % top_k == 0, op, ": row_map has ", P, " entries, not a multiple of top_k = ", top_k);
  TORCH_CHECK(y_perm.dim() == 2 && y_perm.is_contiguous() && y_perm.size(0) == P, op,
              ": y_perm must be a contiguous (P, d) tensor with P = row_map.numel() = ", P, ", got ",
              y_perm.sizes());
  if (scores.has_value()) {
    check_cpu(*scores, op, "scores");
    TORCH_CHECK(scores->dim() == 2 && scores->size(0) * scores->size(1) == P && scores->size(1) == top_k, op,
                ": scores must be (T, top_k) = (", P / top_k, ", ", top_k, "), got ", scores->sizes());
    TORCH_CHECK(at::isFloatingType(scores->scalar_type()), op, ": scores must be a float tensor");
  }
  const int64_t* rm = row_map.const_data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(rm[p] >= 0 && rm[p] < P, op, ": row_map[", p, "] = ", rm[p], " lies outside [0, ", P, ")");
}

// fp32 sums for bf16/fp16 rows, fp64 for fp64: same rule as reference.accumulation_dtype.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// ---------------------------------------------------------------------------------------------
// Row stores that bypass the cache.
// A plain store to a cache line that is not cached first reads the line in (read-for-ownership), so
// writing a buffer too big for the cache moves its bytes twice. Streaming (non-temporal) stores write
// around the cache; glibc's memcpy switches to them for big copies, which is why one tensor.copy_ of
// 32 MiB beats 16k memcpys of 2 KiB rows. Used when the whole output is big (kStreamBytes); a small
// output is better left in cache for the next op to read. Other CPUs (ARM) take the memcpy path.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kStreamBytes = int64_t(4) << 20;

inline void store_row(void* dst, const void* src, size_t bytes, bool stream) {
#if defined(__SSE2__)
  if (stream && reinterpret_cast<uintptr_t>(dst) % 16 == 0 && bytes % 16 == 0) {
    auto* out = static_cast<__m128i*>(dst);
    const auto* in = static_cast<const __m128i*>(src);
    for (size_t i = 0; i < bytes / 16; ++i) _mm_stream_si128(out + i, _mm_loadu_si128(in + i));
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Streaming stores are weakly ordered: fence them before the parallel region hands the buffer on.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------------------------
// Grouping: pair p -> row of the expert-grouped buffer, stable, by counting sort.
//
// The P pairs are cut into C chunks. Pass 1 counts experts per chunk. A prefix scan in (expert, chunk)
// order then gives every (chunk, expert) its first row: expert e's rows start after all rows of
// experts < e, and chunk c's share of expert e after the shares of chunks < c. Pass 2 walks each chunk
// in pair order and hands out consecutive rows, so token order is kept inside every expert (stable),
// exactly like torch.argsort(stable=True) in the reference.
// Only pass 2 (which also copies the rows) runs in parallel: pass 1 reads 8 bytes per pair against the
// 2 KiB row copy per pair of pass 2, far less than what a second fork/join would cost on a busy machine.
// ---------------------------------------------------------------------------------------------
template <typename id_t, typename Body>
void counting_sort_rows(const id_t* ids, int64_t P, int64_t E, int64_t* row_map, int64_t* counts,
                        Body&& per_pair) {
  // A few chunks per thread balances the load; at least 1024 pairs each keeps the scan tiny.
  const int64_t max_chunks = std::max<int64_t>(1, (P + 1023) / 1024);
  const int64_t C = std::min<int64_t>(max_chunks, 4 * at::get_num_threads());
  const int64_t chunk = (P + C - 1) / std::max<int64_t>(C, 1);
  std::vector<int64_t> start(C * E, 0);  // (C, E): pass 1 counts, after the scan first rows

  for (int64_t p = 0; p < P; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    TORCH_CHECK(e >= 0 && e < E, "permute_fwd: expert_ids[", p, "] = ", e, " lies outside [0, ", E, ")");
    start[(p / chunk) * E + e] += 1;
  }

  int64_t running = 0;  // exclusive scan, expert-major: (e=0,c=0), (e=0,c=1), ..., (e=1,c=0), ...
  for (int64_t e = 0; e < E; ++e) {
    const int64_t before = running;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t n = start[c * E + e];
      start[c * E + e] = running;
      running += n;
    }
    counts[e] = running - before;
  }

  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cursor = start.data() + c * E;  // this chunk's next free row per expert
      const int64_t end = std::min(P, (c + 1) * chunk);
      for (int64_t p = c * chunk; p < end; ++p) {
        const int64_t row = cursor[ids[p]]++;
        row_map[p] = row;
        per_pair(p, row);  // the row copy happens here, while the cache line of ids is hot
      }
    }
    stream_fence();
  });
}

// permute: x (T, d), expert_ids (T, k) -> x_perm (T*k, d), row_map (T*k,) int64, counts (E,) int64
std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_fwd(const at::Tensor& x, const at::Tensor& expert_ids,
                                                           int64_t num_experts) {
  check_cpu(x, "permute_fwd", "x");
  check_cpu(expert_ids, "permute_fwd", "expert_ids");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "permute_fwd: x must be a contiguous (T, d) tensor");
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.is_contiguous(), "permute_fwd: expert_ids must be a contiguous (T, k) tensor");
  const int64_t T = expert_ids.size(0), k = expert_ids.size(1), P = T * k, d = x.size(1);
  TORCH_CHECK(k >= 1, "permute_fwd: expert_ids must have k >= 1 columns, got ", k);
  TORCH_CHECK(num_experts >= 1, "permute_fwd: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(x.size(0) == T, "permute_fwd: x has ", x.size(0), " rows but expert_ids has ", T);

  auto x_perm = empty_cached({P, d}, x.scalar_type());
  auto row_map = at::empty({P}, x.options().dtype(at::kLong));
  auto counts = at::empty({num_experts}, x.options().dtype(at::kLong));
  const int64_t row_bytes = d * static_cast<int64_t>(x.element_size());
  const char* src = static_cast<const char*>(x.const_data_ptr());
  char* dst = static_cast<char*>(x_perm.data_ptr());

  // x_perm[row_map[p]] = x[p // k]: one row copy per pair, any dtype (bytes are bytes).
  const bool stream = P * row_bytes >= kStreamBytes;
  auto copy_row = [&](int64_t p, int64_t row) {
    store_row(dst + row * row_bytes, src + (p / k) * row_bytes, row_bytes, stream);
  };
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "permute_fwd", [&] {
    counting_sort_rows(expert_ids.const_data_ptr<index_t>(), P, num_experts, row_map.data_ptr<int64_t>(),
                       counts.data_ptr<int64_t>(), copy_row);
  });
  return {x_perm, row_map, counts};
}

// unpermute: out[t] = sum_j s[t, j] * y_perm[row_map[t*k + j]]   (s = 1 when scores is absent)
//
// The k rows of a token are read side by side, kBlock elements at a time, rather than one whole row
// after the other: k memory streams in flight at once instead of one (measured 1.4x faster on the 2-core
// box). Every element still gets the same operations in the same order as reference.unpermute_fwd: a
// product rounded to acc_t, then additions j = 0, 1, ..., k-1 (built with -ffp-contract=off, so no fused
// multiply-add sneaks in; a missing score is a weight of exactly 1, and 1 * v == v).
constexpr int64_t kBlock = 64;

template <typename scalar_t>
void unpermute_rows(const scalar_t* y, const int64_t* row_map, const typename Acc<scalar_t>::type* s,
                    scalar_t* out, int64_t T, int64_t k, int64_t d) {
  using acc_t = typename Acc<scalar_t>::type;
  const bool stream = T * d * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  // Grain of 16 tokens: enough work per task that the OpenMP split costs nothing.
  at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(d);  // the token's sum, kept in L1, stored once
    std::vector<scalar_t> rounded(std::is_same_v<acc_t, scalar_t> ? 0 : d);
    std::vector<const scalar_t*> rows(k);
    std::vector<acc_t> w(k);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < k; ++j) {
        rows[j] = y + row_map[t * k + j] * d;
        w[j] = s == nullptr ? acc_t(1) : s[t * k + j];
      }
      for (int64_t i0 = 0; i0 < d; i0 += kBlock) {
        const int64_t i1 = std::min(d, i0 + kBlock);
        acc_t* __restrict a = acc.data();
        const scalar_t* __restrict r0 = rows[0];
        for (int64_t i = i0; i < i1; ++i) a[i] = w[0] * static_cast<acc_t>(r0[i]);
        for (int64_t j = 1; j < k; ++j) {
          const scalar_t* __restrict r = rows[j];
          const acc_t wj = w[j];
          for (int64_t i = i0; i < i1; ++i) a[i] += wj * static_cast<acc_t>(r[i]);
        }
      }
      const void* result = acc.data();
      if constexpr (!std::is_same_v<acc_t, scalar_t>) {  // bf16/fp16: round once, at the end
        for (int64_t i = 0; i < d; ++i) rounded[i] = static_cast<scalar_t>(acc[i]);
        result = rounded.data();
      }
      store_row(out + t * d, result, d * sizeof(scalar_t), stream);
    }
    stream_fence();
  });
}

at::Tensor unpermute_fwd(const at::Tensor& y_perm, const at::Tensor& row_map, const std::optional<at::Tensor>& scores,
                         int64_t top_k) {
  check_unpermute_args("unpermute_fwd", y_perm, row_map, scores, top_k);
  const int64_t P = row_map.numel(), T = P / top_k, d = y_perm.size(1);
  auto out = empty_cached({T, d}, y_perm.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "unpermute_fwd", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    at::Tensor s;  // scores converted once to the accumulation dtype, (T, k)
    if (scores.has_value()) s = scores->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    unpermute_rows<scalar_t>(y_perm.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int64_t>(),
                             s.defined() ? s.const_data_ptr<acc_t>() : nullptr, out.data_ptr<scalar_t>(), T, top_k, d);
  });
  return out;
}

// Dot product of two rows in acc_t. Eight independent partial sums: the compiler may not reorder a
// single running sum (that would change the rounding), but it can turn eight of them into SIMD lanes.
template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* __restrict a, const scalar_t* __restrict b, int64_t d) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int u = 0; u < 8; ++u) part[u] += static_cast<acc_t>(a[i + u]) * static_cast<acc_t>(b[i + u]);
  for (; i < d; ++i) part[0] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Backward of unpermute, one pass over the pairs (row_map is a bijection, so every pair owns its row):
//   grad_y[row_map[p]] = s[p] * grad_out[p // k]           -- a weighted permute of grad_out
//   grad_s[p]          = <grad_out[p // k], y[row_map[p]]> -- dot products, accumulated in acc_t
std::tuple<at::Tensor, at::Tensor> unpermute_bwd(const at::Tensor& grad_out, const at::Tensor& y_perm,
                                                 const at::Tensor& row_map, const std::optional<at::Tensor>& scores,
                                                 int64_t top_k, bool need_y, bool need_scores) {
  check_unpermute_args("unpermute_bwd", y_perm, row_map, scores, top_k);
  check_cpu(grad_out, "unpermute_bwd", "grad_out");
  const int64_t P = row_map.numel(), k = top_k, d = y_perm.size(1);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.dim() == 2 && grad_out.size(0) == P / k && grad_out.size(1) == d &&
              grad_out.scalar_type() == y_perm.scalar_type(),
              "unpermute_bwd: grad_out must be a contiguous (T, d) = (", P / k, ", ", d, ") tensor of y_perm's dtype, got ",
              grad_out.sizes(), " ", grad_out.scalar_type());
  need_scores = need_scores && scores.has_value();
  auto grad_y = need_y ? empty_cached(y_perm.sizes(), y_perm.scalar_type()) : at::empty({0}, y_perm.options());
  const auto score_opts = scores.has_value() ? scores->options() : y_perm.options();
  at::Tensor grad_s = at::empty({0}, score_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "unpermute_bwd", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor s;  // (T, k) in acc_t
    if (scores.has_value()) s = scores->to(acc_type).contiguous();
    at::Tensor gs = need_scores ? at::empty({P}, y_perm.options().dtype(acc_type)) : at::Tensor();
    const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* y = y_perm.const_data_ptr<scalar_t>();
    const int64_t* rm = row_map.const_data_ptr<int64_t>();
    const acc_t* sp = s.defined() ? s.const_data_ptr<acc_t>() : nullptr;
    scalar_t* gy = need_y ? grad_y.data_ptr<scalar_t>() : nullptr;
    acc_t* gsp = need_scores ? gs.data_ptr<acc_t>() : nullptr;

    const bool stream = P * d * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
    at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> scaled(d);  // s[p] * grad_out row, built in L1 then stored once
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* __restrict gt = g + (p / k) * d;
        const int64_t row = rm[p];
        if (gy != nullptr) {
          const scalar_t* src = gt;
          if (sp != nullptr) {
            const acc_t w = sp[p];
            for (int64_t i = 0; i < d; ++i) scaled[i] = static_cast<scalar_t>(w * static_cast<acc_t>(gt[i]));
            src = scaled.data();
          }
          store_row(gy + row * d, src, d * sizeof(scalar_t), stream);
        }
        if (gsp != nullptr) gsp[p] = dot<scalar_t, acc_t>(gt, y + row * d, d);
      }
      stream_fence();
    });
    if (need_scores) grad_s = gs.view(scores->sizes()).to(scores->scalar_type());
  });
  return {grad_y, grad_s};
}

}  // namespace

// experts_cpu.cpp adds its ops to the same namespace with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(llama_moe_cpu, m) {
  m.def("permute_fwd", &permute_fwd);
  m.def("unpermute_fwd", &unpermute_fwd);
  m.def("unpermute_bwd", &unpermute_bwd);
  m.def("empty_cached", &llama_moe::empty_cached);
}

namespace llama_moe {

// =============================================================================================
// Performance appendix: buffers that stay mapped (empty_cached, also used by experts_cpu.cpp, hence the
// named namespace). Correctness does not depend on it: at::empty would give the same results, slower.
//
// A fresh multi-megabyte CPU tensor is not free: glibc serves it with mmap, and the first write to every
// 4 KiB page traps into the kernel, which zeroes the page. glibc keeps freed blocks for reuse only below its
// mmap threshold, which tops out at 32 MiB, and the (T*k, d) row buffers of the MoE layer sit right there
// (4096 * 4 * 512 fp32 = 32 MiB exactly, plus a header). Measured on the 2-core box: clone() of such a
// buffer took 3-4x as long as copy_ into an existing one. So the big row buffers (permute's output, the
// expert activations and the row gradients) come from this small cache of blocks that stay mapped: the CPU
// counterpart of the CUDA caching allocator. A block returns here when its last tensor dies.
// ---------------------------------------------------------------------------------------------
constexpr size_t kMinCachedBytes = size_t(1) << 20;  // smaller: glibc's own free lists already reuse them
constexpr size_t kBlockRound = size_t(2) << 20;      // sizes rounded up to 2 MiB (one huge page), so near
                                                     // sizes share a block
constexpr size_t kMaxIdleBytes = size_t(2) << 30;    // idle blocks beyond 2 GiB go back to the system

struct BlockCache {
  std::mutex mutex;
  std::unordered_multimap<size_t, void*> idle;  // bytes -> block
  size_t idle_bytes = 0;
};

BlockCache& block_cache() {
  static auto* cache = new BlockCache();  // never destroyed: tensors may die after static destructors ran
  return *cache;
}

void release_block(void* ptr, size_t bytes) {
  auto& cache = block_cache();
  {
    std::lock_guard<std::mutex> lock(cache.mutex);
    if (cache.idle_bytes + bytes <= kMaxIdleBytes) {
      cache.idle.emplace(bytes, ptr);
      cache.idle_bytes += bytes;
      return;
    }
  }
  std::free(ptr);
}

// Uninitialised CPU tensor of `sizes`; blocks of 1 MiB and more are recycled through the cache.
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype);
  size_t bytes = c10::elementSize(dtype);
  for (const int64_t s : sizes) bytes *= static_cast<size_t>(s);
  if (bytes < kMinCachedBytes) return at::empty(sizes, options);
  bytes = (bytes + kBlockRound - 1) / kBlockRound * kBlockRound;
  void* ptr = nullptr;
  {
    auto& cache = block_cache();
    std::lock_guard<std::mutex> lock(cache.mutex);
    const auto it = cache.idle.find(bytes);
    if (it != cache.idle.end()) {
      ptr = it->second;
      cache.idle.erase(it);
      cache.idle_bytes -= bytes;
    }
  }
  if (ptr == nullptr) {
    ptr = std::aligned_alloc(kBlockRound, bytes);
    TORCH_CHECK(ptr != nullptr, "empty_cached: out of memory allocating ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Ask for 2 MiB pages: rows are gathered from all over these buffers, and with 4 KiB pages nearly
    // every 2 KiB row would be a TLB miss. Only a hint; it is ignored where huge pages are off.
    madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(ptr, sizes, [bytes](void* p) { release_block(p, bytes); }, options);
}

}  // namespace llama_moe
