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
#include <string.h>
#include <sys/uio.h>
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

enum fp_target { FP_TARGET_NULL = 0, FP_TARGET_FD = 1 };

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
    uint64_t block_mask, submit_min;
    int accepts_writes, flush_ok;
    const volatile int *stop; /* nonzero: stop at once (the queue is being given up) */
    /* scratch: one chain's buffers */
    struct iovec readable[FP_MAX_SEGMENTS], writable[FP_MAX_SEGMENTS];
};

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
    if (length == 0 || length >= q->submit_min)
        return 0;
    if (sector > (capacity >> FP_SECTOR_SHIFT))
        return 0;
    uint64_t offset = sector << FP_SECTOR_SHIFT;
    if ((offset | length) & q->block_mask)
        return 0;
    return length <= capacity - offset;
}

/*
 * Serve the request whose chain is in the scratch iovecs. Returns the bytes written
 * into the chain (status included), or -1 if the Python path must take it (nothing
 * about the request was answered; an I/O it began is redone there).
 */
static int64_t serve(struct fp_queue *q, int nr, int nw)
{
    if (!nr || !nw || q->readable[0].iov_len != FP_BLK_HEADER
        || q->writable[nw - 1].iov_len != 1)
        return -1;
    unsigned char header[FP_BLK_HEADER];
    memcpy(header, q->readable[0].iov_base, FP_BLK_HEADER);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    unsigned char *status = q->writable[nw - 1].iov_base;
    if (type == FP_BLK_T_IN) {
        if (nr != 1 || nw < 2)
            return -1;
        struct iovec *data = q->writable;
        int n = nw - 1;
        uint64_t length = total_length(data, n);
        if (!range_ok(q, sector, length))
            return -1;
        if (q->target == FP_TARGET_FD) {
            if (transfer(q->fd, data, n, sector << FP_SECTOR_SHIFT, 0) < 0)
                return -1;
        } else {
            for (int i = 0; i < n; i++)
                memset(data[i].iov_base, 0, data[i].iov_len);
        }
        *status = 0;
        return (int64_t)length + 1;
    }
    if (type == FP_BLK_T_OUT) {
        if (nw != 1 || nr < 2 || !q->accepts_writes)
            return -1;
        struct iovec *data = q->readable + 1;
        int n = nr - 1;
        uint64_t length = total_length(data, n);
        if (!range_ok(q, sector, length))
            return -1;
        if (q->target == FP_TARGET_FD
            && transfer(q->fd, data, n, sector << FP_SECTOR_SHIFT, 1) < 0)
            return -1;
        *status = 0;
        return 1;
    }
    if (type == FP_BLK_T_FLUSH) {
        if (nr != 1 || nw != 1 || !q->flush_ok)
            return -1;
        if (q->target == FP_TARGET_FD) {
            while (fdatasync(q->fd) < 0) {
                if (errno != EINTR)
                    return -1;
            }
        }
        *status = 0;
        return 1;
    }
    return -1;
}

/*
 * Serve up to `count` available requests from avail entry *last_avail on, in ring
 * order; stop before the first one the Python path must take (or when *q->stop is
 * set). Advances *last_avail, *used_idx (16-bit) and *sequence by what it served
 * and returns how many that was. Used elements are stored, not published.
 */
static unsigned fp_run(struct fp_queue *q, unsigned count, unsigned *last_avail,
                       unsigned *used_idx, uint64_t *sequence)
{
    unsigned served = 0;
    unsigned avail = *last_avail, used = *used_idx;
    uint64_t seq = *sequence;
    if (count > q->size)
        count = q->size;
    while (served < count && !*q->stop) {
        uint16_t head = q->avail[2 + ((avail + served) & q->mask)];
        if (head >= q->size)
            break;
        int nr, nw;
        if (walk(q, head, &nr, &nw) < 0)
            break;
        /* Marked before the request starts; put back if Python is to take it. */
        uint64_t previous = q->slots[head];
        q->slots[head] = seq;
        int64_t written = serve(q, nr, nw);
        if (written < 0) {
            q->slots[head] = previous;
            break;
        }
        if (*q->stop)
            break; /* the queue was given up during the I/O: its completion is dropped */
        uint32_t slot = used & q->mask;
        q->used[1 + 2 * slot] = head;
        q->used[2 + 2 * slot] = (uint32_t)written;
        used = (used + 1) & 0xFFFF;
        seq++;
        served++;
    }
    *last_avail = (avail + served) & 0xFFFF;
    *used_idx = used;
    *sequence = seq;
    return served;
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
