// Optional host-side helper: slot mapping from block tables, for schedulers that build it on the CPU.
// Registered with PyTorch's dispatcher as torch.ops.tulu.slot_mapping (importing engine._csrc, or loading this file
// with torch.utils.cpp_extension.load(..., is_python_module=False), registers it). The headers are ATen's core and
// the op registry alone, not torch/extension.h (pybind11 and all of ATen's): it compiles in half the time.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

// block_table [B, max_blocks] (any integer dtype), start [B], count [B] -> slots [sum(count)] int64: token p of
// sequence i (start[i] <= p < start[i] + count[i]) goes to slot block_table[i, p / block_size] * block_size +
// p % block_size. The counts are the caller's to keep within each sequence's blocks: a row shorter than the table
// is padded with block 0 (BlockManager.block_table), which no check here can tell from a real block 0; only a
// position past the table's width is refused.
at::Tensor slot_mapping(const at::Tensor& block_table, const at::Tensor& start, const at::Tensor& count,
                        int64_t block_size) {
  TORCH_CHECK(block_table.dim() == 2, "block_table must be [B, max_blocks], got ", block_table.dim(), " dims");
  TORCH_CHECK(block_size > 0, "block_size must be positive, got ", block_size);
  const int64_t rows = block_table.size(0);
  TORCH_CHECK(start.numel() == rows && count.numel() == rows, "start and count need one entry per block-table row (",
              rows, "), got ", start.numel(), " and ", count.numel());
  const auto bt = block_table.to(at::kCPU, at::kLong).contiguous();
  const auto st = start.to(at::kCPU, at::kLong).contiguous();
  const auto ct = count.to(at::kCPU, at::kLong).contiguous();
  const int64_t* b = bt.data_ptr<int64_t>();
  const int64_t* s = st.data_ptr<int64_t>();
  const int64_t* c = ct.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < rows; ++i) {
    TORCH_CHECK(s[i] >= 0 && c[i] >= 0, "sequence ", i, ": start ", s[i], " and count ", c[i], " must be >= 0");
    total += c[i];
  }
  auto out = at::empty({total}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  const int64_t width = bt.size(1);
  for (int64_t i = 0, k = 0; i < rows; ++i) {
    for (int64_t p = s[i]; p < s[i] + c[i]; ++p) {
      TORCH_CHECK(p / block_size < width, "position ", p, " of sequence ", i, " is past its block table");
      o[k++] = b[i * width + p / block_size] * block_size + p % block_size;
    }
  }
  return out;
}

TORCH_LIBRARY(tulu, m) {
  m.def("slot_mapping(Tensor block_table, Tensor start, Tensor count, int block_size) -> Tensor", &slot_mapping);
}

// `import engine._csrc` (the package's build, TULU_PPO_BUILD_CSRC=1) loads the library, registering the op above;
// the module itself is empty
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_csrc", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__csrc(void) { return PyModule_Create(&module); }
