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

typedef struct {
    PyObject_HEAD
    struct fp_queue q;
    /* what q points into, held as exports of private memoryviews */
    Py_buffer desc_buf, avail_buf, used_buf, slots_buf, capacity_buf;
    Py_buffer map_bufs[FP_MAX_MAPPINGS];
    int held; /* the five ring and log buffers are held */
    int next_evict;
    int running, closed;
    volatile int close_pending; /* set under the GIL by close() while run() works without it */
    unsigned long long served, fallbacks;
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

static void release_all(FastPath *self)
{
    if (self->held) {
        PyBuffer_Release(&self->desc_buf);
        PyBuffer_Release(&self->avail_buf);
        PyBuffer_Release(&self->used_buf);
        PyBuffer_Release(&self->slots_buf);
        PyBuffer_Release(&self->capacity_buf);
        self->held = 0;
    }
    for (int i = 0; i < self->q.nmaps; i++)
        PyBuffer_Release(&self->map_bufs[i]);
    self->q.nmaps = 0;
    self->closed = 1;
}

/* -- the type -------------------------------------------------------------------------- */

static void FastPath_dealloc(FastPath *self)
{
    release_all(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int FastPath_init(FastPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"desc", "avail", "used", "size", "indirect", "max_indirect",
                             "slots", "capacity", "target", "fd", "block_size",
                             "accepts_writes", "flush_ok", "submit_min", NULL};
    PyObject *desc, *avail, *used, *slots, *capacity;
    unsigned int size, max_indirect, block_size;
    int indirect, target, fd, accepts_writes, flush_ok;
    unsigned long long submit_min;
    if (self->held || self->q.nmaps) {
        PyErr_SetString(PyExc_RuntimeError, "FastPath is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOIpIOOiiIppK", kwlist, &desc, &avail,
                                     &used, &size, &indirect, &max_indirect, &slots, &capacity,
                                     &target, &fd, &block_size, &accepts_writes, &flush_ok,
                                     &submit_min))
        return -1;
    if (size == 0 || size > 32768 || size & (size - 1)) {
        PyErr_Format(PyExc_ValueError, "queue size %u is not a power of two in 1..32768", size);
        return -1;
    }
    if (block_size < 512 || block_size & (block_size - 1)) {
        PyErr_Format(PyExc_ValueError, "block size %u is not a power of two >= 512", block_size);
        return -1;
    }
    if (target != FP_TARGET_NULL && target != FP_TARGET_FD) {
        PyErr_Format(PyExc_ValueError, "unknown target kind %d", target);
        return -1;
    }
    if (target == FP_TARGET_FD && fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a file target needs its descriptor");
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
    if ((uintptr_t)self->desc_buf.buf & 7 || (uintptr_t)self->avail_buf.buf & 1
        || (uintptr_t)self->used_buf.buf & 3
        || ((uintptr_t)self->slots_buf.buf | (uintptr_t)self->capacity_buf.buf) & 7) {
        PyErr_SetString(PyExc_ValueError, "misaligned ring or log buffer");
        goto fail_capacity;
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
    q->flush_ok = flush_ok;
    q->submit_min = submit_min;
    q->stop = &self->close_pending;
    return 0;
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
        release_all(self);
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
    if (self->running)
        self->close_pending = 1;
    else
        release_all(self);
    Py_RETURN_NONE;
}

static PyObject *FastPath_get_served(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->served);
}

static PyObject *FastPath_get_fallbacks(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->fallbacks);
}

static PyObject *FastPath_get_mappings(FastPath *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->q.nmaps);
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
    {"forget", (PyCFunction)FastPath_forget, METH_NOARGS,
     "Forget every mapping learned (the driver's memory changed)."},
    {"close", (PyCFunction)FastPath_close, METH_NOARGS,
     "Let go of every buffer (after the current run(), if one is running); idempotent."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef FastPath_getset[] = {
    {"served", (getter)FastPath_get_served, NULL, "requests served here", NULL},
    {"fallbacks", (getter)FastPath_get_fallbacks, NULL,
     "runs that stopped at a request for the Python path", NULL},
    {"mappings", (getter)FastPath_get_mappings, NULL, "mappings known", NULL},
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

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyvduse._fastpath",
    .m_doc = "The compiled data path of pyvduse's split virtqueues (virtio-blk).",
    .m_size = -1,
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
        || PyModule_AddIntConstant(module, "MAX_MAPPINGS", FP_MAX_MAPPINGS) < 0
        || PyModule_AddIntConstant(module, "MAX_SEGMENTS", FP_MAX_SEGMENTS) < 0) {
        Py_DECREF(&FastPathType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
