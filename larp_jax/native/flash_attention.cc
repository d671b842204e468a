// Flash attention for XLA:CPU as two XLA FFI handlers (forward, backward), float32.
//
// Layout: q [B, Lq, H, D], k and v [B, Lk, H, D] (the model's own layout, so no transposes
// around the call); out like q; lse [B, H, Lq] float32, the log-sum-exp of each query's scaled
// scores. Scores are scaled by 1/sqrt(D) here. With causal=1, key j is visible from query i iff
// j <= i. Attention dropout (threshold > 0) keeps probability (b*H + h, i, j) when
// counter_bits(seeds, ((b*H + h) * Lq + i) * Lk + j) >= threshold and scales kept ones by
// keep_scale: the same mask as the JAX kernels (larp_jax/models/attention_masks.py).
//
// Work: the forward pass splits (batch*head, query block) items, the backward pass whole
// (batch*head) items (so dK and dV never race), over XLA's intra-op thread pool with the calling
// thread taking part. Each item runs single-threaded matrix products on a register-tiled
// micro-kernel written with GCC/Clang vector extensions of 8 floats, which the compiler maps to
// whatever -march=native has (measured with AVX2 + FMA; other targets compile the same source,
// untested). This is the per-thread blocking of torch's CPU flash kernel; XLA's own dots inside
// a loop split each small product over the threads instead.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

constexpr int kNR = 16;   // micro-kernel columns (two 8-lane vectors)
constexpr int kMR = 6;    // micro-kernel rows

inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }
inline v8f splat(float x) { return v8f{x, x, x, x, x, x, x, x}; }
const v8i kLane = {0, 1, 2, 3, 4, 5, 6, 7};

// C[r][0:16] (+)= sum_k A(r, k) * B[k][0:16] for r < MR, where A(r, k) = a[r*sr + k*sk] and
// B's row k starts at b + k*ldb.
template <int MR>
inline void micro(int64_t kdim, const float* a, int64_t sr, int64_t sk, const float* b,
                  int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  v8f acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = splat(0.f);
  for (int64_t k = 0; k < kdim; ++k) {
    const v8f b0 = load8(b + k * ldb), b1 = load8(b + k * ldb + 8);
    const float* ak = a + k * sk;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const v8f x = splat(ak[r * sr]);
      acc[r][0] += x * b0;
      acc[r][1] += x * b1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      acc[r][0] += load8(cr);
      acc[r][1] += load8(cr + 8);
    }
    store8(cr, acc[r][0]);
    store8(cr + 8, acc[r][1]);
  }
}

// C[m][n] (+)= sum_k A(m, k) B(k, n) for m < M, n < N (N a multiple of 16), with A as above.
// B's 16-column tile t starts at b + t*panel_stride with rows ldb apart: a row-major B has
// panel_stride 16 and ldb its row stride, a panel-major one (pack_panels) ldb 16. The
// contraction runs in chunks of kKC so that a chunk of B's tile stays in L1 across row tiles.
constexpr int64_t kKC = 256;

void matmul(int64_t m, int64_t n, int64_t kdim, const float* a, int64_t sr, int64_t sk,
            const float* b, int64_t ldb, int64_t panel_stride, float* c, int64_t ldc,
            bool accumulate) {
  for (int64_t k0 = 0; k0 < kdim; k0 += kKC) {
    const int64_t kc = std::min(kKC, kdim - k0);
    const bool acc = accumulate || k0 > 0;
    const float* ak = a + k0 * sk;
    for (int64_t j = 0; j < n; j += kNR) {
      const float* bj = b + (j / kNR) * panel_stride + k0 * ldb;
      int64_t i = 0;
      for (; i + kMR <= m; i += kMR)
        micro<kMR>(kc, ak + i * sr, sr, sk, bj, ldb, c + i * ldc + j, ldc, acc);
      const float* ai = ak + i * sr;
      float* ci = c + i * ldc + j;
      switch (m - i) {
        case 5: micro<5>(kc, ai, sr, sk, bj, ldb, ci, ldc, acc); break;
        case 4: micro<4>(kc, ai, sr, sk, bj, ldb, ci, ldc, acc); break;
        case 3: micro<3>(kc, ai, sr, sk, bj, ldb, ci, ldc, acc); break;
        case 2: micro<2>(kc, ai, sr, sk, bj, ldb, ci, ldc, acc); break;
        case 1: micro<1>(kc, ai, sr, sk, bj, ldb, ci, ldc, acc); break;
        default: break;
      }
    }
  }
}

// S[m][0:np*16] = A[m][0:D] . packed^T, where packed holds np panels [D][16] of a transposed
// operand (see pack_transposed): the scores of m rows against np*16 keys.
void matmul_panels(int64_t m, int64_t np, int64_t d, const float* a, int64_t lda,
                   const float* packed, float* s, int64_t lds) {
  for (int64_t p = 0; p < np; ++p)
    matmul(m, kNR, d, a, lda, 1, packed + p * d * kNR, kNR, kNR, s + p * kNR, lds, false);
}

// Panel-major copy of x [rows][d] (row stride ldx): out[t][r][c] = x[r][t*16 + c].
void pack_panels(const float* x, int64_t ldx, int64_t rows, int64_t d, float* out) {
  for (int64_t t = 0; t < d / kNR; ++t)
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(out + (t * rows + r) * kNR, x + r * ldx + t * kNR, kNR * sizeof(float));
}

// packed[p][dd][c] = x[(p*16 + c) * ldx + dd] for rows p*16 + c < rows, zero beyond.
void pack_transposed(const float* x, int64_t ldx, int64_t rows, int64_t d, int64_t np,
                     float* packed) {
  for (int64_t p = 0; p < np; ++p) {
    float* dst = packed + p * d * kNR;
    for (int c = 0; c < kNR; ++c) {
      const int64_t row = p * kNR + c;
      if (row < rows) {
        const float* src = x + row * ldx;
        for (int64_t dd = 0; dd < d; ++dd) dst[dd * kNR + c] = src[dd];
      } else {
        for (int64_t dd = 0; dd < d; ++dd) dst[dd * kNR + c] = 0.f;
      }
    }
  }
}

// exp(x) for x <= 0 (softmax arguments) as 2^t, t = x log2(e): t = n + f with n = round(t)
// (the 1.5 * 2^23 rounding trick, whose low bits also hold n) and |f| <= 1/2, 2^f from a
// degree-6 fit. Relative error (against double exp): 1.2e-7 on [-1, 0], 5e-7 on [-10, -1],
// 1e-6 on [-20, -10], 4e-6 below: the rounding of t, the size of float32's own spacing at x.
// Below t = -126 it returns 2^-126 ~ 1.2e-38 (nothing next to a row maximum's exp(0) = 1).
inline v8f exp_nonpos(v8f x) {
  v8f t = x * splat(1.44269504088896341f);
  t = t < splat(-126.f) ? splat(-126.f) : t;
  const v8f shifted = t + splat(12582912.f);                 // 1.5 * 2^23
  const v8f f = t - (shifted - splat(12582912.f));
  v8f y = splat(1.5345806605182588e-4f);
  y = y * f + splat(1.3399930903688073e-3f);
  y = y * f + splat(9.618489071726799e-3f);
  y = y * f + splat(5.550328642129898e-2f);
  y = y * f + splat(0.24022646248340607f);
  y = y * f + splat(0.6931471824645996f);
  y = y * f + splat(1.f);
  v8i bits, n;
  std::memcpy(&bits, &y, sizeof(y));
  std::memcpy(&n, &shifted, sizeof(n));
  bits += n << 23;                                           // y * 2^n
  std::memcpy(&y, &bits, sizeof(y));
  return y;
}

inline v8u mix32(v8u x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

struct Dropout {
  uint32_t s0 = 0, s1 = 0, threshold = 0;
  float scale = 1.f;
  bool on() const { return threshold > 0; }
  // keep mask (all ones or zero per lane) for 8 consecutive columns from flat index `base`.
  v8i keep(uint32_t base) const {
    const v8u lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const v8u bits = mix32(mix32((lane + base) ^ s0) + s1);
    return (v8i)(bits >= threshold);
  }
};

struct Geometry {
  int64_t b, lq, lk, h, d;
  int64_t row() const { return h * d; }                  // stride between tokens
  int64_t q_off(int64_t bh) const { return (bh / h) * lq * row() + (bh % h) * d; }
  int64_t k_off(int64_t bh) const { return (bh / h) * lk * row() + (bh % h) * d; }
  int64_t panels(int64_t keys) const { return (keys + kNR - 1) / kNR; }
};

// Runs fn(i) for i < n on the intra-op pool and the calling thread; returns when all are done.
void parallel_for(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const std::function<void(int64_t)>* body = &fn;
  auto work = [state, body, n]() {
    int64_t i, finished = 0;
    while ((i = state->next.fetch_add(1)) < n) {
      (*body)(i);
      ++finished;
    }
    if (finished && state->done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// Query rows per forward item: the item's [rows, Lk] scores stay within ~256 KiB (L2).
int64_t query_block(int64_t lk) {
  const int64_t rows = (int64_t{64} * 1024 / std::max<int64_t>(lk, 1)) / kMR * kMR;
  return std::clamp<int64_t>(rows, kMR, 16 * kMR);
}

constexpr int64_t kBwdKeys = 128;    // backward: keys per block (dK, dV accumulate in cache)
constexpr int64_t kBwdRows = 64;     // backward: queries per block

inline float hsum(v8f x) {
  float t = 0.f;
  for (int i = 0; i < 8; ++i) t += x[i];
  return t;
}

inline float row_max(const float* s, int64_t valid) {
  v8f m8 = splat(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= valid; j += 8) {
    const v8f x = load8(s + j);
    m8 = x > m8 ? x : m8;
  }
  float m = -INFINITY;
  for (int i = 0; i < 8; ++i) m = std::max(m, m8[i]);
  for (; j < valid; ++j) m = std::max(m, s[j]);
  return m;
}

// Per-thread buffers, reused across calls; `head` says which (call, batch*head) the packed
// operands belong to.
struct Scratch {
  std::vector<float> kt, vt, kp, vp, qp, gp, s, ds, acc, dq, dk, dv, rows;
  uint64_t call = 0;
  int64_t head = -1;
};

// What both handlers read from their operands and attributes.
struct Problem {
  Geometry g;
  Dropout drop;
  float scale;      // 1 / sqrt(D)
};

ffi::Error Setup(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k,
                 const ffi::Buffer<ffi::F32>& v, const ffi::Buffer<ffi::U32>& seeds,
                 int64_t threshold, float keep_scale, Problem* pb) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || qd[3] % kNR != 0 ||
      qd[0] != kd[0] || qd[2] != kd[2] || qd[3] != kd[3] ||
      !std::equal(kd.begin(), kd.end(), vd.begin()))
    return ffi::Error::InvalidArgument(
        "larp flash attention: need q [B, Lq, H, D] and k, v [B, Lk, H, D] with D % 16 == 0");
  pb->g = Geometry{qd[0], qd[1], kd[1], qd[2], qd[3]};
  pb->drop = Dropout{seeds.typed_data()[0], seeds.typed_data()[1], (uint32_t)threshold,
                     keep_scale};
  pb->scale = 1.f / std::sqrt((float)qd[3]);
  return ffi::Error::Success();
}

// Visits one score row in vectors of 8: term(j, lanes) for the `valid` columns (the last vector
// with only its lanes < valid set), then zero(j) for the vectors up to `width`.
template <typename Term, typename Zero>
inline void over_row(int64_t valid, int64_t width, Term term, Zero zero) {
  const int64_t full = valid / 8 * 8;
  for (int64_t j = 0; j < full; j += 8) term(j, ~v8i{});
  if (full < valid) term(full, kLane < (int32_t)(valid - full));
  for (int64_t j = (valid + 7) / 8 * 8; j < width; j += 8) zero(j);
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U32> seeds,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse,
                   int64_t causal, int64_t threshold, float keep_scale) {
  Problem pb;
  if (ffi::Error e = Setup(q, k, v, seeds, threshold, keep_scale, &pb); e.failure()) return e;
  const Geometry& g = pb.g;
  const Dropout& drop = pb.drop;
  const float scale = pb.scale;
  const int64_t bq = query_block(g.lk), nqb = (g.lq + bq - 1) / bq;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  const int64_t ld = g.row(), np_all = g.panels(g.lk);
  static std::atomic<uint64_t> calls{0};
  const uint64_t call = ++calls;        // packed operands never outlive their call
  auto item = [&](int64_t it) {
    thread_local Scratch sc;
    const int64_t bh = it / nqb, q0 = (it % nqb) * bq, rows = std::min(bq, g.lq - q0);
    if (sc.call != call || sc.head != bh) {          // K^T panels and V panels of this head
      sc.kt.resize(np_all * kNR * g.d);
      sc.vp.resize(g.lk * g.d);
      pack_transposed(kp + g.k_off(bh), ld, g.lk, g.d, np_all, sc.kt.data());
      pack_panels(vp + g.k_off(bh), ld, g.lk, g.d, sc.vp.data());
      sc.call = call;
      sc.head = bh;
    }
    const int64_t keys = causal ? std::min(g.lk, q0 + rows) : g.lk, np = g.panels(keys);
    const int64_t lds = np * kNR;
    sc.s.resize(bq * np_all * kNR);
    sc.acc.resize(bq * g.d);
    sc.rows.resize(bq);
    float *s = sc.s.data(), *acc = sc.acc.data();
    matmul_panels(rows, np, g.d, qp + g.q_off(bh) + q0 * ld, ld, sc.kt.data(), s, lds);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t valid = causal ? std::min(keys, q0 + r + 1) : keys;
      float* sr = s + r * lds;
      const float m = row_max(sr, valid) * scale;
      const uint32_t base = (uint32_t)(((uint64_t)bh * g.lq + q0 + r) * g.lk);
      v8f sum = splat(0.f);
      auto term = [&](int64_t j, v8i in) {
        v8f p = exp_nonpos(load8(sr + j) * splat(scale) - splat(m));
        p = in ? p : splat(0.f);
        sum += p;
        if (drop.on()) p = drop.keep(base + (uint32_t)j) ? p * splat(drop.scale) : splat(0.f);
        store8(sr + j, p);
      };
      over_row(valid, lds, term, [&](int64_t j) { store8(sr + j, splat(0.f)); });
      const float total = hsum(sum);
      sc.rows[r] = 1.f / total;
      lp[bh * g.lq + q0 + r] = m + std::log(total);
    }
    matmul(rows, g.d, keys, s, lds, 1, sc.vp.data(), kNR, g.lk * kNR, acc, g.d, false);
    float* ob = op + g.q_off(bh) + q0 * ld;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < g.d; ++c) ob[r * ld + c] = acc[r * g.d + c] * sc.rows[r];
  };
  parallel_for(pool, g.b * g.h * nqb, item);
  return ffi::Error::Success();
}

// Backward of one batch*head, key block outer (FlashAttention-2 order): dK and dV of a block of
// kBwdKeys keys accumulate in cache over the query blocks that see it, dQ accumulates in a
// contiguous per-thread buffer.
ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::U32> seeds,
                    ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv,
                    int64_t causal, int64_t threshold, float keep_scale) {
  Problem pb;
  if (ffi::Error e = Setup(q, k, v, seeds, threshold, keep_scale, &pb); e.failure()) return e;
  const Geometry& g = pb.g;
  const Dropout& drop = pb.drop;
  const float scale = pb.scale;
  const int64_t ld = g.row(), np_all = g.panels(g.lk);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  auto head = [&](int64_t bh) {
    thread_local Scratch sc;
    const int64_t qo = g.q_off(bh), ko = g.k_off(bh), d = g.d;
    sc.kt.resize(np_all * kNR * d);
    sc.vt.resize(np_all * kNR * d);
    sc.kp.resize(g.lk * d);
    sc.qp.resize(g.lq * d);
    sc.gp.resize(g.lq * d);
    sc.dq.assign(g.lq * d, 0.f);
    sc.dk.resize(kBwdKeys * d);
    sc.dv.resize(kBwdKeys * d);
    sc.s.resize(kBwdRows * kBwdKeys);
    sc.ds.resize(kBwdRows * kBwdKeys);
    sc.rows.resize(g.lq);
    pack_transposed(kp + ko, ld, g.lk, d, np_all, sc.kt.data());
    pack_transposed(vp + ko, ld, g.lk, d, np_all, sc.vt.data());
    pack_panels(kp + ko, ld, g.lk, d, sc.kp.data());
    pack_panels(qp + qo, ld, g.lq, d, sc.qp.data());
    pack_panels(gp + qo, ld, g.lq, d, sc.gp.data());
    float* delta = sc.rows.data();                   // rowsum(O * dO)
    for (int64_t r = 0; r < g.lq; ++r) {
      const float *o = op + qo + r * ld, *gr = gp + qo + r * ld;
      v8f t = splat(0.f);
      for (int64_t c = 0; c < d; c += 8) t += load8(o + c) * load8(gr + c);
      delta[r] = hsum(t);
    }
    for (int64_t k0 = 0; k0 < g.lk; k0 += kBwdKeys) {
      const int64_t nk = std::min(kBwdKeys, g.lk - k0), np = g.panels(nk), lds = np * kNR;
      float *s = sc.s.data(), *ds = sc.ds.data(), *dkb = sc.dk.data(), *dvb = sc.dv.data();
      std::fill(sc.dk.begin(), sc.dk.end(), 0.f);
      std::fill(sc.dv.begin(), sc.dv.end(), 0.f);
      const int64_t first = causal ? (k0 / kBwdRows) * kBwdRows : 0;
      for (int64_t q0 = first; q0 < g.lq; q0 += kBwdRows) {
        const int64_t rows = std::min(kBwdRows, g.lq - q0);
        const float* qb = qp + qo + q0 * ld;
        matmul_panels(rows, np, d, qb, ld, sc.kt.data() + k0 * d, s, lds);             // S
        matmul_panels(rows, np, d, gp + qo + q0 * ld, ld, sc.vt.data() + k0 * d, ds, lds);
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t row = q0 + r;
          const int64_t valid = causal ? std::min(nk, row - k0 + 1) : nk;
          float *sr = s + r * lds, *dsr = ds + r * lds;
          if (valid <= 0) {
            std::fill(sr, sr + lds, 0.f);
            std::fill(dsr, dsr + lds, 0.f);
            continue;
          }
          const float shift = lp[bh * g.lq + row], dl = delta[row];
          const uint32_t base = (uint32_t)(((uint64_t)bh * g.lq + row) * g.lk + k0);
          auto term = [&](int64_t j, v8i in) {
            v8f p = exp_nonpos(load8(sr + j) * splat(scale) - splat(shift));
            p = in ? p : splat(0.f);
            v8f dp = load8(dsr + j), pd = p;
            if (drop.on()) {
              const v8i keep = drop.keep(base + (uint32_t)j);
              pd = keep ? p * splat(drop.scale) : splat(0.f);
              dp = keep ? dp * splat(drop.scale) : splat(0.f);
            }
            store8(sr + j, pd);                                       // dropped P, for dV
            store8(dsr + j, p * (dp - splat(dl)) * splat(scale));      // dS of scaled scores
          };
          over_row(valid, lds, term, [&](int64_t j) {
            store8(sr + j, splat(0.f));
            store8(dsr + j, splat(0.f));
          });
        }
        // dV_blk += Pd^T dO_b, dK_blk += dS^T Q_b, dQ_b += dS K_blk.
        matmul(nk, d, rows, s, 1, lds, sc.gp.data() + q0 * kNR, kNR, g.lq * kNR, dvb, d, true);
        matmul(nk, d, rows, ds, 1, lds, sc.qp.data() + q0 * kNR, kNR, g.lq * kNR, dkb, d, true);
        matmul(rows, d, nk, ds, lds, 1, sc.kp.data() + k0 * kNR, kNR, g.lk * kNR,
               sc.dq.data() + q0 * d, d, true);
      }
      for (int64_t t = 0; t < nk; ++t) {
        std::memcpy(dkp + ko + (k0 + t) * ld, dkb + t * d, d * sizeof(float));
        std::memcpy(dvp + ko + (k0 + t) * ld, dvb + t * d, d * sizeof(float));
      }
    }
    for (int64_t r = 0; r < g.lq; ++r)
      std::memcpy(dqp + qo + r * ld, sc.dq.data() + r * d, d * sizeof(float));
  };
  parallel_for(pool, g.b * g.h, head);
  return ffi::Error::Success();
}

}  // namespace

namespace {

// The operands both handlers start with (q, k, v, seeds) and the attributes they end with.
auto BindInputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::U32>>();
}

template <typename Binding>
auto BindAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("causal")
      .template Attr<int64_t>("threshold")
      .template Attr<float>("keep_scale");
}

}  // namespace

// Forward(q, k, v, seeds) -> (out, lse).
XLA_FFI_DEFINE_HANDLER_SYMBOL(LarpFlashForward, Forward,
                              BindAttrs(BindInputs()
                                            .Ret<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));

// Backward(q, k, v, seeds, out, lse, dout) -> (dq, dk, dv).
XLA_FFI_DEFINE_HANDLER_SYMBOL(LarpFlashBackward, Backward,
                              BindAttrs(BindInputs()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Arg<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()
                                            .Ret<ffi::Buffer<ffi::F32>>()));
