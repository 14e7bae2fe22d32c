// The CPU backend's native op: the slot rows of the multi-shard delta of one projection call.
//
// Semantics (Punica's y = x·W + x·A·B with K weighted shards per token), per token t, slice i:
//     y_t[i] += Σ_j w_{t,j} · B[i, s(t,j), :, :r_s] · (A[i, s(t,j), :r_s, :] · x_t)
// The work list is the CPU plan's slot rows (cpu.py): one row per distinct slot s of the step
// (requests that form a dense group run as torch GEMMs beside it, see ops.py),
// [slot, pair_begin, pair_end, count, bucket], and its (token, weight) pairs pair_tok / pair_w,
// slot-major; the first `count` pairs of a row are real (the rest is bucket padding, skipped).
//   1. shrink  h[p, i, :r] = w_p · A[i, s, :r, :] · x[tok_p]          parallel over slot rows
//   2. expand  y[tok_p, i·d_out + o] += Σ_k B[i, s, o, k] · h[p, i, k]  parallel over column blocks
// Each distinct slot's factors are read once per call (A in 1; B once per column block in 2);
// nothing past a slot's rank is read; accumulation is fp32; y is written only at the tokens of the
// pairs, so tokens without a slot stay bit-exact. The expand streams B along d_out: it is fast when
// the pool stores B with d_out contiguous (b_pool.stride(2) == 1, as the serving layers allocate
// it) and correct for any strides. Loops are written for the compiler to vectorise (-O3
// -march=native); bf16 is converted with integer shifts (round to nearest even), which vectorise.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t PB = 4;   // pairs (tokens) that share each load of a factor row
// Calls reading fewer factor elements than this run on the calling thread
// (WRAG_NATIVE_PAR_MIN_ELEMS overrides it; 0 = always parallel).
inline int64_t par_min_elems() {
  static const int64_t v = [] {
    const char* e = std::getenv("WRAG_NATIVE_PAR_MIN_ELEMS");
    return e ? std::atoll(e) : int64_t(1) << 16;
  }();
  return v;
}

inline float f32(float v) { return v; }
inline float f32(double v) { return static_cast<float>(v); }
inline float f32(c10::Half v) { return static_cast<float>(v); }
inline float f32(c10::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void store(float& dst, float v) { dst = v; }
inline void store(double& dst, float v) { dst = v; }
inline void store(c10::Half& dst, float v) { dst = static_cast<c10::Half>(v); }
inline void store(c10::BFloat16& dst, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  dst.x = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);   // NaN stays NaN
}

template <typename scalar_t>
void delta_impl(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                const at::Tensor& slot_ranks, const at::Tensor& plan, int64_t num_rows,
                const at::Tensor& pair_tok, const at::Tensor& pair_w) {
  const int64_t n = a_pool.size(0), S = a_pool.size(1), R = a_pool.size(2), d_in = a_pool.size(3);
  const int64_t d_out = b_pool.size(2);
  const int64_t bs_i = b_pool.stride(0), bs_s = b_pool.stride(1), bs_o = b_pool.stride(2), bs_k = b_pool.stride(3);
  const scalar_t* X = x.data_ptr<scalar_t>();
  const scalar_t* A = a_pool.data_ptr<scalar_t>();
  const scalar_t* B = b_pool.data_ptr<scalar_t>();
  scalar_t* Y = y.data_ptr<scalar_t>();
  const int32_t* ranks = slot_ranks.data_ptr<int32_t>();
  const int64_t* rows = plan.data_ptr<int64_t>();          // (num_rows, 5)
  const int64_t* tok = pair_tok.data_ptr<int64_t>();
  const float* w = pair_w.data_ptr<float>();
  const int64_t x_stride = x.stride(0), y_stride = y.stride(0);

  int64_t num_pairs = 0;
  for (int64_t g = 0; g < num_rows; ++g) {
    const int64_t s = rows[g * 5];
    TORCH_CHECK(s >= 0 && s < S && ranks[s] >= 0 && ranks[s] <= R, "delta_cpu_native: slot ", s,
                " or its rank is outside the pool");
    TORCH_CHECK(rows[g * 5 + 2] <= pair_tok.numel() && rows[g * 5 + 1] + rows[g * 5 + 3] <= rows[g * 5 + 2],
                "delta_cpu_native: a slot row's pairs are outside pair_tok");
    num_pairs = std::max(num_pairs, rows[g * 5 + 2]);
  }
  // h (num_pairs, n, R) fp32, indexed by pair (padding positions are never read): scratch of this
  // thread, grown to the largest step seen and reused by every layer's call.
  static thread_local std::vector<float> h_buf;
  if (h_buf.size() < static_cast<size_t>(num_pairs * n * R)) h_buf.resize(static_cast<size_t>(num_pairs * n * R));
  float* H = h_buf.data();
  // Small work runs on the calling thread (par_min_elems): a fork/join of the OpenMP team costs more
  // than it saves, and on a loaded host a descheduled team thread stalls the join.
  int64_t elems = 0;                                        // factor elements this call reads
  for (int64_t g = 0; g < num_rows; ++g) elems += ranks[rows[g * 5]] * n * (d_in + d_out);
  const bool serial = elems < par_min_elems();
  const int64_t grain_rows = serial ? num_rows + 1 : 1;

  // 1. shrink: dot products of length d_in per (pair, slice, rank row); PB pairs share each load
  // of an A row.
  at::parallel_for(0, num_rows, grain_rows, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t s = rows[g * 5], p0 = rows[g * 5 + 1], c = rows[g * 5 + 3];
      const int64_t r = ranks[s];
      for (int64_t q0 = p0; q0 < p0 + c; q0 += PB) {
        const int64_t nq = std::min<int64_t>(PB, p0 + c - q0);
        const scalar_t* xt[PB];
        for (int64_t q = 0; q < PB; ++q) xt[q] = X + tok[q0 + std::min(q, nq - 1)] * x_stride;
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* Ai = A + ((i * S + s) * R) * d_in;
          for (int64_t k = 0; k < r; ++k) {
            const scalar_t* a = Ai + k * d_in;
            if (nq == 1) {                       // decode with a slot of its own: one token
              float a0 = 0.f;
#pragma omp simd reduction(+ : a0)
              for (int64_t d = 0; d < d_in; ++d) a0 += f32(a[d]) * f32(xt[0][d]);
              H[(q0 * n + i) * R + k] = a0 * w[q0];
              continue;
            }
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int64_t d = 0; d < d_in; ++d) {
              const float ad = f32(a[d]);
              a0 += ad * f32(xt[0][d]);
              a1 += ad * f32(xt[1][d]);
              a2 += ad * f32(xt[2][d]);
              a3 += ad * f32(xt[3][d]);
            }
            const float out[PB] = {a0, a1, a2, a3};
            for (int64_t q = 0; q < nq; ++q) H[((q0 + q) * n + i) * R + k] = out[q] * w[q0 + q];
          }
        }
      }
    }
  });

  // 2. expand, per block of one slice's output columns: for PB pairs at a time, r axpy's along
  // the block into fp32 accumulators (each B element loaded once for the PB pairs), then added to
  // the pairs' rows of y once.
  // Blocks of ≤ COLS columns, at least two per thread over all slices and of equal width (a
  // multiple of 16), so the threads get equal shares (576 columns: 4 × 144, not 512 + 64).
  constexpr int64_t COLS = 512;
  const int64_t want = std::max<int64_t>((d_out + COLS - 1) / COLS, (2 * at::get_num_threads() + n - 1) / n);
  const int64_t width = std::min<int64_t>(COLS, ((d_out + want - 1) / want + 15) / 16 * 16);
  const int64_t blocks_per_slice = (d_out + width - 1) / width;
  at::parallel_for(0, n * blocks_per_slice, serial ? n * blocks_per_slice + 1 : 1,
                   [&](int64_t b0, int64_t b1) {
    static thread_local std::vector<float> acc_buf(static_cast<size_t>(PB * COLS));
    float* acc[PB];
    for (int64_t q = 0; q < PB; ++q) acc[q] = acc_buf.data() + q * COLS;
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t i = blk / blocks_per_slice, o0 = (blk % blocks_per_slice) * width;
      const int64_t nc = std::min(width, d_out - o0);
      for (int64_t g = 0; g < num_rows; ++g) {
        const int64_t s = rows[g * 5], p0 = rows[g * 5 + 1], c = rows[g * 5 + 3];
        const int64_t r = ranks[s];
        if (r == 0) continue;
        const scalar_t* Bs = B + i * bs_i + s * bs_s + o0 * bs_o;
        for (int64_t q0 = p0; q0 < p0 + c; q0 += PB) {
          const int64_t nq = std::min<int64_t>(PB, p0 + c - q0);
          if (nq == 1) {                         // one token: one accumulator
            float* c0 = acc[0];
#pragma omp simd
            for (int64_t j = 0; j < nc; ++j) c0[j] = 0.f;
            for (int64_t k = 0; k < r; ++k) {
              const float hk = H[(q0 * n + i) * R + k];
              const scalar_t* b = Bs + k * bs_k;
              if (bs_o == 1) {
#pragma omp simd
                for (int64_t j = 0; j < nc; ++j) c0[j] += hk * f32(b[j]);
              } else {
                for (int64_t j = 0; j < nc; ++j) c0[j] += hk * f32(b[j * bs_o]);
              }
            }
            scalar_t* yp = Y + tok[q0] * y_stride + i * d_out + o0;
#pragma omp simd
            for (int64_t j = 0; j < nc; ++j) store(yp[j], f32(yp[j]) + c0[j]);
            continue;
          }
          std::fill(acc_buf.begin(), acc_buf.end(), 0.f);
          float* c0 = acc[0]; float* c1 = acc[1]; float* c2 = acc[2]; float* c3 = acc[3];
          for (int64_t k = 0; k < r; ++k) {
            float hk[PB] = {0.f, 0.f, 0.f, 0.f};
            for (int64_t q = 0; q < nq; ++q) hk[q] = H[((q0 + q) * n + i) * R + k];
            const scalar_t* b = Bs + k * bs_k;
            if (bs_o == 1) {
#pragma omp simd
              for (int64_t j = 0; j < nc; ++j) {
                const float bj = f32(b[j]);
                c0[j] += hk[0] * bj; c1[j] += hk[1] * bj; c2[j] += hk[2] * bj; c3[j] += hk[3] * bj;
              }
            } else {
              for (int64_t j = 0; j < nc; ++j) {
                const float bj = f32(b[j * bs_o]);
                c0[j] += hk[0] * bj; c1[j] += hk[1] * bj; c2[j] += hk[2] * bj; c3[j] += hk[3] * bj;
              }
            }
          }
          for (int64_t q = 0; q < nq; ++q) {
            scalar_t* yp = Y + tok[q0 + q] * y_stride + i * d_out + o0;
            const float* aq = acc[q];
#pragma omp simd
            for (int64_t j = 0; j < nc; ++j) store(yp[j], f32(yp[j]) + aq[j]);
          }
        }
      }
    }
  });
}

// Dense groups (cpu.py "dense group"): requests sharing one shard list with many tokens, as
// one rank-Σr adapter through ATen's GEMMs (BLAS wins at these sizes). Same math as cpu.py's
// _dense_per_slot_expand (fp32) and _dense_concat (bf16/fp16).
void dense_groups(at::Tensor& y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                  const int32_t* ranks, const at::Tensor& cplan, const at::Tensor& cslots,
                  const at::Tensor& cweights, const at::Tensor& ctok, int64_t num_dense) {
  const int64_t n_slices = a_pool.size(0), d_in = a_pool.size(3), d_out = b_pool.size(2), K = cslots.size(1);
  const int64_t* cp = cplan.data_ptr<int64_t>();
  const int64_t* cs = cslots.data_ptr<int64_t>();
  const double* cw = cweights.data_ptr<double>();
  at::Tensor yv = y.view({y.size(0), n_slices, d_out});
  for (int64_t g = 0; g < num_dense; ++g) {
    const int64_t tb = cp[g * 3], cb = cp[g * 3 + 1], ce = cp[g * 3 + 2];
    int64_t k = 0;
    while (k < K && cs[g * K + k] >= 0) ++k;                 // entries are packed at the front
    std::vector<int64_t> used_j, used_s, used_r;
    std::vector<double> used_w;
    int64_t r_eff = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = cs[g * K + j], r = ranks[s];
      if (r <= 0) continue;
      used_j.push_back(j); used_s.push_back(s); used_r.push_back(r); used_w.push_back(cw[g * K + j]);
      r_eff = std::max(r_eff, r);
    }
    if (used_s.empty()) continue;
    const int64_t n = ce - cb;
    at::Tensor idx, xs, ys;
    if (tb >= 0) {
      xs = x.narrow(0, tb, n);
      ys = yv.narrow(0, tb, n);                              // (n, ns, d_out) view: updated in place
    } else {
      idx = ctok.narrow(0, cb, n);
      xs = x.index_select(0, idx);
      ys = at::zeros({n, n_slices, d_out}, y.options());     // accumulated, then added to y's rows
    }
    if (x.scalar_type() == at::kFloat) {
      at::Tensor sl = cslots.select(0, g).narrow(0, 0, k);
      at::Tensor a_cat = a_pool.narrow(2, 0, r_eff).transpose(0, 1).index_select(0, sl);   // (k, ns, R_eff, d_in)
      at::Tensor h = at::mm(xs, a_cat.reshape({-1, d_in}).t()).view({n, k, n_slices, r_eff});
      at::Tensor yt = ys.transpose(0, 1);                    // (ns, n, d_out)
      for (size_t u = 0; u < used_s.size(); ++u) {
        const int64_t r = used_r[u];
        yt.baddbmm_(h.select(1, used_j[u]).narrow(-1, 0, r).transpose(0, 1),
                    b_pool.select(1, used_s[u]).narrow(-1, 0, r).transpose(1, 2), 1.0, used_w[u]);
      }
    } else {
      std::vector<at::Tensor> as, bs, ws;
      for (size_t u = 0; u < used_s.size(); ++u) {
        as.push_back(a_pool.select(1, used_s[u]).narrow(1, 0, used_r[u]));          // (ns, r, d_in)
        bs.push_back(b_pool.select(1, used_s[u]).narrow(2, 0, used_r[u]));          // (ns, d_out, r)
        ws.push_back(at::full({used_r[u]}, used_w[u], x.options()));
      }
      at::Tensor a_cat = at::cat(as, 1), b_cat = at::cat(bs, 2), w_col = at::cat(ws);
      const int64_t sum_r = w_col.numel();
      at::Tensor h = at::mm(xs, a_cat.reshape({-1, d_in}).t()).view({n, n_slices, sum_r}).mul_(w_col);
      ys.transpose(0, 1).baddbmm_(h.transpose(0, 1), b_cat.transpose(1, 2));
    }
    if (tb < 0) y.index_add_(0, idx, ys.view({n, -1}));
  }
}

}  // namespace

static void delta_cpu_native(at::Tensor y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                      const at::Tensor& slot_ranks, const at::Tensor& plan, int64_t num_rows,
                      const at::Tensor& pair_tok, const at::Tensor& pair_w) {
  TORCH_CHECK(x.is_cpu() && y.is_cpu() && a_pool.is_contiguous(), "delta_cpu_native: CPU tensors, contiguous a_pool");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "delta_cpu_native: rows of x and y must be contiguous");
  TORCH_CHECK(plan.is_contiguous() && pair_tok.is_contiguous() && pair_w.is_contiguous() && slot_ranks.is_contiguous(),
              "delta_cpu_native: contiguous plan tensors");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "delta_cpu_native", [&] {
    delta_impl<scalar_t>(y, x, a_pool, b_pool, slot_ranks, plan, num_rows, pair_tok, pair_w);
  });
}

// torch.ops.wrag.apply_delta_native: the whole op of one projection call on the native backend, with
// no Python on the path (its schema and fake are defined in ops.py, from MetaArgs; the argument
// order below is MetaArgs'). Host tables are read here, on the host: host_info = [active, tokens,
// seqs, max_seq_len, max_slot] (meta.py), cpu_info = [groups, pairs, dense, buckets, …] (cpu.py).
void apply_delta_native(at::Tensor y, const at::Tensor& x, const at::Tensor& a_pool, const at::Tensor& b_pool,
                        const at::Tensor& slot_ranks, const at::Tensor& token_slots, const at::Tensor& token_weights,
                        const at::Tensor& seq_start, const at::Tensor& seq_slots, const at::Tensor& seq_weights,
                        const at::Tensor& host_info, const at::Tensor& pair_tok, const at::Tensor& pair_w,
                        const at::Tensor& plan, const at::Tensor& cplan, const at::Tensor& cslots,
                        const at::Tensor& cweights, const at::Tensor& ctok, const at::Tensor& cpu_info) {
  TORCH_CHECK_VALUE(x.dim() == 2 && y.dim() == 2 && a_pool.dim() == 4 && b_pool.dim() == 4,
              "expected y (T, n_slices*d_out), x (T, d_in), a_pool (n, S, R, d_in), b_pool (n, S, d_out, R)");
  const int64_t n = a_pool.size(0), S = a_pool.size(1), R = a_pool.size(2), d_in = a_pool.size(3), T = x.size(0);
  TORCH_CHECK_VALUE(b_pool.size(0) == n && b_pool.size(1) == S && b_pool.size(3) == R, "b_pool ", b_pool.sizes(),
              " does not match a_pool ", a_pool.sizes());
  TORCH_CHECK_VALUE(x.size(1) == d_in && y.size(0) == T && y.size(1) == n * b_pool.size(2), "shapes y ", y.sizes(),
              ", x ", x.sizes(), " do not match the pools");
  TORCH_CHECK_VALUE(slot_ranks.dim() == 1 && slot_ranks.size(0) == S && slot_ranks.scalar_type() == at::kInt,
              "slot_ranks must be int32 of shape (", S, ",)");
  TORCH_CHECK_VALUE(x.scalar_type() == y.scalar_type() && x.scalar_type() == a_pool.scalar_type() &&
              x.scalar_type() == b_pool.scalar_type(), "y, x, a_pool and b_pool must share one dtype");
  TORCH_CHECK_VALUE(T <= token_slots.size(0), "batch has ", T, " rows but DeltaMeta(max_tokens=", token_slots.size(0), ")");
  TORCH_CHECK_VALUE(slot_ranks.is_contiguous() && host_info.is_contiguous() && cpu_info.is_contiguous() &&
                    plan.is_contiguous() && cplan.is_contiguous() && cslots.is_contiguous() &&
                    cweights.is_contiguous() && pair_tok.is_contiguous() && pair_w.is_contiguous(),
                    "slot_ranks and DeltaMeta's tables must be contiguous");
  const int64_t* info = host_info.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(T >= info[1], "batch has ", T, " rows but DeltaMeta holds ", info[1], " tokens");
  TORCH_CHECK_VALUE(info[4] < S, "slot ", info[4], " is outside the pool of ", S, " slots");
  if (!info[0] || T == 0 || n == 0 || b_pool.size(2) == 0) return;   // early exit: no token has a slot
  const int64_t* ci = cpu_info.data_ptr<int64_t>();
  const int32_t* ranks = slot_ranks.data_ptr<int32_t>();
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK_VALUE(ranks[s] >= 0 && ranks[s] <= R, "slot ", s, " has rank ", ranks[s],
                                              " outside 0..", R);
  if (ci[2]) dense_groups(y, x, a_pool, b_pool, ranks, cplan, cslots, cweights, ctok, ci[2]);
  if (ci[0]) delta_cpu_native(y, x, a_pool, b_pool, slot_ranks, plan, ci[0], pair_tok, pair_w);
}

TORCH_LIBRARY_IMPL(wrag, CPU, m) {
  m.impl("apply_delta_native", &apply_delta_native);
}

// The Python module only lets torch.utils.cpp_extension load the library (native.py); the op is
// reached through the dispatcher, as torch.ops.wrag.apply_delta_native.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
