/*
 * Fuzzer of the compiled data path's core (src/pyvduse/fastpath_core.h).
 *
 * Each input describes one hostile driver: the queue's size and negotiated
 * features, up to four memory mappings (guest address, length, rights), the
 * bytes of the descriptor table, the avail ring and every mapping, the device
 * capacity and block size, and how many requests to serve. The core serves
 * them against it; the rings, the log slots and every mapping are separate
 * heap blocks of their exact size, so AddressSanitizer reports any byte the
 * core touches outside them, and UndefinedBehaviorSanitizer any overflow,
 * misaligned access or bad shift. After the run the harness checks what the
 * core may not do even inside its memory: serve more than asked, leave a
 * position out of range, put a used element's head out of range.
 *
 * Two ways to build it (fuzz/run does either):
 *   clang -fsanitize=fuzzer,address,undefined   -> libFuzzer, coverage-guided;
 *   gcc -DFP_STANDALONE -fsanitize=address,undefined -> a driver of its own that
 *       mutates valid chains at random (no coverage feedback; for hosts without
 *       clang), run as `fastpath_fuzz RUNS SEED`; `fastpath_fuzz seeds DIR N`
 *       writes N well-formed inputs, libFuzzer's starting corpus.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "../src/pyvduse/fastpath_core.h"

#define MAX_QSIZE 64u
#define MAX_MAP_LEN 65536u

/* Bytes of the input, consumed front to back; zeroes once it runs out. */
struct input {
    const uint8_t *data;
    size_t size, at;
};

static uint64_t take(struct input *in, unsigned bytes)
{
    uint64_t value = 0;
    for (unsigned i = 0; i < bytes; i++)
        value |= (uint64_t)(in->at < in->size ? in->data[in->at++] : 0) << (8 * i);
    return value;
}

static void fill(struct input *in, void *dst, size_t len)
{
    unsigned char *out = dst;
    for (size_t i = 0; i < len; i++)
        out[i] = (unsigned char)take(in, 1);
}

static int memfd = -1;
static unsigned long long chains; /* heads the core looked at, over all runs */
static unsigned long long staged; /* of which the engine took, over all runs */

/*
 * A stand-in for the io_uring engine: it records the heads staged (refusing some, as
 * the input says) and the harness finishes them after the run, each one succeeding
 * or failing as the input says, so fp_finish() and the staging code are fuzzed too.
 */
struct fake_engine {
    uint32_t staged[MAX_QSIZE];
    unsigned count, refuse_mask, calls, kicks;
};

static int fake_stage(struct fp_queue *q, uint32_t head)
{
    struct fake_engine *e = q->engine.ctx;
    if (head >= q->size || !q->jobs[head].iov == !!q->jobs[head].n || e->count == MAX_QSIZE)
        abort(); /* a head out of range, a data job without buffers, more than the queue */
    if (e->refuse_mask >> (e->calls++ % 6) & 1)
        return -1;
    e->staged[e->count++] = head;
    return 0;
}

static void fake_kick(struct fp_queue *q)
{
    ((struct fake_engine *)q->engine.ctx)->kicks++;
}

static void run_one(const uint8_t *data, size_t size)
{
    struct input in = {data, size, 0};
    struct fp_queue *q = calloc(1, sizeof(*q));
    uint32_t qsize = 1u << (take(&in, 1) % 7); /* 1..64 */
    uint32_t flags = (uint32_t)take(&in, 1);
    q->size = qsize;
    q->mask = qsize - 1;
    q->indirect = flags & 1;
    q->max_indirect = qsize << ((flags >> 1) & 3);
    q->target = (flags >> 3) & 1 ? FP_TARGET_FD : FP_TARGET_NULL;
    q->fd = memfd;
    q->accepts_writes = (flags >> 4) & 1;
    q->flush_offered = (flags >> 5) & 1;
    q->block_mask = (512u << ((flags >> 6) & 3)) - 1;
    uint64_t submit_flags = take(&in, 1), submit_byte = take(&in, 1);
    q->submit_min = submit_flags & 1 ? UINT64_MAX : 512u << (submit_byte % 12);
    q->batch_small = (int)(submit_byte >> 7) & 1; /* runs of FP_BATCH_MIN stage small ones */
    if (q->target == FP_TARGET_FD && (submit_byte >> 6 & 1))
        q->target = FP_TARGET_NBD; /* every request staged (with an engine), none done here */
    struct fake_engine engine = {.refuse_mask = (unsigned)(submit_flags >> 2)};
    q->asynchronous = (submit_flags >> 1) & 1;
    if (q->asynchronous && !(submit_flags >> 7 & 1)) { /* else: no engine, Python takes them */
        q->jobs = calloc(qsize, sizeof(*q->jobs));
        q->returned = calloc(qsize, sizeof(*q->returned));
        q->engine.ctx = &engine;
        q->engine.stage = fake_stage;
        q->engine.kick = fake_kick;
    }
    uint64_t *capacity = malloc(sizeof(*capacity));
    *capacity = take(&in, 4) << 9;
    q->capacity = capacity;
    static const int never = 0;
    q->stop = &never;
    uint64_t stats[FP_STAT_CELLS] = {0};
    q->stats = stats; /* every request served is counted: checked against what was pushed */

    struct fp_desc *desc = malloc(qsize * sizeof(*desc));
    fill(&in, desc, qsize * sizeof(*desc));
    uint16_t *avail = malloc(6 + 2 * qsize);
    fill(&in, avail, 6 + 2 * qsize);
    uint32_t *used = malloc(6 + 8 * qsize);
    memset(used, 0, 6 + 8 * qsize);
    uint64_t *slots = calloc(qsize, sizeof(*slots));
    q->desc = desc;
    q->avail = avail;
    q->used = used;
    q->slots = slots;

    unsigned char *blocks[FP_MAX_MAPPINGS] = {0};
    int maps = (int)(take(&in, 1) % 5);
    for (int i = 0; i < maps; i++) {
        uint32_t len = 1 + (uint32_t)(take(&in, 2) % MAX_MAP_LEN);
        uint64_t near = take(&in, 1) & 1, anywhere = take(&in, 8);
        uint64_t start = near ? (uint64_t)i * 0x20000 : anywhere;
        if (start > UINT64_MAX - len)
            start = UINT64_MAX - len;
        unsigned rights = 1 + (unsigned)(take(&in, 1) % 3); /* 1 read, 2 write, 3 both */
        blocks[i] = malloc(len);
        fill(&in, blocks[i], len < 4096 ? len : 4096);
        if (len > 4096)
            memset(blocks[i] + 4096, 0xA5, len - 4096);
        q->maps[i].start = start;
        q->maps[i].read_end = rights & 1 ? start + len : 0;
        q->maps[i].write_end = rights & 2 ? start + len : 0;
        q->maps[i].base = blocks[i];
    }
    q->nmaps = maps;

    unsigned last_avail = (unsigned)take(&in, 2), used_idx = (unsigned)take(&in, 2);
    unsigned count = (unsigned)(take(&in, 1) % (qsize + 2));
    uint64_t sequence = take(&in, 8);
    unsigned before_avail = last_avail, before_used = used_idx;
    unsigned served = fp_run(q, count, &last_avail, &used_idx, &sequence);
    chains += served + (served < count);
    unsigned pushed = served - engine.count;
    staged += engine.count;
    if (served > count || served > qsize || last_avail > 0xFFFF || used_idx > 0xFFFF
        || engine.count > served || q->pending != engine.count
        || engine.kicks != (engine.count != 0)
        || last_avail != ((before_avail + served) & 0xFFFF)
        || used_idx != ((before_used + pushed) & 0xFFFF))
        abort();
    for (unsigned i = 0; i < engine.count; i++) {
        int ok = !(take(&in, 1) & 1);
        unsigned at = used_idx;
        pushed += (unsigned)fp_finish(q, engine.staged[i], ok, 0, &used_idx);
        if (used_idx != ((at + (unsigned)ok) & 0xFFFF))
            abort();
    }
    if (q->pending)
        abort();
    uint64_t counted = 0;
    for (int op = 0; op < 3; op++) {
        const uint64_t *cells = stats + op * FP_STAT_TYPE_CELLS;
        uint64_t in_buckets = 0;
        for (int b = 0; b <= FP_LAT_BOUNDS; b++)
            in_buckets += cells[3 + b];
        if (in_buckets != cells[0] || (op == FP_OP_FLUSH && cells[1]))
            abort();
        counted += cells[0];
    }
    if (counted != pushed)
        abort();
    for (unsigned i = 0; i < pushed; i++)
        if (used[1 + 2 * ((before_used + i) & q->mask)] >= qsize)
            abort();
    fp_retire(q, (unsigned)take(&in, 2), used_idx);
    if (q->nreturned > engine.count)
        abort();
    free(q->returned);
    free(q->jobs);

    for (int i = 0; i < maps; i++)
        free(blocks[i]);
    free(slots);
    free(used);
    free(avail);
    free(desc);
    free(capacity);
    free(q);
}

static void setup(void)
{
    if (memfd < 0) {
        memfd = memfd_create("fastpath-fuzz", MFD_CLOEXEC);
        if (memfd < 0 || ftruncate(memfd, 1 << 20) < 0) {
            perror("memfd");
            exit(2);
        }
    }
}

#ifndef FP_STANDALONE

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

__attribute__((destructor)) static void report(void)
{
    fprintf(stderr, "fastpath_fuzz: %llu chains, %llu staged\n", chains, staged);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    setup();
    run_one(data, size);
    return 0;
}

#else

/* xorshift64*: the standalone driver's randomness, reproducible from its seed. */
static uint64_t rng;
static uint64_t next(void)
{
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ull;
}

/* A well-formed input: requests laid out as drivers do, in one read-write mapping. */
static size_t seed_input(uint8_t *buf, size_t cap)
{
    struct fp_desc desc[MAX_QSIZE] = {{0}};
    uint16_t avail[3 + MAX_QSIZE] = {0};
    size_t at = 0;
#define PUT(value, bytes)                                        \
    do {                                                         \
        uint64_t v_ = (uint64_t)(value);                         \
        for (unsigned i_ = 0; i_ < (bytes) && at < cap; i_++)    \
            buf[at++] = (uint8_t)(v_ >> (8 * i_));              \
    } while (0)
    uint32_t qsize = 64;
    PUT(6, 1);                              /* 1 << 6 = 64 */
    PUT(1 | (1 << 3) | (1 << 4) | (1 << 5), 1); /* indirect, fd, writes, flush */
    static unsigned made;
    if (made++ & 1) {                       /* every other seed: the engine, 1 KiB up */
        PUT(2, 1);
        PUT(1, 1);
    } else {
        PUT(1, 1);                          /* submit_min: none */
        PUT(0, 1);
    }
    PUT(1 << 20, 4);                        /* 512 MiB */
    unsigned chains_laid = 1 + (unsigned)(next() % 21), slot = 0;
    /* headers and status bytes in the mapping's first page (the input's bytes), data after */
    uint8_t page[4096];
    for (unsigned i = 0; i < sizeof(page); i++)
        page[i] = (uint8_t)next();
    uint64_t data = 4096;
    for (unsigned c = 0; c < chains_laid && slot + 3 <= qsize; c++) {
        uint32_t kind = (uint32_t)(next() % 3); /* 0 in, 1 out, 2 flush */
        uint32_t type = kind == 2 ? FP_BLK_T_FLUSH : kind;
        uint64_t sector = (next() % 1024) * 8, header = 64 + 32 * c, status = header + 16;
        memcpy(page + header, &type, 4);
        memset(page + header + 4, 0, 4);
        memcpy(page + header + 8, &sector, 8);
        avail[2 + c] = (uint16_t)slot;
        desc[slot] = (struct fp_desc){header, 16, FP_DESC_F_NEXT, (uint16_t)(slot + 1)};
        if (kind == 2) {
            desc[slot + 1] = (struct fp_desc){status, 1, FP_DESC_F_WRITE, 0};
            slot += 2;
            continue;
        }
        uint16_t dflags = FP_DESC_F_NEXT | (kind == 0 ? FP_DESC_F_WRITE : 0);
        desc[slot + 1] = (struct fp_desc){data, 1024, dflags, (uint16_t)(slot + 2)};
        data += 1024;
        desc[slot + 2] = (struct fp_desc){status, 1, FP_DESC_F_WRITE, 0};
        slot += 3;
    }
    avail[1] = (uint16_t)chains_laid;
    for (unsigned i = 0; i < qsize * sizeof(struct fp_desc) && at < cap; i++)
        buf[at++] = ((uint8_t *)desc)[i];
    for (unsigned i = 0; i < 6 + 2 * qsize && at < cap; i++)
        buf[at++] = ((uint8_t *)avail)[i];
    PUT(1, 1);            /* one mapping */
    PUT(data, 2);         /* its length */
    PUT(0, 1);            /* start: take 8 bytes */
    PUT(0, 8);            /* at guest address 0 */
    PUT(2, 1);            /* rights 3: read and write */
    for (unsigned i = 0; i < sizeof(page) && at < cap; i++)
        buf[at++] = page[i];
    PUT(0, 2);            /* last_avail */
    PUT(0, 2);            /* used_idx */
    PUT(chains_laid, 1);  /* count */
    PUT(1, 8);            /* sequence */
    PUT(0, 2);            /* retire from */
#undef PUT
    return at;
}

/* `fastpath_fuzz seeds DIR N`: write N well-formed inputs to DIR (libFuzzer's corpus). */
static int write_seeds(const char *dir, unsigned n)
{
    static uint8_t buf[16384];
    for (unsigned i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof(path), "%s/seed-%04u", dir, i);
        FILE *f = fopen(path, "wb");
        if (f == NULL) {
            perror(path);
            return 2;
        }
        size_t size = seed_input(buf, sizeof(buf));
        if (fwrite(buf, 1, size, f) != size || fclose(f) != 0) {
            perror(path);
            return 2;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "seeds") == 0) {
        rng = 0x9E3779B97F4A7C15ull;
        return write_seeds(argv[2], (unsigned)strtoul(argv[3], NULL, 0));
    }
    unsigned long long runs = argc > 1 ? strtoull(argv[1], NULL, 0) : 100000;
    rng = argc > 2 ? strtoull(argv[2], NULL, 0) | 1 : 0x9E3779B97F4A7C15ull;
    setup();
    static uint8_t buf[16384];
    for (unsigned long long r = 0; r < runs; r++) {
        size_t size = seed_input(buf, sizeof(buf));
        unsigned flips = (unsigned)(next() % 4); /* 0: the valid input itself */
        for (unsigned f = 0; f < flips; f++) {
            size_t at = next() % size;
            switch (next() % 4) {
            case 0: buf[at] ^= (uint8_t)(1u << (next() % 8)); break;
            case 1: buf[at] = (uint8_t)next(); break;
            case 2: buf[at] = (uint8_t)(next() % 2 ? 0xFF : 0); break;
            default: size = at + 1; break; /* truncate */
            }
        }
        run_one(buf, size);
    }
    printf("fastpath_fuzz: %llu inputs, %llu chains (%llu staged), 0 findings\n", runs, chains,
           staged);
    return 0;
}

#endif
