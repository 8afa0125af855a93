/*
 * blkio_load: a small load generator on libblkio, for vhost-user-blk and vhost-vdpa devices.
 *
 *   blkio_load --driver virtio-blk-vhost-user --path SOCKET
 *              [--rw randread|randwrite|read|write] [--bs BYTES] [--iodepth N]
 *              [--seconds S] [--wait block|loop] [--queue-size N] [--size BYTES]
 *
 * Keeps --iodepth requests of --bs bytes in flight on queue 0 for --seconds
 * seconds: at random --bs-aligned offsets (randread, randwrite) or one after
 * the other, wrapping at the end (read, write), within the first --size bytes
 * of the device (default: all of it). Every completion is replaced by a new
 * request at once.
 *
 * --wait block: blkioq_do_io(min_completions = 1) sleeps until a completion
 * arrives (the device's interrupt wakes it); --wait loop: blkioq_do_io with
 * min_completions = 0 in a busy loop (no interrupts needed, one CPU spent).
 * QD1 results depend more on this than on the device: always report it.
 *
 * Prints one JSON object on one line: the parameters, "completions",
 * "errors" (failed requests; the first failure's errno goes to stderr), the
 * elapsed "seconds", "iops", "mib_s", "lat_us_mean" (submission to
 * completion as the client sees it) and the client's CPU use ("cpu_usr",
 * "cpu_sys", in % of one CPU). Exit status 0 if the run completed (even with
 * failed requests), 1 if libblkio failed to set up or to do I/O, 2 for bad
 * arguments.
 *
 * Build: bench/blkio_load.py does it (gcc against build/blkio/root, see
 * scripts/setup-blkio).
 */
#define _GNU_SOURCE
#include <blkio.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

struct slot {
    uint64_t offset;
    double submitted;
};

struct job {
    const char *driver, *path, *rw, *wait;
    uint64_t bs, size, next_offset, rng;
    int iodepth, queue_size, random, write, loop;
    double seconds;
    struct blkioq *q;
    char *buf;
    struct slot *slots;
};

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double cpu_seconds(const struct timeval *tv)
{
    return (double)tv->tv_sec + (double)tv->tv_usec / 1e6;
}

static int fail(const char *what, int ret)
{
    fprintf(stderr, "blkio_load: %s: %s (%s)\n", what, blkio_get_error_msg(), strerror(-ret));
    return 1;
}

/* xorshift64*: fast and good enough to spread offsets */
static uint64_t next_random(struct job *j)
{
    j->rng ^= j->rng >> 12;
    j->rng ^= j->rng << 25;
    j->rng ^= j->rng >> 27;
    return j->rng * 2685821657736338717ULL;
}

static void submit(struct job *j, int i)
{
    uint64_t blocks = j->size / j->bs, offset;
    if (j->random) {
        offset = next_random(j) % blocks * j->bs;
    } else {
        offset = j->next_offset;
        j->next_offset = offset + j->bs >= blocks * j->bs ? 0 : offset + j->bs;
    }
    char *buf = j->buf + (size_t)i * j->bs;
    j->slots[i].offset = offset;
    j->slots[i].submitted = now();
    if (j->write)
        blkioq_write(j->q, offset, buf, j->bs, (void *)(uintptr_t)i, 0);
    else
        blkioq_read(j->q, offset, buf, j->bs, (void *)(uintptr_t)i, 0);
}

static void print_json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || end == s)
        return -1;
    switch (*end) {
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: break;
    }
    if (*end)
        return -1;
    *out = v;
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: blkio_load --driver DRIVER --path PATH [--rw randread|randwrite|read|write]\n"
            "                  [--bs BYTES] [--iodepth N] [--seconds S] [--wait block|loop]\n"
            "                  [--queue-size N] [--size BYTES]\n");
}

int main(int argc, char **argv)
{
    struct job j = {
        .rw = "randread", .wait = "block", .bs = 4096, .iodepth = 1, .seconds = 5.0,
        .rng = 0x9e3779b97f4a7c15ULL,
    };
    static const struct option options[] = {
        {"driver", required_argument, 0, 'd'}, {"path", required_argument, 0, 'p'},
        {"rw", required_argument, 0, 'r'}, {"bs", required_argument, 0, 'b'},
        {"iodepth", required_argument, 0, 'q'}, {"seconds", required_argument, 0, 't'},
        {"wait", required_argument, 0, 'w'}, {"queue-size", required_argument, 0, 'Q'},
        {"size", required_argument, 0, 's'}, {"help", no_argument, 0, 'h'}, {0, 0, 0, 0},
    };
    int c;
    uint64_t v;
    while ((c = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (c) {
        case 'd': j.driver = optarg; break;
        case 'p': j.path = optarg; break;
        case 'r': j.rw = optarg; break;
        case 'w': j.wait = optarg; break;
        case 'b':
            if (parse_u64(optarg, &j.bs) || j.bs == 0 || j.bs % 512) {
                fprintf(stderr, "blkio_load: --bs must be a positive multiple of 512\n");
                return 2;
            }
            break;
        case 's':
            if (parse_u64(optarg, &j.size)) {
                fprintf(stderr, "blkio_load: bad --size\n");
                return 2;
            }
            break;
        case 'q':
            if (parse_u64(optarg, &v) || v < 1 || v > 65536) {
                fprintf(stderr, "blkio_load: --iodepth must be 1..65536\n");
                return 2;
            }
            j.iodepth = (int)v;
            break;
        case 'Q':
            if (parse_u64(optarg, &v) || v < 1 || v > 32768) {
                fprintf(stderr, "blkio_load: --queue-size must be 1..32768\n");
                return 2;
            }
            j.queue_size = (int)v;
            break;
        case 't':
            j.seconds = atof(optarg);
            if (!(j.seconds > 0)) {
                fprintf(stderr, "blkio_load: --seconds must be positive\n");
                return 2;
            }
            break;
        case 'h': usage(); return 0;
        default: usage(); return 2;
        }
    }
    if (!j.driver || !j.path || optind != argc) {
        usage();
        return 2;
    }
    if (!strcmp(j.rw, "randread")) j.random = 1;
    else if (!strcmp(j.rw, "randwrite")) j.random = 1, j.write = 1;
    else if (!strcmp(j.rw, "write")) j.write = 1;
    else if (strcmp(j.rw, "read")) {
        fprintf(stderr, "blkio_load: --rw must be randread, randwrite, read or write\n");
        return 2;
    }
    if (!strcmp(j.wait, "loop")) j.loop = 1;
    else if (strcmp(j.wait, "block")) {
        fprintf(stderr, "blkio_load: --wait must be block or loop\n");
        return 2;
    }

    struct blkio *b;
    int ret;
    if ((ret = blkio_create(j.driver, &b)) < 0)
        return fail("blkio_create", ret);
    if ((ret = blkio_set_str(b, "path", j.path)) < 0)
        return fail("set path", ret);
    if ((ret = blkio_connect(b)) < 0)
        return fail("connect", ret);
    if (j.queue_size && (ret = blkio_set_int(b, "queue-size", j.queue_size)) < 0)
        return fail("set queue-size", ret);
    uint64_t capacity, align;
    if ((ret = blkio_get_uint64(b, "capacity", &capacity)) < 0)
        return fail("get capacity", ret);
    if ((ret = blkio_get_uint64(b, "mem-region-alignment", &align)) < 0)
        return fail("get mem-region-alignment", ret);
    if ((ret = blkio_start(b)) < 0)
        return fail("start", ret);
    if (!j.size || j.size > capacity)
        j.size = capacity;
    if (j.size < j.bs) {
        fprintf(stderr, "blkio_load: the device (%" PRIu64 " bytes) is smaller than --bs\n",
                j.size);
        return 1;
    }
    j.q = blkio_get_queue(b, 0);
    if (!j.q)
        return fail("get queue 0", -ENOENT);

    struct blkio_mem_region region;
    size_t length = (size_t)j.bs * (size_t)j.iodepth;
    if (align > 1)
        length = (length + align - 1) / align * align;
    if ((ret = blkio_alloc_mem_region(b, &region, length)) < 0)
        return fail("alloc mem region", ret);
    if ((ret = blkio_map_mem_region(b, &region)) < 0)
        return fail("map mem region", ret);
    j.buf = region.addr;
    for (size_t i = 0; i < length; i++)
        j.buf[i] = (char)(i * 7 + 1);
    j.slots = calloc((size_t)j.iodepth, sizeof *j.slots);
    struct blkio_completion *done = calloc((size_t)j.iodepth, sizeof *done);
    if (!j.slots || !done) {
        fprintf(stderr, "blkio_load: out of memory\n");
        return 1;
    }

    uint64_t completions = 0, errors = 0;
    double latency = 0, t0, t1, deadline;
    struct rusage r0, r1;
    int in_flight = j.iodepth, stopping = 0;
    getrusage(RUSAGE_SELF, &r0);
    t0 = now();
    deadline = t0 + j.seconds;
    for (int i = 0; i < j.iodepth; i++)
        submit(&j, i);
    while (in_flight > 0) {
        int n = blkioq_do_io(j.q, done, j.loop ? 0 : 1, in_flight, NULL);
        if (n < 0)
            return fail("blkioq_do_io", n);
        if (n == 0)
            continue;
        double t = now();
        if (t >= deadline)
            stopping = 1;
        for (int k = 0; k < n; k++) {
            int i = (int)(uintptr_t)done[k].user_data;
            completions++;
            latency += t - j.slots[i].submitted;
            if (done[k].ret != 0) {
                if (errors++ == 0)
                    fprintf(stderr, "blkio_load: %s of %" PRIu64 " bytes at %" PRIu64
                            " failed: %s%s%s\n", j.write ? "write" : "read", j.bs,
                            j.slots[i].offset, strerror(-done[k].ret),
                            done[k].error_msg ? ": " : "",
                            done[k].error_msg ? done[k].error_msg : "");
            }
            if (stopping)
                in_flight--;
            else
                submit(&j, i);
        }
    }
    t1 = now();
    getrusage(RUSAGE_SELF, &r1);
    double elapsed = t1 - t0;
    double usr = cpu_seconds(&r1.ru_utime) - cpu_seconds(&r0.ru_utime);
    double sys = cpu_seconds(&r1.ru_stime) - cpu_seconds(&r0.ru_stime);
    printf("{\"driver\": ");
    print_json_string(j.driver);
    printf(", \"path\": ");
    print_json_string(j.path);
    printf(", \"rw\": \"%s\", \"bs\": %" PRIu64
           ", \"iodepth\": %d, \"mode\": \"%s\", \"size\": %" PRIu64
           ", \"seconds\": %.6f, \"completions\": %" PRIu64 ", \"errors\": %" PRIu64
           ", \"iops\": %.1f, \"mib_s\": %.3f, \"lat_us_mean\": %.3f"
           ", \"cpu_usr\": %.1f, \"cpu_sys\": %.1f}\n",
           j.rw, j.bs, j.iodepth, j.wait, j.size, elapsed, completions,
           errors, (double)completions / elapsed,
           (double)completions * (double)j.bs / elapsed / (1 << 20),
           completions ? latency / (double)completions * 1e6 : 0.0,
           100 * usr / elapsed, 100 * sys / elapsed);
    free(done);
    free(j.slots);
    blkio_destroy(&b);
    return 0;
}
