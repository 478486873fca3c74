// Prophet: routed experts of one MoE layer computed on host CPU cores, from the host expert store.
//
// One call computes, for the experts the GPU does not hold (a layer call's CPU experts),
//     y[r] += w_p * W2_e @ (silu(Wg_e @ x[r]) * (Wu_e @ x[r]))      for every pair p = (expert e, row r)
// reading each expert's weights once per call (decode is a matrix-vector product per expert: bound
// by the host's DRAM read rate; large batches by its FLOP rate). Compiled at first use by
// prophet_kernels/cpu/native.py with the machine's compiler and -march=native (like Triton's launcher
// stubs), loaded through ctypes: no libtorch, no Python API, so it builds beside any torch.
//
// Legend: H hidden size, I expert intermediate size, P (expert, token) pairs of the call, n rows of x.
//   w13_ptrs [n_experts] int64   address of each CPU expert's [2I, H] matrix (gate rows, then up rows)
//   w2_ptrs  [n_experts] int64   address of each CPU expert's [H, I] matrix
//   offsets  [n_experts + 1]     pairs of expert j are offsets[j] .. offsets[j+1]
//   rows     [P] int32           the row of x (and y) of each pair
//   weights  [P] fp32            its routing weight
//   x        [n, H] dtype        the tokens' hidden states (dtype = the weights' dtype)
//   act      [P, I] dtype        scratch: silu(gate) * up per pair, rounded to dtype (as the GPU kernels do)
//   y        [n, H] fp32         accumulated into (the caller zeroes it)
//
// Threads: the pool's own (never torch's or OpenMP's, so the caller's thread counts are untouched).
// A call is two phases split evenly over the threads with one barrier between them:
//   phase 1  units (expert j, i in [0, I)): gate row i and up row I+i against the expert's tokens -> act
//   phase 2  y columns [h0, h1) per thread (multiples of 16 floats: no two threads share a cache line
//            of y), every expert: W2 rows h against act -> y[r, h] += w_p * dot. Disjoint writes: no atomics.
// submit() returns at once; join() blocks until the call is done (ctypes releases the GIL around both).
//
// int4 experts (the store's int4 rows, kernels/int4.py's layout): codes [N, K/2] bytes (the even input
// in the low nibble), an fp32 scale and a uint8 zero point (none: 8) per G inputs of a row; a weight is
// (code - zero) * scale. x and the activations are read as fp32 with the even inputs first, then the
// odd ones (phase 0 converts x, phase 1 writes act that way), so that a byte's two codes meet their
// inputs in two vector lanes of equal position. Three phases, two barriers:
//   phase 0  rows of x -> xf [n, H] fp32 (even inputs, then odd)
//   phase 1  as above, against xf; act rounded to the activations' dtype, kept as fp32 in af [P, I]
//   phase 2  as above, against af

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace {

enum DType : int { F32 = 0, BF16 = 1, F16 = 2 };

// ------------------------------------------------------------------------------ scalar conversions

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept a NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      int e = -1;
      uint32_t m = man;
      do { ++e; m <<= 1; } while (!(m & 0x400));
      u = sign | uint32_t(127 - 15 - e) << 23 | (m & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even
#if defined(__F16C__)
  return uint16_t(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  int exp = int((u >> 23) & 0xff) - 127 + 15;
  uint32_t man = u & 0x7fffff;
  if (((u >> 23) & 0xff) == 0xff) return uint16_t(sign | 0x7c00 | (man ? 0x200 : 0));
  if (exp >= 31) return uint16_t(sign | 0x7c00);
  if (exp <= 0) {
    if (exp < -10) return uint16_t(sign);
    man |= 0x800000;
    const int shift = 14 - exp;
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return uint16_t(sign | half);
  }
  uint32_t h = sign | uint32_t(exp) << 10 | man >> 13, rem = man & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return uint16_t(h);
#endif
}

template <int D> struct Elem;
template <> struct Elem<F32> {
  using T = float;
  static float load(T v) { return v; }
  static T store(float f) { return f; }
};
template <> struct Elem<BF16> {
  using T = uint16_t;
  static float load(T v) { return bf16_to_f32(v); }
  static T store(float f) { return f32_to_bf16(f); }
};
template <> struct Elem<F16> {
  using T = uint16_t;
  static float load(T v) { return f16_to_f32(v); }
  static T store(float f) { return f32_to_f16(f); }
};

// ------------------------------------------------------------------------------ dot-product tiles
// out[a][b] = dot(w[a], x[b]) over K elements, for R weight rows and B token rows: each weight
// vector is loaded once per tile and used B times (decode: B = 1, the weights stream from DRAM once).

#if defined(__AVX512F__)
template <int D> struct Vec;
template <> struct Vec<F32> {
  static constexpr int W = 16;
  static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static __m512 load_tail(const float* p, int n) { return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p); }
};
template <> struct Vec<BF16> {
  static constexpr int W = 16;
  static __m512 cvt(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
  static __m512 load(const uint16_t* p) { return cvt(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load_tail(const uint16_t* p, int n) { return cvt(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p)); }
};
template <> struct Vec<F16> {
  static constexpr int W = 16;
  static __m512 load(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static __m512 load_tail(const uint16_t* p, int n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(__mmask16((1u << n) - 1), p)); }
};

template <int D, int R, int B>
inline void tile(const typename Elem<D>::T* const* w, const typename Elem<D>::T* const* x, int K, float out[4][4]) {
#if defined(__AVX512BF16__)
  if constexpr (D == BF16) {  // 32 bf16 products per instruction, accumulated in fp32
    __m512 acc[R][B];
    for (int a = 0; a < R; ++a)
      for (int b = 0; b < B; ++b) acc[a][b] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
      __m512bh xv[B];
      for (int b = 0; b < B; ++b) xv[b] = (__m512bh)_mm512_loadu_si512(x[b] + k);
      for (int a = 0; a < R; ++a) {
        const __m512bh wv = (__m512bh)_mm512_loadu_si512(w[a] + k);
        for (int b = 0; b < B; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wv, xv[b]);
      }
    }
    if (k < K) {
      const __mmask32 m = K - k >= 32 ? ~__mmask32(0) : __mmask32((1ull << (K - k)) - 1);
      __m512bh xv[B];
      for (int b = 0; b < B; ++b) xv[b] = (__m512bh)_mm512_maskz_loadu_epi16(m, x[b] + k);
      for (int a = 0; a < R; ++a) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(m, w[a] + k);
        for (int b = 0; b < B; ++b) acc[a][b] = _mm512_dpbf16_ps(acc[a][b], wv, xv[b]);
      }
    }
    for (int a = 0; a < R; ++a)
      for (int b = 0; b < B; ++b) out[a][b] = _mm512_reduce_add_ps(acc[a][b]);
    return;
  }
#endif
  using V = Vec<D>;
  __m512 acc[R][B];
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < B; ++b) acc[a][b] = _mm512_setzero_ps();
  int k = 0;
  for (; k + V::W <= K; k += V::W) {
    __m512 xv[B];
    for (int b = 0; b < B; ++b) xv[b] = V::load(x[b] + k);
    for (int a = 0; a < R; ++a) {
      const __m512 wv = V::load(w[a] + k);
      for (int b = 0; b < B; ++b) acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
    }
  }
  if (k < K) {
    __m512 xv[B];
    for (int b = 0; b < B; ++b) xv[b] = V::load_tail(x[b] + k, K - k);
    for (int a = 0; a < R; ++a) {
      const __m512 wv = V::load_tail(w[a] + k, K - k);
      for (int b = 0; b < B; ++b) acc[a][b] = _mm512_fmadd_ps(wv, xv[b], acc[a][b]);
    }
  }
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < B; ++b) out[a][b] = _mm512_reduce_add_ps(acc[a][b]);
}
#else
template <int D, int R, int B>
inline void tile(const typename Elem<D>::T* const* w, const typename Elem<D>::T* const* x, int K, float out[4][4]) {
  // portable: 8 partial sums per (row, token) so the compiler can vectorise without reassociating
  float acc[R][B][8] = {};
  int k = 0;
  for (; k + 8 <= K; k += 8)
    for (int a = 0; a < R; ++a)
      for (int b = 0; b < B; ++b)
        for (int j = 0; j < 8; ++j) acc[a][b][j] += Elem<D>::load(w[a][k + j]) * Elem<D>::load(x[b][k + j]);
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < B; ++b) {
      float s = 0.f;
      for (int j = 0; j < 8; ++j) s += acc[a][b][j];
      for (int kk = k; kk < K; ++kk) s += Elem<D>::load(w[a][kk]) * Elem<D>::load(x[b][kk]);
      out[a][b] = s;
    }
}
#endif

template <int D, int R>
inline void tile_rows(const typename Elem<D>::T* const* w, const typename Elem<D>::T* const* x, int nb, int K,
                      float out[4][4]) {
  switch (nb) {
    case 1: tile<D, R, 1>(w, x, K, out); break;
    case 2: tile<D, R, 2>(w, x, K, out); break;
    case 3: tile<D, R, 3>(w, x, K, out); break;
    default: tile<D, R, 4>(w, x, K, out); break;
  }
}

template <int D>
inline void tile_any(const typename Elem<D>::T* const* w, int nr, const typename Elem<D>::T* const* x, int nb, int K,
                     float out[4][4]) {
  switch (nr) {
    case 1: tile_rows<D, 1>(w, x, nb, K, out); break;
    case 2: tile_rows<D, 2>(w, x, nb, K, out); break;
    case 3: tile_rows<D, 3>(w, x, nb, K, out); break;
    default: tile_rows<D, 4>(w, x, nb, K, out); break;
  }
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// ------------------------------------------------------------------------------ one call

struct Call {
  int dtype = F32, H = 0, I = 0, n_experts = 0;
  const int64_t* w13 = nullptr;
  const int64_t* w2 = nullptr;
  const int64_t* offsets = nullptr;
  const int32_t* rows = nullptr;
  const float* weights = nullptr;
  const void* x = nullptr;
  void* act = nullptr;
  float* y = nullptr;
  // int4 experts (q4): per-expert addresses of the scales and zero points (z13/z2 null: zero 8)
  bool q4 = false;
  int G = 0;
  int64_t rows_n = 0;  // rows of x
  const int64_t* s13 = nullptr;
  const int64_t* s2 = nullptr;
  const int64_t* z13 = nullptr;
  const int64_t* z2 = nullptr;
  float* xf = nullptr;
  float* af = nullptr;
};

// phase 1 for units [u0, u1) of n_experts * I: act[p, i] = silu(gate_i . x[r_p]) * (up_i . x[r_p])
template <int D>
void gate_up(const Call& c, int64_t u0, int64_t u1) {
  using T = typename Elem<D>::T;
  const int H = c.H, I = c.I;
  const T* x = static_cast<const T*>(c.x);
  T* act = static_cast<T*>(c.act);
  float out[4][4];
  int64_t u = u0;
  while (u < u1) {
    const int j = int(u / I);
    const int i0 = int(u % I);
    const int ni = int(std::min<int64_t>({u1 - u, int64_t(I - i0), int64_t(2)}));  // 2 gate + 2 up rows per tile
    const T* W = reinterpret_cast<const T*>(c.w13[j]);
    const T* w[4];
    for (int a = 0; a < ni; ++a) {
      w[a] = W + int64_t(i0 + a) * H;           // gate row
      w[ni + a] = W + int64_t(I + i0 + a) * H;  // up row
    }
    for (int64_t p = c.offsets[j]; p < c.offsets[j + 1]; p += 4) {
      const int nb = int(std::min<int64_t>(4, c.offsets[j + 1] - p));
      const T* xr[4];
      for (int b = 0; b < nb; ++b) xr[b] = x + int64_t(c.rows[p + b]) * H;
      tile_any<D>(w, 2 * ni, xr, nb, H, out);
      for (int b = 0; b < nb; ++b)
        for (int a = 0; a < ni; ++a) act[(p + b) * I + i0 + a] = Elem<D>::store(silu(out[a][b]) * out[ni + a][b]);
    }
    u += ni;
  }
}

// phase 2 for y columns [h0, h1): y[r_p, h] += w_p * (W2_e[h] . act[p])
template <int D>
void down(const Call& c, int h0, int h1) {
  using T = typename Elem<D>::T;
  const int H = c.H, I = c.I;
  const T* act = static_cast<const T*>(c.act);
  float out[4][4];
  for (int j = 0; j < c.n_experts; ++j) {
    const T* W = reinterpret_cast<const T*>(c.w2[j]);
    for (int h = h0; h < h1; h += 4) {
      const int nr = std::min(4, h1 - h);
      const T* w[4];
      for (int a = 0; a < nr; ++a) w[a] = W + int64_t(h + a) * I;
      for (int64_t p = c.offsets[j]; p < c.offsets[j + 1]; p += 4) {
        const int nb = int(std::min<int64_t>(4, c.offsets[j + 1] - p));
        const T* ar[4];
        for (int b = 0; b < nb; ++b) ar[b] = act + (p + b) * I;
        tile_any<D>(w, nr, ar, nb, I, out);
        for (int b = 0; b < nb; ++b) {
          float* yr = c.y + int64_t(c.rows[p + b]) * H;
          const float wt = c.weights[p + b];
          for (int a = 0; a < nr; ++a) yr[h + a] += wt * out[a][b];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ int4 experts
// out[a][b] = sum_k (q[a][k] - z[a][k/G]) * s[a][k/G] * x[b][k] for R int4 weight rows and B token
// rows of K fp32 inputs stored even inputs first (x[b][j] = input 2j, x[b][K/2 + j] = input 2j + 1).

struct Q4Row {
  const uint8_t* q;  // K/2 bytes
  const float* s;    // K/G scales
  const uint8_t* z;  // K/G zero points, or null (8)
};

template <int R, int B>
inline void tile_q4(const Q4Row* w, const float* const* x, int K, int G, float out[4][4]) {
  const int half = K / 2, gh = G / 2;
#if defined(__AVX512F__)
  __m512 acc[R][B];
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < B; ++b) acc[a][b] = _mm512_setzero_ps();
  const __m512 codes = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int g = 0; g < K / G; ++g) {
    // the group's 16 weight values, (code - zero) * scale, one per lane: a code is a lane index (a
    // permute reads an index's low 4 bits: the high nibble needs no mask)
    __m512 table[R];
    for (int a = 0; a < R; ++a)
      table[a] = _mm512_mul_ps(_mm512_sub_ps(codes, _mm512_set1_ps(w[a].z ? float(w[a].z[g]) : 8.f)),
                               _mm512_set1_ps(w[a].s[g]));
    for (int c = 0; c < gh; c += 16) {  // 16 bytes: 16 even and 16 odd inputs
      const int j = g * gh + c;
      __m512 xe[B], xo[B];
      for (int b = 0; b < B; ++b) {
        xe[b] = _mm512_loadu_ps(x[b] + j);
        xo[b] = _mm512_loadu_ps(x[b] + half + j);
      }
      for (int a = 0; a < R; ++a) {
        const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[a].q + j)));
        const __m512 lo = _mm512_permutexvar_ps(q, table[a]);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table[a]);
        for (int b = 0; b < B; ++b) acc[a][b] = _mm512_fmadd_ps(lo, xe[b], _mm512_fmadd_ps(hi, xo[b], acc[a][b]));
      }
    }
  }
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < B; ++b) out[a][b] = _mm512_reduce_add_ps(acc[a][b]);
#else
  float acc[R][B][16] = {};
  for (int g = 0; g < K / G; ++g)
    for (int a = 0; a < R; ++a) {
      const float s = w[a].s[g], z = w[a].z ? float(w[a].z[g]) : 8.f;
      for (int c = 0; c < gh; c += 16)
        for (int l = 0; l < 16; ++l) {
          const int j = g * gh + c + l;
          const float lo = (float(w[a].q[j] & 0xF) - z) * s, hi = (float(w[a].q[j] >> 4) - z) * s;
          for (int b = 0; b < B; ++b) acc[a][b][l] += lo * x[b][j] + hi * x[b][half + j];
        }
    }
  for (int a = 0; a < R; ++a)
    for (int b = 0; b < B; ++b) {
      float t = 0.f;
      for (int l = 0; l < 16; ++l) t += acc[a][b][l];
      out[a][b] = t;
    }
#endif
}

template <int R>
inline void tile_q4_rows(const Q4Row* w, const float* const* x, int nb, int K, int G, float out[4][4]) {
  switch (nb) {
    case 1: tile_q4<R, 1>(w, x, K, G, out); break;
    case 2: tile_q4<R, 2>(w, x, K, G, out); break;
    case 3: tile_q4<R, 3>(w, x, K, G, out); break;
    default: tile_q4<R, 4>(w, x, K, G, out); break;
  }
}

inline void tile_q4_any(const Q4Row* w, int nr, const float* const* x, int nb, int K, int G, float out[4][4]) {
  switch (nr) {
    case 1: tile_q4_rows<1>(w, x, nb, K, G, out); break;
    case 2: tile_q4_rows<2>(w, x, nb, K, G, out); break;
    case 3: tile_q4_rows<3>(w, x, nb, K, G, out); break;
    default: tile_q4_rows<4>(w, x, nb, K, G, out); break;
  }
}

inline Q4Row q4_row(int64_t codes, int64_t scales, const int64_t* zeros, int j, int64_t row, int K, int G) {
  const int64_t groups = K / G;
  return {reinterpret_cast<const uint8_t*>(codes) + row * (K / 2), reinterpret_cast<const float*>(scales) + row * groups,
          zeros ? reinterpret_cast<const uint8_t*>(zeros[j]) + row * groups : nullptr};
}

// phase 0 for rows [r0, r1) of x: xf[r] = x[r] as fp32, even inputs then odd
template <int D>
void q4_inputs(const Call& c, int64_t r0, int64_t r1) {
  using T = typename Elem<D>::T;
  const int H = c.H, h2 = H / 2;
  const T* x = static_cast<const T*>(c.x);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * H;
    float* o = c.xf + r * H;
    for (int k = 0; k < h2; ++k) {
      o[k] = Elem<D>::load(xr[2 * k]);
      o[h2 + k] = Elem<D>::load(xr[2 * k + 1]);
    }
  }
}

// phase 1 (int4) for units [u0, u1): af[p] = silu(gate_i . xf[r_p]) * (up_i . xf[r_p]), rounded to D
template <int D>
void gate_up_q4(const Call& c, int64_t u0, int64_t u1) {
  const int H = c.H, I = c.I, G = c.G, i2 = I / 2;
  float out[4][4];
  int64_t u = u0;
  while (u < u1) {
    const int j = int(u / I);
    const int i0 = int(u % I);
    const int ni = int(std::min<int64_t>({u1 - u, int64_t(I - i0), int64_t(2)}));
    Q4Row w[4];
    for (int a = 0; a < ni; ++a) {
      w[a] = q4_row(c.w13[j], c.s13[j], c.z13, j, i0 + a, H, G);           // gate row
      w[ni + a] = q4_row(c.w13[j], c.s13[j], c.z13, j, I + i0 + a, H, G);  // up row
    }
    for (int64_t p = c.offsets[j]; p < c.offsets[j + 1]; p += 4) {
      const int nb = int(std::min<int64_t>(4, c.offsets[j + 1] - p));
      const float* xr[4];
      for (int b = 0; b < nb; ++b) xr[b] = c.xf + int64_t(c.rows[p + b]) * H;
      tile_q4_any(w, 2 * ni, xr, nb, H, G, out);
      for (int b = 0; b < nb; ++b)
        for (int a = 0; a < ni; ++a) {
          const int i = i0 + a;
          c.af[(p + b) * I + (i & 1 ? i2 + i / 2 : i / 2)] =
              Elem<D>::load(Elem<D>::store(silu(out[a][b]) * out[ni + a][b]));
        }
    }
    u += ni;
  }
}

// phase 2 (int4) for y columns [h0, h1): y[r_p, h] += w_p * (W2_e[h] . af[p])
inline void down_q4(const Call& c, int h0, int h1) {
  const int H = c.H, I = c.I, G = c.G;
  float out[4][4];
  for (int j = 0; j < c.n_experts; ++j) {
    for (int h = h0; h < h1; h += 4) {
      const int nr = std::min(4, h1 - h);
      Q4Row w[4];
      for (int a = 0; a < nr; ++a) w[a] = q4_row(c.w2[j], c.s2[j], c.z2, j, h + a, I, G);
      for (int64_t p = c.offsets[j]; p < c.offsets[j + 1]; p += 4) {
        const int nb = int(std::min<int64_t>(4, c.offsets[j + 1] - p));
        const float* ar[4];
        for (int b = 0; b < nb; ++b) ar[b] = c.af + (p + b) * I;
        tile_q4_any(w, nr, ar, nb, I, G, out);
        for (int b = 0; b < nb; ++b) {
          float* yr = c.y + int64_t(c.rows[p + b]) * H;
          const float wt = c.weights[p + b];
          for (int a = 0; a < nr; ++a) yr[h + a] += wt * out[a][b];
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------ the pool

class Pool {
 public:
  // spin_ns: how long an idle thread (and a joining caller) polls before sleeping on a condition
  // variable: a decode step's next layer call comes within a layer's time, and waking a sleeping
  // thread costs tens of microseconds
  // cpus: the CPUs every thread may run on (none: the process's own); a NUMA machine's store lives on
  // its GPU's node, and threads on that node's cores read it locally
  Pool(int n, int64_t spin_ns, const int* cpus, int ncpus) : n_(n), spin_ns_(spin_ns) {
    for (int t = 0; t < n_; ++t) {
      threads_.emplace_back([this, t] { loop(t); });
#if defined(__linux__)
      if (ncpus > 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        for (int i = 0; i < ncpus; ++i)
          if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET(cpus[i], &set);
        pthread_setaffinity_np(threads_.back().native_handle(), sizeof(set), &set);
      }
#endif
    }
  }

  ~Pool() {
    join();
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_acq_rel);
    { std::lock_guard<std::mutex> g(m_); }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

  void submit(const Call& c, int kind) {
    join();  // one call at a time
    call_ = c;
    kind_ = kind;
    start_ = std::chrono::steady_clock::now();
    remaining_.store(n_, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);  // publishes call_ to the threads
    { std::lock_guard<std::mutex> g(m_); }  // a thread between its check and its sleep sees the change
    cv_.notify_all();
  }

  // blocks until the current call (if any) is done; returns its duration in seconds
  double join() {
    if (remaining_.load(std::memory_order_acquire) != 0) {
      const auto t0 = std::chrono::steady_clock::now();
      int polls = 0;
      while (remaining_.load(std::memory_order_acquire) != 0) {
        if ((++polls & 63) == 0) {
          if (std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(spin_ns_)) {
            std::unique_lock<std::mutex> lk(m_);
            done_cv_.wait(lk, [this] { return remaining_.load(std::memory_order_acquire) == 0; });
            break;
          }
          std::this_thread::yield();
        }
        pause();
      }
    }
    return seconds_;
  }

  double read_sum() const { return read_sum_; }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_pause();
#endif
  }

  void barrier() {  // sense-reversing; yields while waiting (the threads may outnumber idle cores)
    const bool mine = !sense_.load(std::memory_order_relaxed);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      arrived_.store(0, std::memory_order_relaxed);
      sense_.store(mine, std::memory_order_release);
    } else {
      int spins = 0;
      while (sense_.load(std::memory_order_acquire) != mine) {
        if (++spins > 64) std::this_thread::yield(); else pause();
      }
    }
  }

  void run(int t) {
    const Call& c = call_;
    if (kind_ == 1) {  // read bandwidth: sum of a byte range, split evenly
      const int64_t n = c.offsets[0] / 64, a = n * t / n_, b = n * (t + 1) / n_;
      const uint64_t* p = static_cast<const uint64_t*>(c.x);
      uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      for (int64_t i = a * 8; i < b * 8; i += 8) {
        s0 += p[i] ^ p[i + 4];
        s1 += p[i + 1] ^ p[i + 5];
        s2 += p[i + 2] ^ p[i + 6];
        s3 += p[i + 3] ^ p[i + 7];
      }
      sums_[t] = double(s0 + s1 + s2 + s3);
      return;
    }
    const int64_t units = int64_t(c.n_experts) * c.I;
    const int64_t u0 = units * t / n_, u1 = units * (t + 1) / n_;
    const int cols = (c.H + 15) / 16;  // y columns in cache-line groups of 16 floats
    const int h0 = std::min(c.H, int(int64_t(cols) * t / n_) * 16), h1 = std::min(c.H, int(int64_t(cols) * (t + 1) / n_) * 16);
    if (c.q4) {
      const int64_t n = c.rows_n, r0 = n * t / n_, r1 = n * (t + 1) / n_;
      switch (c.dtype) {
        case F32: q4_inputs<F32>(c, r0, r1); barrier(); gate_up_q4<F32>(c, u0, u1); break;
        case BF16: q4_inputs<BF16>(c, r0, r1); barrier(); gate_up_q4<BF16>(c, u0, u1); break;
        default: q4_inputs<F16>(c, r0, r1); barrier(); gate_up_q4<F16>(c, u0, u1); break;
      }
      barrier();
      down_q4(c, h0, h1);
      return;
    }
    switch (c.dtype) {
      case F32: gate_up<F32>(c, u0, u1); barrier(); down<F32>(c, h0, h1); break;
      case BF16: gate_up<BF16>(c, u0, u1); barrier(); down<BF16>(c, h0, h1); break;
      default: gate_up<F16>(c, u0, u1); barrier(); down<F16>(c, h0, h1); break;
    }
  }

  void loop(int t) {
    uint64_t seen = 0;
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      int polls = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        if ((++polls & 63) == 0) {
          if (std::chrono::steady_clock::now() - t0 > std::chrono::nanoseconds(spin_ns_)) {
            std::unique_lock<std::mutex> lk(m_);
            cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != seen; });
            break;
          }
          std::this_thread::yield();  // a runnable thread that wants this core (more threads than cores) gets it
        }
        pause();
      }
      seen = generation_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      run(t);
      if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        seconds_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
        if (kind_ == 1) {
          read_sum_ = 0;
          for (int k = 0; k < n_; ++k) read_sum_ += sums_[k];
        }
        remaining_.store(0, std::memory_order_release);  // (publishes seconds_ and read_sum_)
        { std::lock_guard<std::mutex> g(m_); }
        done_cv_.notify_all();
      }
    }
  }

  const int n_;
  const int64_t spin_ns_;
  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable cv_, done_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> remaining_{0};
  std::atomic<bool> stop_{false};
  Call call_;
  int kind_ = 0;
  std::chrono::steady_clock::time_point start_;
  double seconds_ = 0, read_sum_ = 0;
  double sums_[1024] = {};
  std::atomic<int> arrived_{0};
  std::atomic<bool> sense_{false};
};

}  // namespace

// the fields every layer call has (both entry points)
static Call layer_call(int dtype, int H, int I, int n_experts, const int64_t* w13_ptrs, const int64_t* w2_ptrs,
                       const int64_t* offsets, const int32_t* rows, const float* weights, const void* x, float* y) {
  Call c;
  c.dtype = dtype;
  c.H = H;
  c.I = I;
  c.n_experts = n_experts;
  c.w13 = w13_ptrs;
  c.w2 = w2_ptrs;
  c.offsets = offsets;
  c.rows = rows;
  c.weights = weights;
  c.x = x;
  c.y = y;
  return c;
}

extern "C" {

int prophet_cpu_abi_version() { return 4; }

// bit 0: AVX-512F tiles; bit 1: AVX-512 BF16 dot products; bit 2: F16C
int prophet_cpu_isa() {
  int isa = 0;
#if defined(__AVX512F__)
  isa |= 1;
#endif
#if defined(__AVX512BF16__)
  isa |= 2;
#endif
#if defined(__F16C__)
  isa |= 4;
#endif
  return isa;
}

void* prophet_cpu_pool_create(int threads, int64_t spin_ns, const int* cpus, int ncpus) {
  if (threads < 1 || threads > 1024 || spin_ns < 0 || ncpus < 0) return nullptr;
  return new Pool(threads, spin_ns, cpus, ncpus);
}

void prophet_cpu_pool_destroy(void* pool) { delete static_cast<Pool*>(pool); }

// One layer call's CPU experts (see the header). Returns 0, or -1 for arguments it cannot run.
int prophet_cpu_submit(void* pool, int dtype, int H, int I, int n_experts, const int64_t* w13_ptrs,
                       const int64_t* w2_ptrs, const int64_t* offsets, const int32_t* rows, const float* weights,
                       const void* x, void* act, float* y) {
  if (!pool || dtype < F32 || dtype > F16 || H < 1 || I < 1 || n_experts < 0) return -1;
  Call c = layer_call(dtype, H, I, n_experts, w13_ptrs, w2_ptrs, offsets, rows, weights, x, y);
  c.act = act;
  static_cast<Pool*>(pool)->submit(c, 0);
  return 0;
}

// One layer call's CPU experts with int4 weights (see the header): codes, scales and zero points (null:
// symmetric) per expert, x [n, H] in dtype, scratch xf [n, H] and af [P, I] fp32. Returns 0, or -1.
int prophet_cpu_submit_q4(void* pool, int dtype, int H, int I, int G, int64_t n, int n_experts,
                          const int64_t* w13_ptrs, const int64_t* w2_ptrs, const int64_t* s13_ptrs,
                          const int64_t* s2_ptrs, const int64_t* z13_ptrs, const int64_t* z2_ptrs,
                          const int64_t* offsets, const int32_t* rows, const float* weights, const void* x,
                          float* xf, float* af, float* y) {
  if (!pool || dtype < F32 || dtype > F16 || G < 32 || G % 32 || H < G || I < G || H % G || I % G || n < 0 ||
      n_experts < 0 || !s13_ptrs || !s2_ptrs || (z13_ptrs == nullptr) != (z2_ptrs == nullptr))
    return -1;
  Call c = layer_call(dtype, H, I, n_experts, w13_ptrs, w2_ptrs, offsets, rows, weights, x, y);
  c.q4 = true;
  c.G = G;
  c.rows_n = n;
  c.s13 = s13_ptrs;
  c.s2 = s2_ptrs;
  c.z13 = z13_ptrs;
  c.z2 = z2_ptrs;
  c.xf = xf;
  c.af = af;
  static_cast<Pool*>(pool)->submit(c, 0);
  return 0;
}

// Blocks until the pool's current call is done; its duration in seconds (submit to the last thread).
double prophet_cpu_join(void* pool) { return static_cast<Pool*>(pool)->join(); }

// The machine's read rate as the pool sees it: every thread reads its share of [ptr, ptr + bytes)
// once (bytes a multiple of 64). Returns the seconds taken; *checksum keeps the reads from being elided.
double prophet_cpu_read(void* pool, const void* ptr, int64_t bytes, double* checksum) {
  Pool* p = static_cast<Pool*>(pool);
  Call c;
  int64_t n = bytes;
  c.x = ptr;
  c.offsets = &n;
  p->submit(c, 1);
  const double s = p->join();
  if (checksum) *checksum = p->read_sum();
  return s;
}

}  // extern "C"
