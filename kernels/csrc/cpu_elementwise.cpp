// Fused CPU versions of the decoder layer's small ops: RMSNorm (with the residual add before it), the
// SwiGLU gate and the rotary embedding. In plain torch they are 3 to ~15 ops each, every one a pass
// over the activations plus a few microseconds of dispatch; at decode batch sizes that dispatch is most
// of their cost.
//
// Rounding follows the torch code in cluster/model/layers.py and rotary.py step by step: RMSNorm
// reduces in float32, rounds the normalised row to the input dtype, then multiplies by the weight and
// rounds again (as HF does); the residual add rounds to the input dtype; SiLU rounds before the
// multiply by `up`; rotary rounds each product and sum. Only the order of the float32 sum of squares
// differs, so a bf16 value on a rounding boundary can land one bf16 step away.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

namespace {

int64_t grain_for(int64_t row_len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_len, 1)); }

template <typename scalar_t>
void rms_norm_rows(const scalar_t* x, const scalar_t* residual, scalar_t* residual_out, const scalar_t* w,
                   scalar_t* out, int64_t rows, int64_t dim, float eps) {
  at::parallel_for(0, rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* xr = x + r * dim;
      scalar_t* outr = out + r * dim;
      const scalar_t* src = xr;
      if (residual != nullptr) {  // residual_out = residual + x, rounded to the dtype; then normalise it
        scalar_t* rr = residual_out + r * dim;
        const scalar_t* res = residual + r * dim;
        for (int64_t d = 0; d < dim; ++d) rr[d] = static_cast<scalar_t>(static_cast<float>(res[d]) + static_cast<float>(xr[d]));
        src = rr;
      }
      float sum_sq = 0.f;
      for (int64_t d = 0; d < dim; ++d) {
        const float v = static_cast<float>(src[d]);
        sum_sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
      for (int64_t d = 0; d < dim; ++d) {
        const scalar_t normed = static_cast<scalar_t>(static_cast<float>(src[d]) * inv);
        outr[d] = static_cast<scalar_t>(static_cast<float>(w[d]) * static_cast<float>(normed));
      }
    }
  });
}

void check_norm_args(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "rms_norm: x and weight must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.numel(), "rms_norm: x's last dim must equal weight's size");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: x and weight must have one dtype");
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  auto out = at::empty_like(x);
  const int64_t dim = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, nullptr, weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), x.numel() / std::max<int64_t>(dim, 1), dim,
                            static_cast<float>(eps));
  });
  return out;
}

// (normed, residual + x): the pre-norm residual step of a decoder layer in one pass.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_norm_args(x, weight);
  TORCH_CHECK(residual.is_contiguous() && residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
              "add_rms_norm: residual must be a contiguous tensor of x's shape and dtype");
  auto out = at::empty_like(x);
  auto residual_out = at::empty_like(x);
  const int64_t dim = x.size(-1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual.data_ptr<scalar_t>(),
                            residual_out.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                            out.data_ptr<scalar_t>(), x.numel() / std::max<int64_t>(dim, 1), dim,
                            static_cast<float>(eps));
  });
  return {out, residual_out};
}

// [T, 2I] = [gate | up] -> silu(gate) * up, [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "silu_and_mul: x must be contiguous [T, 2I]");
  const int64_t rows = x.size(0), half = x.size(1) / 2;
  auto out = at::empty({rows, half}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(2 * half), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = src + r * 2 * half;
        const scalar_t* up = gate + half;
        scalar_t* o = dst + r * half;
        for (int64_t i = 0; i < half; ++i) {
          const float g = static_cast<float>(gate[i]);
          const scalar_t silu = static_cast<scalar_t>(g / (1.f + std::exp(-g)));
          o[i] = static_cast<scalar_t>(static_cast<float>(silu) * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

// Rotary embedding, half-rotation ("neox") layout, for q [T, Hq, D] and k [T, Hkv, D] (strided views
// of the fused qkv output are fine: a token's heads only need unit stride within each head). cos/sin
// rows come from cos_sin_cache [P, D] (float32: [cos | sin]) at `positions`, cast to the input dtype
// first, as the torch code does: out = [x1 cos - x2 sin | x2 cos + x1 sin], every product and sum
// rounded to the dtype. Returns new contiguous q and k.
template <typename scalar_t>
void rotate_heads(const scalar_t* x, int64_t stride_t, int64_t stride_h, int64_t num_heads, int64_t half,
                  const scalar_t* cs, scalar_t* out, int64_t t) {
  for (int64_t h = 0; h < num_heads; ++h) {
    const scalar_t* xh = x + t * stride_t + h * stride_h;
    scalar_t* oh = out + (t * num_heads + h) * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(xh[i]), x2 = static_cast<float>(xh[i + half]);
      const float c = static_cast<float>(cs[i]), s = static_cast<float>(cs[i + half]);
      const float x1c = static_cast<float>(static_cast<scalar_t>(x1 * c));
      const float x2s = static_cast<float>(static_cast<scalar_t>(x2 * s));
      const float x2c = static_cast<float>(static_cast<scalar_t>(x2 * c));
      const float x1s = static_cast<float>(static_cast<scalar_t>(x1 * s));
      oh[i] = static_cast<scalar_t>(x1c - x2s);
      oh[i + half] = static_cast<scalar_t>(x2c + x1s);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> rotary(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos_sin_cache,
                                          const at::Tensor& positions) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rotary: q must be [T, Hq, D] and k [T, Hkv, D]");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && q.size(2) % 2 == 0, "rotary: head_dim must be even, unit stride");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rotary: q and k must have one dtype");
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == q.size(2), "rotary: cache must be [P, D]");
  const int64_t tokens = q.size(0), dim = q.size(2), half = dim / 2;
  auto pos = positions.to(at::kLong).contiguous();
  auto cache = cos_sin_cache.index_select(0, pos).to(q.scalar_type()).contiguous();  // [T, D], rounded like torch
  auto q_out = at::empty({tokens, q.size(1), dim}, q.options());
  auto k_out = at::empty({tokens, k.size(1), dim}, k.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "rotary", [&] {
    const scalar_t* cs = cache.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, grain_for((q.size(1) + k.size(1)) * dim), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        rotate_heads<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), q.stride(1), q.size(1), half, cs + t * dim,
                               q_out.data_ptr<scalar_t>(), t);
        rotate_heads<scalar_t>(k.data_ptr<scalar_t>(), k.stride(0), k.stride(1), k.size(1), half, cs + t * dim,
                               k_out.data_ptr<scalar_t>(), t);
      }
    });
  });
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("rotary(Tensor q, Tensor k, Tensor cos_sin_cache, Tensor positions) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary", &rotary);
}
