// semantic_cli._native: the two hot loops of a warm restore, where Python's
// overhead is a visible share of the time (SmolLM2, 2-core dev VM).
//
// empty_arrays: MLX arrays straight from MLX's allocator, contents undefined.
//   A size product that overflows raises ValueError, a failed allocation
//   MemoryError: never a buffer smaller than its shape, or at address 0.
//   A restore reads every cached byte into fresh buffers, so they need no
//   initial contents. MLX's Python API cannot allocate without touching:
//   mx.empty is mx.zeros, and mx.load of a Python stream evaluates its arrays
//   one hand-off at a time (~110 us each, ~7 ms for SmolLM2's 60 buffers).
//   Here the 60 take ~0.3 ms, and no page is touched until the reads land.
//
// read_hashed (built where xxhash.h is found): a block file's scatter reads and
//   their xxh3-64 without the GIL. From Python the two reader threads take
//   turns: xxhash holds the GIL for 64 KB updates, the size of one head's rows.
//   It also maps fresh destination pages, a row per call, before reading into them.
//
// Optional: scripts/build_native.py builds it against the installed mlx and a
// nanobind whose internals mlx shares (domain "mlx"); backend.native() returns
// None, and Python does the work, where it is missing or built for another mlx.

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <new>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include "mlx/allocator.h"
#include "mlx/array.h"

#ifdef SEMANTIC_HAVE_XXHASH
#define XXH_INLINE_ALL
#include <xxhash.h>
#endif

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
    // The size in bytes, refusing a product that overflows (a bogus small buffer)
    // or that no allocation could hold (MLX's element count is a signed 64-bit).
    size_t nbytes = dtypes[i].size();
    for (int dim : shapes[i]) {
      if (dim < 0) {
        throw nb::value_error("empty_arrays: negative dimension");
      }
      if (__builtin_mul_overflow(nbytes, static_cast<size_t>(dim), &nbytes) ||
          nbytes > static_cast<size_t>(PTRDIFF_MAX)) {
        throw nb::value_error("empty_arrays: size overflows");
      }
    }
    // Each array owns its own allocation, so MLX can update it in place.
    mx::allocator::Data data = mx::allocator::malloc(nbytes);
    if (data.buffer().ptr() == nullptr) {
      // MLX's CPU allocator hands back a null buffer for a failed allocation (its
      // data pointer then a few bytes past address 0), without raising.
      throw std::bad_alloc();  // nanobind raises MemoryError
    }
    arrays.emplace_back(std::move(data), mx::Shape(shapes[i].begin(), shapes[i].end()), dtypes[i]);
  }
  return arrays;
}

#ifdef SEMANTIC_HAVE_XXHASH
namespace {

// Writable byte views held for the duration of a call.
struct Buffers {
  std::vector<Py_buffer> views;
  ~Buffers() {
    for (Py_buffer& b : views) {
      PyBuffer_Release(&b);
    }
  }
};

// Fill iov[0..count) from `offset`, resuming short reads. Returns 0, the errno
// of a failed read, or -1 if the file ended first.
int read_fully(int fd, struct iovec* iov, int count, off_t offset) {
  while (count > 0) {
    ssize_t got = ::preadv(fd, iov, count, offset);
    if (got < 0) {
      if (errno == EINTR) {
        continue;
      }
      return errno;
    }
    if (got == 0) {
      return -1;
    }
    offset += got;
    while (count > 0 && static_cast<size_t>(got) >= iov->iov_len) {
      got -= static_cast<ssize_t>(iov->iov_len);
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + got;
      iov->iov_len -= static_cast<size_t>(got);
    }
  }
  return 0;
}

// Fresh destination pages are mapped before a read lands in them: one
// MADV_POPULATE_WRITE per row costs less than a page fault per 4 KB inside the
// copy (8K-token SmolLM2 restore in a new process, 2-core VM: ~210 -> ~190 ms).
// Memory that MLX recycled within the process is already mapped, and populating
// it again only costs (~10 ms at 8K), so each read group asks mincore whether its
// first row is mapped. Only pages wholly inside a view are named, so memory
// outside it is never touched; before Linux 5.14 the pages just fault as before.
void map_if_fresh(const struct iovec* rows, size_t count) {
#ifdef MADV_POPULATE_WRITE
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  auto whole_pages = [](const struct iovec& v) {
    uintptr_t start = reinterpret_cast<uintptr_t>(v.iov_base);
    uintptr_t first = (start + page - 1) & ~(page - 1);
    return std::pair{first, std::max(first, (start + v.iov_len) & ~(page - 1))};
  };
  auto [first, end] = whole_pages(rows[0]);
  unsigned char resident = 1;
  if (end == first || ::mincore(reinterpret_cast<void*>(first), 1, &resident) != 0 || (resident & 1)) {
    return;
  }
  for (size_t i = 0; i < count; ++i) {
    auto [row_first, row_end] = whole_pages(rows[i]);
    if (row_end > row_first) {
      ::madvise(reinterpret_cast<void*>(row_first), row_end - row_first, MADV_POPULATE_WRITE);
    }
  }
#else
  (void)rows;
  (void)count;
#endif
}

}  // namespace

// Read the file from `offset` into `views` in order, in groups of about
// `group_bytes` (each hashed right after its read, while in cache), after
// hashing `prefix`. Returns (0 or errno or -1 if the file ended first, hex digest).
static nb::tuple read_hashed(int fd, int64_t offset, nb::list views, nb::bytes prefix, size_t group_bytes) {
  Buffers held;
  held.views.reserve(views.size());
  for (nb::handle view : views) {
    Py_buffer b;
    if (PyObject_GetBuffer(view.ptr(), &b, PyBUF_SIMPLE | PyBUF_WRITABLE) != 0) {
      throw nb::python_error();
    }
    held.views.push_back(b);
  }
  std::vector<struct iovec> iov(held.views.size());
  for (size_t i = 0; i < iov.size(); ++i) {
    iov[i] = {held.views[i].buf, static_cast<size_t>(held.views[i].len)};
  }
  const char* prefix_data = prefix.c_str();
  size_t prefix_len = prefix.size();
  int status = 0;
  XXH64_hash_t digest;
  {
    nb::gil_scoped_release nogil;
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    XXH3_64bits_update(&state, prefix_data, prefix_len);
    std::vector<struct iovec> pending;  // read_fully consumes its iovecs
    size_t first = 0;
    while (first < iov.size() && status == 0) {
      size_t last = first, bytes = 0;
      while (last < iov.size() && (last == first || bytes < group_bytes) && last - first < IOV_MAX) {
        bytes += iov[last++].iov_len;
      }
      map_if_fresh(&iov[first], last - first);
      pending.assign(iov.begin() + first, iov.begin() + last);
      status = read_fully(fd, pending.data(), static_cast<int>(pending.size()), offset);
      for (size_t i = first; i < last && status == 0; ++i) {
        XXH3_64bits_update(&state, iov[i].iov_base, iov[i].iov_len);
      }
      offset += static_cast<off_t>(bytes);
      first = last;
    }
    digest = XXH3_64bits_digest(&state);
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(digest));
  return nb::make_tuple(status, nb::str(hex));
}
#endif

NB_MODULE(_native, m) {
  nb::module_::import_("mlx.core");  // registers the array and Dtype types converted here
  m.attr("mlx_version") = SEMANTIC_MLX_VERSION;
  m.def(
      "empty_arrays",
      &empty_arrays,
      nb::arg("shapes"),
      nb::arg("dtypes"),
      "Evaluated arrays of these shapes and dtypes, each its own allocation, contents undefined.");
#ifdef SEMANTIC_HAVE_XXHASH
  m.def(
      "read_hashed",
      &read_hashed,
      nb::arg("fd"),
      nb::arg("offset"),
      nb::arg("views"),
      nb::arg("prefix"),
      nb::arg("group_bytes"),
      "Fill the views from the file at offset, in order; (0, errno or -1 at end of file, xxh3-64 hex of prefix + bytes).");
#endif
}
