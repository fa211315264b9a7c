/* Rows of work split across threads, shared by the kernels of sparse_attention/native. */
#ifndef SA_ROWS_H
#define SA_ROWS_H

#include <stdint.h>
#if defined(_OPENMP)
#include <omp.h>
#endif

/* fn(ctx, row0, row1) does rows row0 <= r < row1 and returns 0, or nonzero on failure */
typedef int (*sa_rows_fn)(void *ctx, int64_t row0, int64_t row1);

/* Runs fn over rows 0..rows split evenly across `threads` threads; nonzero when any part failed.
 *
 * Built with OpenMP (-fopenmp) and loaded into a process where PyTorch has loaded its libgomp.so.1,
 * the parts run on PyTorch's own OpenMP threads. That matters: after each parallel PyTorch op its
 * worker threads spin for a while, and threads of another pool would compete with them for the cores
 * (measured here: 2 pthreads right after a bmm ran no faster than one). Without OpenMP the calling
 * thread does every row. */
static inline int sa_parallel_rows(int64_t rows, int threads, sa_rows_fn fn, void *ctx) {
    if (threads < 1 || rows < 2) threads = 1;
    if (threads > rows) threads = (int)rows;
    int status = 0;
#if defined(_OPENMP)
#pragma omp parallel num_threads(threads) reduction(| : status)
    {
        int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
        status |= fn(ctx, rows * t / n, rows * (t + 1) / n);
    }
#else
    (void)threads;
    status = fn(ctx, 0, rows);
#endif
    return status;
}

/* 1 when built with OpenMP */
int sa_openmp(void);

#endif
