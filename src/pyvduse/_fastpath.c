/*
 * pyvduse._fastpath: the compiled fast path of a split virtqueue serving virtio-blk.
 *
 * One FastPath object belongs to one queue (one QueueWorker). Its run() serves, in
 * ring order and with the GIL released, every available request that has the shape
 * of the Python fast paths (SplitQueue.pop and BlkHandler.handle) and targets a
 * backend this file can serve itself (a file descriptor, or the null disk):
 *
 *   pop the head, walk the chain (direct, or one indirect table) checking every
 *   descriptor against the mappings it was taught (learn()), parse the virtio-blk
 *   header, check the range, mark the head in the inflight log, do the I/O, write
 *   the status byte and push the used element.
 *
 * It stops, without consuming the request, at the first one it does not take:
 * any malformed chain, any buffer outside the mappings it knows, any other request
 * type or layout, any request for the backend's asynchronous path, and any I/O
 * failure (the I/O is then redone by Python, which reports it). The Python path
 * pops that request with its own code and every one of its checks, so results,
 * errors and log lines are exactly those of the pure-Python data path; run() is
 * called again for what follows. Publishing the used index, interrupts and
 * EVENT_IDX stay with the caller (once per batch).
 *
 * With `asynchronous` (the backend has a thread pool for large requests), a file
 * target's reads and writes of submit_min bytes or more and its flushes go to an
 * io_uring instead (fastpath_uring.h), one submission per run; reap() completes
 * them later, and hands back to Python any that failed: Python serves that head
 * again from its chain (QueueWorker), with its own error reporting. Without an
 * io_uring (the kernel refused one: `engine_error` says why) those requests are
 * left to Python, whose thread pool serves them.
 *
 * An NBD target (the connection's socket, negotiated by Python) sends every read,
 * write and flush through the queue's own connection (fastpath_nbd.h) and completes
 * them the same way; one that fails, and every one in flight when the connection
 * breaks, goes back to Python, whose NBD client serves it (and reconnects).
 * attach() gives a broken engine a new connection.
 *
 * An RBD target (an image opened by rbd_open(), this module's function: a handle of
 * the native path's own, shared by the export's queues) starts every read, write and
 * flush with librbd's AIO calls (fastpath_rbd.h); one that fails goes back to Python,
 * whose rbd backend serves it again.
 *
 * The ring walk, request rules and I/O are in fastpath_core.h (plain C, also built
 * into the fuzzer, fuzz/fastpath_fuzz.c); this file holds the buffers they point
 * into and the interpreter's side.
 *
 * Contract with the caller (pyvduse.native, pyvduse.queue_worker):
 *   - run() and retire() are called with the queue's ring lock held, one thread
 *     at a time; the ring positions go in and come out as plain integers.
 *   - Every buffer it was given (rings, log slots, mappings, the capacity cell) is
 *     held as a buffer export of a memoryview private to this object, so the
 *     memory stays mapped until close() (or deallocation) lets it go.
 *   - close() during a run() (a thread abandoned in a slow read) is deferred
 *     to that run's end; the run stops at once, and the completion of a request
 *     whose I/O was under way is dropped (never reaches the ring or the log).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "fastpath_core.h"
#include "fastpath_uring.h"
#include "fastpath_nbd.h"
#include "fastpath_rbd.h"
#include "fastpath_loop.h"

#include <fcntl.h>
#include <sys/eventfd.h>

#define RBD_CAPSULE "pyvduse._fastpath.rbd_image" /* rbd_open()'s result */

typedef struct {
    PyObject_HEAD
    struct fp_queue q;
    /* what q points into, held as exports of private memoryviews */
    Py_buffer desc_buf, avail_buf, used_buf, slots_buf, capacity_buf;
    Py_buffer stats_buf; /* the metrics cells, if given (q.stats) */
    Py_buffer map_bufs[FP_MAX_MAPPINGS];
    int held; /* the five ring and log buffers are held */
    struct fp_uring uring;
    int uring_open;
    struct fp_nbd *nbd; /* the NBD engine (an NBD target), or NULL */
    struct fp_rbd *rbd; /* the RBD engine (an RBD target), or NULL */
    PyObject *rbd_image; /* the RBD target's image (a capsule), held while the engine is */
    char engine_error[160];
    int next_evict;
    int running, closed;
    volatile int close_pending; /* set under the GIL by close() while run() works without it */
    unsigned long long served, fallbacks;
    volatile uint64_t looped; /* requests loop() took: stored as it goes, read any time */
    volatile unsigned live_avail; /* loop()'s next avail entry, stored as it goes */
    volatile int looping;         /* loop() runs */
} FastPath;

/* -- buffers --------------------------------------------------------------------------- */

static int take_buffer(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t need,
                       const char *what)
{
    /* A private memoryview of obj: its export, not one of obj's, pins the memory. */
    PyObject *private_view = PyMemoryView_FromObject(obj);
    if (private_view == NULL)
        return -1;
    int flags = PyBUF_ANY_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    int rc = PyObject_GetBuffer(private_view, view, flags);
    Py_DECREF(private_view); /* the export holds the view alive */
    if (rc < 0)
        return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, %zd needed", what, view->len, need);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Close an RBD image now (GIL released: librbd may wait for the cluster). */
static void rbd_image_close_now(struct fp_rbd_image *img)
{
    if (img->cluster == NULL)
        return;
    Py_BEGIN_ALLOW_THREADS
    fp_rbd_image_close(img);
    Py_END_ALLOW_THREADS
}

/* An engine stops using the image of `capsule`: the last one closes it if asked to. */
static void rbd_image_let_go(PyObject *capsule)
{
    struct fp_rbd_image *img = PyCapsule_GetPointer(capsule, RBD_CAPSULE);
    if (img == NULL) {
        PyErr_Clear();
        return;
    }
    if (--img->users == 0 && img->closing)
        rbd_image_close_now(img);
}

#define CLOSE_WAIT_MS 5000 /* what close() gives the io_uring's requests in flight */

/* Wait for the engine's requests in flight, up to CLOSE_WAIT_MS (no Python API inside);
 * an NBD connection is simply shut: its requests fail at once; librbd's requests get the
 * same time as the io_uring's. */
static void quiesce_engine(FastPath *self)
{
    if (self->uring_open && self->q.pending)
        fp_uring_wait(&self->q, CLOSE_WAIT_MS);
    if (self->nbd != NULL)
        fp_nbd_stop(self->nbd);
    if (self->rbd != NULL)
        fp_done_wait(&self->rbd->list, CLOSE_WAIT_MS);
}

/* The engine's jobs, jobs' bookkeeping and eventfd, once nothing is in flight. */
static void free_engine_state(FastPath *self)
{
    if (self->q.engine.event_fd >= 0)
        close(self->q.engine.event_fd);
    self->q.engine.event_fd = -1;
    free(self->q.jobs);
    self->q.jobs = NULL;
    free(self->q.returned);
    self->q.returned = NULL;
    self->q.nreturned = 0;
}

/*
 * Drop the engine's completions and close it (the queue is given up); -1 if requests
 * are still in the kernel: then everything stays as it is, the buffers they move
 * data into included (a leak, not a hazard; `pending` tells).
 */
static int close_engine(FastPath *self)
{
    unsigned used = 0;
    if (self->nbd != NULL) {
        fp_nbd_stop(self->nbd); /* the reader joined: what was in flight failed */
        fp_done_reap(&self->nbd->list, &self->q, 1, &used);
        fp_nbd_free(self->nbd);
        self->nbd = NULL;
        free_engine_state(self);
        return 0;
    }
    if (self->rbd != NULL) {
        fp_done_reap(&self->rbd->list, &self->q, 1, &used);
        if (fp_done_wait(&self->rbd->list, 0) < 0)
            return -1; /* librbd still holds some: its callbacks need the engine */
        fp_rbd_free(self->rbd);
        self->rbd = NULL;
        free_engine_state(self);
        rbd_image_let_go(self->rbd_image);
        Py_CLEAR(self->rbd_image);
        return 0;
    }
    if (!self->uring_open)
        return 0;
    fp_uring_reap_jobs(&self->q, 1, &used);
    if (self->q.pending)
        return -1;
    fp_uring_close(&self->uring);
    self->uring_open = 0;
    free_engine_state(self);
    return 0;
}

static void release_all(FastPath *self)
{
    if (close_engine(self) < 0) {
        self->closed = 1; /* the kernel may still write into the buffers: they stay */
        return;
    }
    if (self->held) {
        PyBuffer_Release(&self->desc_buf);
        PyBuffer_Release(&self->avail_buf);
        PyBuffer_Release(&self->used_buf);
        PyBuffer_Release(&self->slots_buf);
        PyBuffer_Release(&self->capacity_buf);
        if (self->q.stats != NULL) {
            self->q.stats = NULL;
            PyBuffer_Release(&self->stats_buf);
        }
        self->held = 0;
    }
    for (int i = 0; i < self->q.nmaps; i++)
        PyBuffer_Release(&self->map_bufs[i]);
    self->q.nmaps = 0;
    self->closed = 1;
}

/* Give the engine's requests their time (GIL released), then let go of everything. */
static void close_now(FastPath *self)
{
    Py_BEGIN_ALLOW_THREADS
    quiesce_engine(self);
    Py_END_ALLOW_THREADS
    release_all(self);
}

/* -- the type -------------------------------------------------------------------------- */

static void FastPath_dealloc(FastPath *self)
{
    release_all(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/*
 * Start the engine: an NBD target's connection engine on `nbd_sock` (a descriptor of
 * the engine's own from then on), an RBD target's on its image, else the io_uring. Without one (engine_error says
 * why) Python takes its share.
 */
static void open_engine(FastPath *self, int nbd_sock, uint64_t nbd_max_payload, int nbd_flush)
{
    struct fp_queue *q = &self->q;
    q->jobs = calloc(q->size, sizeof(*q->jobs));
    q->returned = calloc(q->size, sizeof(*q->returned));
    int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (q->jobs == NULL || q->returned == NULL) {
        snprintf(self->engine_error, sizeof(self->engine_error), "out of memory");
    } else if (efd < 0) {
        snprintf(self->engine_error, sizeof(self->engine_error), "eventfd: %s",
                 strerror(errno));
    } else if (q->target == FP_TARGET_NBD) {
        self->nbd = fp_nbd_open(q, nbd_sock, efd, nbd_max_payload, nbd_flush);
        if (self->nbd != NULL) {
            q->engine = (struct fp_engine){self->nbd, fp_nbd_stage, fp_nbd_kick,
                                           fp_nbd_reap, fp_nbd_ready, efd};
            return;
        }
        snprintf(self->engine_error, sizeof(self->engine_error), "nbd: %s", strerror(errno));
        close(nbd_sock);
    } else if (q->target == FP_TARGET_RBD) {
        struct fp_rbd_image *img = PyCapsule_GetPointer(self->rbd_image, RBD_CAPSULE);
        if (img != NULL && img->closing)
            errno = ESHUTDOWN; /* closed, or closing: no new engines */
        self->rbd = img != NULL && !img->closing ? fp_rbd_open(q, img->image, efd) : NULL;
        if (self->rbd != NULL) {
            img->users++;
            q->engine = (struct fp_engine){self->rbd, fp_rbd_stage, fp_rbd_kick,
                                           fp_rbd_reap, fp_rbd_ready, efd};
            return;
        }
        snprintf(self->engine_error, sizeof(self->engine_error), "rbd: %s",
                 img == NULL ? "not an image of rbd_open()"
                 : img->closing ? "the image is closed" : strerror(errno));
        PyErr_Clear();
        Py_CLEAR(self->rbd_image);
    } else if (fp_uring_open(&self->uring, q->size, q->fd, efd) < 0) {
        snprintf(self->engine_error, sizeof(self->engine_error), "io_uring: %s",
                 strerror(errno));
    } else {
        self->uring_open = 1;
        q->engine = (struct fp_engine){&self->uring, fp_uring_stage, fp_uring_kick,
                                       fp_uring_reap, fp_uring_ready, efd};
        q->batch_small = self->uring.batch_small;
        return;
    }
    if (efd >= 0)
        close(efd);
    free(q->jobs);
    q->jobs = NULL;
    free(q->returned);
    q->returned = NULL;
}

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"desc", "avail", "used", "size", "indirect", "max_indirect",
                             "slots", "capacity", "target", "fd", "block_size",
                             "accepts_writes", "flush_offered", "submit_min", "asynchronous",
                             "nbd_max_payload", "nbd_flush", "rbd_image", "stats", NULL};
    PyObject *desc, *avail, *used, *slots, *capacity, *rbd_image = NULL, *stats = NULL;
    unsigned int size, max_indirect, block_size;
    int indirect, target, fd, accepts_writes, flush_offered, asynchronous = 0, nbd_flush = 0;
    unsigned long long submit_min, nbd_max_payload = 0;
    if (self->held || self->q.nmaps) {
        PyErr_SetString(PyExc_RuntimeError, "FastPath is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOIpIOOiiIppK|pKpOO", kwlist, &desc,
                                     &avail, &used, &size, &indirect, &max_indirect, &slots,
                                     &capacity, &target, &fd, &block_size, &accepts_writes,
                                     &flush_offered, &submit_min, &asynchronous,
                                     &nbd_max_payload, &nbd_flush, &rbd_image, &stats))
        return -1;
    if (size == 0 || size > 32768 || size & (size - 1)) {
        PyErr_Format(PyExc_ValueError, "queue size %u is not a power of two in 1..32768", size);
        return -1;
    }
    if (block_size < 512 || block_size & (block_size - 1)) {
        PyErr_Format(PyExc_ValueError, "block size %u is not a power of two >= 512", block_size);
        return -1;
    }
    if (target != FP_TARGET_NULL && target != FP_TARGET_FD && !FP_TARGET_REMOTE(target)) {
        PyErr_Format(PyExc_ValueError, "unknown target kind %d", target);
        return -1;
    }
    if (target == FP_TARGET_RBD && (rbd_image == NULL || !PyCapsule_IsValid(rbd_image, RBD_CAPSULE))) {
        PyErr_SetString(PyExc_ValueError, "an RBD target needs its image (rbd_open())");
        return -1;
    }
    if ((target == FP_TARGET_FD || target == FP_TARGET_NBD) && fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a file or NBD target needs its descriptor");
        return -1;
    }
    if (take_buffer(desc, &self->desc_buf, 0, (Py_ssize_t)size * (Py_ssize_t)sizeof(struct fp_desc), "descriptor table") < 0)
        return -1;
    if (take_buffer(avail, &self->avail_buf, 0, 6 + 2 * (Py_ssize_t)size, "avail ring") < 0)
        goto fail_desc;
    if (take_buffer(used, &self->used_buf, 1, 6 + 8 * (Py_ssize_t)size, "used ring") < 0)
        goto fail_avail;
    if (take_buffer(slots, &self->slots_buf, 1, 8 * (Py_ssize_t)size, "log slots") < 0)
        goto fail_used;
    if (take_buffer(capacity, &self->capacity_buf, 0, 8, "capacity") < 0)
        goto fail_slots;
    if (stats != NULL && stats != Py_None) {
        if (take_buffer(stats, &self->stats_buf, 1, 8 * FP_STAT_CELLS, "stats") < 0)
            goto fail_capacity;
        if ((uintptr_t)self->stats_buf.buf & 7) {
            PyErr_SetString(PyExc_ValueError, "misaligned stats buffer");
            PyBuffer_Release(&self->stats_buf);
            goto fail_capacity;
        }
        self->q.stats = self->stats_buf.buf;
    }
    if ((uintptr_t)self->desc_buf.buf & 7 || (uintptr_t)self->avail_buf.buf & 1
        || (uintptr_t)self->used_buf.buf & 3
        || ((uintptr_t)self->slots_buf.buf | (uintptr_t)self->capacity_buf.buf) & 7) {
        PyErr_SetString(PyExc_ValueError, "misaligned ring or log buffer");
        goto fail_stats;
    }
    self->held = 1;
    struct fp_queue *q = &self->q;
    q->desc = self->desc_buf.buf;
    q->avail = self->avail_buf.buf;
    q->used = self->used_buf.buf;
    q->slots = self->slots_buf.buf;
    q->capacity = self->capacity_buf.buf;
    q->size = size;
    q->mask = size - 1;
    q->indirect = indirect;
    q->max_indirect = max_indirect < size ? size : max_indirect;
    q->target = target;
    q->fd = fd;
    q->block_mask = block_size - 1;
    q->accepts_writes = accepts_writes;
    q->flush_offered = flush_offered;
    q->submit_min = submit_min;
    q->stop = &self->close_pending;
    q->engine.event_fd = -1;
    q->asynchronous = asynchronous && target == FP_TARGET_FD;
    if (target == FP_TARGET_NBD) {
        /* The connection: a duplicate, the engine's (the caller closes its own). */
        int sock = fcntl(fd, F_DUPFD_CLOEXEC, 0);
        if (sock < 0)
            snprintf(self->engine_error, sizeof(self->engine_error), "dup: %s",
                     strerror(errno));
        else
            open_engine(self, sock, nbd_max_payload, nbd_flush);
    } else if (target == FP_TARGET_RBD) {
        Py_INCREF(rbd_image);
        self->rbd_image = rbd_image;
        open_engine(self, -1, 0, 0);
    } else if (q->asynchronous) {
        open_engine(self, -1, 0, 0);
    }
    return 0;
fail_stats:
    if (self->q.stats != NULL) {
        self->q.stats = NULL;
        PyBuffer_Release(&self->stats_buf);
    }
fail_capacity:
    PyBuffer_Release(&self->capacity_buf);
fail_slots:
    PyBuffer_Release(&self->slots_buf);
fail_used:
    PyBuffer_Release(&self->used_buf);
fail_avail:
    PyBuffer_Release(&self->avail_buf);
fail_desc:
    PyBuffer_Release(&self->desc_buf);
    return -1;
}

static PyObject *FastPath_learn(FastPath *self, PyObject *args)
{
    unsigned long long start, read_end, write_end;
    PyObject *view;
    if (!PyArg_ParseTuple(args, "KKKO", &start, &read_end, &write_end, &view))
        return NULL;
    if (self->closed || self->close_pending) {
        PyErr_SetString(PyExc_ValueError, "the fast path is closed");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "learn() during run()");
        return NULL;
    }
    uint64_t end = read_end > write_end ? read_end : write_end;
    if (end <= start)
        Py_RETURN_FALSE; /* no right at all: nothing fits it */
    Py_buffer buf;
    if (take_buffer(view, &buf, write_end != 0, (Py_ssize_t)(end - start), "mapping") < 0)
        return NULL;
    struct fp_queue *q = &self->q;
    for (int i = 0; i < q->nmaps; i++) {
        const struct fp_mapping *m = &q->maps[i];
        if (m->start == start && m->read_end == read_end && m->write_end == write_end
            && m->base == buf.buf) {
            PyBuffer_Release(&buf); /* known already */
            Py_RETURN_FALSE;
        }
    }
    int slot = q->nmaps;
    if (slot == FP_MAX_MAPPINGS) {
        slot = self->next_evict;
        self->next_evict = (self->next_evict + 1) % FP_MAX_MAPPINGS;
        PyBuffer_Release(&self->map_bufs[slot]);
    } else {
        q->nmaps++;
    }
    struct fp_mapping *m = &q->maps[slot];
    m->start = start;
    m->read_end = read_end;
    m->write_end = write_end;
    m->base = buf.buf;
    self->map_bufs[slot] = buf;
    Py_RETURN_TRUE;
}

static PyObject *FastPath_run(FastPath *self, PyObject *args)
{
    unsigned int count, last_avail, used_idx;
    unsigned long long sequence;
    if (!PyArg_ParseTuple(args, "IIIK", &count, &last_avail, &used_idx, &sequence))
        return NULL;
    if (!self->held || self->closed || self->close_pending) {
        PyErr_SetString(PyExc_ValueError, "the fast path is closed");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "run() is not reentrant");
        return NULL;
    }
    unsigned int served;
    uint64_t seq = sequence;
    self->running = 1;
    Py_BEGIN_ALLOW_THREADS
    served = fp_run(&self->q, count, &last_avail, &used_idx, &seq);
    Py_END_ALLOW_THREADS
    self->running = 0;
    self->served += served;
    if (served < count)
        self->fallbacks++;
    if (self->close_pending)
        close_now(self);
    return Py_BuildValue("(IIIK)", served, last_avail, used_idx, (unsigned long long)seq);
}

static PyObject *FastPath_retire(FastPath *self, PyObject *args)
{
    unsigned int position, used_idx;
    if (!PyArg_ParseTuple(args, "II", &position, &used_idx))
        return NULL;
    if (!self->held || self->closed || self->close_pending) {
        PyErr_SetString(PyExc_ValueError, "the fast path is closed");
        return NULL;
    }
    fp_retire(&self->q, position, used_idx);
    Py_RETURN_NONE;
}

/* The heads q->returned holds, as a tuple (emptied). */
static PyObject *take_returned(struct fp_queue *q)
{
    PyObject *heads = PyTuple_New(q->nreturned);
    if (heads == NULL)
        return NULL;
    for (unsigned i = 0; i < q->nreturned; i++) {
        PyObject *head = PyLong_FromUnsignedLong(q->returned[i]);
        if (head == NULL) {
            Py_DECREF(heads);
            return NULL;
        }
        PyTuple_SET_ITEM(heads, i, head);
    }
    q->nreturned = 0;
    return heads;
}

static int check_usable(FastPath *self)
{
    if (!self->held || self->closed || self->close_pending) {
        PyErr_SetString(PyExc_ValueError, "the fast path is closed");
        return -1;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "the fast path is running");
        return -1;
    }
    return 0;
}

static PyObject *FastPath_reap(FastPath *self, PyObject *args)
{
    unsigned int used_idx;
    if (!PyArg_ParseTuple(args, "I", &used_idx))
        return NULL;
    if (check_usable(self) < 0)
        return NULL;
    if (self->q.jobs != NULL && self->q.pending)
        fp_reap(&self->q, &used_idx);
    if (!self->q.nreturned)
        return Py_BuildValue("(I())", used_idx);
    PyObject *heads = take_returned(&self->q);
    if (heads == NULL)
        return NULL;
    return Py_BuildValue("(IN)", used_idx, heads);
}

static PyObject *FastPath_loop(FastPath *self, PyObject *args)
{
    struct fp_loop l;
    memset(&l, 0, sizeof(l));
    unsigned long irq_request;
    unsigned int irq_arg;
    unsigned long long poll_max_ns, poll_ns, sequence;
    Py_buffer header;
    if (!PyArg_ParseTuple(args, "iiiikIpKKpw*IIIIKp", &l.kick_fd, &l.wake_fd, &l.stop_fd,
                          &l.irq.fd, &irq_request, &irq_arg, &l.event_idx, &poll_max_ns,
                          &poll_ns, &l.python_inflight, &header, &l.last_avail, &l.used_idx,
                          &l.signalled, &l.log_used, &sequence, &l.dry))
        return NULL;
    if (check_usable(self) < 0 || header.len < 2 || (uintptr_t)header.buf & 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "the log header is not a u16 buffer");
        PyBuffer_Release(&header);
        return NULL;
    }
    l.irq.request = irq_request;
    l.irq.arg = irq_arg;
    l.poll_max_ns = poll_max_ns;
    l.poll_ns = poll_ns;
    l.sequence = sequence;
    l.log_header = header.buf;
    l.taken_live = &self->looped;
    l.avail_live = &self->live_avail;
    self->live_avail = l.last_avail;
    l.last_avail &= 0xFFFF;
    l.used_idx &= 0xFFFF;
    enum fp_loop_reason reason;
    self->running = 1;
    self->looping = 1;
    Py_BEGIN_ALLOW_THREADS
    reason = fp_loop_run(&self->q, &l);
    Py_END_ALLOW_THREADS
    self->looping = 0;
    self->running = 0;
    PyBuffer_Release(&header);
    self->served += l.taken;
    if (reason == FP_LOOP_PYTHON)
        self->fallbacks++;
    if (self->close_pending)
        close_now(self);
    return Py_BuildValue("(iIIIIKKiKKKK)", (int)reason, l.last_avail, l.used_idx, l.signalled,
                         l.log_used, (unsigned long long)l.sequence,
                         (unsigned long long)l.poll_ns, l.dry, (unsigned long long)l.taken,
                         (unsigned long long)l.interrupts, (unsigned long long)l.irq_errors,
                         (unsigned long long)l.polls_found);
}

static PyObject *FastPath_wait(FastPath *self, PyObject *args)
{
    double timeout;
    if (!PyArg_ParseTuple(args, "d", &timeout))
        return NULL;
    if (self->q.jobs == NULL || !self->q.pending)
        Py_RETURN_TRUE;
    int rc, ms = timeout < 0 ? -1 : timeout * 1000 > INT_MAX ? INT_MAX : (int)(timeout * 1000);
    Py_BEGIN_ALLOW_THREADS
    rc = self->nbd != NULL   ? fp_done_wait(&self->nbd->list, ms)
         : self->rbd != NULL ? fp_done_wait(&self->rbd->list, ms)
                             : fp_uring_wait(&self->q, ms);
    Py_END_ALLOW_THREADS
    if (rc < 0 && errno != ETIMEDOUT)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(rc == 0);
}

static PyObject *FastPath_attach(FastPath *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    if (check_usable(self) < 0)
        return NULL;
    if (self->nbd == NULL) {
        PyErr_SetString(PyExc_ValueError, "attach(): not an NBD target with its engine");
        return NULL;
    }
    int sock = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (sock < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fp_nbd_attach(self->nbd, sock);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        int saved = errno;
        close(sock);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *FastPath_get_engine_broken(FastPath *self, void *Py_UNUSED(closure))
{
    char why[sizeof(self->nbd->why)];
    if (self->nbd == NULL || !fp_nbd_broken(self->nbd, why, sizeof(why)))
        return PyUnicode_FromString("");
    return PyUnicode_FromString(why[0] ? why : "broken");
}

static PyObject *FastPath_forget(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "forget() during run()");
        return NULL;
    }
    for (int i = 0; i < self->q.nmaps; i++)
        PyBuffer_Release(&self->map_bufs[i]);
    self->q.nmaps = 0;
    self->next_evict = 0;
    Py_RETURN_NONE;
}

static PyObject *FastPath_close(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    if (self->running) {
        self->close_pending = 1;
        Py_RETURN_NONE;
    }
    close_now(self);
    Py_RETURN_NONE;
}

static PyObject *FastPath_get_served(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->served);
}

static PyObject *FastPath_get_position(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->looping ? (long)self->live_avail : -1L);
}

static PyObject *FastPath_get_looped(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->looped);
}

static PyObject *FastPath_get_batches_small(FastPath *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->q.batch_small);
}

static PyObject *FastPath_get_staged(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->q.staged);
}

static PyObject *FastPath_get_fallbacks(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->fallbacks);
}

static PyObject *FastPath_get_mappings(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->q.nmaps);
}

static PyObject *FastPath_get_pending(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->q.pending);
}

static PyObject *FastPath_get_returned(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLong(self->q.nreturned);
}

static PyObject *FastPath_get_asynchronous(FastPath *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->q.jobs != NULL);
}

static PyObject *FastPath_get_event_fd(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->q.jobs != NULL ? self->q.engine.event_fd : -1);
}

static PyObject *FastPath_get_engine_error(FastPath *self, void *Py_UNUSED(closure))
{
    return PyUnicode_FromString(self->engine_error);
}

static PyObject *FastPath_get_closed(FastPath *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->closed);
}

static PyMethodDef FastPath_methods[] = {
    {"learn", (PyCFunction)FastPath_learn, METH_VARARGS,
     "learn(start, read_end, write_end, view) -> bool\n\n"
     "Serve buffers inside this mapping (a HotRegion's four fields) from now on.\n"
     "Keeps at most 16; the oldest goes first. False if it grants no access or\n"
     "is known already."},
    {"run", (PyCFunction)FastPath_run, METH_VARARGS,
     "run(count, last_avail, used_idx, sequence) -> (served, last_avail, used_idx, sequence)\n\n"
     "Serve up to count available requests in ring order, GIL released; stop before\n"
     "the first one the Python path must take. Used elements are pushed, not published."},
    {"retire", (PyCFunction)FastPath_retire, METH_VARARGS,
     "retire(position, used_idx): clear the log slots of the heads published at\n"
     "used ring positions position..used_idx (16-bit, wrapping)."},
    {"reap", (PyCFunction)FastPath_reap, METH_VARARGS,
     "reap(used_idx) -> (used_idx, returned)\n\n"
     "Finish the asynchronous requests that completed: status byte and used element\n"
     "stored (not published). `returned`: the heads whose I/O failed, for the Python\n"
     "path to serve again from their chains (nothing of theirs was answered)."},
    {"loop", (PyCFunction)FastPath_loop, METH_VARARGS,
     "loop(kick_fd, wake_fd, stop_fd, irq_fd, irq_request, irq_arg, event_idx, poll_max_ns,\n"
     "     poll_ns, python_inflight, log_header, last_avail, used_idx, signalled, log_used,\n"
     "     sequence, dry)\n"
     "  -> (reason, last_avail, used_idx, signalled, log_used, sequence, poll_ns, dry,\n"
     "      taken, interrupts, irq_errors, polls_found)\n\n"
     "Serve the queue from kick to interrupt with the GIL released (fastpath_loop.h)\n"
     "until Python must act; `reason` says why (LOOP_* constants)."},
    {"wait", (PyCFunction)FastPath_wait, METH_VARARGS,
     "wait(timeout) -> bool\n\n"
     "Block (GIL released) until every asynchronous request completed, at most timeout\n"
     "seconds (negative: no limit); True if they did. reap() them afterwards."},
    {"attach", (PyCFunction)FastPath_attach, METH_VARARGS,
     "attach(fd)\n\n"
     "Give a broken NBD engine (`engine_broken`) a new connection: a negotiated socket\n"
     "(simple replies), duplicated (the caller keeps and closes its own). Only with\n"
     "nothing in flight: OSError EBUSY otherwise."},
    {"forget", (PyCFunction)FastPath_forget, METH_NOARGS,
     "Forget every mapping learned (the driver's memory changed)."},
    {"close", (PyCFunction)FastPath_close, METH_NOARGS,
     "Let go of every buffer (after the current run(), if one is running); idempotent.\n"
     "Requests in the io_uring get 5 s to finish (their completions are dropped); if\n"
     "some do not, their buffers are kept for good (`pending` stays nonzero). An NBD\n"
     "connection is shut at once (its requests in flight are dropped)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef FastPath_getset[] = {
    {"served", (getter)FastPath_get_served, NULL, "requests served here", NULL},
    {"position", (getter)FastPath_get_position, NULL,
     "while loop() runs, its next avail entry as it goes; else -1", NULL},
    {"looped", (getter)FastPath_get_looped, NULL,
     "requests loop() took (of `served`), counted as it goes: readable while it runs", NULL},
    {"batches_small", (getter)FastPath_get_batches_small, NULL,
     "runs of several requests put small ones in the io_uring too (fp_uring_probe())", NULL},
    {"staged", (getter)FastPath_get_staged, NULL,
     "requests of `served` handed to the asynchronous engine (io_uring or NBD)", NULL},
    {"fallbacks", (getter)FastPath_get_fallbacks, NULL,
     "runs that stopped at a request for the Python path", NULL},
    {"mappings", (getter)FastPath_get_mappings, NULL, "mappings known", NULL},
    {"pending", (getter)FastPath_get_pending, NULL,
     "asynchronous requests not reaped yet", NULL},
    {"returned", (getter)FastPath_get_returned, NULL,
     "failed engine requests waiting for reap() to hand them to Python", NULL},
    {"asynchronous", (getter)FastPath_get_asynchronous, NULL,
     "whether an asynchronous engine runs (io_uring, or an NBD target's)", NULL},
    {"event_fd", (getter)FastPath_get_event_fd, NULL,
     "the engine's completion eventfd (-1 without one): wait on it with the kick fd",
     NULL},
    {"engine_error", (getter)FastPath_get_engine_error, NULL,
     "why the engine could not start ('' if it runs or was not asked for)", NULL},
    {"engine_broken", (getter)FastPath_get_engine_broken, NULL,
     "why an NBD engine's connection is gone ('' while it serves): attach() a new one",
     NULL},
    {"closed", (getter)FastPath_get_closed, NULL, "whether close() took effect", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvduse._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPath),
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The compiled fast path of one virtio-blk split queue (see the module source).",
    .tp_methods = FastPath_methods,
    .tp_getset = FastPath_getset,
    .tp_init = (initproc)FastPath_init,
    .tp_new = PyType_GenericNew,
};

/* -- RBD images ------------------------------------------------------------------------ */

static void rbd_image_destroy(PyObject *capsule)
{
    struct fp_rbd_image *img = PyCapsule_GetPointer(capsule, RBD_CAPSULE);
    if (img == NULL) {
        PyErr_Clear();
        return;
    }
    rbd_image_close_now(img); /* no engine holds it: each holds a reference */
    PyMem_RawFree(img);
}

static PyObject *fastpath_rbd_close(PyObject *Py_UNUSED(module), PyObject *capsule)
{
    struct fp_rbd_image *img = PyCapsule_GetPointer(capsule, RBD_CAPSULE);
    if (img == NULL)
        return NULL;
    img->closing = 1;
    if (img->users == 0)
        rbd_image_close_now(img);
    Py_RETURN_NONE;
}

/* The NULL-ended key, value array of a sequence of (str, str) pairs (PyMem_Free it); the
 * strings are the pairs', valid while `pairs` lives. */
static const char **rbd_settings(PyObject *pairs)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(pairs);
    const char **kv = PyMem_Calloc((size_t)n * 2 + 2, sizeof(*kv));
    if (kv == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(pairs, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2
            || (kv[2 * i] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(pair, 0))) == NULL
            || (kv[2 * i + 1] = PyUnicode_AsUTF8(PyTuple_GET_ITEM(pair, 1))) == NULL) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "settings are (str, str) pairs");
            PyMem_Free(kv);
            return NULL;
        }
    }
    return kv;
}

static PyObject *fastpath_rbd_open(PyObject *Py_UNUSED(module), PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"conf", "optional_conf", "client_id", "before", "after", "pool",
                             "namespace", "image", "snapshot", "readonly", NULL};
    struct fp_rbd_spec spec = {0};
    PyObject *before, *after;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "zpsOOsssz$p", kwlist, &spec.conf,
                                     &spec.optional_conf, &spec.client_id, &before, &after,
                                     &spec.pool, &spec.nspace, &spec.name, &spec.snapshot,
                                     &spec.readonly))
        return NULL;
    PyObject *before_seq = PySequence_Fast(before, "before: a sequence of pairs");
    PyObject *after_seq = before_seq ? PySequence_Fast(after, "after: a sequence of pairs") : NULL;
    const char **before_kv = after_seq ? rbd_settings(before_seq) : NULL;
    const char **after_kv = before_kv ? rbd_settings(after_seq) : NULL;
    struct fp_rbd_image *img = after_kv ? PyMem_RawCalloc(1, sizeof(*img)) : NULL;
    PyObject *result = NULL;
    if (after_kv != NULL && img == NULL)
        PyErr_NoMemory();
    if (img != NULL) {
        spec.before = before_kv;
        spec.after = after_kv;
        char why[256];
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = fp_rbd_image_open(img, &spec, why, sizeof(why));
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            PyObject *error = Py_BuildValue("(is)", -rc, why);
            if (error != NULL) {
                PyErr_SetObject(PyExc_OSError, error);
                Py_DECREF(error);
            }
            PyMem_RawFree(img);
        } else if ((result = PyCapsule_New(img, RBD_CAPSULE, rbd_image_destroy)) == NULL) {
            fp_rbd_image_close(img);
            PyMem_RawFree(img);
        }
    }
    PyMem_Free(after_kv);
    PyMem_Free(before_kv);
    Py_XDECREF(after_seq);
    Py_XDECREF(before_seq);
    return result;
}

/* count_request(): pyvduse.metrics.RequestCounters.record() for the Python path, in one
 * call made with the GIL held (so without a lock of its own). */
static PyObject *fastpath_count_request(PyObject *Py_UNUSED(module), PyObject *const *args,
                                        Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "count_request(cells, kind, status, nbytes, started_ns)");
        return NULL;
    }
    long kind = PyLong_AsLong(args[1]);
    long status = PyLong_AsLong(args[2]);
    unsigned long long nbytes = PyLong_AsUnsignedLongLong(args[3]);
    unsigned long long started = PyLong_AsUnsignedLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    /* The types' cells, then two error cells (ioerr, unsupp). */
    Py_ssize_t cells = view.len / 8, types = (cells - 2) / FP_STAT_TYPE_CELLS;
    if ((uintptr_t)view.buf & 7 || cells < 2 || kind < 0 || kind >= types) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "count_request: bad cells or kind");
        return NULL;
    }
    uint64_t *cell = view.buf;
    uint64_t now = fp_now_ns();
    fp_count(cell + kind * FP_STAT_TYPE_CELLS, status == 0 ? nbytes : 0,
             now > started ? now - started : 0);
    if (status != 0)
        cell[cells - (status == 2 ? 1 : 2)]++;
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef fastpath_functions[] = {
    {"count_request", (PyCFunction)(void (*)(void))fastpath_count_request, METH_FASTCALL,
     "count_request(cells, kind, status, nbytes, started_ns)\n\n"
     "Count one request the Python path answered in `cells` (a writable buffer of u64:\n"
     "per type STAT_TYPE_CELLS cells, then the ioerr and unsupp cells): type index\n"
     "`kind`, virtio-blk `status`, `nbytes` (counted on success), taken at `started_ns`\n"
     "(time.monotonic_ns()); its latency ends now. Atomic for Python threads (GIL)."},
    {"rbd_open", (PyCFunction)(void (*)(void))fastpath_rbd_open, METH_VARARGS | METH_KEYWORDS,
     "rbd_open(conf, optional_conf, client_id, before, after, pool, namespace, image,\n"
     "         snapshot, *, readonly) -> image\n\n"
     "Connect to a Ceph cluster and open an RBD image for an RBD target (GIL released).\n"
     "librados and librbd are loaded on first use. `conf`: the configuration file, or\n"
     "None for librados' search (finding none is an error unless optional_conf);\n"
     "`before`/`after`: (option, value) pairs set before connecting and after opening;\n"
     "`namespace` '' for the default one, `snapshot` None for the image itself.\n"
     "Raises OSError(errno, why) naming the step that failed (ENOSYS: no librbd).\n"
     "rbd_close() closes it; so does dropping the last reference."},
    {"rbd_close", (PyCFunction)fastpath_rbd_close, METH_O,
     "rbd_close(image)\n\n"
     "Close an image of rbd_open() (GIL released: librbd flushes and lets go of the\n"
     "image's lock), at once if no FastPath's engine uses it, else when the last one\n"
     "is closed; no new FastPath may use it. Idempotent."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyvduse._fastpath",
    .m_doc = "The compiled data path of pyvduse's split virtqueues (virtio-blk).",
    .m_size = -1,
    .m_methods = fastpath_functions,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&FastPathType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&fastpath_module);
    if (module == NULL)
        return NULL;
    Py_INCREF(&FastPathType);
    if (PyModule_AddObject(module, "FastPath", (PyObject *)&FastPathType) < 0
        || PyModule_AddIntConstant(module, "TARGET_NULL", FP_TARGET_NULL) < 0
        || PyModule_AddIntConstant(module, "TARGET_FD", FP_TARGET_FD) < 0
        || PyModule_AddIntConstant(module, "TARGET_NBD", FP_TARGET_NBD) < 0
        || PyModule_AddIntConstant(module, "TARGET_RBD", FP_TARGET_RBD) < 0
        || PyModule_AddIntConstant(module, "MAX_MAPPINGS", FP_MAX_MAPPINGS) < 0
        || PyModule_AddIntConstant(module, "MAX_SEGMENTS", FP_MAX_SEGMENTS) < 0
        || PyModule_AddIntConstant(module, "LOOP_PYTHON", FP_LOOP_PYTHON) < 0
        || PyModule_AddIntConstant(module, "LOOP_RETURNED", FP_LOOP_RETURNED) < 0
        || PyModule_AddIntConstant(module, "LOOP_WOKEN", FP_LOOP_WOKEN) < 0
        || PyModule_AddIntConstant(module, "LOOP_STOPPED", FP_LOOP_STOPPED) < 0
        || PyModule_AddIntConstant(module, "LOOP_BROKEN", FP_LOOP_BROKEN) < 0
        || PyModule_AddIntConstant(module, "STAT_CELLS", FP_STAT_CELLS) < 0
        || PyModule_AddIntConstant(module, "STAT_POLL_HITS", FP_STAT_POLL_HITS) < 0
        || PyModule_AddIntConstant(module, "STAT_TYPE_CELLS", FP_STAT_TYPE_CELLS) < 0) {
        Py_DECREF(&FastPathType);
        Py_DECREF(module);
        return NULL;
    }
    /* The latency buckets' bounds, for pyvduse.metrics to check its own against. */
    PyObject *bounds = PyTuple_New(FP_LAT_BOUNDS);
    if (bounds == NULL) {
        Py_DECREF(module);
        return NULL;
    }
    for (int i = 0; i < FP_LAT_BOUNDS; i++) {
        PyObject *bound = PyLong_FromUnsignedLongLong(fp_latency_bounds[i]);
        if (bound == NULL) {
            Py_DECREF(bounds);
            Py_DECREF(module);
            return NULL;
        }
        PyTuple_SET_ITEM(bounds, i, bound);
    }
    if (PyModule_AddObject(module, "LATENCY_BOUNDS_NS", bounds) < 0) {
        Py_DECREF(bounds);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
