/*
 * The finished-head list shared by the engines whose completions arrive on threads
 * other than the queue's (fastpath_nbd.h: a reader thread; fastpath_rbd.h: librbd's).
 *
 * Those threads queue each finished head (with FP_DONE_FAILED if it failed) under
 * `lock`, take it off `inflight` and write the engine's eventfd; the queue's thread
 * reaps the list (fp_finish() each head) while it holds the ring lock. `lock` also
 * guards whatever else the engine keeps beside the list.
 */
#ifndef PYVDUSE_FASTPATH_DONE_H
#define PYVDUSE_FASTPATH_DONE_H

#include <pthread.h>
#include <time.h>

#include "fastpath_core.h"

#define FP_DONE_FAILED 0x80000000u /* in done[]: the request failed */

struct fp_done_list {
    pthread_mutex_t lock;
    pthread_cond_t idle; /* broadcast when nothing is in flight any more */
    int event_fd;        /* written when heads are queued (the FastPath's, not closed here) */
    /* under lock */
    unsigned inflight;
    uint32_t *done; /* [size] finished heads, for reap */
    unsigned ndone;
    /* the queue thread's */
    uint32_t *reaping; /* [size] scratch for reap */
};

/* 0, or -1 with errno ENOMEM (call fp_done_destroy() all the same). */
static int fp_done_init(struct fp_done_list *d, unsigned size, int event_fd)
{
    pthread_mutex_init(&d->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&d->idle, &attr);
    pthread_condattr_destroy(&attr);
    d->event_fd = event_fd;
    d->done = calloc(size, sizeof(*d->done));
    d->reaping = calloc(size, sizeof(*d->reaping));
    if (d->done == NULL || d->reaping == NULL) {
        errno = ENOMEM;
        return -1;
    }
    return 0;
}

static void fp_done_destroy(struct fp_done_list *d)
{
    free(d->done);
    free(d->reaping);
    pthread_cond_destroy(&d->idle);
    pthread_mutex_destroy(&d->lock);
}

/* Under lock: queue `head` as finished (it is not taken off `inflight`). */
static void fp_done_push_locked(struct fp_done_list *d, uint32_t head, int ok)
{
    d->done[d->ndone] = head | (ok ? 0 : FP_DONE_FAILED);
    __atomic_store_n(&d->ndone, d->ndone + 1, __ATOMIC_RELEASE);
}

/* Wake the queue's thread for what was queued. */
static void fp_done_signal(struct fp_done_list *d)
{
    uint64_t one = 1;
    if (write(d->event_fd, &one, sizeof(one)) < 0) {
        /* EAGAIN: the counter is full, so the queue's thread is woken anyway */
    }
}

/* Under lock: `count` requests in flight are over; broadcast `idle` if none is left. */
static void fp_done_retire_locked(struct fp_done_list *d, unsigned count)
{
    d->inflight -= count;
    if (d->inflight == 0)
        pthread_cond_broadcast(&d->idle);
}

/* Finish the queued heads (drop: write nothing anywhere); how many there were. */
static unsigned fp_done_reap(struct fp_done_list *d, struct fp_queue *q, int drop,
                             unsigned *used_idx)
{
    if (!__atomic_load_n(&d->ndone, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&d->lock);
    unsigned count = d->ndone;
    memcpy(d->reaping, d->done, count * sizeof(*d->done));
    __atomic_store_n(&d->ndone, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&d->lock);
    for (unsigned i = 0; i < count; i++) {
        uint32_t head = d->reaping[i] & ~FP_DONE_FAILED;
        if (head < q->size && q->jobs[head].busy)
            fp_finish(q, head, !(d->reaping[i] & FP_DONE_FAILED), drop, used_idx);
    }
    return count;
}

/* Whether heads wait to be reaped. */
static int fp_done_ready(struct fp_done_list *d)
{
    return __atomic_load_n(&d->ndone, __ATOMIC_ACQUIRE) != 0;
}

/* Wait until nothing is in flight (finished heads stay to be reaped), at most
 * `timeout_ms` (negative: no limit). 0, or -1 with errno ETIMEDOUT. */
static int fp_done_wait(struct fp_done_list *d, int timeout_ms)
{
    struct timespec deadline = fp_deadline(timeout_ms < 0 ? 0 : timeout_ms);
    int rc = 0;
    pthread_mutex_lock(&d->lock);
    while (d->inflight && rc == 0) {
        if (timeout_ms < 0)
            pthread_cond_wait(&d->idle, &d->lock);
        else
            rc = pthread_cond_timedwait(&d->idle, &d->lock, &deadline);
    }
    int idle = d->inflight == 0;
    pthread_mutex_unlock(&d->lock);
    if (!idle) {
        errno = ETIMEDOUT;
        return -1;
    }
    return 0;
}

#endif /* PYVDUSE_FASTPATH_DONE_H */
