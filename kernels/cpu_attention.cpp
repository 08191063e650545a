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

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
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

// A cache row as fp32: the row itself when the cache is fp32, else converted into `buf`.
inline const float* as_float(const float* row, float*, int64_t) { return row; }
template <typename T>
inline const float* as_float(const T* row, float* buf, int64_t n) {
  for (int64_t d = 0; d < n; ++d) buf[d] = static_cast<float>(row[d]);
  return buf;
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& kc,
            at::Tensor& vc, at::Tensor& out, double scale, int64_t window) {
  const Step& s = g_step;
  const int64_t n = s.num_tokens, H = q.size(1), D = q.size(2);
  const int64_t bs = kc.size(1), hkv = kc.size(2), group = H / hkv;
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
  std::vector<float> qf(group * D), acc(group * D), total(group), scores, row_f(D);
  for (int64_t t = 0; t < n; ++t) {
    const int32_t* row = s.rows[t];
    const int64_t pos = s.positions[t];
    const int64_t lo = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    const int64_t len = pos - lo + 1;
    scores.resize(group * len);
    for (int64_t kvh = 0; kvh < hkv; ++kvh) {
      for (int64_t g = 0; g < group; ++g) {
        const T* qh = qp + t * q.stride(0) + (kvh * group + g) * q.stride(1);
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(qh[d]) * scale;
      }
      for (int64_t j = 0; j < len; ++j) {
        const int64_t p = lo + j;
        const float* kr = as_float(kcp + ((int64_t(row[p / bs]) * bs + p % bs) * hkv + kvh) * D,
                                   row_f.data(), D);
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * kr[d];
          scores[g * len + j] = dot;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sc = scores.data() + g * len;
        float m = sc[0], sum = 0.f;
        for (int64_t j = 1; j < len; ++j) m = std::max(m, sc[j]);
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < len; ++j) {
          sc[j] = std::exp(sc[j] - m);
          sum += sc[j];
        }
        total[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < len; ++j) {
        const int64_t p = lo + j;
        const float* vr = as_float(vcp + ((int64_t(row[p / bs]) * bs + p % bs) * hkv + kvh) * D,
                                   row_f.data(), D);
        for (int64_t g = 0; g < group; ++g) {
          const float w = scores[g * len + j];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += w * vr[d];
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        T* oh = op + (t * H + kvh * group + g) * D;
        const float inv = 1.f / total[g];
        for (int64_t d = 0; d < D; ++d) oh[d] = static_cast<T>(acc[g * D + d] * inv);
      }
    }
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           int64_t layer, double scale, std::optional<int64_t> sliding_window) {
  const Step& s = g_step;
  TORCH_CHECK(s.active, "paged_attention runs only inside kernels.attention_op.step_context");
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
    attend<scalar_t>(qc, kk, vv, kc, vc, out, scale, window);
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
