// CPU kernels for kernels/experts.py: the expert SwiGLU over contiguous row slices, forward and backward.
//
// The math is the one in experts.py (its Python loop path is the readable version of this file), with
// W_gu = [W_gate; W_up] (E, 2 d_e, d), the gate and up projections stacked along the output rows:
//   forward   GU = X W_gu^T = [G | U],  H = silu(G) * U,  Y = H W_down^T              (per expert)
//   backward  dH = dY W_down,  dU = dH silu(G),  dG = dH U silu'(G),  dX = [dG | dU] W_gu,
//             dW_down = dY^T H,  dW_gu = [dG | dU]^T X
// Why C++ for what is mostly matmuls: how the work meets the threads. A Python loop runs each expert's
// small matmul on all threads in turn, and every matmul and every elementwise op is one fork/join of
// the thread pool. On the 2-core box shared with busy neighbours each join can wait a whole scheduler
// slice for a descheduled thread: 16 expert matmuls in a Python loop measured 3-6x one dense matmul of
// the same FLOPs, the task scheme below about 1x. Here
//   * the rows are cut into blocks of one expert each, and every thread takes whole blocks (BLAS runs
//     single-threaded inside the parallel region), largest first, from a shared counter;
//   * one block does all of its expert's row-local work at once (both matmuls and the SwiGLU between
//     them), so the forward is one parallel region and H never leaves the cache;
//   * the weight gradients, which sum over an expert's rows, are a second region in the backward, cut
//     by output rows instead;
//   * matmuls whose output is d_e wide run on weights padded with zeros to a multiple of 32 bytes (see
//     padded_width).

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

namespace llama_moe {
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype);  // permute_cpu.cpp
}

namespace {

using llama_moe::empty_cached;

// Run task(i) for i in [0, n) on torch's thread pool; tasks are taken in order from a shared counter,
// so order them largest first. Worker threads do not inherit the caller's dispatch state, so it is set
// again here: these are plain kernels below autograd (experts.py's custom op owns the gradient).
template <typename F>
void run_tasks(int64_t n, const F& task) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t i = next++; i < n; i = next++) task(i);
  });
}

// Row blocks: [row0, row1) of one expert. About four blocks per thread balance well; at most 512 rows
// each keeps H of a block in L2; at least 64 rows keeps BLAS efficient.
struct Block { int64_t expert, row0, row1; };

std::vector<Block> row_blocks(at::IntArrayRef bounds) {
  const int64_t rows = bounds.back();
  const int64_t target = std::clamp<int64_t>(rows / (4 * at::get_num_threads()), 64, 512);
  std::vector<Block> blocks;
  for (size_t e = 0; e + 1 < bounds.size(); ++e) {
    for (int64_t r = bounds[e]; r < bounds[e + 1]; r += target)
      blocks.push_back({static_cast<int64_t>(e), r, std::min(bounds[e + 1], r + target)});
  }
  std::stable_sort(blocks.begin(), blocks.end(),
                   [](const Block& a, const Block& b) { return a.row1 - a.row0 > b.row1 - b.row0; });
  return blocks;
}

// Width padding. MKL's fp32 matmul measured ~78 GFLOP/s for an output 86 columns wide and ~93-100 for 88
// (one thread, 256-1024 rows): it works in panels of 8 columns and a partial last panel runs slowly. So
// the matmuls whose output is d_e (or 2 d_e) wide use weights padded with zero rows / columns to a
// multiple of 32 bytes. Padding changes nothing: a zero weight gives g = u = 0, silu(0) * 0 = 0, and the
// padded columns of H meet zero columns of W_down (x + 0 == x exactly).
int64_t padded_width(int64_t d_e, const at::Tensor& like) {
  const int64_t m = std::max<int64_t>(1, 32 / static_cast<int64_t>(like.element_size()));
  return (d_e + m - 1) / m * m;
}

// W_gu = [W_gate; W_up] (E, 2 d_e, d) with each half padded to dp rows: (E, 2 dp, d). No copy when
// d_e is already a multiple (then this is W_gu itself).
at::Tensor padded_gate_up(const at::Tensor& w_gu, int64_t dp) {
  const int64_t E = w_gu.size(0), d_e = w_gu.size(1) / 2, d = w_gu.size(2);
  if (dp == d_e) return w_gu;
  auto w = at::empty({E, 2 * dp, d}, w_gu.options());
  w.narrow(1, 0, d_e).copy_(w_gu.narrow(1, 0, d_e));
  w.narrow(1, dp, d_e).copy_(w_gu.narrow(1, d_e, d_e));
  w.narrow(1, d_e, dp - d_e).zero_(), w.narrow(1, dp + d_e, dp - d_e).zero_();
  return w;
}

// experts_forward / experts_backward: CPU tensors of one float dtype, x (N, d), w_gu (E, 2 d_e, d),
// w_down (E, d, d_e), bounds [0, ..., N] (E + 1 entries, non-decreasing).
void check_args(const char* op, const at::Tensor& x, at::IntArrayRef bounds, const at::Tensor& w_gu,
                const at::Tensor& w_down) {
  for (const auto* t : {&x, &w_gu, &w_down}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got one on ", t->device());
    TORCH_CHECK(t->is_contiguous() && t->scalar_type() == x.scalar_type(), op,
                ": x and the weights must be contiguous and share a dtype");
  }
  TORCH_CHECK(x.dim() == 2 && w_gu.dim() == 3 && w_down.dim() == 3 && w_gu.size(1) % 2 == 0, op,
              ": need x (N, d), w_gate_up (E, 2 d_e, d), w_down (E, d, d_e)");
  const int64_t E = w_gu.size(0), d_e = w_gu.size(1) / 2, d = x.size(1);
  TORCH_CHECK(w_gu.size(2) == d && w_down.size(0) == E && w_down.size(1) == d && w_down.size(2) == d_e, op,
              ": shapes disagree: x ", x.sizes(), ", w_gate_up ", w_gu.sizes(), ", w_down ", w_down.sizes());
  TORCH_CHECK(static_cast<int64_t>(bounds.size()) == E + 1 && bounds.front() == 0 && bounds.back() == x.size(0),
              op, ": bounds must be [0, ..., N] with E + 1 entries");
  for (size_t e = 0; e + 1 < bounds.size(); ++e)
    TORCH_CHECK(bounds[e] <= bounds[e + 1], op, ": bounds must be non-decreasing (token counts >= 0)");
}

// W_down padded to dp columns: (E, d, dp)
at::Tensor padded_down(const at::Tensor& w_down, int64_t dp) {
  const int64_t d_e = w_down.size(2);
  if (dp == d_e) return w_down;
  auto w = at::empty({w_down.size(0), w_down.size(1), dp}, w_down.options());
  w.narrow(2, 0, d_e).copy_(w_down);
  w.narrow(2, d_e, dp - d_e).zero_();
  return w;
}

// The SwiGLU between the matmuls uses torch's own vectorised elementwise kernels on each block (inside a
// parallel region they run on the calling thread): a plain C++ loop calls a scalar exp per element, which
// measured slower than the matmul it sits between.

// x (N, d) grouped by expert, bounds [0, ..., N] (E + 1), w_gate_up (E, 2 d_e, d), w_down (E, d, d_e)
// -> y (N, d), gu (N, 2 d_e) (kept by experts.py for the backward)
std::tuple<at::Tensor, at::Tensor> experts_forward(const at::Tensor& x, at::IntArrayRef bounds,
                                                   const at::Tensor& w_gate_up, const at::Tensor& w_down) {
  check_args("experts_forward", x, bounds, w_gate_up, w_down);
  const int64_t N = x.size(0), d = x.size(1), d_e = w_down.size(2), dp = padded_width(d_e, x);
  const auto w_gu = padded_gate_up(w_gate_up, dp);                  // (E, 2 dp, d)
  const auto w_dn = padded_down(w_down, dp);                        // (E, d, dp)
  auto gu = empty_cached({N, 2 * d_e}, x.scalar_type());            // saved for the backward, unpadded
  auto y = empty_cached({N, d}, x.scalar_type());
  const auto blocks = row_blocks(bounds);
  run_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t b) {
    const Block& blk = blocks[b];
    const int64_t n = blk.row1 - blk.row0, j = blk.expert;
    const auto gu_pad = at::mm(x.narrow(0, blk.row0, n), w_gu[j].t());  // (n, d) @ (d, 2 dp): G and U at once
    auto h = at::silu(gu_pad.narrow(1, 0, dp));                          // (n, dp), this block's H
    h.mul_(gu_pad.narrow(1, dp, dp));
    auto yb = y.narrow(0, blk.row0, n);
    at::mm_out(yb, h, w_dn[j].t());                                      // (n, dp) @ (dp, d)
    auto gub = gu.narrow(0, blk.row0, n);                                // keep [G | U] without the padding
    gub.narrow(1, 0, d_e).copy_(gu_pad.narrow(1, 0, d_e));
    gub.narrow(1, d_e, d_e).copy_(gu_pad.narrow(1, dp, d_e));
  });
  return {y, gu};
}

// Backward. Returns (grad_x, grad_w_gate_up, grad_w_down); unneeded ones are empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor> experts_backward(
    const at::Tensor& grad_y, const at::Tensor& x, at::IntArrayRef bounds, const at::Tensor& gu,
    const at::Tensor& w_gate_up, const at::Tensor& w_down, bool need_x, bool need_w) {
  check_args("experts_backward", x, bounds, w_gate_up, w_down);
  const int64_t N = x.size(0), d = x.size(1), E = w_down.size(0), d_e = w_down.size(2);
  for (const auto* t : {&grad_y, &gu})
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous() && t->scalar_type() == x.scalar_type() && t->dim() == 2 &&
                t->size(0) == N, "experts_backward: grad_y (N, d) and gu (N, 2 d_e) must be contiguous CPU tensors of x's dtype");
  TORCH_CHECK(grad_y.size(1) == d && gu.size(1) == 2 * d_e, "experts_backward: grad_y must be (N, d) and gu (N, 2 d_e)");
  const int64_t dp = padded_width(d_e, x);
  const auto opts = x.options();
  const auto w_dn = padded_down(w_down, dp);                        // (E, d, dp)
  auto h = empty_cached({N, dp}, x.scalar_type());                  // padded: dW_down below is dp wide
  auto grad_gu = empty_cached({N, 2 * d_e}, x.scalar_type());
  at::Tensor grad_x = need_x ? empty_cached({N, d}, x.scalar_type()) : at::empty({0}, opts);
  const auto blocks = row_blocks(bounds);

  // Phase 1, per row block: dH, the SwiGLU backward, dX. Rows are independent, so blocks are too.
  run_tasks(static_cast<int64_t>(blocks.size()), [&](int64_t b) {
    const Block& blk = blocks[b];
    const int64_t n = blk.row1 - blk.row0, j = blk.expert;
    const auto grad_h = at::mm(grad_y.narrow(0, blk.row0, n), w_dn[j]).narrow(1, 0, d_e);  // (n, d) @ (d, dp)
    const auto gub = gu.narrow(0, blk.row0, n);
    const auto g = gub.narrow(1, 0, d_e), u = gub.narrow(1, d_e, d_e);
    auto dgu = grad_gu.narrow(0, blk.row0, n);
    auto dg = dgu.narrow(1, 0, d_e), du = dgu.narrow(1, d_e, d_e);
    const auto silu = at::silu(g);
    at::mul_out(du, grad_h, silu);                                        // dU = dH silu(G)
    at::mul_out(dg, grad_h, u);
    at::silu_backward_out(dg, dg, g);                                     // dG = dH U silu'(G)
    auto hb = h.narrow(0, blk.row0, n), hb_used = hb.narrow(1, 0, d_e);
    at::mul_out(hb_used, silu, u);                                        // H again, for dW_down
    if (dp > d_e) hb.narrow(1, d_e, dp - d_e).zero_();
    if (need_x) {
      auto dx = grad_x.narrow(0, blk.row0, n);
      at::mm_out(dx, dgu, w_gate_up[j]);                                  // [dG | dU] @ W_gu: (n, 2 d_e) @ (2 d_e, d)
    }
  });
  if (!need_w) return {grad_x, at::empty({0}, opts), at::empty({0}, opts)};

  // Phase 2, the weight gradients: each sums over all rows of its expert, so the work is cut by output
  // rows instead (rows of dW depend on the matching rows of the left factor only).
  auto grad_wgu = at::empty({E, 2 * d_e, d}, opts);
  auto grad_wd = at::empty({E, d, dp}, opts);  // dp wide like h; the padding is cut off at the end
  struct Product { at::Tensor out, left, right; };
  std::vector<Product> products;
  for (int64_t j = 0; j < E; ++j) {
    const int64_t r0 = bounds[j], n = bounds[j + 1] - bounds[j];
    if (n == 0) {  // an expert without tokens: exactly zero gradient
      grad_wgu[j].zero_(), grad_wd[j].zero_();
      continue;
    }
    const auto dgu = grad_gu.narrow(0, r0, n), xj = x.narrow(0, r0, n);
    products.push_back({grad_wd[j], grad_y.narrow(0, r0, n).t(), h.narrow(0, r0, n)});  // (d, n) @ (n, dp)
    products.push_back({grad_wgu[j], dgu.t(), xj});                                     // (2 d_e, n) @ (n, d)
  }
  // Cut each product into pieces of about 1/4 thread's share of the work (at least 32 output rows).
  double total = 0;
  for (const auto& p : products) total += double(p.left.size(0)) * p.left.size(1) * p.right.size(1);
  const double share = total / (4.0 * at::get_num_threads());
  struct Piece { size_t product; int64_t row0, row1; double cost; };
  std::vector<Piece> pieces;
  for (size_t i = 0; i < products.size(); ++i) {
    const auto& p = products[i];
    const double row_cost = double(p.left.size(1)) * p.right.size(1);
    const int64_t rows = p.left.size(0);
    const int64_t step = std::max<int64_t>(32, static_cast<int64_t>(share / std::max(row_cost, 1.0)));
    for (int64_t r = 0; r < rows; r += step) {
      const int64_t r1 = std::min(rows, r + step);
      pieces.push_back({i, r, r1, row_cost * (r1 - r)});
    }
  }
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.cost > b.cost; });
  run_tasks(static_cast<int64_t>(pieces.size()), [&](int64_t i) {
    const Piece& piece = pieces[i];
    const auto& p = products[piece.product];
    auto out = p.out.narrow(0, piece.row0, piece.row1 - piece.row0);
    at::mm_out(out, p.left.narrow(0, piece.row0, piece.row1 - piece.row0), p.right);
  });
  if (dp > d_e) grad_wd = grad_wd.narrow(2, 0, d_e).contiguous();
  return {grad_x, grad_wgu, grad_wd};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(llama_moe_cpu, m) {
  m.def("experts_forward", &experts_forward);
  m.def("experts_backward", &experts_backward);
}
