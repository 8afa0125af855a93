/*
 * The compiled data path's asynchronous engine for file targets: one io_uring per queue.
 *
 * fp_run() stages the queue's large reads and writes and its flushes here (readv,
 * writev, fdatasync at the request's offset) and kicks once at the end of the run:
 * one io_uring_enter for the whole batch. Completions are reaped by whoever holds
 * the queue's ring lock (fp_uring_reap()), and the ring's eventfd, when one is
 * registered, wakes the queue's thread for them.
 *
 * Raw system calls, no liburing: the setup, the two rings and three opcodes are all
 * this needs. The submission ring has as many entries as the virtqueue, so it can
 * never be full (a head is staged at most once at a time) and the completion ring,
 * twice as large, can never overflow.
 *
 * If the kernel refuses a submission, the staged jobs it did not take are handed
 * back to the Python path (reported as failed, nothing written), which serves them
 * with its own code.
 */
#ifndef PYVDUSE_FASTPATH_URING_H
#define PYVDUSE_FASTPATH_URING_H

#include <fcntl.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>

#include "fastpath_core.h"

struct fp_uring {
    int fd;
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ring, *cq_ring;
    size_t sq_ring_len, cq_ring_len, sqes_len;
    unsigned unsubmitted; /* staged since the last kick */
    int failed;           /* a kick was refused: these heads went back to Python */
    int batch_small;      /* fp_uring_probe() */
};

static void fp_uring_close(struct fp_uring *u)
{
    if (u->sqes != NULL && u->sqes != MAP_FAILED)
        munmap(u->sqes, u->sqes_len);
    if (u->cq_ring != NULL && u->cq_ring != MAP_FAILED && u->cq_ring != u->sq_ring)
        munmap(u->cq_ring, u->cq_ring_len);
    if (u->sq_ring != NULL && u->sq_ring != MAP_FAILED)
        munmap(u->sq_ring, u->sq_ring_len);
    if (u->fd >= 0)
        close(u->fd);
    memset(u, 0, sizeof(*u));
    u->fd = -1;
}

static int fp_uring_probe(struct fp_uring *u, int fd);

/*
 * Set up a ring of `entries` submissions for `fd`; 0, or -1 with errno set (all
 * undone). u->batch_small says whether batches of small requests belong in it.
 */
static int fp_uring_open(struct fp_uring *u, unsigned entries, int fd, int eventfd)
{
    struct io_uring_params p;
    memset(u, 0, sizeof(*u));
    memset(&p, 0, sizeof(p));
    u->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
    if (u->fd < 0)
        return -1;
    int saved;
    u->sq_ring_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_ring_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP && u->cq_ring_len > u->sq_ring_len)
        u->sq_ring_len = u->cq_ring_len;
    u->sq_ring = mmap(NULL, u->sq_ring_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      u->fd, IORING_OFF_SQ_RING);
    if (u->sq_ring == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        u->cq_ring = u->sq_ring;
    } else {
        u->cq_ring = mmap(NULL, u->cq_ring_len, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_POPULATE, u->fd, IORING_OFF_CQ_RING);
        if (u->cq_ring == MAP_FAILED)
            goto fail;
    }
    u->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sqes = mmap(NULL, u->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   u->fd, IORING_OFF_SQES);
    if (u->sqes == MAP_FAILED)
        goto fail;
    unsigned char *sq = u->sq_ring, *cq = u->cq_ring;
    u->sq_head = (unsigned *)(sq + p.sq_off.head);
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(sq + p.sq_off.array);
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    u->batch_small = fp_uring_probe(u, fd);
    if (eventfd >= 0
        && syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_EVENTFD, &eventfd, 1) < 0)
        goto fail;
    return 0;
fail:
    saved = errno;
    fp_uring_close(u);
    errno = saved;
    return -1;
}

/*
 * Whether batches of small requests for `fd` belong in this ring (struct fp_queue's
 * batch_small): 1 for an O_DIRECT file (the ring starts the device's I/O for the whole
 * batch without a worker, where preadv would wait for each request in turn); for a
 * buffered file, 1 if a read of a page the cache holds completes inside io_uring_enter
 * (one system call then copies a whole batch), 0 if the ring hands it to an io-wq
 * worker (tmpfs in Linux 6.12 has no non-blocking reads: every request would cost two
 * thread switches; in the benchmark guest that halved 4K QD32 IOPS). Called before
 * the eventfd is registered, and it reaps its own completion.
 */
static int fp_uring_probe(struct fp_uring *u, int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0)
        return 0;
    if (flags & O_DIRECT)
        return 1;
    unsigned char *buf = malloc(512);
    if (buf == NULL)
        return 0;
    if (pread(fd, buf, 512, 0) != 512) { /* also brings the page into the cache */
        free(buf);
        return 0; /* an empty or unreadable file: nothing to learn */
    }
    struct iovec iov = {.iov_base = buf, .iov_len = 512};
    unsigned tail = *u->sq_tail, index = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = &u->sqes[index];
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IORING_OP_READV;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)&iov;
    sqe->len = 1;
    sqe->user_data = UINT64_MAX;
    u->sq_array[index] = index;
    __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
    long submitted;
    do
        submitted = syscall(__NR_io_uring_enter, u->fd, 1, 0, 0, NULL, 0);
    while (submitted < 0 && errno == EINTR);
    if (submitted != 1) {
        __atomic_store_n(u->sq_tail, tail, __ATOMIC_RELEASE); /* taken back */
        free(buf);
        return 0;
    }
    int in_line = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE) != *u->cq_head;
    while (__atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE) == *u->cq_head) {
        if (syscall(__NR_io_uring_enter, u->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0
            && errno != EINTR)
            return 0; /* cannot wait for it: `buf` stays allocated for the kernel */
    }
    int complete = u->cqes[*u->cq_head & *u->cq_mask].res == 512;
    __atomic_store_n(u->cq_head, *u->cq_head + 1, __ATOMIC_RELEASE);
    free(buf);
    return in_line && complete;
}

/* fp_engine.stage: one SQE for jobs[head]. */
static int fp_uring_stage(struct fp_queue *q, uint32_t head)
{
    struct fp_uring *u = q->engine.ctx;
    const struct fp_job *job = &q->jobs[head];
    unsigned tail = *u->sq_tail; /* ours: the kernel only reads it */
    if (tail - __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE) > *u->sq_mask)
        return -1; /* full: cannot happen with entries >= the queue size */
    unsigned index = tail & *u->sq_mask;
    struct io_uring_sqe *sqe = &u->sqes[index];
    memset(sqe, 0, sizeof(*sqe));
    /*
     * Reads and flushes go straight to the kernel's io-wq workers: without
     * IOSQE_ASYNC a read the page cache can serve is copied inside io_uring_enter,
     * on the queue's thread, one request after the other, while the workers copy
     * several at once (1 MiB reads at QD8 in the benchmark guest: 395 -> 615 IOPS).
     * Writes are tried in line first: a file's writes are serialised by its inode
     * lock anyway, and handing them over only adds a switch (361 -> 300 IOPS). Small
     * reads (staged because their batch was large, FP_BATCH_MIN) are tried in line
     * too: one io_uring_enter then copies the whole batch, and those that miss the
     * page cache go on to io-wq by themselves.
     */
    if (job->op == FP_OP_FLUSH || (job->op == FP_OP_READ && job->length >= q->submit_min))
        sqe->flags = IOSQE_ASYNC;
    sqe->fd = q->fd;
    sqe->user_data = head;
    if (job->op == FP_OP_FLUSH) {
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    } else {
        sqe->opcode = job->op == FP_OP_WRITE ? IORING_OP_WRITEV : IORING_OP_READV;
        sqe->addr = (uint64_t)(uintptr_t)job->iov;
        sqe->len = (uint32_t)job->n;
        sqe->off = job->offset;
    }
    u->sq_array[index] = index;
    __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
    u->unsubmitted++;
    return 0;
}

/*
 * fp_engine.kick: submit what was staged. What the kernel refuses stays in the
 * submission ring and is marked failed; fp_uring_reap() hands it back to Python.
 */
static void fp_uring_kick(struct fp_queue *q)
{
    struct fp_uring *u = q->engine.ctx;
    while (u->unsubmitted) {
        long done = syscall(__NR_io_uring_enter, u->fd, u->unsubmitted, 0, 0, NULL, 0);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0) {
            u->failed = 1;
            return;
        }
        u->unsubmitted -= (unsigned)done;
    }
}

/*
 * Finish every job the kernel completed (fp_finish(): used elements stored at
 * *used_idx, not published; failed heads to q->returned), and every job a refused
 * kick left behind (failed). With `drop`, nothing is written anywhere. Returns how
 * many jobs were finished.
 */
static unsigned fp_uring_reap_jobs(struct fp_queue *q, int drop, unsigned *used_idx)
{
    struct fp_uring *u = q->engine.ctx;
    unsigned finished = 0;
    unsigned head = *u->cq_head;
    unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    for (; head != tail; head++) {
        const struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
        uint64_t id = cqe->user_data;
        if (id >= q->size || !q->jobs[id].busy)
            continue; /* not ours: cannot happen */
        int ok = cqe->res >= 0 && (uint64_t)cqe->res == q->jobs[id].length;
        fp_finish(q, (uint32_t)id, ok, drop, used_idx);
        finished++;
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    if (u->failed && u->unsubmitted) {
        /* Take the refused entries back out of the submission ring. */
        unsigned sq_tail = *u->sq_tail;
        for (unsigned i = sq_tail - u->unsubmitted; i != sq_tail; i++) {
            uint64_t id = u->sqes[i & *u->sq_mask].user_data;
            fp_finish(q, (uint32_t)id, 0, drop, used_idx);
            finished++;
        }
        __atomic_store_n(u->sq_tail, sq_tail - u->unsubmitted, __ATOMIC_RELEASE);
        u->unsubmitted = 0;
    }
    u->failed = 0;
    return finished;
}

/* fp_engine.reap */
static unsigned fp_uring_reap(struct fp_queue *q, unsigned *used_idx)
{
    return fp_uring_reap_jobs(q, 0, used_idx);
}

/* fp_engine.ready */
static int fp_uring_ready(struct fp_queue *q)
{
    struct fp_uring *u = q->engine.ctx;
    return __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE) != *u->cq_head
           || (u->failed && u->unsubmitted);
}

/*
 * Wait until the kernel has completed every submitted job (they stay to be reaped),
 * at most `timeout_ms` (negative: no limit). 0, or -1 with errno set (ETIMEDOUT).
 */
static int fp_uring_wait(struct fp_queue *q, int timeout_ms)
{
    struct fp_uring *u = q->engine.ctx;
    struct timespec now, deadline = fp_deadline(timeout_ms < 0 ? 0 : timeout_ms);
    for (;;) {
        unsigned ready = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE) - *u->cq_head;
        unsigned submitted = q->pending - (u->failed ? u->unsubmitted : 0);
        if (ready >= submitted)
            return 0;
        int wait = -1;
        if (timeout_ms >= 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            long long left = (long long)(deadline.tv_sec - now.tv_sec) * 1000
                             + (deadline.tv_nsec - now.tv_nsec) / 1000000;
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            wait = left > INT_MAX ? INT_MAX : (int)left;
        }
        /* The ring's fd is readable while completions wait in it. */
        struct pollfd pfd = {.fd = u->fd, .events = POLLIN};
        if (poll(&pfd, 1, wait) < 0 && errno != EINTR)
            return -1;
    }
}

#endif /* PYVDUSE_FASTPATH_URING_H */
