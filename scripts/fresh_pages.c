// What memory a process has never touched costs here: the floor under a warm turn's
// restore, which reads an agent's cache into such memory (docs/benchmarks.md, issue 19).
//
// It maps 377 MB (an 8K-token SmolLM2-135M cache) and has the kernel populate it
// with MADV_POPULATE_WRITE (Linux 5.14+) on two threads, as the restore's two
// readers do: first as this new process's first large mapping (a warm turn's
// case), then ROUNDS more times, each after unmapping the one before. Run it
// several times: see docs/benchmarks.md for what it measured on the dev VM.
//
// Build and run:
//   cc -O2 -pthread -o /tmp/fresh_pages scripts/fresh_pages.c
//   for i in 1 2 3 4 5 6; do /tmp/fresh_pages; done
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

enum { ROUNDS = 4, THREADS = 2 };
static const size_t CACHE_BYTES = 377487360;  // 8192 tokens x 30 layers x K,V x 3 heads x 64 x 4 bytes
static char* region;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void* populate(void* arg) {
  size_t part = CACHE_BYTES / THREADS, i = (size_t)arg;
  if (madvise(region + i * part, part, MADV_POPULATE_WRITE) != 0) {
    perror("madvise(MADV_POPULATE_WRITE)");  // a time without the mapping would mean nothing
    exit(1);
  }
  return NULL;
}

static double map_fresh(void) {
  region = mmap(NULL, CACHE_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (region == MAP_FAILED) {
    perror("mmap");
    exit(1);
  }
  double t = now();
  pthread_t threads[THREADS];
  for (size_t i = 0; i < THREADS; i++) {
    if (pthread_create(&threads[i], NULL, populate, (void*)i) != 0) {
      fprintf(stderr, "pthread_create failed\n");
      exit(1);
    }
  }
  for (size_t i = 0; i < THREADS; i++) pthread_join(threads[i], NULL);
  t = now() - t;
  munmap(region, CACHE_BYTES);
  return t * 1e3;
}

int main(void) {
  printf("%zu MB of fresh memory on %d threads: first mapping %.1f ms, then", CACHE_BYTES / 1000000, THREADS, map_fresh());
  for (int r = 0; r < ROUNDS; r++) printf(" %.1f", map_fresh());
  printf(" ms\n");
  return 0;
}
