// Block copies for the KV transfer that checksum the bytes on the way through.
//
// The dist transport gathers a request's blocks out of the prefill worker's cache into a message and,
// on the decode worker, scatters each message's blocks into the reserved ones; both sides checksum the
// message (cluster/transfer/codec.py). In torch that is two passes over every byte per side (a gather or
// scatter, then the row sums), each a few ops with their dispatch. On a 2-core host the transfer is
// CPU-bound, so here each side does it in one pass: copy a block, adding up its 512-byte rows as they go.
//
// The returned value is codec.checksum's weighted part for the rows copied: the sum over rows r of
// (2 * (first_row + r) + 1) * (sum of row r's little-endian 64-bit words), mod 2^64, as an int64 bit
// pattern. Blocks must be whole rows; the caller adds the length term. One thread: the caller is a
// transfer thread, and the model's thread pool stays free for compute.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kRowWords = 64;  // codec._ROW_WORDS
constexpr int64_t kRowBytes = kRowWords * 8;

// Copy `num_rows` rows from src to dst; the weighted sum of their row sums, rows numbered from first_row.
inline uint64_t copy_rows(const uint64_t* __restrict src, uint64_t* __restrict dst, int64_t num_rows,
                          int64_t first_row) {
  uint64_t total = 0;
  for (int64_t r = 0; r < num_rows; ++r) {
    const uint64_t* s = src + r * kRowWords;
    uint64_t* d = dst + r * kRowWords;
    uint64_t row_sum = 0;
    for (int64_t w = 0; w < kRowWords; ++w) {  // vectorized: loads, stores and adds, no multiplies
      const uint64_t x = s[w];
      d[w] = x;
      row_sum += x;
    }
    total += row_sum * static_cast<uint64_t>(2 * (first_row + r) + 1);
  }
  return total;
}

void check_args(const at::Tensor& blocks, const at::Tensor& ids, const at::Tensor& flat, const char* name) {
  TORCH_CHECK(blocks.device().is_cpu() && flat.device().is_cpu() && ids.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(blocks.dim() == 2 && blocks.scalar_type() == at::kByte, name, ": blocks must be a [N, block_bytes] uint8 view");
  TORCH_CHECK(blocks.stride(1) == 1, name, ": each block's bytes must be contiguous");
  TORCH_CHECK(blocks.size(1) % kRowBytes == 0, name, ": block_bytes must be a multiple of ", kRowBytes);
  TORCH_CHECK(blocks.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(blocks.data_ptr()) % 8 == 0, name,
              ": blocks must be 8-byte aligned");
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong, name, ": block ids must be a 1-D int64 tensor");
  TORCH_CHECK(flat.dim() == 1 && flat.scalar_type() == at::kByte && flat.is_contiguous(), name,
              ": the message must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(flat.data_ptr()) % 8 == 0, name, ": the message must be 8-byte aligned");
  TORCH_CHECK(flat.numel() == ids.numel() * blocks.size(1), name, ": the message holds ", flat.numel(),
              " bytes, the blocks ", ids.numel() * blocks.size(1));
}

const uint64_t* block_ptr(const at::Tensor& blocks, int64_t id) {
  TORCH_CHECK(id >= 0 && id < blocks.size(0), "block id ", id, " out of range [0, ", blocks.size(0), ")");
  return reinterpret_cast<const uint64_t*>(static_cast<const uint8_t*>(blocks.data_ptr()) + id * blocks.stride(0));
}

// out[i] = blocks[ids[i]] for every i; returns the weighted checksum part of `out`.
int64_t gather_blocks_checksum(const at::Tensor& blocks, const at::Tensor& ids, const at::Tensor& out,
                               int64_t first_row) {
  check_args(blocks, ids, out, "gather_blocks_checksum");
  const int64_t rows_per_block = blocks.size(1) / kRowBytes;
  const int64_t* id = ids.data_ptr<int64_t>();
  auto* dst = reinterpret_cast<uint64_t*>(out.data_ptr());
  uint64_t total = 0;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    total += copy_rows(block_ptr(blocks, id[i]), dst + i * rows_per_block * kRowWords, rows_per_block,
                       first_row + i * rows_per_block);
  }
  return static_cast<int64_t>(total);
}

// blocks[ids[i]] = data[i] for every i; returns the weighted checksum part of `data`.
int64_t scatter_blocks_checksum(const at::Tensor& data, const at::Tensor& ids, const at::Tensor& blocks,
                                int64_t first_row) {
  check_args(blocks, ids, data, "scatter_blocks_checksum");
  const int64_t rows_per_block = blocks.size(1) / kRowBytes;
  const int64_t* id = ids.data_ptr<int64_t>();
  const auto* src = reinterpret_cast<const uint64_t*>(data.data_ptr());
  uint64_t total = 0;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    auto* dst = const_cast<uint64_t*>(block_ptr(blocks, id[i]));
    total += copy_rows(src + i * rows_per_block * kRowWords, dst, rows_per_block, first_row + i * rows_per_block);
  }
  return static_cast<int64_t>(total);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pdserve_cpu, m) {
  m.def("gather_blocks_checksum(Tensor blocks, Tensor ids, Tensor(a!) out, int first_row) -> int");
  m.def("scatter_blocks_checksum(Tensor data, Tensor ids, Tensor(a!) blocks, int first_row) -> int");
}

TORCH_LIBRARY_IMPL(pdserve_cpu, CPU, m) {
  m.impl("gather_blocks_checksum", &gather_blocks_checksum);
  m.impl("scatter_blocks_checksum", &scatter_blocks_checksum);
}
