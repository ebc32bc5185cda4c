/*
 * statstorm: lstat DIR/PREFIX0 .. DIR/PREFIX(COUNT-1) from THREADS threads, each name once;
 * prints the wall seconds it took.
 *
 *   statstorm DIR PREFIX COUNT THREADS
 *
 * Why C: it measures latencyfs's capacity (calls per second it can serve with its workers
 * busy), and the client must not be the bottleneck. From Python, 64 threads cost ~33 us of CPU
 * per stat (GIL hand-offs), twice what the filesystem itself spends, and on two cores the storm
 * measured the client. Here a stat costs the client little more than the syscall.
 */

#define _GNU_SOURCE

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>

static const char *dir, *prefix;
static long count;
static atomic_long next_index;
static atomic_long failures;

static void *worker(void *arg)
{
    char path[4096];
    struct stat st;
    for (long i; (i = atomic_fetch_add(&next_index, 1)) < count;) {
        snprintf(path, sizeof path, "%s/%s%ld", dir, prefix, i);
        if (lstat(path, &st) != 0)
            atomic_fetch_add(&failures, 1);
    }
    return NULL;
}

int main(int argc, char *argv[])
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s DIR PREFIX COUNT THREADS\n", argv[0]);
        return 2;
    }
    dir = argv[1];
    prefix = argv[2];
    count = atol(argv[3]);
    int threads = atoi(argv[4]);
    if (count < 1 || threads < 1) {
        fprintf(stderr, "statstorm: COUNT and THREADS must be positive\n");
        return 2;
    }
    pthread_t *tids = calloc((size_t)threads, sizeof *tids);
    if (!tids)
        return 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int started = 0;
    for (; started < threads; started++)
        if (pthread_create(&tids[started], NULL, worker, NULL) != 0)
            break;
    if (started == 0)
        return 1;
    for (int i = 0; i < started; i++)
        pthread_join(tids[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    free(tids);
    if (atomic_load(&failures)) {
        fprintf(stderr, "statstorm: %ld of %ld stats failed\n", atomic_load(&failures), count);
        return 1;
    }
    printf("%.6f\n", (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
