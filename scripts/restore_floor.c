// What the fastest restore of exp-006's 8K-token cache could cost on this machine,
// without Python: the floor behind `semantic bench exp-006` (docs/benchmarks.md).
//
// It writes 32 files shaped like the KV block files of an 8K-token SmolLM2-135M
// cache (a 6,784-byte header, then 180 rows of 64 KB: 30 layers x K,V x 3 heads x
// 256 tokens x 64 floats) into DIR, reads them once so they sit in the page cache,
// then times, in memory that is already mapped (as exp-006's reused state):
//   - each way of landing the rows in their places in 60 arrays of (3, 8192, 64)
//     floats, every row hashed (xxh3-64) on the way, on 1 and on 2 threads;
//   - exp-006's baseline: one contiguous copy of the same bytes on one thread.
// With --fresh, the destination is new memory for every run (a warm turn's new
// process), each row's pages mapped with MADV_POPULATE_WRITE before it is written.
//
// Build and run (Debian: libxxhash-dev):
//   cc -O2 -march=native -pthread -o /tmp/restore_floor scripts/restore_floor.c
//   /tmp/restore_floor /tmp/restore-floor-files [--fresh]
#define _GNU_SOURCE
#include <fcntl.h>
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

enum { FILES = 32, ROWS = 180, PIECE = 64 << 10, HEADER = 6784, REPEATS = 5 };
static const size_t ROW_BYTES = (size_t)8192 * 64 * 4;  // one head's keys (or values) in one layer

static int fds[FILES];
static char* dst;  // 60 arrays x 3 heads = 180 rows of ROW_BYTES, each file's piece at file * PIECE
static int mode, threads, fresh;
static volatile uint64_t sink;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void die(const char* what) {
  perror(what);
  exit(1);
}

// A copy with non-temporal stores (what glibc's memcpy does for one large copy).
static void stream_copy(char* d, const char* s, size_t n) {
  size_t i = 0;
#ifdef __AVX512F__
  for (; i + 64 <= n; i += 64) {
    _mm512_stream_si512((__m512i*)(d + i), _mm512_loadu_si512(s + i));
  }
#elif defined(__AVX2__)
  for (; i + 32 <= n; i += 32) {
    _mm256_stream_si256((__m256i*)(d + i), _mm256_loadu_si256((const __m256i*)(s + i)));
  }
#endif
  memcpy(d + i, s + i, n - i);
}

static char* piece(int file, size_t row) { return dst + row * ROW_BYTES + (size_t)file * PIECE; }

// Fresh memory (a new process): map each row's pages just before it is written, as the restore does.
static void populate(int f, size_t row, int count) {
  if (!fresh) return;
  for (int k = 0; k < count; k++) madvise(piece(f, row + k), PIECE, MADV_POPULATE_WRITE);
}

static void read_file(int f) {
  XXH3_state_t state;
  XXH3_64bits_reset(&state);
  if (mode == 0) {  // what the restore does: preadv 4 rows at a time, hash them after each read
    for (size_t r = 0; r < ROWS; r += 4) {
      populate(f, r, 4);
      struct iovec iov[4];
      for (int k = 0; k < 4; k++) {
        iov[k].iov_base = piece(f, r + k);
        iov[k].iov_len = PIECE;
      }
      if (preadv(fds[f], iov, 4, HEADER + (off_t)r * PIECE) != 4 * PIECE) die("preadv");
      for (int k = 0; k < 4; k++) XXH3_64bits_update(&state, iov[k].iov_base, PIECE);
    }
  } else if (mode == 1 || mode == 2) {  // map the file, hash each row there, then copy it
    size_t size = HEADER + (size_t)ROWS * PIECE;
    char* m = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fds[f], 0);
    if (m == MAP_FAILED) die("mmap");
    for (size_t r = 0; r < ROWS; r++) {
      const char* src = m + HEADER + r * PIECE;
      populate(f, r, 1);
      XXH3_64bits_update(&state, src, PIECE);
      if (mode == 1) {
        memcpy(piece(f, r), src, PIECE);
      } else {
        stream_copy(piece(f, r), src, PIECE);
      }
    }
    _mm_sfence();
    munmap(m, size);
  } else {  // read 256 KB into a small buffer that stays in cache, hash it there, stream it out
    static __thread char* bounce;
    if (!bounce && !(bounce = aligned_alloc(4096, 4 * PIECE))) die("aligned_alloc");
    for (size_t r = 0; r < ROWS; r += 4) {
      populate(f, r, 4);
      if (pread(fds[f], bounce, 4 * PIECE, HEADER + (off_t)r * PIECE) != 4 * PIECE) die("pread");
      XXH3_64bits_update(&state, bounce, 4 * PIECE);
      for (int k = 0; k < 4; k++) stream_copy(piece(f, r + k), bounce + (size_t)k * PIECE, PIECE);
    }
    _mm_sfence();
  }
  sink += XXH3_64bits_digest(&state);
}

static void* worker(void* arg) {
  for (int f = (int)(intptr_t)arg; f < FILES; f += threads) read_file(f);
  return NULL;
}

int main(int argc, char** argv) {
  if (argc < 2 || argc > 3 || (argc == 3 && strcmp(argv[2], "--fresh") != 0)) {
    fprintf(stderr, "usage: %s DIR [--fresh]\n", argv[0]);
    return 2;
  }
  fresh = argc == 3;
  size_t total = ROW_BYTES * ROWS;
  char* row = malloc((size_t)ROWS * PIECE + HEADER);
  if (!row) die("malloc");
  for (size_t i = 0; i < (size_t)ROWS * PIECE + HEADER; i++) row[i] = (char)(i * 7);
  mkdir(argv[1], 0700);
  for (int f = 0; f < FILES; f++) {
    char path[4096];
    snprintf(path, sizeof path, "%s/block-%02d", argv[1], f);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || write(fd, row, (size_t)ROWS * PIECE + HEADER) != (ssize_t)((size_t)ROWS * PIECE + HEADER)) die(path);
    fsync(fd);
    fds[f] = fd;
  }
  dst = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  char* src = malloc(total);
  char* copy = malloc(total);
  if (dst == MAP_FAILED || !src || !copy) die("allocate");
  memset(dst, 1, total);  // every destination page mapped once, as in exp-006's reused state
  memset(src, 2, total);
  memset(copy, 3, total);
  const char* names[] = {"preadv + xxh3 (the restore)", "mmap + xxh3 + memcpy", "mmap + xxh3 + streaming copy",
                         "pread to a 256 KB buffer + xxh3 + streaming copy"};
  for (int rep = 0; rep < REPEATS; rep++) {
    for (mode = 0; mode < 4; mode++) {
      for (threads = 1; threads <= 2; threads++) {
        if (fresh) {  // new pages for every run, mapped as the rows are written
          munmap(dst, total);
          dst = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
          if (dst == MAP_FAILED) die("mmap");
        }
        double t = now();
        pthread_t th[2];
        for (intptr_t k = 0; k < threads; k++) pthread_create(&th[k], NULL, worker, (void*)k);
        for (int k = 0; k < threads; k++) pthread_join(th[k], NULL);
        printf("%-50s %d thread%s %6.1f ms\n", names[mode], threads, threads > 1 ? "s" : " ", (now() - t) * 1e3);
      }
    }
    double t = now();
    memcpy(copy, src, total);
    printf("%-50s 1 thread  %6.1f ms\n", "one contiguous copy (exp-006's baseline)", (now() - t) * 1e3);
  }
  return (int)(sink & 0);
}
