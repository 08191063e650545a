// The CPU kernel of skybroker::paged_attention: one layer's KV-cache write and paged attention
// over the whole step (decode and prefill tokens) in one call, with no Python in between.
//
// The step's cache layout is set once per step (skybroker_cpu::set_step, from
// kernels.attention_op.step_context) and turned into one (block table row, position) pair per
// token, which every layer reuses. Attention math runs in fp32 whatever the storage dtype.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

struct Step {
  bool active = false;
  int64_t num_tokens = 0;
  at::Tensor slots;                  // [num_tokens] int64
  std::vector<at::Tensor> tables;    // int32 [B, W] block tables the rows below point into
  std::vector<const int32_t*> rows;  // per token: its block table row
  std::vector<int64_t> positions;    // per token: its position (it sees 0..position)
  std::vector<at::Tensor> k_caches, v_caches;
  int64_t next_layer = 0;  // the layer a call with layer -1 attends (counted per forward)
};

Step g_step;

at::Tensor as_int(const at::Tensor& t, at::ScalarType type) {
  TORCH_CHECK(t.device().is_cpu(), "skybroker_cpu::set_step takes CPU tensors");
  return t.to(type).contiguous();
}

void set_step(int64_t num_tokens, int64_t num_decode, const at::Tensor& slot_mapping,
              const at::Tensor& decode_tables, const at::Tensor& decode_lens,
              const at::Tensor& prefill_tables, const at::Tensor& prefill_cu,
              const at::Tensor& prefill_lens, at::TensorList k_caches, at::TensorList v_caches) {
  Step s;
  s.num_tokens = num_tokens;
  s.slots = as_int(slot_mapping, at::kLong);
  TORCH_CHECK(s.slots.numel() >= num_tokens, "slot_mapping is shorter than num_tokens");
  at::Tensor dt = as_int(decode_tables, at::kInt), dl = as_int(decode_lens, at::kInt);
  at::Tensor pt = as_int(prefill_tables, at::kInt), pl = as_int(prefill_lens, at::kInt);
  at::Tensor cu = as_int(prefill_cu, at::kInt);
  s.rows.reserve(num_tokens);
  s.positions.reserve(num_tokens);
  TORCH_CHECK(dl.numel() == num_decode && dt.size(0) == num_decode,
              "decode block tables and context lengths must have num_decode rows");
  for (int64_t b = 0; b < num_decode; ++b) {
    s.rows.push_back(dt.data_ptr<int32_t>() + b * dt.stride(0));
    s.positions.push_back(dl.data_ptr<int32_t>()[b] - 1);
  }
  const int32_t* cup = cu.data_ptr<int32_t>();
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    const int64_t len = cup[b + 1] - cup[b], end = pl.data_ptr<int32_t>()[b];
    for (int64_t i = 0; i < len; ++i) {
      s.rows.push_back(pt.data_ptr<int32_t>() + b * pt.stride(0));
      s.positions.push_back(end - len + i);
    }
  }
  TORCH_CHECK(static_cast<int64_t>(s.rows.size()) == num_tokens,
              "decode plus prefill tokens must add up to num_tokens");
  s.tables = {dt, pt};
  s.k_caches = k_caches.vec();
  s.v_caches = v_caches.vec();
  s.active = true;
  g_step = std::move(s);
}

void clear_step() { g_step = Step(); }

// Scratch that lives across calls (one step's layers reuse it; no allocation per token).
std::vector<float>& scratch(int i) {
  thread_local std::vector<float> bufs[5];
  return bufs[i];
}

// A cache row (all KV heads of one position) as fp32: the row itself when the cache is fp32,
// else converted into `buf`.
inline const float* as_float(const float* row, float*, int64_t) { return row; }
template <typename T>
inline const float* as_float(const T* row, float* buf, int64_t n) {
  for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}

// A size known at compile time (kN > 0: loops over it unroll into a few vector instructions)
// or at run time (kN == 0).
template <int kN>
struct Const {
  static constexpr int64_t get(int64_t) { return kN; }
};
template <>
struct Const<0> {
  static int64_t get(int64_t n) { return n; }
};

// Calls f(rows, j, count) for each run of consecutive cached positions lo..pos of one token
// that lie in one block (block by block: no division per position): rows points at the run's
// first entry in `cache`, rows row_len elements apart.
template <typename T, typename F>
inline void for_each_run(const T* cache, const int32_t* table, int64_t bs, int64_t row_len,
                         int64_t lo, int64_t pos, F&& f) {
  int64_t j = 0;
  for (int64_t blk = lo / bs; blk <= pos / bs; ++blk) {
    const int64_t first = blk == lo / bs ? lo % bs : 0;
    const int64_t last = blk == pos / bs ? pos % bs : bs - 1;
    f(cache + (int64_t(table[blk]) * bs + first) * row_len, j, last - first + 1);
    j += last - first + 1;
  }
}

// Calls f(row, j) for each cached position lo..pos of one token, row pointing at its entry
// in `cache`, j counting from 0.
template <typename T, typename F>
inline void for_each_position(const T* cache, const int32_t* table, int64_t bs, int64_t row_len,
                              int64_t lo, int64_t pos, F&& f) {
  for_each_run(cache, table, bs, row_len, lo, pos, [&](const T* rows, int64_t j, int64_t n) {
    for (int64_t i = 0; i < n; ++i) f(rows + i * row_len, j + i);
  });
}

#if defined(__AVX2__) && defined(__FMA__)
// The sums of eight vectors, as one vector (element i: the sum of a[i]'s elements).
inline __m256 sum8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s03 = _mm256_hadd_ps(s01, s23), s47 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(s03, s47, 0x20),
                       _mm256_permute2f128_ps(s03, s47, 0x31));
}

// Scores of a query group (kG heads of kD, in q) against eight consecutive cached K rows, into
// sc[g * len + 0..7]: one horizontal reduction per eight scores instead of one per score.
template <int kD, int kG>
inline void scores8(const float* q, const float* rows, int64_t row_len, float* sc, int64_t len) {
  for (int64_t g = 0; g < kG; ++g) {
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) {
      const float* k = rows + r * row_len;
      acc[r] = _mm256_mul_ps(_mm256_loadu_ps(q + g * kD), _mm256_loadu_ps(k));
      for (int c = 8; c < kD; c += 8)
        acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + g * kD + c), _mm256_loadu_ps(k + c), acc[r]);
    }
    _mm256_storeu_ps(sc + g * len, sum8(acc));
  }
}
#endif

// One token's attention over its cached positions lo..pos, one KV head at a time: the head's
// query group against each position's K, softmax per query head, then the group's weighted sum
// of V. kD (head size) and kG (query heads per KV head) are compile-time constants for the
// common shapes, so the group's query and accumulators stay in registers; 0 means run-time.
template <typename T, int kD, int kG>
void attend_token(const T* qh, int64_t q_head_stride, const T* kc, const T* vc,
                  const int32_t* table, int64_t bs, int64_t hkv, int64_t H, int64_t d_rt,
                  int64_t lo, int64_t pos, float scale, T* out) {
  const int64_t D = Const<kD>::get(d_rt), G = Const<kG>::get(H / hkv), len = pos - lo + 1;
  const int64_t row_len = hkv * D;
  std::vector<float>& scratch_q = scratch(0);
  std::vector<float>& scores = scratch(1);
  std::vector<float>& scratch_acc = scratch(2);
  std::vector<float>& row_f = scratch(3);
  if (scratch_q.size() < size_t(G * D)) scratch_q.resize(G * D), scratch_acc.resize(G * D);
  if (scores.size() < size_t(G * len)) scores.resize(G * len);
  if (row_f.size() < size_t(D)) row_f.resize(D);
  // Fixed-size locals when the shape is known (registers), the scratch vectors otherwise.
  constexpr int64_t kN = kD > 0 && kG > 0 ? kD * kG : 1;
  float q_local[kN], acc_local[kN];
  float* q = kD > 0 && kG > 0 ? q_local : scratch_q.data();
  float* acc = kD > 0 && kG > 0 ? acc_local : scratch_acc.data();
  float* sc = scores.data();
  float* rf = row_f.data();
  for (int64_t kvh = 0; kvh < hkv; ++kvh) {
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        q[g * D + d] = static_cast<float>(qh[(kvh * G + g) * q_head_stride + d]) * scale;
    auto score_run = [&](const T* rows, int64_t j, int64_t n) {
      int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
      if constexpr (std::is_same_v<T, float> && kD > 0 && kD % 8 == 0 && kG > 0)
        for (; i + 8 <= n; i += 8) scores8<kD, kG>(q, rows + i * row_len, row_len, sc + j + i, len);
#endif
      for (; i < n; ++i) {
        const float* kr = as_float(rows + i * row_len, rf, D);
        for (int64_t g = 0; g < G; ++g) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += q[g * D + d] * kr[d];
          sc[g * len + j + i] = dot;
        }
      }
    };
    for_each_run(kc + kvh * D, table, bs, row_len, lo, pos, score_run);
    float total[kG > 0 ? kG : 1];
    std::vector<float>& totals = scratch(4);
    if (kG == 0 && totals.size() < size_t(G)) totals.resize(G);
    float* tot = kG > 0 ? total : totals.data();
    for (int64_t g = 0; g < G; ++g) {
      float* s = sc + g * len;
      float m = s[0], sum = 0.f;
      for (int64_t j = 1; j < len; ++j) m = std::max(m, s[j]);
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < len; ++j) {
        s[j] = std::exp(s[j] - m);
        sum += s[j];
      }
      tot[g] = sum;
    }
    for (int64_t i = 0; i < G * D; ++i) acc[i] = 0.f;
    for_each_position(vc + kvh * D, table, bs, row_len, lo, pos, [&](const T* raw, int64_t j) {
      const float* vr = as_float(raw, rf, D);
      for (int64_t g = 0; g < G; ++g) {
        const float w = sc[g * len + j];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[g * D + d] += w * vr[d];
      }
    });
    for (int64_t g = 0; g < G; ++g) {
      const float inv = 1.f / tot[g];
      T* o = out + (kvh * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[g * D + d] * inv);
    }
  }
}

// Asks for the cache lines of a token's K and V blocks (positions lo..pos), issued while the
// token before it computes: its blocks lie anywhere in the cache, where the hardware
// prefetcher cannot follow (benchmarks/cpu_attention.py: 1.70x at 50 positions, 1.80x at 200,
// blocks shuffled).
template <typename T>
inline void prefetch_cache(const T* kc, const T* vc, const int32_t* table, int64_t bs,
                           int64_t row_len, int64_t lo, int64_t pos) {
  const int64_t block_bytes = bs * row_len * int64_t(sizeof(T));
  for (int64_t blk = lo / bs; blk <= pos / bs; ++blk) {
    const char* kb = reinterpret_cast<const char*>(kc) + int64_t(table[blk]) * block_bytes;
    const char* vb = reinterpret_cast<const char*>(vc) + int64_t(table[blk]) * block_bytes;
    for (int64_t off = 0; off < block_bytes; off += 64) {
      __builtin_prefetch(kb + off);
      __builtin_prefetch(vb + off);
    }
  }
}

template <typename T, int kD, int kG>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kc,
            at::Tensor& vc, at::Tensor& out, double scale, int64_t window) {
  const Step& s = g_step;
  const int64_t n = s.num_tokens, H = q.size(1), D = q.size(2);
  const int64_t bs = kc.size(1), hkv = kc.size(2);
  const int64_t* slots = s.slots.data_ptr<int64_t>();
  T* kcp = kc.data_ptr<T>();
  T* vcp = vc.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    for (int64_t h = 0; h < hkv; ++h) {
      std::copy_n(kp + t * k.stride(0) + h * k.stride(1), D, kcp + (slot * hkv + h) * D);
      std::copy_n(vp + t * v.stride(0) + h * v.stride(1), D, vcp + (slot * hkv + h) * D);
    }
  }
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  auto window_lo = [&](int64_t pos) {
    return window > 0 ? std::max<int64_t>(0, pos - window + 1) : int64_t(0);
  };
  for (int64_t t = 0; t < n; ++t) {
    const int64_t pos = s.positions[t];
    const int64_t lo = window_lo(pos);
    // The next token's blocks, unless they are this one's (prefill tokens of one sequence).
    if (t + 1 < n && s.rows[t + 1] != s.rows[t])
      prefetch_cache(kcp, vcp, s.rows[t + 1], bs, hkv * D, window_lo(s.positions[t + 1]),
                     s.positions[t + 1]);
    attend_token<T, kD, kG>(qp + t * q.stride(0), q.stride(1), kcp, vcp, s.rows[t], bs, hkv, H, D,
                        lo, pos, float(scale), op + t * H * D);
  }
}

template <typename T, int kD>
void attend_d(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kc,
              at::Tensor& vc, at::Tensor& out, double scale, int64_t window) {
  switch (q.size(1) / kc.size(2)) {
    case 1: return attend<T, kD, 1>(q, k, v, kc, vc, out, scale, window);
    case 2: return attend<T, kD, 2>(q, k, v, kc, vc, out, scale, window);
    case 4: return attend<T, kD, 4>(q, k, v, kc, vc, out, scale, window);
    case 8: return attend<T, kD, 8>(q, k, v, kc, vc, out, scale, window);
    default: return attend<T, kD, 0>(q, k, v, kc, vc, out, scale, window);
  }
}

// Specialised shapes for fp32 (the CPU default dtype); other dtypes take the run-time loops.
template <typename T>
void attend_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kc,
                at::Tensor& vc, at::Tensor& out, double scale, int64_t window) {
  if constexpr (std::is_same_v<T, float>) {
    switch (q.size(2)) {
      case 16: return attend_d<T, 16>(q, k, v, kc, vc, out, scale, window);
      case 32: return attend_d<T, 32>(q, k, v, kc, vc, out, scale, window);
      case 64: return attend_d<T, 64>(q, k, v, kc, vc, out, scale, window);
      case 128: return attend_d<T, 128>(q, k, v, kc, vc, out, scale, window);
    }
  }
  attend<T, 0, 0>(q, k, v, kc, vc, out, scale, window);
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           int64_t layer, double scale, std::optional<int64_t> sliding_window) {
  Step& s = g_step;
  TORCH_CHECK(s.active, "paged_attention runs only inside kernels.attention_op.step_context");
  if (layer < 0) {
    layer = s.next_layer;
    s.next_layer = (layer + 1) % static_cast<int64_t>(s.k_caches.size());
  }
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(s.k_caches.size()),
              "paged_attention: layer ", layer, " has no KV cache in this step");
  at::Tensor kc = s.k_caches[layer], vc = s.v_caches[layer];
  TORCH_CHECK(kc.is_contiguous() && vc.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be [T, heads, D]");
  TORCH_CHECK(q.size(0) >= s.num_tokens, "q has fewer rows than the step's tokens");
  const auto type = kc.scalar_type();
  auto fit = [&](const at::Tensor& x) {
    at::Tensor y = x.scalar_type() == type ? x : x.to(type);
    return y.stride(2) == 1 ? y : y.contiguous();
  };
  at::Tensor qc = fit(q), kk = fit(k), vv = fit(v);
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(type));
  if (q.size(0) > s.num_tokens) out.narrow(0, s.num_tokens, q.size(0) - s.num_tokens).zero_();
  const int64_t window = sliding_window.has_value() ? *sliding_window : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "paged_attention", [&] {
    attend_any<scalar_t>(qc, kk, vv, kc, vc, out, scale, window);
  });
  return out.scalar_type() == q.scalar_type() ? out : out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY(skybroker_cpu, m) {
  m.def(
      "set_step(int num_tokens, int num_decode, Tensor slot_mapping, Tensor decode_block_tables,"
      " Tensor decode_context_lens, Tensor prefill_block_tables, Tensor prefill_cu_seqlens_q,"
      " Tensor prefill_context_lens, Tensor[] k_caches, Tensor[] v_caches) -> ()");
  m.def("clear_step() -> ()");
  m.impl("set_step", set_step);
  m.impl("clear_step", clear_step);
}

TORCH_LIBRARY_IMPL(skybroker, CPU, m) { m.impl("paged_attention", paged_attention); }
