// semantic_cli._native: the two hot loops of a warm restore, where Python's
// overhead is a visible share of the time (SmolLM2, 2-core dev VM), and the
// matmul of a batch's decode step on the CPU (few_rows_matmul, further down),
// and attention's softmax (exact_softmax, after it).
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
// Reader (built where xxhash.h is found): a restore's files, their scatter reads
//   and xxh3-64, on a few threads without the GIL, each started as it is submitted.
//   It also maps fresh destination pages, a row per call, before reading into them;
//   rows whose pages are mapped already it copies out of a mapping of the file
//   (Linux on x86-64 with AVX2: `streamed_reads`).
//
// Optional: scripts/build_native.py builds it against the installed mlx and a
// nanobind whose internals mlx shares (domain "mlx"); backend.native() returns
// None, and Python does the work, where it is missing or built for another mlx.

#include <nanobind/nanobind.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include <csetjmp>
#include <csignal>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "mlx/allocator.h"
#include "mlx/array.h"
#if __has_include("mlx/backend/cpu/encoder.h")  // the batched matmul needs MLX's CPU encoder (mlx >= 0.22)
#define SEMANTIC_HAVE_CPU_ENCODER
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#endif

#if defined(__AVX2__)
#include <immintrin.h>
#endif

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

#ifdef SEMANTIC_HAVE_CPU_ENCODER
// few_rows_matmul: x @ w.T for a batch's decode step on the CPU (see
//   backend/fewrows.py), as an MLX primitive: it runs in the step's graph on the
//   CPU stream. OpenBLAS's sgemm packs all of w for every call, even for the 2-16
//   rows of a batch's decode step: twice the weights' memory traffic of a
//   matrix-vector product. This reads each row of w once and takes every row of
//   x's dot product with it, split over w's rows on a small pool of threads.
namespace {

using Lanes = float __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register, two AVX2
constexpr size_t kLanes = 16;
constexpr size_t kRowsAtOnce = 8;  // x's rows per pass over w: their accumulators stay in registers
constexpr size_t kRowsPerPart = 64;  // w's rows per unit of work handed to a thread

struct Operands {
  const float* x;
  size_t ldx;  // elements between x's rows
  const float* w;
  size_t ldw;
  float* y;  // rows x n, row-major
  size_t rows, k_len, n_len;
};

template <size_t M>
void dot_rows(const Operands& o, const float* x, float* y, size_t n0, size_t n1) {
  for (size_t n = n0; n < n1; ++n) {
    const float* wn = o.w + n * o.ldw;
    Lanes acc[M] = {};
    size_t k = 0;
    for (; k + kLanes <= o.k_len; k += kLanes) {
      Lanes wv;
      std::memcpy(&wv, wn + k, sizeof wv);
      for (size_t m = 0; m < M; ++m) {
        Lanes xv;
        std::memcpy(&xv, x + m * o.ldx + k, sizeof xv);
        acc[m] += xv * wv;
      }
    }
    for (size_t m = 0; m < M; ++m) {
      float sum = 0.0f;
      for (size_t lane = 0; lane < kLanes; ++lane) {
        sum += acc[m][lane];
      }
      for (size_t kk = k; kk < o.k_len; ++kk) {
        sum += x[m * o.ldx + kk] * wn[kk];
      }
      y[m * o.n_len + n] = sum;
    }
  }
}

void dot_part(const Operands& o, size_t n0, size_t n1) {
  using Kernel = void (*)(const Operands&, const float*, float*, size_t, size_t);
  static constexpr Kernel kernels[kRowsAtOnce] = {
      dot_rows<1>, dot_rows<2>, dot_rows<3>, dot_rows<4>, dot_rows<5>, dot_rows<6>, dot_rows<7>, dot_rows<8>};
  for (size_t m = 0; m < o.rows; m += kRowsAtOnce) {
    size_t here = std::min(kRowsAtOnce, o.rows - m);
    kernels[here - 1](o, o.x + m * o.ldx, o.y + m * o.n_len, n0, n1);
  }
}

// Helper threads that live as long as the process (never joined: nothing to wait
// for at exit). One call at a time: it publishes its parts (`Call`, on the
// caller's stack), takes parts itself, and returns only once every part is done
// and no helper is still looking at the call. Helpers spin briefly between
// calls, since a decode step makes ~200 calls a few microseconds apart, and
// sleep otherwise.
class Pool {
 public:
  static constexpr int kMaxHelpers = 7;

  explicit Pool(int helpers) {
    for (int i = 0; i < std::min(helpers, kMaxHelpers); ++i) {
      try {
        std::thread(&Pool::serve, this).detach();
      } catch (const std::system_error&) {
        break;  // fewer helpers: the caller takes the parts nobody else does
      }
    }
  }

  void run(const Operands& o, size_t parts) {
    std::lock_guard<std::mutex> one_call(calls_);  // calls from several streams take turns
    Call call{o, parts};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_.store(&call);
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    work(call);
    while (call.done.load() < parts) {
      std::this_thread::yield();
    }
    // No helper may still hold `call` once this returns: a helper counts itself in
    // `active_` before it reads `current_` (sequentially consistent on both sides).
    current_.store(nullptr);
    while (active_.load() != 0) {
      std::this_thread::yield();
    }
  }

 private:
  struct Call {
    Operands op;
    size_t parts;
    std::atomic<size_t> next{0};
    std::atomic<size_t> done{0};
  };

  static void work(Call& call) {
    size_t part;
    while ((part = call.next.fetch_add(1)) < call.parts) {
      size_t n0 = part * kRowsPerPart, n1 = std::min(call.op.n_len, n0 + kRowsPerPart);
      dot_part(call.op, n0, n1);
      call.done.fetch_add(1);
    }
  }

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < 20000 && generation_.load() == seen; ++spin) {
      }
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
      }
      seen = generation_.load();
      active_.fetch_add(1);
      if (Call* call = current_.load()) {
        work(*call);
      }
      active_.fetch_sub(1);
    }
  }

  std::mutex calls_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<Call*> current_{nullptr};
  std::atomic<int> active_{0};
};

Pool& pool(int threads) {
  // Sized by the first call (the engine passes the cores it may use); the caller is one of the threads.
  static Pool* shared = new Pool(std::max(0, threads - 1));
  return *shared;
}

class FewRowsMatmul : public mx::UnaryPrimitive {
 public:
  FewRowsMatmul(mx::Stream stream, int threads) : mx::UnaryPrimitive(stream), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    if (x.strides(1) != 1 || w.strides(1) != 1) {  // both came through mx::contiguous
      throw std::runtime_error("few_rows_matmul: rows must be contiguous");
    }
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x),
                      w = mx::array::unsafe_weak_copy(w),
                      out = mx::array::unsafe_weak_copy(out),
                      threads = threads_]() mutable {
      Operands o{x.data<float>(), static_cast<size_t>(x.strides(0)), w.data<float>(), static_cast<size_t>(w.strides(0)),
                 out.data<float>(), static_cast<size_t>(x.shape(0)), static_cast<size_t>(x.shape(1)),
                 static_cast<size_t>(w.shape(0))};
      size_t parts = (o.n_len + kRowsPerPart - 1) / kRowsPerPart;
      if (threads <= 1 || parts <= 1) {
        dot_part(o, 0, o.n_len);
      } else {
        pool(threads).run(o, parts);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("few_rows_matmul runs on the CPU only");
  }

  const char* name() const override {
    return "FewRowsMatmul";
  }

 private:
  int threads_;
};

}  // namespace

static mx::array few_rows_matmul(const mx::array& x, const mx::array& w, int threads) {
  if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) != w.shape(1)) {
    throw nb::value_error("few_rows_matmul: x must be (rows, k) and w (n, k)");
  }
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32) {
    throw nb::value_error("few_rows_matmul: float32 only");
  }
  // Rows may be strided, their elements not: both come through mx::contiguous, which
  // copies only what is not already laid out so (checked again in eval_cpu).
  mx::Stream cpu = mx::default_stream(mx::Device::cpu);
  mx::array xc = mx::contiguous(x, false, cpu);
  mx::array wc = mx::contiguous(w, false, cpu);
  return mx::array(mx::Shape{x.shape(0), w.shape(0)}, mx::float32, std::make_shared<FewRowsMatmul>(cpu, threads), {xc, wc});
}

// exact_softmax: softmax over the last axis, float32, with every bit of the result
//   MLX 0.32's CPU `Softmax` gives (mlx/backend/cpu/softmax.cpp with its scalar simd
//   types, mlx/backend/cpu/simd/math.h's exp), so attention stays byte-identical to
//   mlx_lm.generate. MLX's CPU build has no x86 vector types: its exp runs one float
//   at a time through six libm fmaf calls (~11 ns a float here; at 2,400 tokens of
//   history softmax was half of a prompt step's attention). Here the same exp runs
//   eight floats at a time: the same IEEE operations in the same order (the rounding
//   to the nearest integer in double, as MLX's `x + 0.5` is; fused multiply-adds,
//   which round once either way). The row's maximum and its sum stay scalar loops in
//   MLX's order, since a float sum depends on its order.
// No contraction of a multiply and an add into one FMA: MLX rounds each separately.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
namespace {

// 2**f on [-0.5, 0.5] by Horner's rule, highest power first: simd::exp's constants.
constexpr float kExpPoly[] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                              5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f,
                              1.000000000000000f};

inline float mlx_exp1(float x_init) {  // simd::exp<float, 1>, written out
  float x = x_init * 1.442695f;
  float ipart = static_cast<float>(std::floor(static_cast<double>(x) + 0.5));
  float fpart = x - ipart;
  x = kExpPoly[0];
  for (size_t c = 1; c < std::size(kExpPoly); ++c) {
    x = std::fma(x, fpart, kExpPoly[c]);
  }
  int32_t bits = (static_cast<int32_t>(ipart) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  float result = std::isnan(x_init) ? x_init : scale * x;
  result = x_init > 88.0f ? INFINITY : result;
  return x_init < -88.0f ? 0.0f : result;
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 mlx_exp8(__m256 x_init) {
  __m256 x = _mm256_mul_ps(x_init, _mm256_set1_ps(1.442695f));
  const __m256d half = _mm256_set1_pd(0.5);
  __m128 lo = _mm256_cvtpd_ps(_mm256_floor_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), half)));
  __m128 hi = _mm256_cvtpd_ps(_mm256_floor_pd(_mm256_add_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)), half)));
  __m256 ipart = _mm256_set_m128(hi, lo);
  __m256 fpart = _mm256_sub_ps(x, ipart);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (size_t c = 1; c < std::size(kExpPoly); ++c) {
    p = _mm256_fmadd_ps(p, fpart, _mm256_set1_ps(kExpPoly[c]));
  }
  __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(ipart), _mm256_set1_epi32(127)), 23);
  __m256 result = _mm256_mul_ps(_mm256_castsi256_ps(bits), p);
  result = _mm256_blendv_ps(result, x_init, _mm256_cmp_ps(x_init, x_init, _CMP_UNORD_Q));
  result = _mm256_blendv_ps(result, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x_init, _mm256_set1_ps(88.0f), _CMP_GT_OQ));
  return _mm256_blendv_ps(result, _mm256_setzero_ps(), _mm256_cmp_ps(x_init, _mm256_set1_ps(-88.0f), _CMP_LT_OQ));
}
#endif

void softmax_row(const float* in, float* out, size_t m) {
  float maximum = -INFINITY;
  for (size_t i = 0; i < m; ++i) {  // simd::maximum<float, 1>: a NaN wins and stays
    float a = in[i];
    maximum = std::isnan(a) ? a : (a > maximum ? a : maximum);
  }
  size_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vmax = _mm256_set1_ps(maximum);
  for (; i + 8 <= m; i += 8) {
    _mm256_storeu_ps(out + i, mlx_exp8(_mm256_sub_ps(_mm256_loadu_ps(in + i), vmax)));
  }
#endif
  for (; i < m; ++i) {
    out[i] = mlx_exp1(in[i] - maximum);
  }
  float normalizer = 0.0f;
  for (size_t j = 0; j < m; ++j) {
    normalizer = normalizer + out[j];
  }
  normalizer = 1 / normalizer;
  for (size_t j = 0; j < m; ++j) {
    out[j] = out[j] * normalizer;
  }
}

class ExactSoftmax : public mx::UnaryPrimitive {
 public:
  explicit ExactSoftmax(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const mx::array& x = inputs[0];
    if (!x.flags().row_contiguous) {  // it came through mx::contiguous
      throw std::runtime_error("exact_softmax: the input must be row-contiguous");
    }
    if (x.is_donatable()) {  // in place, as MLX's Softmax (each float is read before it is written)
      out.copy_shared_buffer(x);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_output_array(out);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), out = mx::array::unsafe_weak_copy(out)]() mutable {
      size_t m = static_cast<size_t>(x.shape(-1));
      size_t rows = m == 0 ? 0 : x.size() / m;
      const float* in = x.data<float>();
      float* o = out.data<float>();
      for (size_t r = 0; r < rows; ++r) {
        softmax_row(in + r * m, o + r * m, m);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("exact_softmax runs on the CPU only");
  }

  const char* name() const override {
    return "ExactSoftmax";
  }
};

}  // namespace
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

static mx::array exact_softmax(const mx::array& x, mx::Stream stream) {
  if (x.dtype() != mx::float32 || x.ndim() < 1) {
    throw nb::value_error("exact_softmax: float32 arrays only");
  }
  if (stream.device != mx::Device::cpu) {
    throw nb::value_error("exact_softmax: a CPU stream only");
  }
  mx::array xc = mx::contiguous(x, false, stream);
  return mx::array(x.shape(), mx::float32, std::make_shared<ExactSoftmax>(stream), {xc});
}

#endif  // SEMANTIC_HAVE_CPU_ENCODER

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
#ifdef __linux__
// The first and end addresses of the pages wholly inside a view (equal if there is none).
std::pair<uintptr_t, uintptr_t> whole_pages(const struct iovec& v) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  uintptr_t start = reinterpret_cast<uintptr_t>(v.iov_base);
  uintptr_t first = (start + page - 1) & ~(page - 1);
  return {first, std::max(first, (start + v.iov_len) & ~(page - 1))};
}

// Whether the first page wholly inside a view is mapped already (memory MLX recycled):
// 1 mapped, 0 not, -1 unknown (no whole page, or mincore failed).
int first_page_mapped(const struct iovec& v) {
  auto [first, end] = whole_pages(v);
  unsigned char resident = 0;
  if (end == first || ::mincore(reinterpret_cast<void*>(first), 1, &resident) != 0) {
    return -1;
  }
  return resident & 1;
}
#endif

void map_if_fresh(const struct iovec* rows, size_t count) {
#ifdef MADV_POPULATE_WRITE
  if (first_page_mapped(rows[0]) != 0) {
    return;  // recycled memory, or nothing to tell
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

#if defined(__linux__) && defined(__x86_64__) && defined(__AVX2__)
#define SEMANTIC_HAVE_STREAMED_READS
// Rows whose memory is already mapped (buffers MLX recycled: the server, a room, a
// second restore in a process) are copied out of a read-only mapping of the file
// instead, 16 KB at a time: hashed in the mapping, then copied from cache with
// non-temporal stores. The kernel's copy out of the page cache runs at ~4-6 GB/s
// per core here and leaves the rows out of cache, so xxh3 read them back from
// memory; this way each byte comes from memory once and goes to it once (exp-006's
// 8K restore in reused memory, 2-core VM: ~37 against ~43 ms). Fresh memory still
// takes preadv: into pages just zeroed, the non-temporal copy took 115 ms where
// preadv took 80 (scripts/restore_floor.c --fresh).
//
// The bytes hashed are the bytes copied, unless something writes into the file in
// place between the two (within one 16 KB chunk): semantic never does (a file is
// written under a temp name and renamed), and the hash covers what was read.
//
// A file cut short under its mapping raises SIGBUS when a row past its new end is
// read. A handler turns that, on the thread and in the range a guard arms, into
// "the file ended first" (siglongjmp back to run_job); any other SIGBUS goes on to
// the handler installed before it (Python's faulthandler, or the default). It is
// installed once; if another handler replaces it later, files are read, not mapped.
struct MapGuard {
  sigjmp_buf env;
  const char* lo = nullptr;
  const char* hi = nullptr;
  volatile sig_atomic_t armed = 0;
};

// initial-exec: reading it in the handler must not allocate (the module is dlopen'ed;
// 8 bytes of glibc's static TLS reserve).
__attribute__((tls_model("initial-exec"))) thread_local MapGuard* t_guard = nullptr;
struct sigaction g_previous_bus;  // the handler a SIGBUS that is not ours goes to
std::once_flag g_bus_once;
bool g_bus_ours = false;  // installed (else files are always read)

void on_sigbus(int sig, siginfo_t* info, void* context) {
  MapGuard* guard = t_guard;
  const char* addr = static_cast<const char*>(info->si_addr);
  if (guard != nullptr && guard->armed && addr >= guard->lo && addr < guard->hi) {
    guard->armed = 0;
    siglongjmp(guard->env, 1);
  }
  void (*plain)(int) = g_previous_bus.sa_handler;
  if (plain == SIG_DFL || plain == SIG_IGN) {
    ::signal(sig, SIG_DFL);  // a fault's access runs again on return and now takes the default action
    if (info->si_code <= 0) {
      ::raise(sig);  // sent (kill, tgkill): nothing runs again, so send it again, delivered on return
    }
  } else if (g_previous_bus.sa_flags & SA_SIGINFO) {
    g_previous_bus.sa_sigaction(sig, info, context);
  } else {
    plain(sig);
  }
}

// Whether our handler is the one SIGBUS reaches now: installed on first use (the
// handler before it saved for every other SIGBUS), never installed over another again.
bool bus_handler_ours() {
  std::call_once(g_bus_once, [] {
    struct sigaction action {};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    g_bus_ours = ::sigaction(SIGBUS, &action, &g_previous_bus) == 0;
  });
  struct sigaction current {};
  return g_bus_ours && ::sigaction(SIGBUS, nullptr, &current) == 0 && (current.sa_flags & SA_SIGINFO) &&
         current.sa_sigaction == on_sigbus;
}

void stream_copy(char* d, const char* s, size_t n) {
  size_t i = std::min(n, static_cast<size_t>((64 - (reinterpret_cast<uintptr_t>(d) & 63)) & 63));
  std::memcpy(d, s, i);
#if defined(__AVX512F__)
  for (; i + 64 <= n; i += 64) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
  }
#else
  for (; i + 32 <= n; i += 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
  }
#endif
  std::memcpy(d + i, s + i, n - i);
}

constexpr size_t kStreamChunk = 16 << 10;  // hashed, then copied while still in L1/L2

// Hash `n` bytes of the mapping at `s` and copy them to `d`, chunk by chunk.
void hash_and_stream(XXH3_state_t& state, char* d, const char* s, size_t n) {
  for (size_t done = 0; done < n; done += kStreamChunk) {
    size_t chunk = std::min(kStreamChunk, n - done);
    XXH3_64bits_update(&state, s + done, chunk);
    stream_copy(d + done, s + done, chunk);
  }
}
#endif  // Linux on x86-64 with AVX2

// One file's reads: `iov` in order from `offset`, in groups of about
// `group_bytes`, each hashed right after its read (while in cache), after
// `prefix`. Runs without the GIL.
struct Job {
  int fd = -1;
  off_t offset = 0;
  std::string prefix;
  std::vector<struct iovec> iov;
  int status = 0;  // 0, an errno, or -1 if the file ended first
  XXH64_hash_t digest = 0;
};

// How rows reach their views: from a mapping of the file where their memory is mapped
// already (-1, what a restore uses), never (0), or always (1: even into fresh memory, and
// whatever the file's size, so that a test can have a file end under the mapping).
enum Streamed { kWhereMapped = -1, kNever = 0, kAlways = 1 };

void run_job(Job& job, size_t group_bytes, int streamed_rows) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  XXH3_64bits_update(&state, job.prefix.data(), job.prefix.size());
  const std::vector<struct iovec>& iov = job.iov;
  std::vector<struct iovec> pending;  // read_fully consumes its iovecs
#ifdef SEMANTIC_HAVE_STREAMED_READS
  const char* mapped = nullptr;  // the file, where rows are streamed from it
  size_t mapped_size = static_cast<size_t>(job.offset);
  for (const struct iovec& v : iov) {
    mapped_size += v.iov_len;
  }
  MapGuard guard;
  struct stat st {};
  // A file already shorter than its views is read (and found short) as before: past its
  // end, the last page of a mapping reads as zeros rather than faulting.
  bool wanted = !iov.empty() && (streamed_rows == kAlways ||
                                 (streamed_rows == kWhereMapped && first_page_mapped(iov[0]) == 1 && ::fstat(job.fd, &st) == 0 &&
                                  static_cast<size_t>(st.st_size) >= mapped_size));
  if (wanted && bus_handler_ours()) {
    void* m = ::mmap(nullptr, mapped_size, PROT_READ, MAP_SHARED | MAP_POPULATE, job.fd, 0);
    if (m != MAP_FAILED) {
      mapped = static_cast<const char*>(m);
      guard.lo = mapped;
      guard.hi = mapped + mapped_size;
    }
  }
  if (mapped != nullptr) {
    // Back here from the SIGBUS handler (mapped and mapped_size are not changed after this).
    if (sigsetjmp(guard.env, 1) != 0) {
      t_guard = nullptr;
      ::munmap(const_cast<char*>(mapped), mapped_size);
      job.status = -1;
      return;
    }
    t_guard = &guard;
  }
  bool streamed = false;
#else
  (void)streamed_rows;  // always read: no mapping here
#endif
  off_t offset = job.offset;
  size_t first = 0;
  while (first < iov.size() && job.status == 0) {
    size_t last = first, bytes = 0;
    while (last < iov.size() && (last == first || bytes < group_bytes) && last - first < IOV_MAX) {
      bytes += iov[last++].iov_len;
    }
#ifdef SEMANTIC_HAVE_STREAMED_READS
    if (mapped != nullptr && (streamed_rows == kAlways || first_page_mapped(iov[first]) == 1)) {
      const char* src = mapped + offset;
      guard.armed = 1;
      std::atomic_signal_fence(std::memory_order_seq_cst);  // no read of the mapping moves above
      for (size_t i = first; i < last; ++i) {
        hash_and_stream(state, static_cast<char*>(iov[i].iov_base), src, iov[i].iov_len);
        src += iov[i].iov_len;
      }
      std::atomic_signal_fence(std::memory_order_seq_cst);  // nor below
      guard.armed = 0;
      streamed = true;
      offset += static_cast<off_t>(bytes);
      first = last;
      continue;
    }
#endif
    map_if_fresh(&iov[first], last - first);
    pending.assign(iov.begin() + first, iov.begin() + last);
    job.status = bytes == 0 ? 0 : read_fully(job.fd, pending.data(), static_cast<int>(pending.size()), offset);
    for (size_t i = first; i < last && job.status == 0; ++i) {
      XXH3_64bits_update(&state, iov[i].iov_base, iov[i].iov_len);
    }
    offset += static_cast<off_t>(bytes);
    first = last;
  }
#ifdef SEMANTIC_HAVE_STREAMED_READS
  if (streamed) {
    _mm_sfence();  // the streamed rows are visible before the job is seen to be done
  }
  if (mapped != nullptr) {
    t_guard = nullptr;
    ::munmap(const_cast<char*>(mapped), mapped_size);
  }
#endif
  job.digest = XXH3_64bits_digest(&state);
}

}  // namespace

// A restore's file reads, on a few threads that never hold the GIL. Python reads
// and checks each file's header, then submits the file's (fd, offset, views,
// prefix): threads - 1 threads start on it while the next header is planned.
// finish() reads what is left on the calling thread too, waits, and returns one (0 or errno or -1 if the file ended first,
// xxh3-64 hex of prefix + bytes) per file, in order. The descriptors must stay
// open until then; the views are held here. (A Python thread per file instead:
// the GIL's hand-offs cost more than the Python work, 8K-token SmolLM2 restore,
// 2-core VM: ~55 ms against ~45 ms.) One Python thread uses a Reader: a restore's own.
class Reader {
 public:
  Reader(size_t group_bytes, int threads, int streamed_rows)
      : group_bytes_(group_bytes), threads_(std::max(threads, 1)), streamed_rows_(streamed_rows) {}
  Reader(const Reader&) = delete;
  Reader& operator=(const Reader&) = delete;
  ~Reader() { abort(); }  // with the GIL held: the threads never take it

  // Skip the files no thread has started, wait for the others: for a caller that gives
  // up (before it closes its descriptors). After finish() there is nothing left to do.
  void abort() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      next_ = jobs_.size();
    }
    stop();
  }

  void submit(int fd, int64_t offset, nb::list views, nb::bytes prefix) {
    if (finished_) {
      throw nb::value_error("Reader: submit after finish");
    }
    Job job;
    job.fd = fd;
    job.offset = static_cast<off_t>(offset);
    job.prefix.assign(prefix.c_str(), prefix.size());
    for (nb::handle view : views) {
      Py_buffer b;
      if (PyObject_GetBuffer(view.ptr(), &b, PyBUF_SIMPLE | PyBUF_WRITABLE) != 0) {
        throw nb::python_error();
      }
      held_.views.push_back(b);
      job.iov.push_back({b.buf, static_cast<size_t>(b.len)});
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      jobs_.push_back(std::move(job));
    }
    ready_.notify_one();
    if (workers_.size() + 1 < static_cast<size_t>(threads_)) {
      try {
        workers_.emplace_back([this] { work(); });
      } catch (const std::system_error&) {
        // fewer threads: finish() reads what they do not
      }
    }
  }

  nb::list finish() {
    {
      nb::gil_scoped_release nogil;
      close();
      work();  // the caller is the last reader: no more threads than cores while it planned
      stop();
    }
    nb::list out;
    for (const Job& job : jobs_) {
      char hex[17];
      std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(job.digest));
      out.append(nb::make_tuple(job.status, nb::str(hex)));
    }
    return out;
  }

 private:
  void work() {
    for (;;) {
      Job* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [this] { return next_ < jobs_.size() || closing_; });
        if (next_ == jobs_.size()) {
          return;  // closing, and nothing left
        }
        job = &jobs_[next_++];  // a deque: later pushes leave it in place
      }
      run_job(*job, group_bytes_, streamed_rows_);
    }
  }

  void close() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      closing_ = true;
    }
    ready_.notify_all();
  }

  void stop() {
    close();
    for (std::thread& t : workers_) {
      t.join();
    }
    workers_.clear();
    finished_ = true;
  }

  size_t group_bytes_;
  int threads_;
  int streamed_rows_;
  Buffers held_;  // released after the threads are joined (members go in reverse order)
  std::deque<Job> jobs_;
  size_t next_ = 0;
  bool closing_ = false;
  bool finished_ = false;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<std::thread> workers_;
};
#endif

NB_MODULE(_native, m) {
  nb::module_::import_("mlx.core");  // registers the array and Dtype types converted here
  m.attr("mlx_version") = SEMANTIC_MLX_VERSION;
#ifdef SEMANTIC_HAVE_STREAMED_READS
  m.attr("streamed_reads") = true;  // Reader can copy recycled rows out of a mapping of the file
#else
  m.attr("streamed_reads") = false;
#endif
  m.def(
      "empty_arrays",
      &empty_arrays,
      nb::arg("shapes"),
      nb::arg("dtypes"),
      "Evaluated arrays of these shapes and dtypes, each its own allocation, contents undefined.");
#ifdef SEMANTIC_HAVE_CPU_ENCODER
  m.def("few_rows_matmul",
        &few_rows_matmul,
        nb::arg("x"),
        nb::arg("w"),
        nb::arg("threads"),
        "x @ w.T (lazily, on the CPU stream) for a few rows of x, float32: each row of w read once.");
  m.def("exact_softmax",
        &exact_softmax,
        nb::arg("x"),
        nb::arg("stream"),
        "softmax over the last axis (lazily, on `stream`), float32: bit for bit MLX 0.32's CPU softmax on x86.");
#endif
#ifdef SEMANTIC_HAVE_XXHASH
  nb::class_<Reader>(m, "Reader", "A restore's file reads and their xxh3-64, on threads without the GIL.")
      .def(nb::init<size_t, int, int>(), nb::arg("group_bytes"), nb::arg("threads"), nb::arg("streamed_rows") = -1)
      .def("submit",
           &Reader::submit,
           nb::arg("fd"),
           nb::arg("offset"),
           nb::arg("views"),
           nb::arg("prefix"),
           "Fill the views from the file at offset, in order, on a reader thread.")
      .def("abort", &Reader::abort, "Skip the files not started, wait for the others (before their descriptors close).")
      .def("finish",
           &Reader::finish,
           "Wait for every file submitted: a (0, errno or -1 at end of file, xxh3-64 hex of prefix + bytes) each.");
#endif
}
