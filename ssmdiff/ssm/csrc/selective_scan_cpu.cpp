// Fused selective scan (Mamba-1) for CPUs: forward and backward without a (batch, length, channels, state) tensor.
//
// Plain C++ with no torch headers so the system compiler builds it in a second or two on first use; Python hands
// over float32 contiguous buffers through ctypes (see ssmdiff/ssm/ops/_scan_cpu.py) and sums the per-thread partial
// gradients it gets back.
//
// Layouts (all float32, contiguous):
//   u, delta, z, add, out, pre_gate, du, ddelta, dz, dout, dadd : (batch, dim, len)
//   A : (dim, n)     B, C, dB, dC : (batch, groups, len, n)  -- state last, so one time step is one short vector
//   chunk_states : (batch * dim, ceil(len / chunk), n), the state *before* step s = k * chunk (scan order)
//
// Scalar-decay mode (Mamba-2's SSD; head_dim > 0, n a multiple of 8, no z): the head_dim rows of a head share one
// decay per step, exp(delta_t * A_head), so no exp is taken per state entry. Then
//   A, dA_heads : (heads)     delta, ddelta : (batch, heads, len), used as given (no bias or softplus)
// with heads = dim / head_dim; dD_rows is still per row. u and du may be the first `dim` channels of a wider
// channel-major tensor: batch b's rows start at b * u_bstride (0: dim * len). Work is split over (batch, head)
// and walks time chunk by chunk across all rows of the head, so one chunk of B and C (and of dB, dC) stays in
// L1/L2 while every row uses it: with state 64, a whole row's B and C (512 bytes a step) would stream from L3 on
// every row.
//
// Work is split over rows (batch x channel); each row is an independent recurrence over time. The state (n floats)
// lives in registers; the backward recomputes each chunk of `chunk` steps from its saved starting state into a small
// L1-resident buffer, then walks it in reverse time.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(_OPENMP)
#include <omp.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#if defined(__AVX__)
#include <immintrin.h>
#endif

extern "C" {
struct ScanArgs {
  int64_t batch, dim, len, dstate, groups, chunk;
  int64_t softplus, reverse, nthreads;
  int64_t head_dim;   // > 0: scalar-decay (SSD) mode, see the layouts above
  int64_t u_bstride;  // SSD mode: floats between batches of u and du (0: dim * len)
  const float *u, *delta, *A, *B, *C, *D, *z, *delta_bias;
  const float* add;  // optional (batch, dim, len) added to out (the other direction of a bidirectional block)
  float *out, *last_state, *chunk_states;
  // backward only
  const float *dout;
  float *du, *ddelta, *dz, *dA_rows, *dD_rows, *dbias_rows, *dB_threads, *dC_threads;
  // Which of the row tensors (u, delta, z, add, out, dout, du, ddelta, dz, dadd, pre_gate) hold bfloat16 instead
  // of float32 (BF16_* bits). Only the vector Mamba-1 rows read and write them (state sizes 8..64, no SSD mode):
  // one row at a time is converted into a float32 buffer on the way in and rounded to nearest-even on the way out,
  // so the caller needs no whole-tensor conversion under autocast.
  int64_t bf16_io;
  // With z and add: 0 adds `add` after the gate, out = (y + D u) silu(z) + add; 1 before it,
  // out = (y + D u + add) silu(z), and the backward writes dadd = dout silu(z) (for a bidirectional block whose
  // directions share the gate: the first direction's call has no z, so no gate pass and no y recompute for dz,
  // and the second gates the sum). pre_gate (u's layout) then takes the sum before the gate: written by the
  // forward when given, read by the backward for dz, which then recomputes no y either.
  int64_t gate_add;
  float* dadd;
  float* pre_gate;
};

enum : int64_t { CONV_BF16_X = 1, CONV_BF16_OUT = 2, CONV_BF16_GOUT = 4, CONV_BF16_DX = 8 };

enum : int64_t { ADDNORM_BF16_H = 1, ADDNORM_BF16_NORMED = 2 };  // h and dh; normed and gnormed

enum : int64_t {
  BF16_U = 1, BF16_DELTA = 2, BF16_Z = 4, BF16_ADD = 8, BF16_OUT = 16, BF16_DOUT = 32, BF16_DU = 64,
  BF16_DDELTA = 128, BF16_DZ = 256, BF16_DADD = 512, BF16_PRE = 1024
};

// Transpose of the last two axes: dst[b][c][r] = src[b][r][c] for r < rows, c < cols; unit stride along the last
// axis of both, any batch and row strides (so the source may be a column slice of a wider tensor and the
// destination a column slice too). The layout change between token-major (batch, length, channels) activations
// and the channel-major ones the kernels read.
struct TransposeArgs {
  int64_t batch, rows, cols, src_bstride, src_rstride, dst_bstride, dst_rstride, nthreads;
  const float* src;
  float* dst;
};

// Depthwise conv1d over the length axis followed by SiLU, for up to two directions that read the same input (the
// forward and backward branches of a bidirectional Mamba). Layouts: x, out[j], gout[j][*], dx : (batch, dim, len);
// w[j] : (dim, k); bias[j] : (dim) or null; dw_rows[j] : (batch, dim, k); db_rows[j] : (batch, dim).
// Direction j is causal (out[t] = silu(bias + sum_i w[i] x[t - (k-1) + i])) or, with reverse[j], anti-causal
// (x[t + (k-1) - i]). The backward recomputes the pre-activations and writes one dx, the sum over directions.
struct ConvSiluArgs {
  int64_t batch, dim, len, k, ndir, nthreads;
  int64_t reverse[2];
  const float* x;
  const float* w[2];
  const float* bias[2];
  float* out[2];
  const float* gout[2];
  float* dx;
  float* dw_rows[2];
  float* db_rows[2];
  int64_t bf16_io;  // CONV_BF16_* bits: x, the outputs, the output gradients or dx are bfloat16 (rows converted here)
};

// Residual add + RMSNorm over rows of `dim` floats (DiS's block entry, mamba-ssm's fused add-norm):
//   res_out = res + scale[sample] * h   (res_out = h without res)
//   normed  = res_out * rstd * weight,  rstd = 1 / sqrt(mean(res_out^2) + eps), kept per row for the backward.
// The backward takes gnormed and gres (the gradient reaching res_out from elsewhere, or null) and writes
// dres = d res_out (when there was a res), dh = scale * d res_out, and per-thread partial sums of dweight.
// Layouts: h, normed, gnormed, dh (rows, dim), float32 or bfloat16 (ADDNORM_BF16_* bits); res, res_out, gres,
// dres (rows, dim) float32; rstd (rows); scale (rows / rows_per_sample); weight (dim); dw_threads (nthreads, dim).
struct AddNormArgs {
  int64_t rows, dim, rows_per_sample, nthreads;
  double eps;
  const float *h, *res, *scale, *weight;
  float *res_out, *normed, *rstd;
  // backward only
  const float *gnormed, *gres;
  float *dres, *dh, *dw_threads;
  int64_t bf16_io;
};
}

namespace {

// exp with a Cody-Waite reduction and a degree-6 polynomial (Cephes' expf coefficients): written branch-free so
// that the compiler inlines and vectorises it across the state (a libm call per element would dominate the scan).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }

// softplus(x) = max(x, 0) + log(1 + exp(-|x|)); the log argument stays in [1, 2] so logf is accurate there.
inline float softplus(float x) { return std::max(x, 0.0f) + std::log(1.0f + fast_exp(-std::fabs(x))); }

// Denormals appear as the state decays; flushing them (only inside our threads, restored afterwards) avoids the
// 100x slow path of denormal arithmetic without changing the process-wide floating-point mode.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved;
  FlushDenormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040); }
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

struct RowInfo {
  int64_t b, d, grp;
};

// This thread's private dB and dC accumulators, (batch, groups, len, n) each (the caller sums them).
inline std::pair<float*, float*> thread_dbc(const ScanArgs& a, int64_t tid, int64_t n) {
  const int64_t size = a.batch * a.groups * a.len * n;
  return {a.dB_threads + tid * size, a.dC_threads + tid * size};
}

inline RowInfo row_info(const ScanArgs& a, int64_t row) {
  RowInfo r;
  r.b = row / a.dim;
  r.d = row % a.dim;
  r.grp = r.d / (a.dim / a.groups);
  return r;
}

// delta after bias and softplus for positions t0.. of one row; `pre` keeps the softplus input for the backward's
// derivative. (The vector rows handle whole vectors themselves and pass their tail's start as t0.)
inline void row_delta(const ScanArgs& a, const RowInfo& ri, const float* drow, float* dt, float* pre,
                      int64_t t0 = 0) {
  const float bias = a.delta_bias ? a.delta_bias[ri.d] : 0.0f;
  const int64_t L = a.len;
  if (a.softplus) {
    for (int64_t t = t0; t < L; ++t) {
      float v = drow[t] + bias;
      if (pre) pre[t] = v;
      dt[t] = softplus(v);
    }
  } else {
    for (int64_t t = t0; t < L; ++t) dt[t] = drow[t] + bias;
  }
}

// The forward's epilogue on positions t0.. of one row of scan outputs y: out = (y + D u) * silu(z), or y + D u
// without z; plus `add` when given (summing the two directions of a bidirectional block here saves a pass over
// both outputs), after the gate or, with gate_add, before it.
inline void skip_and_gate(const ScanArgs& a, const RowInfo& ri, const float* urow, const float* zrow,
                          const float* addrow, float* orow, float* prerow, int64_t t0 = 0) {
  const int64_t L = a.len;
  const float Dd = a.D ? a.D[ri.d] : 0.0f;
  if (zrow && addrow && a.gate_add) {
    for (int64_t t = t0; t < L; ++t) {
      const float zz = zrow[t], sum = orow[t] + Dd * urow[t] + addrow[t];
      if (prerow) prerow[t] = sum;
      orow[t] = sum * zz * sigmoid(zz);
    }
  } else if (zrow) {
    for (int64_t t = t0; t < L; ++t) {
      const float zz = zrow[t];
      orow[t] = (orow[t] + Dd * urow[t]) * zz * sigmoid(zz) + (addrow ? addrow[t] : 0.0f);
    }
  } else if (a.D || addrow) {
    for (int64_t t = t0; t < L; ++t) orow[t] += Dd * urow[t] + (addrow ? addrow[t] : 0.0f);
  }
}

template <int NS>
void forward_rows(const ScanArgs& a, int64_t row0, int64_t row1) {
  FlushDenormals ftz;
  const int64_t n = NS ? NS : a.dstate;
  const int64_t L = a.len, K = a.chunk;
  const int64_t nchunks = (L + K - 1) / K;
  std::vector<float> dtbuf(L);
  float* dt = dtbuf.data();
  std::vector<float> hbuf(n);
  float* h = hbuf.data();
  for (int64_t row = row0; row < row1; ++row) {
    const RowInfo ri = row_info(a, row);
    const float* urow = a.u + row * L;
    float* orow = a.out + row * L;
    const float* Ad = a.A + ri.d * n;
    const float* Bg = a.B + (ri.b * a.groups + ri.grp) * L * n;
    const float* Cg = a.C + (ri.b * a.groups + ri.grp) * L * n;
    float* cs = a.chunk_states ? a.chunk_states + row * nchunks * n : nullptr;
    row_delta(a, ri, a.delta + row * L, dt, nullptr);
    for (int64_t i = 0; i < n; ++i) h[i] = 0.0f;
    for (int64_t s = 0; s < L; ++s) {
      const int64_t t = a.reverse ? L - 1 - s : s;
      if (cs && s % K == 0) std::memcpy(cs + (s / K) * n, h, n * sizeof(float));
      const float dtt = dt[t];
      const float x = dtt * urow[t];
      const float* Bt = Bg + t * n;
      const float* Ct = Cg + t * n;
      float y = 0.0f;
#pragma GCC ivdep
      for (int64_t i = 0; i < n; ++i) {
        h[i] = fast_exp(dtt * Ad[i]) * h[i] + x * Bt[i];
        y += h[i] * Ct[i];
      }
      orow[t] = y;
    }
    if (a.last_state) std::memcpy(a.last_state + row * n, h, n * sizeof(float));
    skip_and_gate(a, ri, urow, a.z ? a.z + row * L : nullptr, a.add ? a.add + row * L : nullptr, orow,
                  a.pre_gate ? a.pre_gate + row * L : nullptr);
  }
}

template <int NS>
void backward_rows(const ScanArgs& a, int64_t row0, int64_t row1, int64_t tid) {
  FlushDenormals ftz;
  const int64_t n = NS ? NS : a.dstate;
  const int64_t L = a.len, K = a.chunk;
  const int64_t nchunks = (L + K - 1) / K;
  std::vector<float> dtbuf(L), prebuf(a.softplus ? L : 0), gbuf(L), ddtbuf(L);
  float *dt = dtbuf.data(), *pre = a.softplus ? prebuf.data() : nullptr, *g = gbuf.data(), *ddt = ddtbuf.data();
  std::vector<float> hs((K + 1) * n), as(K * n), dhbuf(n), dAbuf(n);
  float *dh = dhbuf.data(), *dAacc = dAbuf.data();
  const auto [dBthr, dCthr] = thread_dbc(a, tid, n);
  for (int64_t row = row0; row < row1; ++row) {
    const RowInfo ri = row_info(a, row);
    const float* urow = a.u + row * L;
    const float* gout = a.dout + row * L;
    const float* Ad = a.A + ri.d * n;
    const int64_t bc_off = (ri.b * a.groups + ri.grp) * L * n;
    const float *Bg = a.B + bc_off, *Cg = a.C + bc_off;
    float *dBg = dBthr + bc_off, *dCg = dCthr + bc_off;
    const float* cs = a.chunk_states + row * nchunks * n;
    float* durow = a.du + row * L;
    const float Dd = a.D ? a.D[ri.d] : 0.0f;
    row_delta(a, ri, a.delta + row * L, dt, pre);
    // Gradient reaching the scan output y (before D and the gate): dout * silu(z).
    const float* zrow = a.z ? a.z + row * L : nullptr;
    const bool gated_sum = zrow && a.gate_add;
    const float* prerow = gated_sum && a.pre_gate ? a.pre_gate + row * L : nullptr;
    if (zrow) {
      for (int64_t t = 0; t < L; ++t) g[t] = gout[t] * zrow[t] * sigmoid(zrow[t]);
    } else {
      for (int64_t t = 0; t < L; ++t) g[t] = gout[t];
    }
    if (gated_sum && a.dadd) std::memcpy(a.dadd + row * L, g, L * sizeof(float));
    for (int64_t i = 0; i < n; ++i) dh[i] = 0.0f, dAacc[i] = 0.0f;
    float dDacc = 0.0f;
    for (int64_t c = nchunks - 1; c >= 0; --c) {
      const int64_t s0 = c * K, s1 = std::min(L, s0 + K);
      std::memcpy(hs.data(), cs + c * n, n * sizeof(float));
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t t = a.reverse ? L - 1 - s : s;
        const float dtt = dt[t], x = dtt * urow[t];
        const float* Bt = Bg + t * n;
        const float* hp = hs.data() + (s - s0) * n;
        float* hn = hs.data() + (s - s0 + 1) * n;
        float* at = as.data() + (s - s0) * n;
#pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) {
          const float e = fast_exp(dtt * Ad[i]);
          at[i] = e;
          hn[i] = e * hp[i] + x * Bt[i];
        }
      }
      for (int64_t s = s1 - 1; s >= s0; --s) {
        const int64_t t = a.reverse ? L - 1 - s : s;
        const float dtt = dt[t], ut = urow[t], x = dtt * ut;
        const float *Bt = Bg + t * n, *Ct = Cg + t * n;
        float *dBt = dBg + t * n, *dCt = dCg + t * n;
        const float* hp = hs.data() + (s - s0) * n;
        const float* hn = hs.data() + (s - s0 + 1) * n;
        const float* at = as.data() + (s - s0) * n;
        if (zrow) {
          float pre_gate;
          if (prerow) {
            pre_gate = prerow[t];
          } else {
            float y = 0.0f;
            for (int64_t i = 0; i < n; ++i) y += hn[i] * Ct[i];
            pre_gate = y + Dd * ut;
          }
          const float zz = zrow[t], sg = sigmoid(zz);
          a.dz[row * L + t] = gout[t] * pre_gate * sg * (1.0f + zz * (1.0f - sg));
        }
        const float gy = g[t];
        dDacc += gy * ut;
        float dx = 0.0f, ddtt = 0.0f;
#pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) {
          dCt[i] += gy * hn[i];
          const float dhi = dh[i] + gy * Ct[i];
          dBt[i] += dhi * x;
          dx += dhi * Bt[i];
          const float w = dhi * hp[i] * at[i];
          ddtt += w * Ad[i];
          dAacc[i] += w * dtt;
          dh[i] = dhi * at[i];
        }
        durow[t] = gy * Dd + dx * dtt;
        ddt[t] = ddtt + dx * ut;
      }
    }
    float* ddrow = a.ddelta + row * L;
    float dbias = 0.0f;
    if (pre) {
      for (int64_t t = 0; t < L; ++t) {
        const float v = ddt[t] * sigmoid(pre[t]);
        ddrow[t] = v;
        dbias += v;
      }
    } else {
      for (int64_t t = 0; t < L; ++t) {
        ddrow[t] = ddt[t];
        dbias += ddt[t];
      }
    }
    std::memcpy(a.dA_rows + row * n, dAacc, n * sizeof(float));
    a.dD_rows[row] = dDacc;
    a.dbias_rows[row] = dbias;
  }
}


// ---- Explicitly vectorised rows for state sizes that are a multiple of 8 (GCC/Clang vector extensions, so the
// same code becomes AVX2/AVX-512 on x86 and NEON pairs on ARM). The scalar templates above auto-vectorise poorly
// for short state loops (loop versioning and epilogues on every step): 1.4x slower forward and 1.8x slower
// backward at state 16 when measured.
typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
typedef float vf_u __attribute__((vector_size(32), aligned(4)));  // unaligned loads and stores
constexpr int VW = 8;
constexpr float kLog2e = 1.44269504088896341f;

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < VW; ++i) s += v[i];
  return s;
}

// Lane sums of 8 vectors at once (r[i] = sum of v[i]): one transpose-and-add instead of 8 separate reductions.
inline vf hsum8(const vf* v) {
#if defined(__AVX__)
  const __m256 t0 = _mm256_hadd_ps(reinterpret_cast<__m256>(v[0]), reinterpret_cast<__m256>(v[1]));
  const __m256 t1 = _mm256_hadd_ps(reinterpret_cast<__m256>(v[2]), reinterpret_cast<__m256>(v[3]));
  const __m256 t2 = _mm256_hadd_ps(reinterpret_cast<__m256>(v[4]), reinterpret_cast<__m256>(v[5]));
  const __m256 t3 = _mm256_hadd_ps(reinterpret_cast<__m256>(v[6]), reinterpret_cast<__m256>(v[7]));
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return reinterpret_cast<vf>(_mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
#else
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = hsum(v[i]);
  return r;
#endif
}

inline vf reversed(vf v) {
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  return __builtin_shufflevector(v, v, 7, 6, 5, 4, 3, 2, 1, 0);
#else
  vf r;
  for (int i = 0; i < VW; ++i) r[i] = v[VW - 1 - i];
  return r;
#endif
}

// Reduces per-step vectors buf[0..count) (scan steps s0, s0+1, ...) into dst at the steps' time positions.
inline void reduce_steps(const vf* buf, int64_t count, int64_t s0, int64_t L, bool reverse, float* dst) {
  int64_t k = 0;
  for (; k + VW <= count; k += VW) {
    const vf r = hsum8(buf + k);
    if (reverse) store(dst + (L - 1 - (s0 + k + VW - 1)), reversed(r));
    else store(dst + s0 + k, r);
  }
  for (; k < count; ++k) dst[reverse ? L - 1 - (s0 + k) : s0 + k] = hsum(buf[k]);
}

// 2^x for x in log2 units (callers fold log2(e) into A once per row). Round to nearest, then a degree-5
// polynomial for 2^f on [-0.5, 0.5] (relative error 2.3e-7, fitted for this file) times 2^k built in the exponent.
inline vi round_to_int(vf x) {
#if defined(__AVX__)
  return reinterpret_cast<vi>(_mm256_cvtps_epi32(reinterpret_cast<__m256>(x)));  // MXCSR default: nearest
#else
  return __builtin_convertvector(x + (x < 0.0f ? splat(-0.5f) : splat(0.5f)), vi);
#endif
}

// The polynomial for 2^f, f in [-0.5, 0.5], shared by both vector widths.
template <typename V>
inline V exp2_poly(V f) {
  V p = V{} + 1.3266975292935967e-3f;
  p = p * f + 9.67546459287405e-3f;
  p = p * f + 5.550742521882057e-2f;
  p = p * f + 2.4022121727466583e-1f;
  p = p * f + 6.931469440460205e-1f;
  return p * f + 1.0000001192092896f;
}

inline vf vexp2(vf x) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  // AVX-512: round in the float domain and scale by 2^k with vscalefps, which saturates to 0 or infinity by
  // itself: three instructions fewer than the integer route below.
  const __m256 k = _mm256_roundscale_ps(reinterpret_cast<__m256>(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf p = exp2_poly(x - reinterpret_cast<vf>(k));
  return reinterpret_cast<vf>(_mm256_scalef_ps(reinterpret_cast<__m256>(p), k));
#else
  // Round first, clamp the integer part: min/max on integer lanes keep the two multiply pipes free for the
  // polynomial. f stays in [-0.5, 0.5] for any |x| < 2^31, and k in [-126, 127] keeps 2^k a normal number.
  vi ki = round_to_int(x);
  const vf f = x - __builtin_convertvector(ki, vf);
  const vi lo = vi{} - 126, hi = vi{} + 127;
  ki = ki < lo ? lo : ki;
  ki = ki > hi ? hi : ki;
  const vf p = exp2_poly(f);
  return reinterpret_cast<vf>(reinterpret_cast<vi>(p) + (ki << 23));
#endif
}

// State vectors. The state of one row (NS floats) is held in vectors of type SV: vf, or with AVX-512 and NS a
// multiple of 16, vw (16 floats, a whole state-16 row in one register). Zen 4 runs a 512-bit operation as two
// 256-bit halves, so the wide type does not add arithmetic throughput; it halves the instructions that are not
// arithmetic (loads, stores, the exp's rounding and scaling, loop overhead) and the per-step reductions.
inline vf load_sv(const float* p, vf) { return load(p); }
inline vf fold(vf v) { return v; }  // a state vector's lanes summed down to one vf (whose lanes hsum8 adds)
#if defined(__AVX512F__) && defined(__AVX512VL__)
#define SSMDIFF_WIDE_STATE 1
typedef float vw __attribute__((vector_size(64)));
typedef float vw_u __attribute__((vector_size(64), aligned(4)));
inline vw load_sv(const float* p, vw) { return *reinterpret_cast<const vw_u*>(p); }
inline void store(float* p, vw v) { *reinterpret_cast<vw_u*>(p) = v; }
inline vf fold(vw v) {
  return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
         __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
}
inline vw vexp2(vw x) {
  const __m512 k = _mm512_roundscale_ps(reinterpret_cast<__m512>(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vw p = exp2_poly(x - reinterpret_cast<vw>(k));
  return reinterpret_cast<vw>(_mm512_scalef_ps(reinterpret_cast<__m512>(p), k));
}
#endif
template <typename SV>
constexpr int lanes() { return int(sizeof(SV) / sizeof(float)); }

// Row vectors: the type the per-position passes (softplus, gates, convs) walk a row with. With AVX-512, 16 floats:
// Zen 4 splits them into two 256-bit halves, but every instruction that is not arithmetic (the exp's rounding and
// scaling, compares, blends, loads, loop overhead) is issued once per 16 positions instead of twice (SiLU over
// DiS-S/2's conv outputs, one thread, hand timing: 0.67 -> 0.38 ms).
#if defined(SSMDIFF_WIDE_STATE)
typedef vw rv;
#else
typedef vf rv;
#endif
constexpr int RVW = lanes<rv>();
template <typename V>
inline float vsum(V v) { return hsum(fold(v)); }

template <typename V>
inline V vsigmoid(V x) {
  // |x| <= 80 keeps exp's result finite (2^115 at most): an infinity would turn the reciprocal that -ffast-math
  // may use for the division into NaN. sigmoid(-80) is 1.8e-35, as good as 0 here.
  x = x < -80.0f ? V{} - 80.0f : x;
  x = x > 80.0f ? V{} + 80.0f : x;
  return 1.0f / (1.0f + vexp2(x * -kLog2e));
}

// softplus and sigmoid on whole vectors, for the per-position work around the scan (a tenth to a quarter of it
// with scalar libm calls). softplus(v) = max(v, 0) + log1p(e), e = exp(-|v|) in (0, 1], with log1p(e) = e q(e)
// and q a degree-8 polynomial fitted for this file on [0, 1] (relative error 2e-7 in float, below the exp's own):
// no division, where the atanh series it replaced needed one (softplus over DiS-S/2's 736 x 1024 deltas, one
// thread, hand timing: 0.53 -> 0.36 ms). From the same exp, its derivative sigmoid(v) = 1 / (1 + e) for v > 0 and
// e / (1 + e) otherwise: the backward keeps that instead of taking another exp per position for it.
template <typename V>
inline V vsoftplus_sig(V v, V& sig) {
  V a = v < 0.0f ? -v : v;
  a = a > 100.0f ? V{} + 100.0f : a;  // exp(-100) is 0 in float: keeps exp2's argument in range
  const V e = vexp2(a * -kLog2e);
  const V r = 1.0f / (1.0f + e);
  sig = v > 0.0f ? r : e * r;
  V q = V{} + 0.005253457929939032f;
  q = q * e - 0.02958850748836994f;
  q = q * e + 0.07836166769266129f;
  q = q * e - 0.13674770295619965f;
  q = q * e + 0.19111430644989014f;
  q = q * e - 0.24844369292259216f;
  q = q * e + 0.33319270610809326f;
  q = q * e - 0.49999502301216125f;
  q = q * e + 1.0f;
  return (v > 0.0f ? v : V{}) + e * q;
}

template <typename V>
inline V vsoftplus(V v) {
  V unused;  // the derivative's division is dead code here and compiled away
  return vsoftplus_sig(v, unused);
}
#if defined(SSMDIFF_WIDE_STATE)
template <int NS>
using state_vector = std::conditional_t<NS % 16 == 0, vw, vf>;
#else
template <int NS>
using state_vector = vf;
#endif

// row_delta with whole vectors, the tail by row_delta (the forward's; the backward fuses its own pass).
inline void row_delta_vec(const ScanArgs& a, const RowInfo& ri, const float* drow, float* dt) {
  int64_t t = 0;
  if (a.softplus) {
    const float bias = a.delta_bias ? a.delta_bias[ri.d] : 0.0f;
    for (; t + RVW <= a.len; t += RVW) store(dt + t, vsoftplus(load_sv(drow + t, rv{}) + bias));
  }
  row_delta(a, ri, drow, dt, nullptr, t);
}

// skip_and_gate with whole vectors where there is a gate, the tail (or a row without gate) by skip_and_gate.
inline void skip_and_gate_vec(const ScanArgs& a, const RowInfo& ri, const float* urow, const float* zrow,
                              const float* addrow, float* orow, float* prerow) {
  const int64_t L = a.len;
  int64_t t = 0;
  if (zrow) {
    const float Dd = a.D ? a.D[ri.d] : 0.0f;
    if (addrow && a.gate_add) {
      for (; t + RVW <= L; t += RVW) {
        const rv zz = load_sv(zrow + t, rv{});
        const rv sum = load_sv(orow + t, rv{}) + Dd * load_sv(urow + t, rv{}) + load_sv(addrow + t, rv{});
        if (prerow) store(prerow + t, sum);
        store(orow + t, sum * zz * vsigmoid(zz));
      }
    } else {
      for (; t + RVW <= L; t += RVW) {
        const rv zz = load_sv(zrow + t, rv{});
        rv o = (load_sv(orow + t, rv{}) + Dd * load_sv(urow + t, rv{})) * zz * vsigmoid(zz);
        if (addrow) o += load_sv(addrow + t, rv{});
        store(orow + t, o);
      }
    }
  }
  skip_and_gate(a, ri, urow, zrow, addrow, orow, prerow, t);
}

// bfloat16 rows: widen exactly; narrow with round-to-nearest-even (NaN stays NaN), as torch's .to(bfloat16) does.
inline void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_si512(dst + i, _mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))), 16));
#endif
  for (; i < n; ++i) {
    const uint32_t bits = uint32_t(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

inline void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  // vcvtneps2bf16 rounds to nearest even and quiets NaNs keeping sign and top payload bits, as the loop below does;
  // it reads denormal inputs as zero, which the kernels' own arithmetic (flush-to-zero) never produces.
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i))));
#endif
  for (; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(float));
    const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
    dst[i] = nan ? uint16_t((bits >> 16) | 0x40u) : uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}

// Row `row` of a (rows, L) input (null stays null) that is float32, or bfloat16 when `bf16` (then widened into buf).
// The scan and conv kernels pass `bf16_io & bit` of their args.
inline const float* in_row(const float* base, bool bf16, int64_t row, int64_t L, float* buf) {
  if (!base) return nullptr;
  if (!bf16) return base + row * L;
  bf16_to_f32(reinterpret_cast<const uint16_t*>(base) + row * L, buf, L);
  return buf;
}

// Where a row of an output is written: in place for float32, or into buf, narrowed by out_row_done.
inline float* out_row(float* base, bool bf16, int64_t row, int64_t L, float* buf) {
  if (!base) return nullptr;
  return bf16 ? buf : base + row * L;
}

inline void out_row_done(float* base, bool bf16, int64_t row, int64_t L, const float* buf) {
  if (base && bf16) f32_to_bf16(buf, reinterpret_cast<uint16_t*>(base) + row * L, L);
}

// Row `row` of a (rows, L) float32 or bfloat16 tensor copied (widened) into dst, and its inverse: unlike
// in_row / out_row, always through the caller's buffer (the conv's padded row, a float32 row already computed).
inline void load_row(const float* base, bool bf16, int64_t row, int64_t L, float* dst) {
  if (bf16) bf16_to_f32(reinterpret_cast<const uint16_t*>(base) + row * L, dst, L);
  else std::memcpy(dst, base + row * L, L * sizeof(float));
}

inline void store_row(float* base, bool bf16, int64_t row, int64_t L, const float* src) {
  if (bf16) f32_to_bf16(src, reinterpret_cast<uint16_t*>(base) + row * L, L);
  else std::memcpy(base + row * L, src, L * sizeof(float));
}

// Software prefetch of the rows a thread takes next, a few lines at a time over the current rows' compute. The
// per-row passes read and write whole rows in bursts between long compute phases, and on a machine whose caches
// are shared with other work the hardware prefetchers bring too little too late: in-process A/B at DiS-S/2's shape
// in bf16 (4 x 736 rows of 1026, 2 threads), the forward took 7-11% less time with this and the backward 3-5% less
// (in float32 the forward 5-12% less; the backward prefetches only bfloat16 rows, see backward_group).
// Fetching the next rows in one burst, or only during the last chunks, measured no better.
struct RowPrefetch {
  static constexpr int kRows = 24;  // the backward adds up to 9 tensors' rows for each of a group's 2 rows
  const char* p[kRows];
  int64_t bytes[kRows];
  bool write[kRows];
  int n = 0, i = 0;
  int64_t off = 0;
  // Absent tensors (null base) are skipped, so callers pass every tensor a kernel may read or write.
  void add(const float* base, bool bf16, int64_t row, int64_t L, bool w = false) {
    if (!base || n == kRows) return;
    const int64_t b = L * (bf16 ? 2 : 4);
    p[n] = reinterpret_cast<const char*>(base) + row * b, bytes[n] = b, write[n] = w, ++n;
  }
  int64_t lines() const {
    int64_t s = 0;
    for (int k = 0; k < n; ++k) s += (bytes[k] + 63) / 64;
    return s;
  }
  void step(int64_t count) {
    for (; count > 0 && i < n; --count) {
      if (write[i]) __builtin_prefetch(p[i] + off, 1, 3);
      else __builtin_prefetch(p[i] + off, 0, 3);
      off += 64;
      if (off >= bytes[i]) off = 0, ++i;
    }
  }
};

template <int NS, typename SV>
void forward_rows_vec(const ScanArgs& a, int64_t row0, int64_t row1) {
  constexpr int SW = lanes<SV>(), NV = NS / SW;
  static_assert(NS % SW == 0 && SW % VW == 0, "vector path needs a multiple of the vector width");
  FlushDenormals ftz;
  const int64_t L = a.len, K = a.chunk;
  const int64_t nchunks = (L + K - 1) / K;
  std::vector<float> dtbuf(L), xbuf(L);
  float *dt = dtbuf.data(), *xs = xbuf.data();
  const bool staged = a.bf16_io != 0;
  std::vector<float> stage(staged ? 6 * L : 0);
  float* sb = stage.data();
  for (int64_t row = row0; row < row1; ++row) {
    RowPrefetch pf;
    if (row + 1 < row1) {
      pf.add(a.u, a.bf16_io & BF16_U, row + 1, L);
      pf.add(a.delta, a.bf16_io & BF16_DELTA, row + 1, L);
      pf.add(a.z, a.bf16_io & BF16_Z, row + 1, L);
      pf.add(a.add, a.bf16_io & BF16_ADD, row + 1, L);
      pf.add(a.out, a.bf16_io & BF16_OUT, row + 1, L, true);
      pf.add(a.pre_gate, a.bf16_io & BF16_PRE, row + 1, L, true);
    }
    const int64_t pf_per_block = (pf.lines() * VW + L - 1) / L + 1;
    const RowInfo ri = row_info(a, row);
    const float* urow = in_row(a.u, a.bf16_io & BF16_U, row, L, sb);
    const float* drow = in_row(a.delta, a.bf16_io & BF16_DELTA, row, L, sb + L);
    const float* zrow = in_row(a.z, a.bf16_io & BF16_Z, row, L, sb + 2 * L);
    const float* addrow = in_row(a.add, a.bf16_io & BF16_ADD, row, L, sb + 3 * L);
    float* orow = out_row(a.out, a.bf16_io & BF16_OUT, row, L, sb + 4 * L);
    float* prerow = zrow && addrow && a.gate_add ? out_row(a.pre_gate, a.bf16_io & BF16_PRE, row, L, sb + 5 * L)
                                                 : nullptr;
    const float* Bg = a.B + (ri.b * a.groups + ri.grp) * L * NS;
    const float* Cg = a.C + (ri.b * a.groups + ri.grp) * L * NS;
    float* cs = a.chunk_states ? a.chunk_states + row * nchunks * NS : nullptr;
    row_delta_vec(a, ri, drow, dt);
    for (int64_t i = 0; i < L; ++i) xs[i] = dt[i] * urow[i];
    SV Av[NV], h[NV];
    for (int j = 0; j < NV; ++j) Av[j] = load_sv(a.A + ri.d * NS + j * SW, SV{}) * kLog2e, h[j] = SV{};
    const int64_t step = a.reverse ? -1 : 1;
    vf ybuf[VW];
    // Steps go in blocks of VW: first every decay and input of the block (independent of the state, so the exps'
    // long dependency chains overlap), then the recurrence itself, whose only chain is one FMA per step.
    SV eb[VW][NV], xb[VW][NV];
    int64_t next_cs = 0;
    for (int64_t s0 = 0; s0 < L; s0 += VW) {
      const int64_t cnt = std::min<int64_t>(VW, L - s0);
      pf.step(pf_per_block);
      const int64_t t0 = a.reverse ? L - 1 - s0 : s0;
      for (int64_t k = 0; k < cnt; ++k) {
        const int64_t t = t0 + k * step;
        const SV dtv = SV{} + dt[t], xv = SV{} + xs[t];
        const float* Bt = Bg + t * NS;
        for (int j = 0; j < NV; ++j) eb[k][j] = vexp2(dtv * Av[j]), xb[k][j] = xv * load_sv(Bt + j * SW, SV{});
      }
      for (int64_t k = 0; k < cnt; ++k) {
        const int64_t s = s0 + k, t = t0 + k * step;
        if (cs && s == next_cs) {
          for (int j = 0; j < NV; ++j) store(cs + (s / K) * NS + j * SW, h[j]);
          next_cs += K;
        }
        const float* Ct = Cg + t * NS;
        SV acc{};
        for (int j = 0; j < NV; ++j) {
          h[j] = eb[k][j] * h[j] + xb[k][j];
          acc += h[j] * load_sv(Ct + j * SW, SV{});
        }
        ybuf[k] = fold(acc);
      }
      reduce_steps(ybuf, cnt, s0, L, a.reverse, orow);
    }
    if (a.last_state)
      for (int j = 0; j < NV; ++j) store(a.last_state + row * NS + j * SW, h[j]);
    skip_and_gate_vec(a, ri, urow, zrow, addrow, orow, prerow);
    out_row_done(a.out, a.bf16_io & BF16_OUT, row, L, orow);
    if (prerow) out_row_done(a.pre_gate, a.bf16_io & BF16_PRE, row, L, prerow);
  }
}

// Whether rows row .. row + R - 1 all lie below row1 and in one batch and group (so share B and C).
inline bool pair_shares_bc(const ScanArgs& a, int64_t row, int R, int64_t row1) {
  if (row + R > row1) return false;
  const RowInfo first = row_info(a, row), last = row_info(a, row + R - 1);
  return first.b == last.b && first.grp == last.grp;
}

// Whether the vector backward recomputes the scan output y: only for dz, and not where the forward kept the sum
// before the gate.
inline bool recomputes_y(const ScanArgs& a) { return a.z && !(a.gate_add && a.pre_gate); }

// One row's buffers in the vector backward (each thread keeps one set per row it walks at once).
struct BwdRow {
  std::vector<float> dt, sig, g, zf, xs, dxs, dss, ys, hs, as, stage;
  std::vector<vf> dxbuf, dsbuf, ybuf;  // per-step partial sums, reduced 8 steps at a time after each chunk
  BwdRow(const ScanArgs& a, int64_t ns)
      : dt(a.len), sig(a.softplus ? a.len : 0), g(a.len), zf(a.z ? a.len : 0), xs(a.len), dxs(a.len), dss(a.len),
        ys(recomputes_y(a) ? a.len : 0), hs((a.chunk + 1) * ns), as(a.chunk * ns), stage(a.bf16_io ? 8 * a.len : 0),
        dxbuf(a.chunk), dsbuf(a.chunk), ybuf(recomputes_y(a) ? a.chunk : 0) {}
};

// The row's inputs in one pass: delta after bias (and softplus, keeping its derivative for ddelta), the scan input
// x = delta u, and the gradient reaching the scan output, g = dout silu(z), with zf = dout silu'(z), which times
// (y + D u) gives dz. Per-position work (this, the epilogue and the per-chunk reductions) was 44% of the backward
// at DiS-S/2's shapes as separate passes with a second exp for softplus' derivative. Fused, forward + backward
// there went from 30.5-31.5 to 26.9-27.4 ms (`python benchmarks/scan.py --lengths 1026 --batch 4 --dim 736
// --skip-ref`, 2 threads).
inline void bwd_prepass(const ScanArgs& a, const RowInfo& ri, const float* drow, const float* urow,
                        const float* gout, const float* zrow, BwdRow& r) {
  const int64_t L = a.len;
  const float bias = a.delta_bias ? a.delta_bias[ri.d] : 0.0f;
  float *dt = r.dt.data(), *sig = r.sig.data(), *g = r.g.data(), *zf = r.zf.data(), *xs = r.xs.data();
  int64_t i = 0;
  for (; i + RVW <= L; i += RVW) {
    rv v = load_sv(drow + i, rv{}) + bias;
    if (a.softplus) {
      rv sg;
      v = vsoftplus_sig(v, sg);
      store(sig + i, sg);
    }
    store(dt + i, v);
    store(xs + i, v * load_sv(urow + i, rv{}));
    const rv go = load_sv(gout + i, rv{});
    if (zrow) {
      const rv zz = load_sv(zrow + i, rv{}), sg = vsigmoid(zz);
      store(g + i, go * zz * sg);
      store(zf + i, go * sg * (1.0f + zz * (1.0f - sg)));
    } else {
      store(g + i, go);
    }
  }
  for (; i < L; ++i) {
    float v = drow[i] + bias;
    if (a.softplus) sig[i] = sigmoid(v), v = softplus(v);
    dt[i] = v;
    xs[i] = v * urow[i];
    if (zrow) {
      const float zz = zrow[i], sg = sigmoid(zz);
      g[i] = gout[i] * zz * sg;
      zf[i] = gout[i] * sg * (1.0f + zz * (1.0f - sg));
    } else {
      g[i] = gout[i];
    }
  }
}

// One pass for the per-position gradients: du, ddelta (through softplus), dz, and the sums for dD and the bias.
inline void bwd_epilogue(const ScanArgs& a, const RowInfo& ri, int64_t row, const float* urow, const float* zrow,
                         const float* prerow, float* durow, BwdRow& r) {
  const int64_t L = a.len;
  const float Dd = a.D ? a.D[ri.d] : 0.0f;
  const float *dt = r.dt.data(), *sig = r.sig.data(), *g = r.g.data(), *zf = r.zf.data();
  const float *dxs = r.dxs.data(), *dss = r.dss.data(), *ys = r.ys.data();
  float* sb = r.stage.data();
  float* ddrow = out_row(a.ddelta, a.bf16_io & BF16_DDELTA, row, L, sb + 5 * L);
  float* dzrow = zrow ? out_row(a.dz, a.bf16_io & BF16_DZ, row, L, sb + 6 * L) : nullptr;
  rv dDv{}, dbv{};
  int64_t i = 0;
  for (; i + RVW <= L; i += RVW) {
    const rv gv = load_sv(g + i, rv{}), uv = load_sv(urow + i, rv{}), dx = load_sv(dxs + i, rv{});
    store(durow + i, gv * Dd + dx * load_sv(dt + i, rv{}));
    rv dd = load_sv(dss + i, rv{}) + dx * uv;
    if (a.softplus) dd *= load_sv(sig + i, rv{});
    store(ddrow + i, dd);
    dbv += dd;
    dDv += gv * uv;
    if (dzrow) {
      const rv pre = prerow ? load_sv(prerow + i, rv{}) : load_sv(ys + i, rv{}) + Dd * uv;
      store(dzrow + i, load_sv(zf + i, rv{}) * pre);
    }
  }
  float dDacc = vsum(dDv), dbias = vsum(dbv);
  for (; i < L; ++i) {
    durow[i] = g[i] * Dd + dxs[i] * dt[i];
    float dd = dss[i] + dxs[i] * urow[i];
    if (a.softplus) dd *= sig[i];
    ddrow[i] = dd;
    dbias += dd;
    dDacc += g[i] * urow[i];
    if (dzrow) dzrow[i] = zf[i] * (prerow ? prerow[i] : ys[i] + Dd * urow[i]);
  }
  if (zrow && a.gate_add && a.dadd) {  // dadd = g = dout silu(z), the gradient reaching the gated sum
    store_row(a.dadd, a.bf16_io & BF16_DADD, row, L, g);
  }
  out_row_done(a.du, a.bf16_io & BF16_DU, row, L, durow);
  out_row_done(a.ddelta, a.bf16_io & BF16_DDELTA, row, L, ddrow);
  if (dzrow) out_row_done(a.dz, a.bf16_io & BF16_DZ, row, L, dzrow);
  a.dD_rows[row] = dDacc;
  a.dbias_rows[row] = dbias;
}

// Rows row .. row + R - 1 (same batch and group, so the same B, C and dB, dC rows) walked together through the
// recompute and the reverse pass: each load of B and C and each read-modify-write of dB and dC serves R rows, and
// the rows' dependency chains (the state's FMA, the reverse dh's FMA and multiply) run side by side.
template <int NS, typename SV, int R>
void backward_group(const ScanArgs& a, int64_t row, int64_t tid, BwdRow* rb, int64_t next0, int64_t next1) {
  constexpr int SW = lanes<SV>(), NV = NS / SW;
  const int64_t L = a.len, K = a.chunk;
  const int64_t nchunks = (L + K - 1) / K;
  const int64_t step = a.reverse ? -1 : 1;
  const auto [dBthr, dCthr] = thread_dbc(a, tid, NS);
  const RowInfo ri0 = row_info(a, row);
  const int64_t bc_off = (ri0.b * a.groups + ri0.grp) * L * NS;
  const float *Bg = a.B + bc_off, *Cg = a.C + bc_off;
  float *dBg = dBthr + bc_off, *dCg = dCthr + bc_off;
  const float *urow[R], *zrow[R], *prerow[R], *cs[R], *dt[R], *xs[R], *g[R];
  float* durow[R];
  SV Av[R][NV], A2[R][NV], dh[R][NV], dAacc[R][NV];
  for (int r = 0; r < R; ++r) {
    const RowInfo ri = row_info(a, row + r);
    float* sb = rb[r].stage.data();
    urow[r] = in_row(a.u, a.bf16_io & BF16_U, row + r, L, sb);
    const float* gout = in_row(a.dout, a.bf16_io & BF16_DOUT, row + r, L, sb + L);
    durow[r] = out_row(a.du, a.bf16_io & BF16_DU, row + r, L, sb + 2 * L);
    const float* drow = in_row(a.delta, a.bf16_io & BF16_DELTA, row + r, L, sb + 3 * L);
    zrow[r] = in_row(a.z, a.bf16_io & BF16_Z, row + r, L, sb + 4 * L);
    prerow[r] = zrow[r] && a.gate_add ? in_row(a.pre_gate, a.bf16_io & BF16_PRE, row + r, L, sb + 7 * L) : nullptr;
    cs[r] = a.chunk_states + (row + r) * nchunks * NS;
    bwd_prepass(a, ri, drow, urow[r], gout, zrow[r], rb[r]);
    dt[r] = rb[r].dt.data(), xs[r] = rb[r].xs.data(), g[r] = rb[r].g.data();
    for (int j = 0; j < NV; ++j) {
      Av[r][j] = load_sv(a.A + ri.d * NS + j * SW, SV{}), A2[r][j] = Av[r][j] * kLog2e;
      dh[r][j] = SV{}, dAacc[r][j] = SV{};
    }
  }
  // Only for bfloat16 rows: with float32 rows (twice the bytes, read in place by the passes) the same prefetch made
  // the backward 4-11% slower in the in-process A/B (DiS-S/2's shape, 1026 and 4098 positions), the forward faster.
  RowPrefetch pf;
  for (int64_t p = next0; a.bf16_io && p < next1; ++p) {
    pf.add(a.u, a.bf16_io & BF16_U, p, L);
    pf.add(a.dout, a.bf16_io & BF16_DOUT, p, L);
    pf.add(a.delta, a.bf16_io & BF16_DELTA, p, L);
    pf.add(a.z, a.bf16_io & BF16_Z, p, L);
    pf.add(a.pre_gate, a.bf16_io & BF16_PRE, p, L);
    pf.add(a.du, a.bf16_io & BF16_DU, p, L, true);
    pf.add(a.ddelta, a.bf16_io & BF16_DDELTA, p, L, true);
    pf.add(a.dz, a.bf16_io & BF16_DZ, p, L, true);
    pf.add(a.dadd, a.bf16_io & BF16_DADD, p, L, true);
  }
  const int64_t pf_per_chunk = pf.lines() / nchunks + 1;
  const bool recompute_y = recomputes_y(a);
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    pf.step(pf_per_chunk);
    const int64_t s0 = c * K, s1 = std::min(L, s0 + K);
    SV h[R][NV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j)
        h[r][j] = load_sv(cs[r] + c * NS + j * SW, SV{}), store(rb[r].hs.data() + j * SW, h[r][j]);
    int64_t t = a.reverse ? L - 1 - s0 : s0;
    for (int64_t s = s0; s < s1; ++s, t += step) {
      const float* Bt = Bg + t * NS;
      for (int j = 0; j < NV; ++j) {
        const SV Bj = load_sv(Bt + j * SW, SV{});
        for (int r = 0; r < R; ++r) {
          const SV e = vexp2((SV{} + dt[r][t]) * A2[r][j]);
          store(rb[r].as.data() + (s - s0) * NS + j * SW, e);
          h[r][j] = e * h[r][j] + (SV{} + xs[r][t]) * Bj;
          store(rb[r].hs.data() + (s - s0 + 1) * NS + j * SW, h[r][j]);
        }
      }
    }
    t = a.reverse ? L - s1 : s1 - 1;
    for (int64_t s = s1 - 1; s >= s0; --s, t -= step) {
      const float *Bt = Bg + t * NS, *Ct = Cg + t * NS;
      float *dBt = dBg + t * NS, *dCt = dCg + t * NS;
      const int64_t k = s - s0;
      SV gv[R], xv[R], dtv[R], dxv[R], ddtv[R], yv[R];
      for (int r = 0; r < R; ++r) {
        gv[r] = SV{} + g[r][t], xv[r] = SV{} + xs[r][t], dtv[r] = SV{} + dt[r][t];
        dxv[r] = SV{}, ddtv[r] = SV{}, yv[r] = SV{};
      }
      for (int j = 0; j < NV; ++j) {
        const int o = j * SW;
        const SV Cj = load_sv(Ct + o, SV{}), Bj = load_sv(Bt + o, SV{});
        SV dCj = load_sv(dCt + o, SV{}), dBj = load_sv(dBt + o, SV{});
        for (int r = 0; r < R; ++r) {
          const float* hp = rb[r].hs.data() + k * NS;
          const SV hnj = load_sv(hp + NS + o, SV{}), hpj = load_sv(hp + o, SV{});
          const SV aj = load_sv(rb[r].as.data() + k * NS + o, SV{});
          if (recompute_y) yv[r] += hnj * Cj;
          dCj += gv[r] * hnj;
          const SV dhi = dh[r][j] + gv[r] * Cj;
          dBj += dhi * xv[r];
          dxv[r] += dhi * Bj;
          dh[r][j] = dhi * aj;
          const SV w = dh[r][j] * hpj;  // dhi * a * h_prev: the gradient of the exponent delta * A
          ddtv[r] += w * Av[r][j];
          dAacc[r][j] += w * dtv[r];
        }
        store(dCt + o, dCj);
        store(dBt + o, dBj);
      }
      for (int r = 0; r < R; ++r) {
        rb[r].dxbuf[k] = fold(dxv[r]);
        rb[r].dsbuf[k] = fold(ddtv[r]);
        if (recompute_y) rb[r].ybuf[k] = fold(yv[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      reduce_steps(rb[r].dxbuf.data(), s1 - s0, s0, L, a.reverse, rb[r].dxs.data());
      reduce_steps(rb[r].dsbuf.data(), s1 - s0, s0, L, a.reverse, rb[r].dss.data());
      if (recompute_y) reduce_steps(rb[r].ybuf.data(), s1 - s0, s0, L, a.reverse, rb[r].ys.data());
    }
  }
  for (int r = 0; r < R; ++r) {
    bwd_epilogue(a, row_info(a, row + r), row + r, urow[r], zrow[r], prerow[r], durow[r], rb[r]);
    for (int j = 0; j < NV; ++j) store(a.dA_rows + (row + r) * NS + j * SW, dAacc[r][j]);
  }
}

// Rows in pairs where the state fits one vector per row (two rows' state, gradient and decay vectors then still
// fit the registers), one at a time otherwise or where a pair would straddle a batch or group boundary. (The
// forward stays one row at a time: pairing it, with its blocks of decays and inputs doubled, was 3-6% slower in a
// hand harness.)
template <int NS, typename SV>
void backward_rows_vec(const ScanArgs& a, int64_t row0, int64_t row1, int64_t tid) {
  constexpr int NV = NS / lanes<SV>();
  constexpr int R = NV == 1 ? 2 : 1;
  FlushDenormals ftz;
  std::vector<BwdRow> rb;
  for (int r = 0; r < R; ++r) rb.emplace_back(a, NS);
  for (int64_t row = row0; row < row1;) {
    if (R > 1 && pair_shares_bc(a, row, R, row1)) {
      backward_group<NS, SV, R>(a, row, tid, rb.data(), row + R, std::min(row1, row + 2 * R));
      row += R;
    } else {
      backward_group<NS, SV, 1>(a, row, tid, rb.data(), row + 1, std::min(row1, row + 2));
      row += 1;
    }
  }
}



// Rows are handed out in small blocks rather than split evenly up front: on a shared or hyper-threaded machine one
// descheduled thread would otherwise hold up the whole call. Each thread keeps its own index (for its private dB/dC
// accumulator) whichever rows it ends up taking. With OpenMP the threads are the OpenMP runtime's pool, which is
// torch's own when the process already loaded torch's libgomp (same soname): no thread start-up per call, and no
// second pool spinning against torch's on a small machine.
template <typename F>
void parallel_for(int64_t rows, int64_t nthreads, int64_t block, F&& fn) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(nthreads, rows));
  if (T == 1) {
    fn(int64_t(0), rows, int64_t(0));
    return;
  }
  std::atomic<int64_t> next{0};
  auto worker = [&](int64_t tid) {
    for (;;) {
      const int64_t r0 = next.fetch_add(block);
      if (r0 >= rows) break;
      fn(r0, std::min(rows, r0 + block), tid);
    }
  };
#if defined(_OPENMP)
#pragma omp parallel num_threads(static_cast<int>(T))
  worker(omp_get_thread_num());
#else
  std::vector<std::thread> pool;
  pool.reserve(T - 1);
  for (int64_t j = 1; j < T; ++j) pool.emplace_back(worker, j);
  worker(0);
  for (auto& th : pool) th.join();
#endif
}

template <typename F>
void parallel_rows(const ScanArgs& a, F&& fn) {
  const int64_t rows = a.batch * a.dim;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(a.nthreads, rows));
  // Even blocks, so that the vector backward's row pairs never straddle two blocks.
  const int64_t block = std::max<int64_t>(2, (rows / (T * 16) + 1) & ~int64_t(1));
  parallel_for(rows, a.nthreads, block, fn);
}

// ---- Scalar-decay (SSD) mode: one (batch, head) unit at a time, time chunk by chunk across the head's rows.
struct HeadInfo {
  int64_t b, head, grp, row0;
};

inline int64_t u_offset(const ScanArgs& a, const HeadInfo& hi, int64_t i) {
  return hi.b * (a.u_bstride ? a.u_bstride : a.dim * a.len) + (hi.head * a.head_dim + i) * a.len;
}

inline HeadInfo head_info(const ScanArgs& a, int64_t unit) {
  const int64_t heads = a.dim / a.head_dim;
  HeadInfo hi;
  hi.b = unit / heads;
  hi.head = unit % heads;
  hi.grp = hi.head / (heads / a.groups);
  hi.row0 = hi.b * a.dim + hi.head * a.head_dim;
  return hi;
}

// e[t] = exp(dt[t] * A) for one head.
inline void head_decay(const float* dt, float A, int64_t L, float* e) {
  const vf A2 = splat(A * kLog2e);
  int64_t t = 0;
  for (; t + VW <= L; t += VW) store(e + t, vexp2(load(dt + t) * A2));
  for (; t < L; ++t) e[t] = fast_exp(dt[t] * A);
}

template <int NS>
void forward_sd(const ScanArgs& a, int64_t unit0, int64_t unit1) {
  static_assert(NS > 0 && NS % VW == 0, "scalar-decay mode needs a multiple of the vector width");
  constexpr int NV = NS / VW;
  FlushDenormals ftz;
  const int64_t L = a.len, K = a.chunk, P = a.head_dim, heads = a.dim / a.head_dim;
  const int64_t nchunks = (L + K - 1) / K;
  const int64_t step = a.reverse ? -1 : 1;
  std::vector<float> ebuf(L), hbuf(P * NS);
  std::vector<vf> ybuf(K);
  float *ea = ebuf.data(), *H = hbuf.data();
  for (int64_t unit = unit0; unit < unit1; ++unit) {
    const HeadInfo hi = head_info(a, unit);
    const float* dt = a.delta + (hi.b * heads + hi.head) * L;
    head_decay(dt, a.A[hi.head], L, ea);
    const float* Bg = a.B + (hi.b * a.groups + hi.grp) * L * NS;
    const float* Cg = a.C + (hi.b * a.groups + hi.grp) * L * NS;
    std::fill(H, H + P * NS, 0.0f);
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t s0 = c * K, s1 = std::min(L, s0 + K);
      for (int64_t i = 0; i < P; ++i) {
        const int64_t row = hi.row0 + i;
        const float* urow = a.u + u_offset(a, hi, i);
        vf h[NV];
        for (int j = 0; j < NV; ++j) h[j] = load(H + i * NS + j * VW);
        if (a.chunk_states)
          for (int j = 0; j < NV; ++j) store(a.chunk_states + (row * nchunks + c) * NS + j * VW, h[j]);
        int64_t t = a.reverse ? L - 1 - s0 : s0;
        for (int64_t s = s0; s < s1; ++s, t += step) {
          const vf e = splat(ea[t]), xv = splat(dt[t] * urow[t]);
          const float* Bt = Bg + t * NS;
          const float* Ct = Cg + t * NS;
          // Four partial sums: one chain of NV dependent multiply-adds per step would be latency-bound.
          vf acc[4] = {};
          for (int j = 0; j < NV; ++j) {
            h[j] = e * h[j] + xv * load(Bt + j * VW);
            acc[j % 4] += h[j] * load(Ct + j * VW);
          }
          ybuf[s - s0] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
        reduce_steps(ybuf.data(), s1 - s0, s0, L, a.reverse, a.out + row * L);
        for (int j = 0; j < NV; ++j) store(H + i * NS + j * VW, h[j]);
      }
    }
    for (int64_t i = 0; i < P; ++i) {
      const int64_t row = hi.row0 + i;
      if (a.last_state) std::memcpy(a.last_state + row * NS, H + i * NS, NS * sizeof(float));
      skip_and_gate(a, row_info(a, row), a.u + u_offset(a, hi, i), nullptr, a.add ? a.add + row * L : nullptr,
                    a.out + row * L, nullptr);
    }
  }
}

template <int NS>
void backward_sd(const ScanArgs& a, int64_t unit0, int64_t unit1, int64_t tid) {
  constexpr int NV = NS / VW;
  FlushDenormals ftz;
  const int64_t L = a.len, K = a.chunk, P = a.head_dim, heads = a.dim / a.head_dim;
  const int64_t nchunks = (L + K - 1) / K;
  const int64_t step = a.reverse ? -1 : 1;
  std::vector<float> ebuf(L), ddt(L), dhbuf(P * NS), dDacc(P), hs((K + 1) * NS), dxs(L), dss(L);
  std::vector<vf> dxbuf(K), dsbuf(K);
  float *ea = ebuf.data(), *DH = dhbuf.data();
  const auto [dBthr, dCthr] = thread_dbc(a, tid, NS);
  for (int64_t unit = unit0; unit < unit1; ++unit) {
    const HeadInfo hi = head_info(a, unit);
    const float* dt = a.delta + (hi.b * heads + hi.head) * L;
    const float A = a.A[hi.head];
    head_decay(dt, A, L, ea);
    const int64_t bc_off = (hi.b * a.groups + hi.grp) * L * NS;
    const float *Bg = a.B + bc_off, *Cg = a.C + bc_off;
    float *dBg = dBthr + bc_off, *dCg = dCthr + bc_off;
    std::fill(DH, DH + P * NS, 0.0f);
    std::fill(dDacc.begin(), dDacc.end(), 0.0f);
    std::fill(ddt.begin(), ddt.end(), 0.0f);
    float dA = 0.0f;
    for (int64_t c = nchunks - 1; c >= 0; --c) {
      const int64_t s0 = c * K, s1 = std::min(L, s0 + K);
      // positions of the chunk in time order: [p0, p1)
      const int64_t p0 = a.reverse ? L - s1 : s0, p1 = a.reverse ? L - s0 : s1;
      for (int64_t i = 0; i < P; ++i) {
        const int64_t row = hi.row0 + i;
        const float* urow = a.u + u_offset(a, hi, i);
        const float* g = a.dout + row * L;
        vf h[NV];
        for (int j = 0; j < NV; ++j) h[j] = load(a.chunk_states + (row * nchunks + c) * NS + j * VW);
        for (int j = 0; j < NV; ++j) store(hs.data() + j * VW, h[j]);
        int64_t t = a.reverse ? L - 1 - s0 : s0;
        for (int64_t s = s0; s < s1; ++s, t += step) {
          const vf e = splat(ea[t]), xv = splat(dt[t] * urow[t]);
          const float* Bt = Bg + t * NS;
          float* hn = hs.data() + (s - s0 + 1) * NS;
          for (int j = 0; j < NV; ++j) {
            h[j] = e * h[j] + xv * load(Bt + j * VW);
            store(hn + j * VW, h[j]);
          }
        }
        vf dh[NV];
        for (int j = 0; j < NV; ++j) dh[j] = load(DH + i * NS + j * VW);
        t = a.reverse ? L - s1 : s1 - 1;
        for (int64_t s = s1 - 1; s >= s0; --s, t -= step) {
          const float *Bt = Bg + t * NS, *Ct = Cg + t * NS;
          float *dBt = dBg + t * NS, *dCt = dCg + t * NS;
          const float* hp = hs.data() + (s - s0) * NS;
          const float* hn = hp + NS;
          const vf gv = splat(g[t]), xv = splat(dt[t] * urow[t]), e = splat(ea[t]);
          vf dxv{}, dsv{};
          for (int j = 0; j < NV; ++j) {
            const vf hnj = load(hn + j * VW), Cj = load(Ct + j * VW), Bj = load(Bt + j * VW);
            store(dCt + j * VW, load(dCt + j * VW) + gv * hnj);
            const vf dhi = dh[j] + gv * Cj;
            store(dBt + j * VW, load(dBt + j * VW) + dhi * xv);
            dxv += dhi * Bj;
            dh[j] = dhi * e;
            dsv += dh[j] * load(hp + j * VW);  // sum of dhi * a * h_prev: the gradient of the exponent
          }
          dxbuf[s - s0] = dxv;
          dsbuf[s - s0] = dsv;
        }
        for (int j = 0; j < NV; ++j) store(DH + i * NS + j * VW, dh[j]);
        reduce_steps(dxbuf.data(), s1 - s0, s0, L, a.reverse, dxs.data());
        reduce_steps(dsbuf.data(), s1 - s0, s0, L, a.reverse, dss.data());
        const float Dd = a.D ? a.D[row % a.dim] : 0.0f;
        float* durow = a.du + u_offset(a, hi, i);
        float dD = 0.0f;
        for (int64_t q = p0; q < p1; ++q) {
          durow[q] = g[q] * Dd + dxs[q] * dt[q];
          ddt[q] += A * dss[q] + dxs[q] * urow[q];
          dA += dss[q] * dt[q];
          dD += g[q] * urow[q];
        }
        dDacc[i] += dD;
      }
    }
    std::memcpy(a.ddelta + (hi.b * heads + hi.head) * L, ddt.data(), L * sizeof(float));
    a.dA_rows[unit] = dA;
    for (int64_t i = 0; i < P; ++i) a.dD_rows[hi.row0 + i] = dDacc[i];
  }
}

template <int NS>
void sd_forward_impl(const ScanArgs& a) {
  const int64_t units = a.batch * (a.dim / a.head_dim);
  parallel_for(units, a.nthreads, 1, [&](int64_t u0, int64_t u1, int64_t) { forward_sd<NS>(a, u0, u1); });
}

template <int NS>
void sd_backward_impl(const ScanArgs& a) {
  const int64_t units = a.batch * (a.dim / a.head_dim);
  parallel_for(units, a.nthreads, 1, [&](int64_t u0, int64_t u1, int64_t tid) { backward_sd<NS>(a, u0, u1, tid); });
}

template <int NS>
void forward_impl(const ScanArgs& a) {
  parallel_rows(a, [&](int64_t r0, int64_t r1, int64_t) {
    if constexpr (NS > 0 && NS % VW == 0) forward_rows_vec<NS, state_vector<NS>>(a, r0, r1);
    else forward_rows<NS>(a, r0, r1);
  });
}

template <int NS>
void backward_impl(const ScanArgs& a) {
  parallel_rows(a, [&](int64_t r0, int64_t r1, int64_t tid) {
    if constexpr (NS > 0 && NS % VW == 0) backward_rows_vec<NS, state_vector<NS>>(a, r0, r1, tid);
    else backward_rows<NS>(a, r0, r1, tid);
  });
}


// ---- Depthwise conv + SiLU (see ConvSiluArgs). Per row, a direction's pre-activation is computed into an
// L1/L2-resident buffer; taps outside the sequence read zeros (the zero padding of nn.Conv1d truncated to length).
inline void conv_row(const float* x, const float* w, float b, int64_t L, int64_t k, bool rev, float* pre) {
  for (int64_t t = 0; t < L; ++t) pre[t] = b;
  for (int64_t i = 0; i < k; ++i) {
    const float wi = w[i];
    const int64_t s = k - 1 - i;  // shift of tap i
    if (s >= L) continue;
    if (!rev) {
      for (int64_t t = s; t < L; ++t) pre[t] += wi * x[t - s];
    } else {
      for (int64_t t = 0; t < L - s; ++t) pre[t] += wi * x[t + s];
    }
  }
}

void conv_silu_forward_rows(const ConvSiluArgs& a, int64_t row0, int64_t row1) {
  const int64_t L = a.len, k = a.k;
  const bool bx = a.bf16_io & CONV_BF16_X, bo = a.bf16_io & CONV_BF16_OUT;
  std::vector<float> prebuf(L), xbuf(bx ? L : 0), obuf(bo ? L : 0);
  float* pre = prebuf.data();
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t d = row % a.dim;
    const float* xr = in_row(a.x, bx, row, L, xbuf.data());
    for (int64_t j = 0; j < a.ndir; ++j) {
      conv_row(xr, a.w[j] + d * k, a.bias[j] ? a.bias[j][d] : 0.0f, L, k, a.reverse[j] != 0, pre);
      float* o = out_row(a.out[j], bo, row, L, obuf.data());
      for (int64_t t = 0; t < L; ++t) o[t] = pre[t] * sigmoid(pre[t]);
      out_row_done(a.out[j], bo, row, L, o);
    }
  }
}

void conv_silu_backward_rows(const ConvSiluArgs& a, int64_t row0, int64_t row1) {
  const int64_t L = a.len, k = a.k;
  const bool bx = a.bf16_io & CONV_BF16_X, bg = a.bf16_io & CONV_BF16_GOUT, bd = a.bf16_io & CONV_BF16_DX;
  std::vector<float> prebuf(L), xbuf(bx ? L : 0), gbuf(bg ? L : 0), dxbuf(bd ? L : 0);
  float* gp = prebuf.data();  // pre-activation, then in place its gradient
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t d = row % a.dim;
    const float* xr = in_row(a.x, bx, row, L, xbuf.data());
    float* dxr = out_row(a.dx, bd, row, L, dxbuf.data());
    for (int64_t t = 0; t < L; ++t) dxr[t] = 0.0f;
    for (int64_t j = 0; j < a.ndir; ++j) {
      const float* w = a.w[j] + d * k;
      const bool rev = a.reverse[j] != 0;
      conv_row(xr, w, a.bias[j] ? a.bias[j][d] : 0.0f, L, k, rev, gp);
      const float* g0 = in_row(a.gout[j], bg, row, L, gbuf.data());
      float db = 0.0f;
      for (int64_t t = 0; t < L; ++t) {
        const float p = gp[t], sg = sigmoid(p);
        gp[t] = g0[t] * sg * (1.0f + p * (1.0f - sg));
        db += gp[t];
      }
      if (a.db_rows[j]) a.db_rows[j][row] = db;
      float* dw = a.dw_rows[j] + row * k;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t s = k - 1 - i;
        float acc = 0.0f;
        if (s < L) {
          if (!rev) {
            for (int64_t t = s; t < L; ++t) acc += gp[t] * xr[t - s], dxr[t - s] += w[i] * gp[t];
          } else {
            for (int64_t t = 0; t < L - s; ++t) acc += gp[t] * xr[t + s], dxr[t + s] += w[i] * gp[t];
          }
        }
        dw[i] = acc;
      }
    }
    out_row_done(a.dx, bd, row, L, dxr);
  }
}

// The same forward and backward with whole vectors for up to kConvTaps taps (mamba-ssm's convs have 2-4): each
// row is widened once into a zero-padded buffer, so every tap of every direction is an unaligned vector load with no
// bounds test, and each output vector is finished (taps, SiLU, narrowing) in one pass. The loops above made a pass
// per tap and per step (about a dozen over each row forward). Padded layout, P = k - 1: xp[P + t] = x[t], zeros
// elsewhere; the causal tap i of output t reads xp[t + i], the anti-causal one xp[t + 2P - i].
constexpr int64_t kConvTaps = 8;

struct ConvRowBufs {
  int64_t L, Lr, P;
  std::vector<float> xp, pre, gp, acc, io;
  ConvRowBufs(int64_t L_, int64_t k)
      : L(L_), Lr((L_ + RVW - 1) / RVW * RVW), P(k - 1), xp(Lr + 2 * P + RVW), pre(Lr), gp(Lr + 2 * P + RVW),
        acc(Lr), io(Lr) {}
  // Row `row` of x into the padded buffer (positions past L stay zero from construction).
  void load_x(const float* x, bool bf16, int64_t row) { load_row(x, bf16, row, L, xp.data() + P); }
};

// Pre-activations of one direction for all Lr positions (the tail past L reads zeros: finite, never stored).
template <int64_t k>
inline void conv_pre_vec(const ConvRowBufs& rb, const float* w, float b, bool rev, float* pre) {
  rv wv[k];
  for (int64_t i = 0; i < k; ++i) wv[i] = rv{} + w[i];
  const float* xp = rb.xp.data();
  const int64_t off = rev ? 2 * rb.P : 0, dir = rev ? -1 : 1;
  for (int64_t t = 0; t < rb.Lr; t += RVW) {
    rv acc = rv{} + b;
    for (int64_t i = 0; i < k; ++i) acc += wv[i] * load_sv(xp + t + off + dir * i, rv{});
    store(pre + t, acc);
  }
}

template <int64_t k>
void conv_silu_forward_rows_vec(const ConvSiluArgs& a, int64_t row0, int64_t row1) {
  const bool bx = a.bf16_io & CONV_BF16_X, bo = a.bf16_io & CONV_BF16_OUT;
  ConvRowBufs rb(a.len, k);
  float* o = rb.io.data();
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t d = row % a.dim;
    rb.load_x(a.x, bx, row);
    for (int64_t j = 0; j < a.ndir; ++j) {
      conv_pre_vec<k>(rb, a.w[j] + d * k, a.bias[j] ? a.bias[j][d] : 0.0f, a.reverse[j] != 0, o);
      for (int64_t t = 0; t < rb.Lr; t += RVW) {
        const rv p = load_sv(o + t, rv{});
        store(o + t, p * vsigmoid(p));
      }
      store_row(a.out[j], bo, row, a.len, o);
    }
  }
}

template <int64_t k>
void conv_silu_backward_rows_vec(const ConvSiluArgs& a, int64_t row0, int64_t row1) {
  const int64_t L = a.len;
  const bool bx = a.bf16_io & CONV_BF16_X, bg = a.bf16_io & CONV_BF16_GOUT, bd = a.bf16_io & CONV_BF16_DX;
  ConvRowBufs rb(L, k);
  const int64_t P = rb.P, Lr = rb.Lr;
  float *pre = rb.pre.data(), *gpp = rb.gp.data(), *dx = rb.acc.data(), *g = rb.io.data();
  // g past L stays zero (from construction), so gp is zero there and the sums below need no tail handling.
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t d = row % a.dim;
    rb.load_x(a.x, bx, row);
    const float* xp = rb.xp.data();
    for (int64_t j = 0; j < a.ndir; ++j) {
      const float* w = a.w[j] + d * k;
      const bool rev = a.reverse[j] != 0;
      conv_pre_vec<k>(rb, w, a.bias[j] ? a.bias[j][d] : 0.0f, rev, pre);
      load_row(a.gout[j], bg, row, L, g);
      // gp = g silu'(pre) into gpp[P + t]; the sums for db and dw[i] as vectors.
      const int64_t off = rev ? 2 * P : 0, dir = rev ? -1 : 1;
      rv dbv{}, dwv[k];
      for (int64_t i = 0; i < k; ++i) dwv[i] = rv{};
      for (int64_t t = 0; t < Lr; t += RVW) {
        const rv p = load_sv(pre + t, rv{}), sg = vsigmoid(p);
        const rv gp = load_sv(g + t, rv{}) * sg * (1.0f + p * (1.0f - sg));
        store(gpp + P + t, gp);
        dbv += gp;
        for (int64_t i = 0; i < k; ++i) dwv[i] += gp * load_sv(xp + t + off + dir * i, rv{});
      }
      if (a.db_rows[j]) a.db_rows[j][row] = vsum(dbv);
      for (int64_t i = 0; i < k; ++i) a.dw_rows[j][row * k + i] = vsum(dwv[i]);
      // dx: the adjoint of the causal conv is anti-causal over gp, and vice versa (gpp is zero outside [P, P + L)).
      rv wv[k];
      for (int64_t i = 0; i < k; ++i) wv[i] = rv{} + w[i];
      const int64_t aoff = rev ? 0 : 2 * P, adir = rev ? 1 : -1;
      for (int64_t t = 0; t < Lr; t += RVW) {
        rv acc = j == 0 ? rv{} : load_sv(dx + t, rv{});
        for (int64_t i = 0; i < k; ++i) acc += wv[i] * load_sv(gpp + t + aoff + adir * i, rv{});
        store(dx + t, acc);
      }
    }
    store_row(a.dx, bd, row, L, dx);
  }
}

// The vector rows for a.k taps (compile-time, so the taps' weights and sums stay in registers), or null for more
// than kConvTaps.
using ConvRowsFn = void (*)(const ConvSiluArgs&, int64_t, int64_t);
template <int64_t k>
ConvRowsFn conv_rows_for(int64_t taps, bool backward) {
  if constexpr (k > kConvTaps) {
    return nullptr;
  } else {
    if (taps != k) return conv_rows_for<k + 1>(taps, backward);
    return backward ? conv_silu_backward_rows_vec<k> : conv_silu_forward_rows_vec<k>;
  }
}

template <typename F>
void parallel_conv_rows(const ConvSiluArgs& a, F&& fn) {
  ScanArgs s{};
  s.batch = a.batch, s.dim = a.dim, s.nthreads = a.nthreads;
  parallel_rows(s, [&](int64_t r0, int64_t r1, int64_t) { fn(a, r0, r1); });
}

// ---- Residual add + RMSNorm (see AddNormArgs). One row (token) at a time, all of it L1-resident; the sums run in
// float32 like the composite they replace (which made ten passes over the stream forward and more backward).
void add_norm_forward_rows(const AddNormArgs& a, int64_t row0, int64_t row1) {
  const int64_t D = a.dim;
  const bool bh = a.bf16_io & ADDNORM_BF16_H, bo = a.bf16_io & ADDNORM_BF16_NORMED;
  std::vector<float> hbuf(bh ? D : 0), obuf(bo ? D : 0);
  const float* w = a.weight;
  const float eps = float(a.eps);
  for (int64_t row = row0; row < row1; ++row) {
    const float* hr = in_row(a.h, bh, row, D, hbuf.data());
    float* x = a.res_out + row * D;
    if (a.res) {
      const float* rr = a.res + row * D;
      const float s = a.scale ? a.scale[row / a.rows_per_sample] : 1.0f;
      for (int64_t i = 0; i < D; ++i) x[i] = rr[i] + s * hr[i];
    } else {
      for (int64_t i = 0; i < D; ++i) x[i] = hr[i];
    }
    float ss = 0.0f;
    for (int64_t i = 0; i < D; ++i) ss += x[i] * x[i];
    const float r = 1.0f / std::sqrt(ss / float(D) + eps);
    a.rstd[row] = r;
    float* o = out_row(a.normed, bo, row, D, obuf.data());
    for (int64_t i = 0; i < D; ++i) o[i] = x[i] * r * w[i];
    out_row_done(a.normed, bo, row, D, o);
  }
}

void add_norm_backward_rows(const AddNormArgs& a, int64_t row0, int64_t row1, int64_t tid) {
  const int64_t D = a.dim;
  const bool bh = a.bf16_io & ADDNORM_BF16_H, bo = a.bf16_io & ADDNORM_BF16_NORMED;
  std::vector<float> gbuf(bo ? D : 0), dhbuf(D);
  const float* w = a.weight;
  float* dw = a.dw_threads + tid * D;
  for (int64_t row = row0; row < row1; ++row) {
    const float* g = in_row(a.gnormed, bo, row, D, gbuf.data());
    const float* x = a.res_out + row * D;
    const float r = a.rstd[row];
    float c = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
      const float xh = x[i] * r;
      c += g[i] * w[i] * xh;
      dw[i] += g[i] * xh;
    }
    c /= float(D);
    const float* gr = a.gres ? a.gres + row * D : nullptr;
    float* dr = a.dres ? a.dres + row * D : dhbuf.data();
    for (int64_t i = 0; i < D; ++i) dr[i] = r * (g[i] * w[i] - x[i] * r * c) + (gr ? gr[i] : 0.0f);
    const float s = a.scale ? a.scale[row / a.rows_per_sample] : 1.0f;
    float* dh = bh ? dhbuf.data() : a.dh + row * D;
    for (int64_t i = 0; i < D; ++i) dh[i] = s * dr[i];
    if (bh) f32_to_bf16(dh, reinterpret_cast<uint16_t*>(a.dh) + row * D, D);
  }
}

template <typename F>
void parallel_norm_rows(const AddNormArgs& a, F&& fn) {
  // Blocks of rows large enough to amortise the hand-out, small enough to balance two busy cores.
  const int64_t T = std::max<int64_t>(1, a.nthreads);
  parallel_for(a.rows, a.nthreads, std::max<int64_t>(1, a.rows / (T * 16)), fn);
}

// ---- Transpose (see TransposeArgs), in tiles of 16 source rows x 8 columns: two 8x8 register transposes, so each
// destination row receives 16 contiguous floats (a whole cache line) per tile. A strided element-by-element copy
// (what .transpose().contiguous() does) reached 3-8 GB/s here, a third of a plain copy's speed and worse at
// power-of-two widths.
inline void transpose8x8(vf* r) {
#if defined(__AVX__)
  __m256 v[8], t[8];
  for (int i = 0; i < 8; ++i) v[i] = reinterpret_cast<__m256>(r[i]);
  for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]), t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
  for (int i = 0; i < 8; i += 4) {
    v[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    v[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    v[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    v[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = reinterpret_cast<vf>(_mm256_permute2f128_ps(v[i], v[i + 4], 0x20));
    r[i + 4] = reinterpret_cast<vf>(_mm256_permute2f128_ps(v[i], v[i + 4], 0x31));
  }
#else
  vf t[8];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) t[j][i] = r[i][j];
  for (int i = 0; i < 8; ++i) r[i] = t[i];
#endif
}

void transpose_tiles(const TransposeArgs& a, int64_t unit0, int64_t unit1) {
  constexpr int64_t TR = 16;
  const int64_t tiles = (a.rows + TR - 1) / TR;
  for (int64_t unit = unit0; unit < unit1; ++unit) {
    const int64_t b = unit / tiles, r0 = (unit % tiles) * TR, nr = std::min(TR, a.rows - r0);
    const float* src = a.src + b * a.src_bstride + r0 * a.src_rstride;
    float* dst = a.dst + b * a.dst_bstride + r0;
    int64_t c = 0;
    if (nr == TR) {
      for (; c + VW <= a.cols; c += VW) {
        vf lo[VW], hi[VW];
        for (int i = 0; i < VW; ++i)
          lo[i] = load(src + i * a.src_rstride + c), hi[i] = load(src + (i + VW) * a.src_rstride + c);
        transpose8x8(lo);
        transpose8x8(hi);
        for (int i = 0; i < VW; ++i) {
          float* d = dst + (c + i) * a.dst_rstride;
          store(d, lo[i]);
          store(d + VW, hi[i]);
        }
      }
    }
    for (; c < a.cols; ++c)
      for (int64_t r = 0; r < nr; ++r) dst[c * a.dst_rstride + r] = src[r * a.src_rstride + c];
  }
}

// Compile-time state sizes let the compiler unroll the state loop into whole vectors; others take the generic
// loop. Scalar-decay mode exists for the vector sizes only (the caller checked the state size).
template <typename F>
void with_state_size(int64_t n, F&& f) {
  switch (n) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace

extern "C" {

int ssmdiff_scan_abi_version() { return 10; }

void ssmdiff_transpose(const TransposeArgs* a) {
  const int64_t units = a->batch * ((a->rows + 15) / 16);
  parallel_for(units, a->nthreads, std::max<int64_t>(1, units / (std::max<int64_t>(1, a->nthreads) * 8)),
               [&](int64_t u0, int64_t u1, int64_t) { transpose_tiles(*a, u0, u1); });
}

void ssmdiff_conv_silu_forward(const ConvSiluArgs* a) {
  const ConvRowsFn vec = conv_rows_for<1>(a->k, false);
  parallel_conv_rows(*a, vec ? vec : conv_silu_forward_rows);
}

void ssmdiff_conv_silu_backward(const ConvSiluArgs* a) {
  const ConvRowsFn vec = conv_rows_for<1>(a->k, true);
  parallel_conv_rows(*a, vec ? vec : conv_silu_backward_rows);
}

void ssmdiff_add_norm_forward(const AddNormArgs* a) {
  parallel_norm_rows(*a, [&](int64_t r0, int64_t r1, int64_t) { add_norm_forward_rows(*a, r0, r1); });
}

void ssmdiff_add_norm_backward(const AddNormArgs* a) {
  parallel_norm_rows(*a, [&](int64_t r0, int64_t r1, int64_t tid) { add_norm_backward_rows(*a, r0, r1, tid); });
}

void ssmdiff_scan_forward(const ScanArgs* a) {
  with_state_size(a->dstate, [&](auto ns) {
    constexpr int NS = decltype(ns)::value;
    if constexpr (NS > 0 && NS % VW == 0) {
      if (a->head_dim > 0) return sd_forward_impl<NS>(*a);
    }
    forward_impl<NS>(*a);
  });
}

void ssmdiff_scan_backward(const ScanArgs* a) {
  with_state_size(a->dstate, [&](auto ns) {
    constexpr int NS = decltype(ns)::value;
    if constexpr (NS > 0 && NS % VW == 0) {
      if (a->head_dim > 0) return sd_backward_impl<NS>(*a);
    }
    backward_impl<NS>(*a);
  });
}
}
