// CUDA kernels for permute / unpermute (SPEC.md §7), same meaning as kernels/reference.py.
//
// Grouping without a sort. On an H100 a stable torch.sort of 16k expert ids was measured to take about as
// long as the whole row gather it prepares, so the pairs are grouped by a counting sort instead:
//   1. rank_in_chunk_kernel: pairs are cut into chunks of CHUNK; every pair learns its stable rank among
//      the pairs of its chunk that chose the same expert, and the last such pair writes the chunk's count
//      for that expert into chunk_counts (E, C).
//   2. a prefix scan (at::cumsum) over chunk_counts in expert-major order gives every (expert, chunk)
//      its first row in the grouped buffer; the row sums give the per-expert counts.
//   3. permute_rows_kernel: row = start[expert, chunk] + rank; copy x[p // k] to x_perm[row].
// Row copies use the widest access the row size and pointer alignment allow (16 bytes when they can:
// fp32 x4, bf16/fp16 x8), one warp per row, so a warp moves 512 bytes per instruction.
// Sums run in fp32 (fp64 for fp64 rows); built with --fmad=false so fp32 results equal reference.py.
//
// Built just in time by kernels/ops.py, only when torch.cuda.is_available(); called from Python as
// torch.ops.llama_moe_cuda.<name>. The host functions check every tensor's device, shape and dtype and
// that k >= 1 (TORCH_CHECK, an error). Values (expert ids in [0, E), row_map in [0, P)) are checked by
// kernels/ops.py before the call: checking them here would need a host sync per call.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: that one needs the cuBLAS/cuSPARSE headers
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace {

constexpr int CHUNK = 256;         // pairs per block in the grouping kernel
constexpr int WARPS_PER_BLOCK = 8;  // row kernels: one warp per row, 8 rows per block

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

// ---------------------------------------------------------------------------------------------
// 1. Stable rank of each pair inside its chunk, and per-chunk expert counts.
// Every thread scans the chunk's ids in shared memory; all threads read the same s_ids[i] at the same
// time (a shared-memory broadcast, no bank conflicts). CHUNK^2 compares per block is a few microseconds,
// and it needs no shared histogram, so any number of experts works.
// ---------------------------------------------------------------------------------------------
template <typename id_t>
__global__ void rank_in_chunk_kernel(const id_t* __restrict__ ids, int64_t P, int64_t num_chunks,
                                     int32_t* __restrict__ rank, int64_t* __restrict__ chunk_counts) {
  __shared__ int64_t s_ids[CHUNK];
  const int64_t chunk = blockIdx.x;
  const int tid = threadIdx.x;
  const int64_t p = chunk * CHUNK + tid;
  const int64_t e = p < P ? static_cast<int64_t>(ids[p]) : -1;  // -1: padding past the last pair
  s_ids[tid] = e;
  __syncthreads();
  int32_t before = 0;  // earlier pairs of this chunk with the same expert (the stable rank)
  bool last = true;    // no later pair of this chunk has the same expert
  for (int i = 0; i < CHUNK; ++i) {
    const bool same = s_ids[i] == e;
    before += (same && i < tid);
    last = last && !(same && i > tid);
  }
  if (p < P) {
    rank[p] = before;
    if (last) chunk_counts[e * num_chunks + chunk] = before + 1;  // (E, C) layout: expert-major
  }
}

// ---------------------------------------------------------------------------------------------
// Widest copy unit for a row: 16, 8, 4 or 2 bytes, limited by the row size and both base pointers.
// ---------------------------------------------------------------------------------------------
inline int copy_width(int64_t row_bytes, const void* a, const void* b) {
  const auto addr = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (int w : {16, 8, 4}) {
    if (row_bytes % w == 0 && addr % w == 0) return w;
  }
  return 2;  // every supported dtype is at least 2 bytes wide
}

template <int W> struct Word;  // a W-byte plain type the hardware moves in one access
template <> struct Word<16> { using type = uint4; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<2> { using type = uint16_t; };

// 3. permute: x_perm[start[e, chunk] + rank[p]] = x[p // k], one warp per pair.
template <typename id_t, typename word_t>
__global__ void permute_rows_kernel(const word_t* __restrict__ x, const id_t* __restrict__ ids,
                                    const int32_t* __restrict__ rank, const int64_t* __restrict__ chunk_start,
                                    int64_t P, int64_t k, int64_t num_chunks, int64_t words_per_row,
                                    word_t* __restrict__ x_perm, int64_t* __restrict__ row_map) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.y;
  if (p >= P) return;
  const int64_t e = static_cast<int64_t>(ids[p]);
  const int64_t row = chunk_start[e * num_chunks + p / CHUNK] + rank[p];
  if (threadIdx.x == 0) row_map[p] = row;
  const word_t* src = x + (p / k) * words_per_row;
  word_t* dst = x_perm + row * words_per_row;
  for (int64_t i = threadIdx.x; i < words_per_row; i += 32) dst[i] = src[i];
}

// A pack of VEC values moved as one aligned access (VEC = 16 bytes / element size when aligned).
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// unpermute: out[t] = sum_j s[t, j] * y[row_map[t*k + j]], one warp per token. s == nullptr means all ones.
template <typename scalar_t, int VEC>
__global__ void unpermute_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ row_map,
                                 const typename Acc<scalar_t>::type* __restrict__ s, int64_t T, int64_t k,
                                 int64_t d, scalar_t* __restrict__ out) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.y;
  if (t >= T) return;
  const int64_t packs = d / VEC;
  for (int64_t i = threadIdx.x; i < packs; i += 32) {
    acc_t acc[VEC];
    for (int64_t j = 0; j < k; ++j) {
      const pack_t in = reinterpret_cast<const pack_t*>(y + row_map[t * k + j] * d)[i];
      const acc_t w = s == nullptr ? acc_t(1) : s[t * k + j];
#pragma unroll
      for (int u = 0; u < VEC; ++u) {
        const acc_t v = static_cast<acc_t>(in.v[u]);
        // same operations as reference.py: first term s0*y0 (or y0), then += s_j*y_j
        const acc_t term = s == nullptr ? v : w * v;
        acc[u] = j == 0 ? term : acc[u] + term;
      }
    }
    pack_t o;
#pragma unroll
    for (int u = 0; u < VEC; ++u) o.v[u] = static_cast<scalar_t>(acc[u]);
    reinterpret_cast<pack_t*>(out + t * d)[i] = o;
  }
}

// Backward of unpermute, one warp per pair p (row_map is a bijection: each pair owns its row):
//   grad_y[row_map[p]] = s[p] * grad_out[p // k];   grad_s[p] = <grad_out[p // k], y[row_map[p]]>
template <typename scalar_t, int VEC>
__global__ void unpermute_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                          const int64_t* __restrict__ row_map,
                                          const typename Acc<scalar_t>::type* __restrict__ s, int64_t P,
                                          int64_t k, int64_t d, scalar_t* __restrict__ grad_y,
                                          typename Acc<scalar_t>::type* __restrict__ grad_s) {
  using acc_t = typename Acc<scalar_t>::type;
  using pack_t = Pack<scalar_t, VEC>;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.y;
  if (p >= P) return;  // whole warps leave together, so the shuffles below stay full-warp
  const int64_t row = row_map[p];
  const acc_t w = s == nullptr ? acc_t(1) : s[p];
  const pack_t* gt = reinterpret_cast<const pack_t*>(g + (p / k) * d);
  const int64_t packs = d / VEC;
  acc_t dot = 0;
  for (int64_t i = threadIdx.x; i < packs; i += 32) {
    const pack_t gp = gt[i];
    if (grad_y != nullptr) {
      pack_t o;
#pragma unroll
      for (int u = 0; u < VEC; ++u) o.v[u] = static_cast<scalar_t>(w * static_cast<acc_t>(gp.v[u]));
      reinterpret_cast<pack_t*>(grad_y + row * d)[i] = o;
    }
    if (grad_s != nullptr) {
      const pack_t yp = reinterpret_cast<const pack_t*>(y + row * d)[i];
#pragma unroll
      for (int u = 0; u < VEC; ++u) dot += static_cast<acc_t>(gp.v[u]) * static_cast<acc_t>(yp.v[u]);
    }
  }
  if (grad_s != nullptr) {
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_down_sync(0xffffffffu, dot, off);
    if (threadIdx.x == 0) grad_s[p] = dot;
  }
}

inline dim3 row_grid(int64_t rows) { return dim3(static_cast<unsigned>((rows + WARPS_PER_BLOCK - 1) / WARPS_PER_BLOCK)); }
const dim3 kRowBlock(32, WARPS_PER_BLOCK);

// Elements per 16-byte pack when rows and base pointers allow it, else 1.
template <typename scalar_t>
int pack_size(int64_t d, const void* a, const void* b) {
  constexpr int full = 16 / sizeof(scalar_t);
  return copy_width(d * sizeof(scalar_t), a, b) == 16 && d % full == 0 ? full : 1;
}

// ---------------------------------------------------------------------------------------------
// Host functions (same signatures as permute_cpu.cpp)
// ---------------------------------------------------------------------------------------------

// Every tensor must be on `device` (the GPU of the main input): a CPU tensor would hand a host pointer
// to a kernel, and a tensor on another GPU a pointer this device cannot read.
void check_device(const at::Tensor& t, const c10::Device& device, const char* op, const char* name) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got one on ",
              t.device());
}

// unpermute_fwd / unpermute_bwd: y_perm (P, d) on a GPU, row_map (P,) int64, scores (T, k) or absent.
void check_unpermute_args(const char* op, const at::Tensor& y_perm, const at::Tensor& row_map,
                          const std::optional<at::Tensor>& scores, int64_t top_k) {
  TORCH_CHECK(y_perm.is_cuda(), op, ": y_perm must be a CUDA tensor, got one on ", y_perm.device());
  check_device(row_map, y_perm.device(), op, "row_map");
  TORCH_CHECK(top_k >= 1, op, ": top_k must be >= 1, got ", top_k);
  TORCH_CHECK(row_map.dim() == 1 && row_map.scalar_type() == at::kLong && row_map.is_contiguous(), op,
              ": row_map must be a contiguous (P,) int64 tensor");
  const int64_t P = row_map.numel();
  TORCH_CHECK(P % top_k == 0, op, ": row_map has ", P, " entries, not a multiple of top_k = ", top_k);
  TORCH_CHECK(y_perm.dim() == 2 && y_perm.is_contiguous() && y_perm.size(0) == P, op,
              ": y_perm must be a contiguous (P, d) tensor with P = row_map.numel() = ", P, ", got ", y_perm.sizes());
  if (scores.has_value()) {
    check_device(*scores, y_perm.device(), op, "scores");
    TORCH_CHECK(scores->dim() == 2 && scores->size(0) * scores->size(1) == P && scores->size(1) == top_k, op,
                ": scores must be (T, top_k) = (", P / top_k, ", ", top_k, "), got ", scores->sizes());
    TORCH_CHECK(at::isFloatingType(scores->scalar_type()), op, ": scores must be a float tensor");
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_fwd(const at::Tensor& x, const at::Tensor& expert_ids,
                                                           int64_t num_experts) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "permute_fwd: x must be a contiguous CUDA (T, d) tensor");
  check_device(expert_ids, x.device(), "permute_fwd", "expert_ids");
  TORCH_CHECK(expert_ids.dim() == 2 && expert_ids.is_contiguous(), "permute_fwd: expert_ids must be a contiguous (T, k) tensor");
  TORCH_CHECK(expert_ids.size(1) >= 1, "permute_fwd: expert_ids must have k >= 1 columns, got ", expert_ids.size(1));
  TORCH_CHECK(x.size(0) == expert_ids.size(0), "permute_fwd: x has ", x.size(0), " rows but expert_ids has ",
              expert_ids.size(0));
  TORCH_CHECK(num_experts >= 1, "permute_fwd: num_experts must be >= 1, got ", num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t T = expert_ids.size(0), k = expert_ids.size(1), P = T * k, d = x.size(1), E = num_experts;
  const int64_t C = (P + CHUNK - 1) / CHUNK;
  const auto long_opts = x.options().dtype(at::kLong);

  auto x_perm = at::empty({P, d}, x.options());
  auto row_map = at::empty({P}, long_opts);
  if (P == 0) return {x_perm, row_map, at::zeros({E}, long_opts)};

  auto rank = at::empty({P}, x.options().dtype(at::kInt));
  auto chunk_counts = at::zeros({E, C}, long_opts);  // experts absent from a chunk keep 0
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "permute_rank", [&] {
    rank_in_chunk_kernel<index_t><<<static_cast<unsigned>(C), CHUNK, 0, stream>>>(
        expert_ids.const_data_ptr<index_t>(), P, C, rank.data_ptr<int32_t>(), chunk_counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // 2. exclusive prefix scan in (expert, chunk) order: first row of every (expert, chunk) share
  auto flat = chunk_counts.view({-1});
  auto chunk_start = at::cumsum(flat, 0).sub_(flat);  // (E*C,)
  auto counts = chunk_counts.sum(1);                  // (E,)

  const int64_t row_bytes = d * static_cast<int64_t>(x.element_size());
  const int width = copy_width(row_bytes, x.const_data_ptr(), x_perm.data_ptr());
  AT_DISPATCH_INDEX_TYPES(expert_ids.scalar_type(), "permute_rows", [&] {
    auto launch = [&](auto word) {
      using word_t = decltype(word);
      permute_rows_kernel<index_t, word_t><<<row_grid(P), kRowBlock, 0, stream>>>(
          static_cast<const word_t*>(x.const_data_ptr()), expert_ids.const_data_ptr<index_t>(),
          rank.const_data_ptr<int32_t>(), chunk_start.const_data_ptr<int64_t>(), P, k, C, row_bytes / width,
          static_cast<word_t*>(x_perm.data_ptr()), row_map.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (width == 16) launch(Word<16>::type{});
    else if (width == 8) launch(Word<8>::type{});
    else if (width == 4) launch(Word<4>::type{});
    else launch(Word<2>::type{});
  });
  return {x_perm, row_map, counts};
}

at::Tensor unpermute_fwd(const at::Tensor& y_perm, const at::Tensor& row_map, const std::optional<at::Tensor>& scores,
                         int64_t top_k) {
  check_unpermute_args("unpermute_fwd", y_perm, row_map, scores, top_k);
  const c10::cuda::CUDAGuard guard(y_perm.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t P = row_map.numel(), T = P / top_k, d = y_perm.size(1);
  auto out = at::empty({T, d}, y_perm.options());
  if (T == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "unpermute_fwd", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    at::Tensor s;
    if (scores.has_value()) s = scores->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* sp = s.defined() ? s.const_data_ptr<acc_t>() : nullptr;
    constexpr int full = 16 / sizeof(scalar_t);
    if (pack_size<scalar_t>(d, y_perm.const_data_ptr(), out.data_ptr()) == full) {
      unpermute_kernel<scalar_t, full><<<row_grid(T), kRowBlock, 0, stream>>>(
          y_perm.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int64_t>(), sp, T, top_k, d,
          out.data_ptr<scalar_t>());
    } else {
      unpermute_kernel<scalar_t, 1><<<row_grid(T), kRowBlock, 0, stream>>>(
          y_perm.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int64_t>(), sp, T, top_k, d,
          out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_bwd(const at::Tensor& grad_out, const at::Tensor& y_perm,
                                                 const at::Tensor& row_map, const std::optional<at::Tensor>& scores,
                                                 int64_t top_k, bool need_y, bool need_scores) {
  check_unpermute_args("unpermute_bwd", y_perm, row_map, scores, top_k);
  check_device(grad_out, y_perm.device(), "unpermute_bwd", "grad_out");
  const int64_t P = row_map.numel(), d = y_perm.size(1);
  TORCH_CHECK(grad_out.is_contiguous() && grad_out.dim() == 2 && grad_out.size(0) == P / top_k &&
              grad_out.size(1) == d && grad_out.scalar_type() == y_perm.scalar_type(),
              "unpermute_bwd: grad_out must be a contiguous (T, d) = (", P / top_k, ", ", d,
              ") tensor of y_perm's dtype, got ", grad_out.sizes(), " ", grad_out.scalar_type());
  const c10::cuda::CUDAGuard guard(y_perm.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  need_scores = need_scores && scores.has_value();
  auto grad_y = need_y ? at::empty_like(y_perm) : at::empty({0}, y_perm.options());
  at::Tensor grad_s = at::empty({0}, scores.has_value() ? scores->options() : y_perm.options());
  if (P == 0 || (!need_y && !need_scores)) return {grad_y, need_scores ? at::zeros_like(*scores) : grad_s};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_perm.scalar_type(), "unpermute_bwd", [&] {
    using acc_t = typename Acc<scalar_t>::type;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    at::Tensor s;
    if (scores.has_value()) s = scores->to(acc_type).contiguous();
    at::Tensor gs = need_scores ? at::empty({P}, y_perm.options().dtype(acc_type)) : at::Tensor();
    const acc_t* sp = s.defined() ? s.const_data_ptr<acc_t>() : nullptr;
    scalar_t* gy = need_y ? grad_y.data_ptr<scalar_t>() : nullptr;
    acc_t* gsp = need_scores ? gs.data_ptr<acc_t>() : nullptr;
    constexpr int full = 16 / sizeof(scalar_t);
    const bool wide = pack_size<scalar_t>(d, grad_out.const_data_ptr(), y_perm.const_data_ptr()) == full &&
                      (gy == nullptr || reinterpret_cast<uintptr_t>(gy) % 16 == 0);
    if (wide) {
      unpermute_backward_kernel<scalar_t, full><<<row_grid(P), kRowBlock, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), y_perm.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int64_t>(),
          sp, P, top_k, d, gy, gsp);
    } else {
      unpermute_backward_kernel<scalar_t, 1><<<row_grid(P), kRowBlock, 0, stream>>>(
          grad_out.const_data_ptr<scalar_t>(), y_perm.const_data_ptr<scalar_t>(), row_map.const_data_ptr<int64_t>(),
          sp, P, top_k, d, gy, gsp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (need_scores) grad_s = gs.view(scores->sizes()).to(scores->scalar_type());
  });
  return {grad_y, grad_s};
}

}  // namespace

TORCH_LIBRARY(llama_moe_cuda, m) {
  m.def("permute_fwd", &permute_fwd);
  m.def("unpermute_fwd", &unpermute_fwd);
  m.def("unpermute_bwd", &unpermute_bwd);
}
