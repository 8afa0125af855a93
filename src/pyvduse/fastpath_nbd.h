/*
 * The compiled data path's asynchronous engine for NBD targets: one connection per
 * queue.
 *
 * Python opens and negotiates the connection (pyvduse.backends.nbd.connect(), simple
 * replies only) and hands a duplicate of its socket over; from then on the socket is
 * this engine's. fp_run() stages the queue's reads, writes and flushes, kick() sends
 * them from the queue's thread (the whole batch in as few sendmsg calls as the
 * iovec limit allows), and a reader thread of the engine's own receives the replies:
 * read data goes straight into the request's buffers, and the finished heads are
 * queued for whoever holds the ring lock to reap (fp_finish()), the engine's eventfd
 * waking the queue's thread for them.
 *
 * Whatever goes wrong fails the requests concerned, which go back to the Python path
 * to be served again from their chains by the Python NBD client, with its own
 * reconnection, retry timeout and error reporting:
 *   - a reply with an error: that request;
 *   - a lost connection, a send that fails, or a reply that breaks the protocol (a
 *     bad magic, a handle not in flight): every request in flight, and from then on
 *     the engine refuses new requests (`broken`, `why` says why) until Python
 *     attaches a new connection (fp_nbd_attach()).
 *
 * The handle of a request is its head (unique while it is in flight); a reply is
 * only accepted for a head the engine sent and has no reply for yet, so a hostile
 * or confused server can neither complete a request twice nor write into buffers
 * that are not in flight.
 */
#ifndef PYVDUSE_FASTPATH_NBD_H
#define PYVDUSE_FASTPATH_NBD_H

#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/socket.h>
#include <time.h>

#include "fastpath_core.h"
#include "fastpath_done.h"

#define FP_NBD_REQUEST_MAGIC 0x25609513u
#define FP_NBD_SIMPLE_REPLY_MAGIC 0x67446698u
#define FP_NBD_CMD_READ 0u
#define FP_NBD_CMD_WRITE 1u
#define FP_NBD_CMD_FLUSH 3u
#define FP_NBD_REQUEST 28u
#define FP_NBD_REPLY 16u
#define FP_NBD_IOV_MAX 1024       /* iovecs per sendmsg (the kernel's UIO_MAXIOV) */

struct fp_nbd {
    struct fp_queue *q;
    unsigned size;
    int sock; /* -1 once closed */
    uint64_t max_payload;
    int flush_supported;
    pthread_t reader;
    int reader_running;       /* started and not joined yet */
    struct fp_done_list list; /* finished heads; its lock guards what follows too */
    /* under list.lock */
    unsigned char *sent; /* [size] the request went to the socket; its reply is due */
    int broken;
    char why[160];
    /* the queue thread's */
    uint32_t *staged; /* [size] heads staged since the last kick */
    unsigned nstaged;
    unsigned char (*headers)[FP_NBD_REQUEST]; /* [size] */
    struct iovec *sendv;                      /* [FP_NBD_IOV_MAX] scratch for kick */
};

static void fp_nbd_put32(unsigned char *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

static void fp_nbd_put64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)v;
}

static uint64_t fp_nbd_get(const unsigned char *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | p[i];
    return v;
}

/* Move the iovecs (*iov, *cnt of them) past `done` bytes moved (a partial one advanced
 * in place), and past any empty buffers after them. */
static void fp_nbd_advance(struct iovec **iov, int *cnt, size_t done)
{
    while (*cnt > 0 && (done || (*iov)->iov_len == 0)) {
        if (done >= (*iov)->iov_len) {
            done -= (*iov)->iov_len;
            (*iov)++;
            (*cnt)--;
        } else {
            (*iov)->iov_base = (char *)(*iov)->iov_base + done;
            (*iov)->iov_len -= done;
            done = 0;
        }
    }
}

/* Receive exactly `len` bytes into iov[0..cnt) (a scratch copy: it is advanced); 0, or
 * -1 with `why` set. */
static int fp_nbd_recv(int sock, struct iovec *iov, int cnt, uint64_t len, char *why,
                       size_t why_len)
{
    while (len) {
        ssize_t got = readv(sock, iov, cnt > FP_NBD_IOV_MAX ? FP_NBD_IOV_MAX : cnt);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            snprintf(why, why_len, "%s", got == 0 ? "the server closed the connection"
                                                  : strerror(errno));
            return -1;
        }
        len -= (uint64_t)got;
        fp_nbd_advance(&iov, &cnt, (size_t)got);
    }
    return 0;
}

/* The reader thread: replies until the connection ends or breaks the protocol; then
 * every request in flight fails and the engine is broken. */
static void *fp_nbd_reader(void *arg)
{
    struct fp_nbd *n = arg;
    struct fp_queue *q = n->q;
    char why[sizeof(n->why)];
    struct iovec *scratch = malloc(FP_MAX_SEGMENTS * sizeof(*scratch));
    snprintf(why, sizeof(why), "out of memory");
    while (scratch != NULL) {
        unsigned char reply[FP_NBD_REPLY];
        struct iovec header = {.iov_base = reply, .iov_len = sizeof(reply)};
        if (fp_nbd_recv(n->sock, &header, 1, sizeof(reply), why, sizeof(why)) < 0)
            break;
        uint32_t magic = (uint32_t)fp_nbd_get(reply, 4);
        uint32_t error = (uint32_t)fp_nbd_get(reply + 4, 4);
        uint64_t handle = fp_nbd_get(reply + 8, 8);
        if (magic != FP_NBD_SIMPLE_REPLY_MAGIC) {
            snprintf(why, sizeof(why), "bad reply magic %#x", magic);
            break;
        }
        pthread_mutex_lock(&n->list.lock);
        int due = handle < n->size && n->sent[handle];
        pthread_mutex_unlock(&n->list.lock);
        if (!due) {
            snprintf(why, sizeof(why), "reply for handle %#llx, not in flight",
                     (unsigned long long)handle);
            break;
        }
        /* The job was written before kick() marked it sent (under the lock). */
        const struct fp_job *job = &q->jobs[handle];
        if (!error && job->op == FP_OP_READ) {
            memcpy(scratch, job->iov, (size_t)job->n * sizeof(*scratch));
            if (fp_nbd_recv(n->sock, scratch, job->n, job->length, why, sizeof(why)) < 0)
                break; /* failed below with the rest: its buffers may hold part of it */
        }
        pthread_mutex_lock(&n->list.lock);
        n->sent[handle] = 0;
        fp_done_push_locked(&n->list, (uint32_t)handle, !error);
        fp_done_retire_locked(&n->list, 1);
        pthread_mutex_unlock(&n->list.lock);
        fp_done_signal(&n->list);
    }
    free(scratch);
    pthread_mutex_lock(&n->list.lock);
    if (!n->broken) {
        n->broken = 1;
        memcpy(n->why, why, sizeof(why));
    }
    for (unsigned head = 0; head < n->size; head++) {
        if (n->sent[head]) {
            n->sent[head] = 0;
            fp_done_push_locked(&n->list, head, 0);
        }
    }
    fp_done_retire_locked(&n->list, n->list.inflight);
    pthread_mutex_unlock(&n->list.lock);
    fp_done_signal(&n->list);
    return NULL;
}

/* Mark the connection broken (first reason wins) and wake the reader, which fails
 * what is in flight. */
static void fp_nbd_break(struct fp_nbd *n, const char *why)
{
    pthread_mutex_lock(&n->list.lock);
    if (!n->broken) {
        n->broken = 1;
        snprintf(n->why, sizeof(n->why), "%s", why);
    }
    pthread_mutex_unlock(&n->list.lock);
    if (n->sock >= 0)
        shutdown(n->sock, SHUT_RDWR);
}

/* Start serving connection `sock` (the engine's from now on); 0, or -1 with errno. */
static int fp_nbd_start(struct fp_nbd *n, int sock)
{
    n->sock = sock;
    n->broken = 0;
    n->why[0] = 0;
    int rc = pthread_create(&n->reader, NULL, fp_nbd_reader, n);
    if (rc != 0) {
        n->broken = 1;
        snprintf(n->why, sizeof(n->why), "cannot start the reader thread: %s", strerror(rc));
        errno = rc;
        return -1;
    }
    n->reader_running = 1;
    return 0;
}

/* Stop the connection: the socket shut, the reader joined (what was in flight has
 * failed into done[]), the socket closed. Nothing moves into any buffer after this. */
static void fp_nbd_stop(struct fp_nbd *n)
{
    if (n->reader_running) {
        fp_nbd_break(n, "the queue stopped");
        pthread_join(n->reader, NULL);
        n->reader_running = 0;
    }
    if (n->sock >= 0) {
        close(n->sock);
        n->sock = -1;
    }
}

static void fp_nbd_free(struct fp_nbd *n)
{
    fp_nbd_stop(n);
    free(n->sent);
    free(n->staged);
    free(n->headers);
    free(n->sendv);
    fp_done_destroy(&n->list);
    free(n);
}

/* A new engine for queue `q` on connection `sock`; NULL with errno (sock not taken). */
static struct fp_nbd *fp_nbd_open(struct fp_queue *q, int sock, int event_fd,
                                  uint64_t max_payload, int flush_supported)
{
    struct fp_nbd *n = calloc(1, sizeof(*n));
    if (n == NULL)
        return NULL;
    n->q = q;
    n->size = q->size;
    n->sock = -1;
    n->max_payload = max_payload;
    n->flush_supported = flush_supported;
    int listed = fp_done_init(&n->list, n->size, event_fd);
    n->sent = calloc(n->size, 1);
    n->staged = calloc(n->size, sizeof(*n->staged));
    n->headers = calloc(n->size, sizeof(*n->headers));
    n->sendv = calloc(FP_NBD_IOV_MAX, sizeof(*n->sendv));
    if (listed < 0 || n->sent == NULL || n->staged == NULL || n->headers == NULL
        || n->sendv == NULL) {
        fp_nbd_free(n);
        errno = ENOMEM;
        return NULL;
    }
    if (fp_nbd_start(n, sock) < 0) {
        int saved = errno;
        n->sock = -1; /* not ours after all */
        fp_nbd_free(n);
        errno = saved;
        return NULL;
    }
    return n;
}

/*
 * Replace a broken connection with `sock` (taken on success). Only between runs, with
 * nothing in flight: the old reader is joined first. 0, or -1 with errno (EBUSY: the
 * old connection still works or has requests in flight).
 */
static int fp_nbd_attach(struct fp_nbd *n, int sock)
{
    pthread_mutex_lock(&n->list.lock);
    int busy = !n->broken || n->list.inflight;
    pthread_mutex_unlock(&n->list.lock);
    if (busy) {
        errno = EBUSY;
        return -1;
    }
    fp_nbd_stop(n);
    return fp_nbd_start(n, sock);
}

/* fp_engine.stage: the request header of jobs[head], to go out with the next kick. */
static int fp_nbd_stage(struct fp_queue *q, uint32_t head)
{
    struct fp_nbd *n = q->engine.ctx;
    const struct fp_job *job = &q->jobs[head];
    if (__atomic_load_n(&n->broken, __ATOMIC_ACQUIRE))
        return -1;
    uint32_t type;
    if (job->op == FP_OP_FLUSH) {
        if (!n->flush_supported)
            return -1;
        type = FP_NBD_CMD_FLUSH;
    } else {
        if (job->length == 0 || job->length > n->max_payload)
            return -1;
        type = job->op == FP_OP_WRITE ? FP_NBD_CMD_WRITE : FP_NBD_CMD_READ;
    }
    unsigned char *h = n->headers[head];
    fp_nbd_put32(h, FP_NBD_REQUEST_MAGIC);
    fp_nbd_put32(h + 4, type); /* flags 0 (u16), then the type (u16) */
    fp_nbd_put64(h + 8, head);
    fp_nbd_put64(h + 16, job->offset);
    fp_nbd_put32(h + 24, (uint32_t)job->length);
    n->staged[n->nstaged++] = head;
    return 0;
}

/* Send iov[0..cnt) whole (it is advanced); 0, or -1 with errno. */
static int fp_nbd_send(int sock, struct iovec *iov, int cnt)
{
    while (cnt > 0) {
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
        ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0)
            return -1;
        fp_nbd_advance(&iov, &cnt, (size_t)sent);
    }
    return 0;
}

/*
 * fp_engine.kick: send what was staged. The heads are marked in flight before the
 * first byte goes out (their replies may come before sendmsg returns); if the engine
 * broke meanwhile they fail at once instead.
 */
static void fp_nbd_kick(struct fp_queue *q)
{
    struct fp_nbd *n = q->engine.ctx;
    if (!n->nstaged)
        return;
    pthread_mutex_lock(&n->list.lock);
    int broken = n->broken;
    for (unsigned i = 0; i < n->nstaged; i++) {
        if (broken) {
            fp_done_push_locked(&n->list, n->staged[i], 0);
        } else {
            n->sent[n->staged[i]] = 1;
            n->list.inflight++;
        }
    }
    pthread_mutex_unlock(&n->list.lock);
    if (broken) {
        n->nstaged = 0;
        fp_done_signal(&n->list);
        return;
    }
    int cnt = 0;
    for (unsigned i = 0; i < n->nstaged; i++) {
        const struct fp_job *job = &q->jobs[n->staged[i]];
        int need = 1 + (job->op == FP_OP_WRITE ? job->n : 0);
        if (cnt + need > FP_NBD_IOV_MAX) {
            if (fp_nbd_send(n->sock, n->sendv, cnt) < 0)
                goto failed;
            cnt = 0;
        }
        n->sendv[cnt].iov_base = n->headers[n->staged[i]];
        n->sendv[cnt++].iov_len = FP_NBD_REQUEST;
        if (job->op == FP_OP_WRITE) {
            memcpy(n->sendv + cnt, job->iov, (size_t)job->n * sizeof(*job->iov));
            cnt += job->n;
        }
    }
    if (cnt && fp_nbd_send(n->sock, n->sendv, cnt) < 0)
        goto failed;
    n->nstaged = 0;
    return;
failed:;
    char why[96];
    snprintf(why, sizeof(why), "send: %s", strerror(errno));
    fp_nbd_break(n, why); /* the reader fails everything in flight */
    n->nstaged = 0;
}

/* fp_engine.reap */
static unsigned fp_nbd_reap(struct fp_queue *q, unsigned *used_idx)
{
    struct fp_nbd *n = q->engine.ctx;
    return fp_done_reap(&n->list, q, 0, used_idx);
}

/* fp_engine.ready */
static int fp_nbd_ready(struct fp_queue *q)
{
    struct fp_nbd *n = q->engine.ctx;
    return fp_done_ready(&n->list);
}

/* Whether the engine refuses requests, and why (copied into why[why_len]). */
static int fp_nbd_broken(struct fp_nbd *n, char *why, size_t why_len)
{
    pthread_mutex_lock(&n->list.lock);
    int broken = n->broken;
    snprintf(why, why_len, "%s", n->why);
    pthread_mutex_unlock(&n->list.lock);
    return broken;
}

#endif /* PYVDUSE_FASTPATH_NBD_H */
