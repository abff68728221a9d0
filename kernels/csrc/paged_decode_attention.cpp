// Paged decode attention for the CPU: one query token per sequence, read straight from the KV blocks.
//
// Why C++: gathering each sequence's blocks into a padded tensor and calling SDPA moves the whole
// KV cache through memory three times per layer per step (gather read, gather write, SDPA read);
// decode on a CPU is bound by exactly that traffic. This kernel reads every cached K and V row once.
//
// Threads come from ATen's pool (at::parallel_for), so torch.set_num_threads governs them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// HEAD_DIM > 0 fixes head_dim at compile time so the dot products unroll and vectorise fully.
//
// Work item = one sequence, all heads: a cached token's K (or V) row holds every kv head
// contiguously (Hkv * D values), so walking a block's rows in order streams the block from memory
// front to back, once. (Splitting every sequence by kv head read each row in Hkv strided pieces:
// ~20% slower at batch 32 on a two-core machine.) Only when there are fewer sequences than threads
// is each sequence split into kv-head ranges, so that every thread has work. The G = Hq / Hkv
// query heads of a kv head are scored together, so each K/V value is loaded once for all of them.
template <typename scalar_t, int64_t HEAD_DIM>
void paged_decode(const float* q, const scalar_t* k_cache, const scalar_t* v_cache,
                  const int64_t* block_tables, const int64_t* seq_lens, float* out,
                  int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t runtime_head_dim,
                  int64_t block_size, int64_t max_blocks, float scale) {
  const int64_t head_dim = HEAD_DIM > 0 ? HEAD_DIM : runtime_head_dim;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t row_stride = num_kv_heads * head_dim;  // between consecutive tokens of a block
  const int64_t block_stride = block_size * row_stride;
  if (num_seqs == 0) return;
  const int64_t threads = at::get_num_threads();
  const int64_t num_chunks = std::min(num_kv_heads, std::max<int64_t>(1, (threads + num_seqs - 1) / num_seqs));
  const int64_t kv_per_chunk = (num_kv_heads + num_chunks - 1) / num_chunks;
  at::parallel_for(0, num_seqs * num_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;  // [heads of the item, len]
    std::vector<float> qs(num_heads * head_dim);
    std::vector<float> acc(num_heads * head_dim);
    std::vector<float> inv_sum(num_heads);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / num_chunks;
      const int64_t kv_first = (item % num_chunks) * kv_per_chunk;
      const int64_t kv_last = std::min(num_kv_heads, kv_first + kv_per_chunk);
      if (kv_first >= kv_last) continue;
      const int64_t h_first = kv_first * group;  // this item's query heads: [h_first, h_first + nh)
      const int64_t nh = (kv_last - kv_first) * group;
      const int64_t len = seq_lens[seq];
      const int64_t* table = block_tables + seq * max_blocks;
      scores.resize(nh * len);
      const float* q_seq = q + (seq * num_heads + h_first) * head_dim;
      for (int64_t i = 0; i < nh * head_dim; ++i) qs[i] = q_seq[i] * scale;

      // scores[h, t] = q_h . k_t[h / G]
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const scalar_t* k_block = k_cache + table[t0 / block_size] * block_stride + kv_first * head_dim;
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t o = 0; o < n; ++o) {
          const scalar_t* k_row = k_block + o * row_stride;
          for (int64_t h = 0; h < nh; ++h) {
            const scalar_t* k_head = k_row + (h / group) * head_dim;
            const float* qh = qs.data() + h * head_dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < head_dim; ++d) s += qh[d] * static_cast<float>(k_head[d]);
            scores[h * len + t0 + o] = s;
          }
        }
      }
      // softmax over t, per query head
      for (int64_t h = 0; h < nh; ++h) {
        float* sh = scores.data() + h * len;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < len; ++t) m = std::max(m, sh[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) {
          sh[t] = std::exp(sh[t] - m);
          sum += sh[t];
        }
        inv_sum[h] = 1.f / sum;
      }
      // acc[h] = sum_t p[h, t] * v_t[h / G]
      std::fill(acc.begin(), acc.begin() + nh * head_dim, 0.f);
      for (int64_t t0 = 0; t0 < len; t0 += block_size) {
        const scalar_t* v_block = v_cache + table[t0 / block_size] * block_stride + kv_first * head_dim;
        const int64_t n = std::min(block_size, len - t0);
        for (int64_t o = 0; o < n; ++o) {
          const scalar_t* v_row = v_block + o * row_stride;
          for (int64_t h = 0; h < nh; ++h) {
            const scalar_t* v_head = v_row + (h / group) * head_dim;
            const float p = scores[h * len + t0 + o];
            float* ah = acc.data() + h * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) ah[d] += p * static_cast<float>(v_head[d]);
          }
        }
      }
      float* out_seq = out + (seq * num_heads + h_first) * head_dim;
      for (int64_t h = 0; h < nh; ++h)
        for (int64_t d = 0; d < head_dim; ++d) out_seq[h * head_dim + d] = acc[h * head_dim + d] * inv_sum[h];
    }
  });
}

// q: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [B, max_blocks]
// int64; seq_lens: [B] int64. Returns [B, Hq, D] float32.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4, "q must be [B, Hq, D] and k_cache [N, bs, Hkv, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "KV caches must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "num_heads must be a multiple of num_kv_heads");
  auto qf = q.to(at::kFloat).contiguous();
  auto tables = block_tables.to(at::kLong).contiguous();
  auto lens = seq_lens.to(at::kLong).contiguous();
  auto out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_cache.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto head_dim_constant) {
      paged_decode<scalar_t, decltype(head_dim_constant)::value>(
          qf.data_ptr<float>(), k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(),
          tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(), out.data_ptr<float>(), q.size(0), q.size(1),
          k_cache.size(2), q.size(2), k_cache.size(1), tables.size(1), static_cast<float>(scale));
    };
    switch (q.size(2)) {
      case 64: run(std::integral_constant<int64_t, 64>{}); break;
      case 128: run(std::integral_constant<int64_t, 128>{}); break;
      default: run(std::integral_constant<int64_t, 0>{});
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(pdserve_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
