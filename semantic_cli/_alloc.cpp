// semantic_cli._alloc: MLX arrays straight from MLX's allocator, contents undefined.
//
// A warm restore reads every cached byte into fresh KV buffers, so the buffers
// need no initial contents. MLX's Python API cannot allocate without touching:
// mx.empty is mx.zeros (a memset that costs more than the reads it precedes),
// and mx.load of a Python stream evaluates its arrays one hand-off at a time
// (~110 us each on the 2-core dev VM, ~7 ms for SmolLM2's 60 buffers). Here the
// 60 buffers take ~0.3 ms, and no page is touched until the reads land.
//
// Optional: scripts/build_native.py builds it against the installed mlx and a
// nanobind whose internals mlx shares (domain "mlx"); backend.empty_arrays
// falls back to Python where it is missing or was built for another mlx.

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/array.h"

namespace nb = nanobind;
namespace mx = mlx::core;

static std::vector<mx::array> empty_arrays(
    const std::vector<std::vector<int>>& shapes,
    const std::vector<mx::Dtype>& dtypes) {
  if (shapes.size() != dtypes.size()) {
    throw nb::value_error("empty_arrays: one dtype per shape");
  }
  std::vector<mx::array> arrays;
  arrays.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i) {
    size_t nbytes = dtypes[i].size();
    for (int dim : shapes[i]) {
      if (dim < 0) {
        throw nb::value_error("empty_arrays: negative dimension");
      }
      nbytes *= static_cast<size_t>(dim);
    }
    // Each array owns its own allocation, so MLX can update it in place.
    arrays.emplace_back(
        mx::allocator::malloc(nbytes),
        mx::Shape(shapes[i].begin(), shapes[i].end()),
        dtypes[i]);
  }
  return arrays;
}

NB_MODULE(_alloc, m) {
  nb::module_::import_("mlx.core");  // registers the array and Dtype types converted here
  m.attr("mlx_version") = SEMANTIC_MLX_VERSION;
  m.def(
      "empty_arrays",
      &empty_arrays,
      nb::arg("shapes"),
      nb::arg("dtypes"),
      "Evaluated arrays of these shapes and dtypes, each its own allocation, contents undefined.");
}
