/*
 * The compiled data path's asynchronous engine for RBD targets: librbd's AIO calls on
 * an image handle of the native path's own.
 *
 * librados and librbd are loaded at run time (dlopen of librados.so.2 and librbd.so.1,
 * their stable C ABI declared below), so building pyvduse needs neither library nor
 * its headers, and a machine without them simply keeps RBD on the Python path.
 *
 * fp_rbd_image_open() connects to the cluster and opens the image once per export
 * (the handle is shared by the export's queues: librbd's AIO calls are thread-safe).
 * Each queue then has an engine: fp_run() stages its reads, writes and flushes,
 * kick() starts each with rbd_aio_readv / rbd_aio_writev / rbd_aio_flush straight on
 * the driver's buffers, and librbd's callback (on one of its own threads) queues the
 * finished head for whoever holds the ring lock to reap (fp_finish()), the engine's
 * eventfd waking the queue's thread for them.
 *
 * A request that fails (a negative result, a short read, a call librbd refused) goes
 * back to the Python path, whose rbd backend serves it again and reports the error.
 * Nothing here retries: librados resends to OSDs that come back.
 */
#ifndef PYVDUSE_FASTPATH_RBD_H
#define PYVDUSE_FASTPATH_RBD_H

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/types.h>

#include "fastpath_core.h"
#include "fastpath_done.h"

typedef void *fp_rados_t;
typedef void *fp_ioctx_t;
typedef void *fp_image_t;
typedef void *fp_completion_t;
typedef void (*fp_rbd_callback_t)(fp_completion_t c, void *arg);

/* The functions of librados.so.2 and librbd.so.1 the engine calls. */
struct fp_librbd {
    int (*rados_create)(fp_rados_t *cluster, const char *id);
    int (*rados_conf_read_file)(fp_rados_t cluster, const char *path);
    int (*rados_conf_set)(fp_rados_t cluster, const char *option, const char *value);
    int (*rados_connect)(fp_rados_t cluster);
    void (*rados_shutdown)(fp_rados_t cluster);
    int (*rados_ioctx_create)(fp_rados_t cluster, const char *pool, fp_ioctx_t *ioctx);
    void (*rados_ioctx_destroy)(fp_ioctx_t ioctx);
    void (*rados_ioctx_set_namespace)(fp_ioctx_t ioctx, const char *nspace);
    int (*rbd_open)(fp_ioctx_t io, const char *name, fp_image_t *image, const char *snap);
    int (*rbd_open_read_only)(fp_ioctx_t io, const char *name, fp_image_t *image,
                              const char *snap);
    int (*rbd_close)(fp_image_t image);
    int (*rbd_aio_create_completion)(void *arg, fp_rbd_callback_t cb, fp_completion_t *c);
    ssize_t (*rbd_aio_get_return_value)(fp_completion_t c);
    void (*rbd_aio_release)(fp_completion_t c);
    int (*rbd_aio_readv)(fp_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                         fp_completion_t c);
    int (*rbd_aio_writev)(fp_image_t image, const struct iovec *iov, int iovcnt, uint64_t off,
                          fp_completion_t c);
    int (*rbd_aio_flush)(fp_image_t image, fp_completion_t c);
};

static struct fp_librbd fp_lib;
static char fp_lib_error[256];
static pthread_once_t fp_lib_once = PTHREAD_ONCE_INIT;
static int fp_lib_loaded;

static void fp_lib_load(void)
{
    void *rados = dlopen("librados.so.2", RTLD_NOW | RTLD_GLOBAL);
    void *rbd = rados != NULL ? dlopen("librbd.so.1", RTLD_NOW | RTLD_GLOBAL) : NULL;
    if (rbd == NULL) {
        const char *why = dlerror();
        snprintf(fp_lib_error, sizeof(fp_lib_error), "%s", why != NULL ? why : "dlopen failed");
        return;
    }
    struct {
        void *lib;
        const char *name;
        void **slot;
    } table[] = {
#define FP_SYM(lib, name) {lib, #name, (void **)&fp_lib.name}
        FP_SYM(rados, rados_create),
        FP_SYM(rados, rados_conf_read_file),
        FP_SYM(rados, rados_conf_set),
        FP_SYM(rados, rados_connect),
        FP_SYM(rados, rados_shutdown),
        FP_SYM(rados, rados_ioctx_create),
        FP_SYM(rados, rados_ioctx_destroy),
        FP_SYM(rados, rados_ioctx_set_namespace),
        FP_SYM(rbd, rbd_open),
        FP_SYM(rbd, rbd_open_read_only),
        FP_SYM(rbd, rbd_close),
        FP_SYM(rbd, rbd_aio_create_completion),
        FP_SYM(rbd, rbd_aio_get_return_value),
        FP_SYM(rbd, rbd_aio_release),
        FP_SYM(rbd, rbd_aio_readv),
        FP_SYM(rbd, rbd_aio_writev),
        FP_SYM(rbd, rbd_aio_flush),
#undef FP_SYM
    };
    for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
        *table[i].slot = dlsym(table[i].lib, table[i].name);
        if (*table[i].slot == NULL) {
            snprintf(fp_lib_error, sizeof(fp_lib_error), "librbd has no %s", table[i].name);
            return; /* the libraries stay loaded: harmless */
        }
    }
    fp_lib_loaded = 1;
}

/* Load librados and librbd once; 0, or -1 with fp_lib_error saying why. */
static int fp_lib_ready(void)
{
    pthread_once(&fp_lib_once, fp_lib_load);
    return fp_lib_loaded ? 0 : -1;
}

/* An open image: its cluster connection, pool context and handle (all NULL once
 * closed), the engines using it, and whether it closes when the last of them goes. */
struct fp_rbd_image {
    fp_rados_t cluster;
    fp_ioctx_t ioctx;
    fp_image_t image;
    int users;
    int closing;
};

/* What to open: a configuration file (NULL: librados' search; not finding one is fine
 * when `optional_conf`), options set before connecting and after opening (NULL-ended
 * key, value pairs), the client id, pool, namespace ("" for none), image, snapshot. */
struct fp_rbd_spec {
    const char *conf, *client_id, *pool, *nspace, *name, *snapshot;
    int optional_conf, readonly;
    const char *const *before, *const *after;
};

static void fp_rbd_image_close(struct fp_rbd_image *img)
{
    if (img->image != NULL)
        fp_lib.rbd_close(img->image);
    if (img->ioctx != NULL)
        fp_lib.rados_ioctx_destroy(img->ioctx);
    if (img->cluster != NULL)
        fp_lib.rados_shutdown(img->cluster);
    img->image = img->ioctx = img->cluster = NULL;
}

/* Set each option of the NULL-ended key, value array `kv`; 0, or librados' negative
 * errno with *step naming the option refused. */
static int fp_rbd_conf_set_all(fp_rados_t cluster, const char *const *kv, const char **step)
{
    for (; kv[0] != NULL; kv += 2) {
        *step = kv[0];
        int rc = fp_lib.rados_conf_set(cluster, kv[0], kv[1]);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Connect and open; 0, or a negative errno with `why` naming the step (nothing open). */
static int fp_rbd_image_open(struct fp_rbd_image *img, const struct fp_rbd_spec *spec,
                             char *why, size_t why_len)
{
    if (fp_lib_ready() < 0) {
        snprintf(why, why_len, "cannot load librbd: %s", fp_lib_error);
        return -ENOSYS;
    }
    const char *step = "creating the cluster handle";
    int rc = fp_lib.rados_create(&img->cluster, spec->client_id);
    if (rc < 0) {
        img->cluster = NULL;
        goto failed;
    }
    step = "reading the configuration";
    rc = fp_lib.rados_conf_read_file(img->cluster, spec->conf);
    if (rc < 0 && !(rc == -ENOENT && spec->optional_conf))
        goto failed;
    rc = fp_rbd_conf_set_all(img->cluster, spec->before, &step);
    if (rc < 0)
        goto failed;
    step = "connecting";
    rc = fp_lib.rados_connect(img->cluster);
    if (rc < 0)
        goto failed;
    step = "opening the pool";
    rc = fp_lib.rados_ioctx_create(img->cluster, spec->pool, &img->ioctx);
    if (rc < 0) {
        img->ioctx = NULL;
        goto failed;
    }
    if (spec->nspace[0])
        fp_lib.rados_ioctx_set_namespace(img->ioctx, spec->nspace);
    step = "opening the image";
    rc = (spec->readonly ? fp_lib.rbd_open_read_only : fp_lib.rbd_open)(
        img->ioctx, spec->name, &img->image, spec->snapshot);
    if (rc < 0) {
        img->image = NULL;
        goto failed;
    }
    rc = fp_rbd_conf_set_all(img->cluster, spec->after, &step);
    if (rc < 0)
        goto failed;
    return 0;
failed:
    snprintf(why, why_len, "%s: %s", step, strerror(-rc));
    fp_rbd_image_close(img);
    return rc;
}

struct fp_rbd;

/* What librbd's callback gets: the engine and the head (one per head, kept). */
struct fp_rbd_call {
    struct fp_rbd *engine;
    uint32_t head;
};

struct fp_rbd {
    /* The queue's jobs, not the queue: a callback that comes after the queue's object
     * is gone (its requests outlived close()) finds the jobs and the engine, which are
     * then kept for good. */
    const struct fp_job *jobs;
    fp_image_t image;
    struct fp_rbd_call *calls; /* [size] */
    struct fp_done_list list;  /* the heads librbd finished */
    /* the queue thread's */
    uint32_t *staged; /* [size] heads staged since the last kick */
    unsigned nstaged;
};

/* Queue `head` as finished (ok or failed) and wake the queue's thread. Everything
 * happens under the lock: once the last request in flight is taken off, a waiter may
 * free the engine and close the eventfd as soon as it has the lock. */
static void fp_rbd_finished(struct fp_rbd *r, uint32_t head, int ok)
{
    pthread_mutex_lock(&r->list.lock);
    fp_done_push_locked(&r->list, head, ok);
    fp_done_signal(&r->list);
    fp_done_retire_locked(&r->list, 1);
    pthread_mutex_unlock(&r->list.lock);
}

/* librbd's completion callback, on a thread of librbd's. A read succeeded only if it
 * returned every byte asked for; anything else succeeded if not negative. */
static void fp_rbd_complete(fp_completion_t c, void *arg)
{
    struct fp_rbd_call *call = arg;
    struct fp_rbd *r = call->engine;
    ssize_t ret = fp_lib.rbd_aio_get_return_value(c);
    fp_lib.rbd_aio_release(c);
    const struct fp_job *job = &r->jobs[call->head];
    int ok = job->op == FP_OP_READ ? ret >= 0 && (uint64_t)ret == job->length : ret >= 0;
    fp_rbd_finished(r, call->head, ok);
}

static void fp_rbd_free(struct fp_rbd *r)
{
    free(r->calls);
    free(r->staged);
    fp_done_destroy(&r->list);
    free(r);
}

/* A new engine for queue `q` on the open `image`; NULL with errno. */
static struct fp_rbd *fp_rbd_open(struct fp_queue *q, fp_image_t image, int event_fd)
{
    struct fp_rbd *r = calloc(1, sizeof(*r));
    if (r == NULL)
        return NULL;
    r->jobs = q->jobs;
    r->image = image;
    int listed = fp_done_init(&r->list, q->size, event_fd);
    r->calls = calloc(q->size, sizeof(*r->calls));
    r->staged = calloc(q->size, sizeof(*r->staged));
    if (listed < 0 || r->calls == NULL || r->staged == NULL) {
        fp_rbd_free(r);
        errno = ENOMEM;
        return NULL;
    }
    for (uint32_t head = 0; head < q->size; head++) {
        r->calls[head].engine = r;
        r->calls[head].head = head;
    }
    return r;
}

/* fp_engine.stage: reads and writes of at least one byte, and flushes. */
static int fp_rbd_stage(struct fp_queue *q, uint32_t head)
{
    struct fp_rbd *r = q->engine.ctx;
    const struct fp_job *job = &q->jobs[head];
    if (job->op != FP_OP_FLUSH && job->length == 0)
        return -1;
    r->staged[r->nstaged++] = head;
    return 0;
}

/* Start one staged job; librbd's result (negative: nothing started). */
static int fp_rbd_start(struct fp_rbd *r, uint32_t head)
{
    const struct fp_job *job = &r->jobs[head];
    fp_completion_t c;
    int rc = fp_lib.rbd_aio_create_completion(&r->calls[head], fp_rbd_complete, &c);
    if (rc < 0)
        return rc;
    if (job->op == FP_OP_READ)
        rc = fp_lib.rbd_aio_readv(r->image, job->iov, job->n, job->offset, c);
    else if (job->op == FP_OP_WRITE)
        rc = fp_lib.rbd_aio_writev(r->image, job->iov, job->n, job->offset, c);
    else
        rc = fp_lib.rbd_aio_flush(r->image, c);
    if (rc < 0)
        fp_lib.rbd_aio_release(c);
    return rc;
}

/* fp_engine.kick: start what was staged; a job librbd refuses fails at once. */
static void fp_rbd_kick(struct fp_queue *q)
{
    struct fp_rbd *r = q->engine.ctx;
    if (!r->nstaged)
        return;
    pthread_mutex_lock(&r->list.lock);
    r->list.inflight += r->nstaged; /* before any callback can take one off */
    pthread_mutex_unlock(&r->list.lock);
    for (unsigned i = 0; i < r->nstaged; i++) {
        if (fp_rbd_start(r, r->staged[i]) < 0)
            fp_rbd_finished(r, r->staged[i], 0);
    }
    r->nstaged = 0;
}

/* fp_engine.reap */
static unsigned fp_rbd_reap(struct fp_queue *q, unsigned *used_idx)
{
    struct fp_rbd *r = q->engine.ctx;
    return fp_done_reap(&r->list, q, 0, used_idx);
}

/* fp_engine.ready */
static int fp_rbd_ready(struct fp_queue *q)
{
    struct fp_rbd *r = q->engine.ctx;
    return fp_done_ready(&r->list);
}

#endif /* PYVDUSE_FASTPATH_RBD_H */
