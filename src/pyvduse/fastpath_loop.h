/*
 * The compiled data path's serving loop: one queue, from kick to interrupt, in C.
 *
 * fp_loop_run() does for one queue what QueueThread and QueueWorker.drain do in
 * Python, with the same rules and in the same order, so that the two loops are
 * interchangeable at every return:
 *
 *   kicks suppressed (VRING_USED_F_NO_NOTIFY, or with EVENT_IDX no new avail_event)
 *   -> the asynchronous engine's completions reaped -> the available requests served
 *   (fp_run(), the first batch after the ring ran dry split in two halves when it
 *   holds SPLIT_MIN or more) -> the used index published -> the published heads
 *   cleared from the inflight log and its used index stored -> the driver
 *   interrupted if it asked to be (EVENT_IDX: vring_need_event on used_event;
 *   else unless VRING_AVAIL_F_NO_INTERRUPT) -> again, until the ring is empty ->
 *   kicks re-enabled and the ring checked once more -> polling for up to the
 *   adaptive window (unless more than FP_POLL_BURST_MAX requests came since the ring
 *   last ran dry) -> sleep in poll() on the kick fd, the engine's eventfd, the
 *   wake fd and the stop fd.
 *
 * It returns to its caller (which serves what it cannot, and calls it again) when
 * a request is for the Python path, an engine job failed (its head is in
 * q->returned), the wake fd or the stop fd became readable (a completion from a
 * Python thread, an owed interrupt, a stop), the queue was given up (*q->stop), or
 * the driver moved its avail index by more than the queue size (the caller finds
 * the broken ring and reports it). Used elements are always published before it
 * returns.
 */
#ifndef PYVDUSE_FASTPATH_LOOP_H
#define PYVDUSE_FASTPATH_LOOP_H

#include <poll.h>
#include <sys/ioctl.h>
#include <time.h>

#include "fastpath_core.h"

#define FP_SPLIT_MIN 8u          /* QueueWorker's SPLIT_MIN */
#define FP_POLL_START_NS 4000u   /* QueueThread's POLL_START_NS */
#define FP_POLL_BURST_MAX 2u     /* QueueThread's POLL_BURST_MAX */
#define FP_USED_F_NO_NOTIFY 1u
#define FP_AVAIL_F_NO_INTERRUPT 1u

enum fp_loop_reason {
    FP_LOOP_PYTHON = 0,  /* the next request is the Python path's */
    FP_LOOP_RETURNED = 1, /* engine jobs failed: q->returned holds their heads */
    FP_LOOP_WOKEN = 2,   /* the wake fd or the stop fd is readable */
    FP_LOOP_STOPPED = 3, /* *q->stop was set */
    FP_LOOP_BROKEN = 4,  /* the avail index moved by more than the queue size */
};

/* How to interrupt the driver: ioctl(fd, request, &arg), or with request 0 an
 * eventfd write of 1 to fd. */
struct fp_irq {
    int fd;
    unsigned long request;
    uint32_t arg;
};

/* A queue's loop: what it waits on, its positions (in and out), its statistics. */
struct fp_loop {
    int kick_fd, wake_fd, stop_fd;
    struct fp_irq irq;
    int event_idx;
    volatile uint16_t *log_header; /* the inflight log's queue header: u16 used index */
    uint64_t poll_max_ns, poll_ns; /* the adaptive polling window (QueueThread._adapt) */
    int dry;                       /* the ring ran dry since the last batch */
    int python_inflight;           /* requests in a Python backend: no polling (their
                                      completions arrive on the wake fd) */
    unsigned last_avail, used_idx, signalled, log_used;
    uint64_t sequence;
    uint64_t taken, interrupts, irq_errors, polls_found;
    uint64_t taken_at_dry;         /* `taken` when the ring last ran dry (the burst) */
    volatile uint64_t *taken_live; /* also counted here as it goes (statistics), or NULL */
    volatile unsigned *avail_live; /* last_avail stored here as it goes, or NULL */
};

static void fp_interrupt(struct fp_loop *l)
{
    long rc;
    if (l->irq.request) {
        uint32_t arg = l->irq.arg;
        rc = ioctl(l->irq.fd, l->irq.request, &arg);
    } else {
        uint64_t one = 1;
        rc = write(l->irq.fd, &one, sizeof(one));
    }
    if (rc < 0)
        l->irq_errors++;
    else
        l->interrupts++;
}

/* QueueWorker.publish: used index stored, log cleared, driver interrupted if it asks. */
static void fp_publish(struct fp_queue *q, struct fp_loop *l)
{
    volatile uint16_t *used16 = (volatile uint16_t *)q->used;
    __atomic_thread_fence(__ATOMIC_RELEASE); /* the used elements before the index */
    used16[1] = (uint16_t)l->used_idx;
    if (l->log_used != l->used_idx) {
        fp_retire(q, l->log_used, l->used_idx);
        l->log_used = l->used_idx;
        l->log_header[0] = (uint16_t)l->used_idx;
    }
    if (l->used_idx == l->signalled)
        return;
    int need;
    if (l->event_idx) {
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        uint16_t event = q->avail[2 + q->size];
        need = (uint16_t)(l->used_idx - event - 1) < (uint16_t)(l->used_idx - l->signalled);
    } else {
        need = !(q->avail[0] & FP_AVAIL_F_NO_INTERRUPT);
    }
    l->signalled = l->used_idx;
    if (need)
        fp_interrupt(l);
}

/* SplitQueue.enable_kicks: ask for a kick; 1 if requests arrived meanwhile. */
static int fp_enable_kicks(struct fp_queue *q, struct fp_loop *l)
{
    volatile uint16_t *used16 = (volatile uint16_t *)q->used;
    if (l->event_idx)
        used16[2 + 4 * q->size] = (uint16_t)l->last_avail;
    else
        used16[0] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return q->avail[1] != (uint16_t)l->last_avail;
}

/* QueueThread._adapt: resize the polling window after a sleep of `slept` ns. */
static void fp_adapt(struct fp_loop *l, uint64_t slept)
{
    if (slept > l->poll_max_ns) {
        l->poll_ns /= 2;
        if (l->poll_ns < FP_POLL_START_NS)
            l->poll_ns = 0;
    } else if (slept > l->poll_ns) {
        uint64_t doubled = 2 * l->poll_ns < FP_POLL_START_NS ? FP_POLL_START_NS : 2 * l->poll_ns;
        l->poll_ns = doubled < l->poll_max_ns ? doubled : l->poll_max_ns;
    }
}

/* Read an eventfd that poll() reported readable (nonblocking: another reader may win). */
static void fp_clear_eventfd(int fd)
{
    uint64_t value;
    if (read(fd, &value, sizeof(value)) < 0) {
        /* EAGAIN: someone else cleared it */
    }
}

/* Watch the ring for up to the polling window, unless the burst that just ended
 * (`burst` requests since the ring last ran dry) was deep; 1 if work came. */
static int fp_poll_window(struct fp_queue *q, struct fp_loop *l, uint64_t burst)
{
    if (!l->poll_ns || burst > FP_POLL_BURST_MAX || l->python_inflight)
        return 0;
    uint64_t deadline = fp_now_ns() + l->poll_ns;
    do {
        if (*q->stop)
            return 1; /* the caller's next check returns */
        if (q->avail[1] != (uint16_t)l->last_avail
            || (q->pending && q->engine.ready(q))) {
            l->polls_found++;
            if (q->stats)
                q->stats[FP_STAT_POLL_HITS]++;
            return 1;
        }
    } while (fp_now_ns() < deadline);
    return 0;
}

static enum fp_loop_reason fp_loop_run(struct fp_queue *q, struct fp_loop *l)
{
    volatile uint16_t *used16 = (volatile uint16_t *)q->used;
    for (;;) {
        if (*q->stop)
            return FP_LOOP_STOPPED;
        if (!l->event_idx)
            used16[0] = FP_USED_F_NO_NOTIFY;
        unsigned reaped = 0;
        if (q->pending)
            reaped = fp_reap(q, &l->used_idx);
        unsigned count = (q->avail[1] - l->last_avail) & 0xFFFF;
        if (count > q->size) {
            fp_publish(q, l);
            return FP_LOOP_BROKEN;
        }
        if (count && l->dry) {
            l->dry = 0;
            if (count >= FP_SPLIT_MIN)
                count /= 2; /* the rest after this half's publish (QueueWorker's SPLIT_MIN) */
        }
        unsigned taken = count ? fp_run(q, count, &l->last_avail, &l->used_idx, &l->sequence)
                               : 0;
        l->taken += taken;
        if (l->taken_live != NULL)
            *l->taken_live += taken;
        if (l->avail_live != NULL)
            *l->avail_live = l->last_avail;
        fp_publish(q, l);
        if (q->nreturned)
            return FP_LOOP_RETURNED;
        if (taken < count)
            return *q->stop ? FP_LOOP_STOPPED : FP_LOOP_PYTHON;
        if (count || reaped)
            continue;
        l->dry = 1;
        uint64_t burst = l->taken - l->taken_at_dry;
        l->taken_at_dry = l->taken;
        if (fp_enable_kicks(q, l) || fp_poll_window(q, l, burst))
            continue;
        struct pollfd fds[4] = {
            {.fd = l->kick_fd, .events = POLLIN},
            {.fd = l->wake_fd, .events = POLLIN},
            {.fd = l->stop_fd, .events = POLLIN},
            {.fd = q->jobs != NULL ? q->engine.event_fd : -1, .events = POLLIN},
        };
        if (q->stats)
            q->stats[FP_STAT_POLL_SLEEPS]++;
        uint64_t slept_from = fp_now_ns();
        if (poll(fds, 4, -1) < 0 && errno != EINTR)
            return FP_LOOP_WOKEN; /* cannot wait: let the caller look */
        if (l->poll_max_ns)
            fp_adapt(l, fp_now_ns() - slept_from);
        if (fds[2].revents)
            return FP_LOOP_WOKEN; /* stop: the caller clears it */
        if (fds[0].revents)
            fp_clear_eventfd(l->kick_fd);
        if (fds[3].revents)
            fp_clear_eventfd(fds[3].fd);
        /* The wake fd (the caller clears it) once the ring's own work is done. */
        if (fds[1].revents && !fds[0].revents && !fds[3].revents)
            return FP_LOOP_WOKEN;
    }
}

#endif /* PYVDUSE_FASTPATH_LOOP_H */
