// Optional host-side helper: slot mapping from block tables, for schedulers that build it on the CPU.
#include <torch/extension.h>

// block_table [B, max_blocks] int32, start [B] int64, count [B] int64 -> slots [sum(count)] int64
torch::Tensor slot_mapping(torch::Tensor block_table, torch::Tensor start, torch::Tensor count, int64_t block_size) {
  TORCH_CHECK(block_table.dim() == 2, "block_table must be [B, max_blocks]");
  auto bt = block_table.to(torch::kInt64).contiguous();
  auto st = start.to(torch::kInt64).contiguous();
  auto ct = count.to(torch::kInt64).contiguous();
  const int64_t total = ct.sum().item<int64_t>();
  auto out = torch::empty({total}, torch::kInt64);
  auto* o = out.data_ptr<int64_t>();
  const auto* b = bt.data_ptr<int64_t>();
  const int64_t width = bt.size(1);
  for (int64_t i = 0, k = 0; i < bt.size(0); ++i) {
    for (int64_t p = st[i].item<int64_t>(); p < st[i].item<int64_t>() + ct[i].item<int64_t>(); ++p) {
      TORCH_CHECK(p / block_size < width, "position ", p, " of sequence ", i, " is past its block table");
      o[k++] = b[i * width + p / block_size] * block_size + p % block_size;
    }
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("slot_mapping", &slot_mapping, "slot mapping from block tables"); }
