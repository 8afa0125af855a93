/*
 * The compiled data path's core: one split virtqueue serving virtio-blk, in plain C.
 *
 * No Python here: pyvduse/_fastpath.c wraps it for the interpreter, and
 * fuzz/fastpath_fuzz.c drives it with hostile rings under the sanitizers.
 * See _fastpath.c for the contract (what is served, what is left to Python).
 *
 * Everything the driver wrote is read through `volatile` pointers, once per
 * field, into locals that are checked before use: the driver may change its
 * memory at any time, so no value is trusted twice.
 */
#ifndef PYVDUSE_FASTPATH_CORE_H
#define PYVDUSE_FASTPATH_CORE_H

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define FP_DESC_F_NEXT 1u
#define FP_DESC_F_WRITE 2u
#define FP_DESC_F_INDIRECT 4u

#define FP_BLK_T_IN 0u
#define FP_BLK_T_OUT 1u
#define FP_BLK_T_FLUSH 4u
#define FP_BLK_HEADER 16u
#define FP_SECTOR_SHIFT 9u

#define FP_MAX_MAPPINGS 16
#define FP_MAX_SEGMENTS 256 /* buffers per side of a chain served here; more: Python */
#define FP_MAX_CHAIN_BYTES 0xFFFFFFFFull
#define FP_MAX_QUEUE_SIZE 32768u

enum fp_target { FP_TARGET_NULL = 0, FP_TARGET_FD = 1, FP_TARGET_NBD = 2, FP_TARGET_RBD = 3 };

/* NBD and RBD targets: every read, write and flush goes to the asynchronous engine. */
#define FP_TARGET_REMOTE(target) ((target) == FP_TARGET_NBD || (target) == FP_TARGET_RBD)
enum fp_op { FP_OP_READ = 0, FP_OP_WRITE = 1, FP_OP_FLUSH = 2 };

#define FP_TAKE_PYTHON (-1) /* serve(): the Python path must take this request */
#define FP_STAGED (-2)      /* serve(): handed to the asynchronous engine */

/*
 * With batch_small, a run of this many requests or more stages all of a file's reads
 * and writes with the asynchronous engine, small ones too: one io_uring_enter for the
 * batch instead of one preadv/pwritev per request, and for O_DIRECT the device works
 * on the whole batch at once instead of one request at a time. Fewer are served
 * synchronously below submit_min, the quickest way for one request. The engine sets
 * batch_small only where it pays (fp_uring_probe()).
 */
#define FP_BATCH_MIN 4u

/*
 * Metrics (pyvduse.metrics): with q->stats set, each request served here is counted in
 * its type's cells (read, write, flush: FP_STAT_TYPE_CELLS each): requests, bytes,
 * latency sum in ns, then a count per latency bucket (upper bounds, inclusive, below;
 * the last bucket takes the rest). Then the serving loop's polling counts. Only the
 * thread serving the queue writes them. Without q->stats nothing is counted or timed.
 */
#define FP_LAT_BOUNDS 20
static const uint64_t fp_latency_bounds[FP_LAT_BOUNDS] = {
    5000ull, 10000ull, 25000ull, 50000ull, 100000ull, 250000ull, 500000ull,
    1000000ull, 2500000ull, 5000000ull, 10000000ull, 25000000ull, 50000000ull,
    100000000ull, 250000000ull, 500000000ull,
    1000000000ull, 2500000000ull, 5000000000ull, 10000000000ull,
};
#define FP_STAT_TYPE_CELLS (3 + FP_LAT_BOUNDS + 1)
#define FP_STAT_POLL_HITS (3 * FP_STAT_TYPE_CELLS)
#define FP_STAT_POLL_SLEEPS (FP_STAT_POLL_HITS + 1)
#define FP_STAT_CELLS (FP_STAT_POLL_SLEEPS + 1)

struct fp_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct fp_mapping {
    uint64_t start;
    uint64_t read_end;   /* exclusive end if readable, else 0 */
    uint64_t write_end;  /* exclusive end if writable, else 0 */
    unsigned char *base; /* host address of `start` */
};

/* A request handed to the asynchronous engine (file and NBD targets), kept by head
 * until done. */
struct fp_job {
    struct iovec *iov; /* its data buffers (a copy, malloc'd); NULL for a flush */
    int n, op, busy;
    uint64_t offset, length;
    uint32_t written;      /* the used element's length once it succeeded */
    unsigned char *status; /* the status byte, written only on success */
    uint64_t started;      /* when it was taken from the ring (ns; with q->stats only) */
};

struct fp_queue;

/*
 * The asynchronous engine (fastpath_uring.h, fastpath_nbd.h; the fuzzer has its own):
 * stage() takes jobs[head] (0) or refuses it (-1: nothing was started); kick() starts
 * everything staged (the end of each run: one submission per batch). It reports each
 * staged job once, through fp_finish(), from the reaping code of its owner.
 */
struct fp_engine {
    void *ctx;
    int (*stage)(struct fp_queue *q, uint32_t head);
    void (*kick)(struct fp_queue *q);
    /* Finish what completed (fp_finish(); failed heads go to q->returned); how many. */
    unsigned (*reap)(struct fp_queue *q, unsigned *used_idx);
    int (*ready)(struct fp_queue *q); /* completions wait to be reaped */
    int event_fd;                     /* readable when completions arrive, or -1 */
};

/* One queue: where its rings and log are, what memory it may touch, the request rules. */
struct fp_queue {
    const volatile struct fp_desc *desc;
    const volatile uint16_t *avail;    /* flags, idx, ring[size], used_event */
    volatile uint32_t *used;           /* flags|idx (one u32), then {id, len} pairs */
    volatile uint64_t *slots;          /* inflight log: pop sequence per head */
    const volatile uint64_t *capacity; /* bytes the device serves (a resize stores it) */
    uint32_t size, mask, max_indirect;
    int indirect;
    struct fp_mapping maps[FP_MAX_MAPPINGS];
    int nmaps;
    int target, fd;
    uint64_t block_mask;
    uint64_t submit_min; /* file reads and writes this large are asynchronous */
    int batch_small;     /* runs of FP_BATCH_MIN requests stage small ones too */
    int batching;        /* this run stages every file request (fp_run()) */
    int accepts_writes;
    int flush_offered;   /* VIRTIO_BLK_F_FLUSH: flushes are served */
    int asynchronous;    /* file flushes and large requests go to `engine`, else Python */
    struct fp_engine engine;
    struct fp_job *jobs; /* [size], when the engine runs; else NULL (Python takes them) */
    unsigned pending;    /* jobs staged and not finished */
    uint64_t staged;     /* jobs ever staged (statistics) */
    uint32_t *returned;  /* [size]: heads whose job failed, for the Python path to serve */
    unsigned nreturned;
    const volatile int *stop; /* nonzero: stop at once (the queue is being given up) */
    uint64_t *stats;          /* FP_STAT_CELLS metrics cells, or NULL: not counted */
    uint64_t now;             /* with stats: when the current request was taken (ns) */
    uint64_t reaped_at;       /* with stats: when this reap found its first completion, or 0 */
    /* scratch: one chain's buffers */
    struct iovec readable[FP_MAX_SEGMENTS], writable[FP_MAX_SEGMENTS];
};

/* -- helpers of the engines ------------------------------------------------------------- */

static uint64_t fp_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* One request in one type's FP_STAT_TYPE_CELLS cells: it moved `bytes`, took `ns`. */
static void fp_count(uint64_t *cells, uint64_t bytes, uint64_t ns)
{
    unsigned bucket = 0;
    while (bucket < FP_LAT_BOUNDS && ns > fp_latency_bounds[bucket])
        bucket++;
    cells[0]++;
    cells[1] += bytes;
    cells[2] += ns;
    cells[3 + bucket]++;
}

/* Count a request of `op` that succeeded, moving `bytes`, taken at `started` and
 * answered at `now` (q->stats set). A clock read is not free (about 1 us in an
 * emulated guest), so each is shared: a request served in line ends when the next
 * one starts, and the completions of one reap share the reap's time (fp_reap()). */
static void fp_account(struct fp_queue *q, int op, uint64_t bytes, uint64_t started,
                       uint64_t now)
{
    fp_count(q->stats + op * FP_STAT_TYPE_CELLS, bytes, now > started ? now - started : 0);
}

/* CLOCK_MONOTONIC now plus `timeout_ms` (non-negative). */
static struct timespec fp_deadline(int timeout_ms)
{
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    return deadline;
}

/* -- translation ----------------------------------------------------------------------- */

/* Host address of [addr, addr+len) with the given right, or NULL; len > 0. */
static unsigned char *translate(const struct fp_queue *q, uint64_t addr, uint64_t len, int write)
{
    for (int i = 0; i < q->nmaps; i++) {
        const struct fp_mapping *m = &q->maps[i];
        uint64_t end = write ? m->write_end : m->read_end;
        if (addr >= m->start && addr < end && len <= end - addr)
            return m->base + (addr - m->start);
    }
    return NULL;
}

/* -- chains ---------------------------------------------------------------------------- */

/* Copy descriptor `index` of `table` (driver memory: each field read once). */
static void load_desc(const volatile struct fp_desc *table, uint32_t index, struct fp_desc *d)
{
    d->addr = table[index].addr;
    d->len = table[index].len;
    d->flags = table[index].flags;
    d->next = table[index].next;
}

/*
 * Walk the chain at `head` the way SplitQueue.pop's fast path accepts it: every buffer
 * non-empty, inside one known mapping with the right it needs, flags NEXT and WRITE
 * only (or the head one indirect descriptor, negotiated, table of 1..max_indirect
 * entries inside a readable mapping), no readable buffer after a writable one, at most
 * table-size descriptors, at most 4 GiB in all. Returns 0 and fills the scratch iovecs,
 * or -1 (nothing consumed) for anything else.
 */
static int walk(struct fp_queue *q, uint32_t head, int *nr, int *nw)
{
    const volatile struct fp_desc *table = q->desc;
    uint32_t table_len = q->size;
    struct fp_desc d;
    load_desc(table, head, &d);
    if (d.flags & FP_DESC_F_INDIRECT) {
        if ((d.flags & ~FP_DESC_F_WRITE) != FP_DESC_F_INDIRECT || !q->indirect)
            return -1;
        if (d.len == 0 || d.len % sizeof(struct fp_desc)
            || d.len / sizeof(struct fp_desc) > q->max_indirect)
            return -1;
        table = (const volatile struct fp_desc *)translate(q, d.addr, d.len, 0);
        if (table == NULL || (uintptr_t)table % _Alignof(struct fp_desc))
            return -1; /* a misaligned table is read by Python, without alignment rules */
        table_len = d.len / sizeof(struct fp_desc);
        load_desc(table, 0, &d);
    }
    uint64_t total = 0;
    int r = 0, w = 0;
    for (uint32_t limit = table_len; limit; limit--) {
        if (d.len == 0)
            return -1;
        int write = (d.flags & FP_DESC_F_WRITE) != 0;
        uint16_t allowed = write ? FP_DESC_F_WRITE | FP_DESC_F_NEXT : FP_DESC_F_NEXT;
        int *count = write ? &w : &r;
        if (d.flags & ~allowed || (!write && w) || *count == FP_MAX_SEGMENTS)
            return -1; /* unknown flags, readable after writable, too many buffers */
        unsigned char *p = translate(q, d.addr, d.len, write);
        if (p == NULL)
            return -1;
        struct iovec *side = write ? q->writable : q->readable;
        side[*count].iov_base = p;
        side[*count].iov_len = d.len;
        (*count)++;
        total += d.len;
        if (!(d.flags & FP_DESC_F_NEXT)) {
            if (total > FP_MAX_CHAIN_BYTES)
                return -1;
            *nr = r;
            *nw = w;
            return 0;
        }
        if (d.next >= table_len)
            return -1;
        load_desc(table, d.next, &d);
    }
    return -1;
}

/* -- I/O ------------------------------------------------------------------------------- */

/* Move every byte of iov[0..n) at offset; 0, or -1 (errno set; EIO for no progress). */
static int transfer(int fd, struct iovec *iov, int n, uint64_t offset, int write)
{
    while (n) {
        int chunk = n > IOV_MAX ? IOV_MAX : n;
        ssize_t done = write ? pwritev(fd, iov, chunk, (off_t)offset)
                             : preadv(fd, iov, chunk, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (done == 0) {
            errno = EIO;
            return -1;
        }
        offset += (uint64_t)done;
        while (n && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n && done) {
            iov->iov_base = (char *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

static uint64_t total_length(const struct iovec *iov, int n)
{
    uint64_t total = 0;
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
    return total;
}

/* The request rules of BlkHandler for a read or write: aligned, inside the device. */
static int range_ok(const struct fp_queue *q, uint64_t sector, uint64_t length)
{
    uint64_t capacity = *q->capacity;
    if (length == 0)
        return 0;
    if (sector > (capacity >> FP_SECTOR_SHIFT))
        return 0;
    uint64_t offset = sector << FP_SECTOR_SHIFT;
    if ((offset | length) & q->block_mask)
        return 0;
    return length <= capacity - offset;
}

/*
 * Hand request `head` to the asynchronous engine: FP_STAGED, or FP_TAKE_PYTHON when
 * there is no engine, the head is in flight already (a driver reusing it) or the
 * engine refuses it. The iovecs are copied: the scratch ones serve the next chain.
 */
static int64_t stage(struct fp_queue *q, uint32_t head, int op, const struct iovec *iov,
                     int n, uint64_t offset, uint64_t length, uint32_t written,
                     unsigned char *status)
{
    if (q->jobs == NULL || q->jobs[head].busy)
        return FP_TAKE_PYTHON;
    struct fp_job *job = &q->jobs[head];
    job->iov = NULL;
    if (n) {
        job->iov = malloc((size_t)n * sizeof(*iov));
        if (job->iov == NULL)
            return FP_TAKE_PYTHON;
        memcpy(job->iov, iov, (size_t)n * sizeof(*iov));
    }
    job->n = n;
    job->op = op;
    job->offset = offset;
    job->length = length;
    job->written = written;
    job->status = status;
    job->started = q->now;
    if (q->engine.stage(q, head) < 0) {
        free(job->iov);
        job->iov = NULL;
        return FP_TAKE_PYTHON;
    }
    job->busy = 1;
    q->pending++;
    q->staged++;
    return FP_STAGED;
}

/* A read or write of iov[0..n) at `sector`: in place (null), synchronous or staged. */
static int64_t serve_data(struct fp_queue *q, uint32_t head, int op, struct iovec *iov,
                          int n, uint64_t sector, uint32_t written, unsigned char *status)
{
    uint64_t length = total_length(iov, n);
    if (!range_ok(q, sector, length))
        return FP_TAKE_PYTHON;
    uint64_t offset = sector << FP_SECTOR_SHIFT;
    if (FP_TARGET_REMOTE(q->target)) /* every request goes to the engine */
        return stage(q, head, op, iov, n, offset, length, written, status);
    if (q->target == FP_TARGET_FD) {
        if (length >= q->submit_min || q->batching)
            return q->asynchronous ? stage(q, head, op, iov, n, offset, length, written, status)
                                   : FP_TAKE_PYTHON;
        if (transfer(q->fd, iov, n, offset, op == FP_OP_WRITE) < 0)
            return FP_TAKE_PYTHON;
    } else if (op == FP_OP_READ) {
        for (int i = 0; i < n; i++)
            memset(iov[i].iov_base, 0, iov[i].iov_len);
    }
    *status = 0;
    if (q->stats) {
        uint64_t now = fp_now_ns();
        fp_account(q, op, length, q->now, now);
        q->now = now; /* the next request's start */
    }
    return written;
}

/*
 * Serve request `head` whose chain is in the scratch iovecs. Returns the bytes written
 * into the chain (status included), FP_STAGED if the engine took it, or FP_TAKE_PYTHON
 * if the Python path must take it (nothing about the request was answered; an I/O it
 * began is redone there).
 */
static int64_t serve(struct fp_queue *q, uint32_t head, int nr, int nw)
{
    if (!nr || !nw || q->readable[0].iov_len != FP_BLK_HEADER
        || q->writable[nw - 1].iov_len != 1)
        return FP_TAKE_PYTHON;
    unsigned char header[FP_BLK_HEADER];
    memcpy(header, q->readable[0].iov_base, FP_BLK_HEADER);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    unsigned char *status = q->writable[nw - 1].iov_base;
    if (type == FP_BLK_T_IN) {
        if (nr != 1 || nw < 2)
            return FP_TAKE_PYTHON;
        uint64_t length = total_length(q->writable, nw - 1);
        if (length >= FP_MAX_CHAIN_BYTES)
            return FP_TAKE_PYTHON;
        return serve_data(q, head, FP_OP_READ, q->writable, nw - 1, sector,
                          (uint32_t)length + 1, status);
    }
    if (type == FP_BLK_T_OUT) {
        if (nw != 1 || nr < 2 || !q->accepts_writes)
            return FP_TAKE_PYTHON;
        return serve_data(q, head, FP_OP_WRITE, q->readable + 1, nr - 1, sector, 1, status);
    }
    if (type == FP_BLK_T_FLUSH) {
        if (nr != 1 || nw != 1 || !q->flush_offered)
            return FP_TAKE_PYTHON;
        if (FP_TARGET_REMOTE(q->target))
            return stage(q, head, FP_OP_FLUSH, NULL, 0, 0, 0, 1, status);
        if (q->target == FP_TARGET_FD) {
            if (q->asynchronous)
                return stage(q, head, FP_OP_FLUSH, NULL, 0, 0, 0, 1, status);
            while (fdatasync(q->fd) < 0) {
                if (errno != EINTR)
                    return FP_TAKE_PYTHON;
            }
        }
        *status = 0;
        if (q->stats) {
            uint64_t now = fp_now_ns();
            fp_account(q, FP_OP_FLUSH, 0, q->now, now);
            q->now = now;
        }
        return 1;
    }
    return FP_TAKE_PYTHON;
}

/*
 * Serve up to `count` available requests from avail entry *last_avail on, in ring
 * order; stop before the first one the Python path must take (or when *q->stop is
 * set). With batch_small, a run of FP_BATCH_MIN or more stages every file request.
 * Advances *last_avail, *used_idx (16-bit) and *sequence by what it took and
 * returns how many that was: served here (used elements stored, not published) or
 * staged with the engine (started before returning; see fp_finish()).
 */
static unsigned fp_run(struct fp_queue *q, unsigned count, unsigned *last_avail,
                       unsigned *used_idx, uint64_t *sequence)
{
    unsigned taken = 0, staged = 0;
    unsigned avail = *last_avail, used = *used_idx;
    uint64_t seq = *sequence;
    if (count > q->size)
        count = q->size;
    q->batching = q->asynchronous && q->batch_small && count >= FP_BATCH_MIN;
    if (q->stats)
        q->now = fp_now_ns(); /* then each request served here ends at the next's start */
    while (taken < count && !*q->stop) {
        uint16_t head = q->avail[2 + ((avail + taken) & q->mask)];
        if (head >= q->size)
            break;
        int nr, nw;
        if (walk(q, head, &nr, &nw) < 0)
            break;
        /* Marked before the request starts; put back if Python is to take it. */
        uint64_t previous = q->slots[head];
        q->slots[head] = seq;
        int64_t written = serve(q, head, nr, nw);
        if (written == FP_TAKE_PYTHON) {
            q->slots[head] = previous;
            break;
        }
        if (written == FP_STAGED) {
            staged++;
        } else {
            if (*q->stop)
                break; /* the queue was given up during the I/O: its completion is dropped */
            uint32_t slot = used & q->mask;
            q->used[1 + 2 * slot] = head;
            q->used[2 + 2 * slot] = (uint32_t)written;
            used = (used + 1) & 0xFFFF;
        }
        seq++;
        taken++;
    }
    if (staged)
        q->engine.kick(q);
    *last_avail = (avail + taken) & 0xFFFF;
    *used_idx = used;
    *sequence = seq;
    return taken;
}

/*
 * The engine is done with jobs[head] (ok: every byte moved, or the flush done). On
 * success the status byte is written and the used element stored at *used_idx (not
 * published); returns 1. Otherwise nothing is written and the head goes to
 * q->returned, the Python path's to serve again from its chain (it reports the
 * error); returns 0. With `drop` (the queue was given up) nothing is written or
 * returned; returns 0.
 */
static int fp_finish(struct fp_queue *q, uint32_t head, int ok, int drop, unsigned *used_idx)
{
    struct fp_job *job = &q->jobs[head];
    free(job->iov);
    job->iov = NULL;
    job->busy = 0;
    q->pending--;
    if (drop)
        return 0;
    if (!ok) {
        q->returned[q->nreturned++] = head; /* at most once each: it was in flight */
        return 0;
    }
    *job->status = 0;
    if (q->stats) {
        if (!q->reaped_at) /* the first completion of this reap: the clock read once */
            q->reaped_at = fp_now_ns();
        fp_account(q, job->op, job->length, job->started, q->reaped_at);
    }
    uint32_t slot = *used_idx & q->mask;
    q->used[1 + 2 * slot] = head;
    q->used[2 + 2 * slot] = job->written;
    *used_idx = (*used_idx + 1) & 0xFFFF;
    return 1;
}

/* Reap what the engine finished (fp_finish() for each); how many. With stats, one clock
 * read, at the first completion found, is the answer time of them all (a reap that finds
 * none, as the serving loop makes many while requests are out, reads no clock). */
static unsigned fp_reap(struct fp_queue *q, unsigned *used_idx)
{
    q->reaped_at = 0;
    return q->engine.reap(q, used_idx);
}

/* Clear the log slots of the heads published at used positions position..used_idx. */
static void fp_retire(struct fp_queue *q, unsigned position, unsigned used_idx)
{
    position &= 0xFFFF;
    used_idx &= 0xFFFF;
    while (position != used_idx) {
        uint32_t head = q->used[1 + 2 * (position & q->mask)];
        if (head < q->size)
            q->slots[head] = 0;
        position = (position + 1) & 0xFFFF;
    }
}

#endif /* PYVDUSE_FASTPATH_CORE_H */
