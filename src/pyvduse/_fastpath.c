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

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define DESC_F_NEXT 1u
#define DESC_F_WRITE 2u
#define DESC_F_INDIRECT 4u

#define BLK_T_IN 0u
#define BLK_T_OUT 1u
#define BLK_T_FLUSH 4u
#define BLK_HEADER 16u
#define SECTOR_SHIFT 9u

#define MAX_MAPPINGS 16
#define MAX_SEGMENTS 256       /* buffers per side of a chain served here; more: Python */
#define MAX_CHAIN_BYTES 0xFFFFFFFFull

enum target_kind { TARGET_NULL = 0, TARGET_FD = 1 };

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct mapping {
    uint64_t start;
    uint64_t read_end;   /* exclusive end if readable, else 0 */
    uint64_t write_end;  /* exclusive end if writable, else 0 */
    unsigned char *base; /* host address of `start` */
    Py_buffer buf;
};

typedef struct {
    PyObject_HEAD
    /* rings */
    Py_buffer desc_buf, avail_buf, used_buf, slots_buf, capacity_buf;
    int held; /* the five buffers above are held */
    const volatile struct desc *desc;
    const volatile uint16_t *avail;     /* flags, idx, ring[size], used_event */
    volatile uint32_t *used;            /* flags|idx (one u32), then {id, len} pairs */
    volatile uint64_t *slots;           /* inflight log: pop sequence per head */
    const volatile uint64_t *capacity;  /* bytes the device serves (resize writes it) */
    uint32_t size, mask, max_indirect;
    int indirect;
    /* mappings */
    struct mapping maps[MAX_MAPPINGS];
    int nmaps, next_evict;
    /* request rules */
    int target, fd;
    uint64_t block_mask, submit_min;
    int accepts_writes, flush_ok;
    /* state */
    int running, closed;
    volatile int close_pending; /* set under the GIL by close() while run() works without it */
    /* scratch: one chain's buffers */
    struct iovec readable[MAX_SEGMENTS], writable[MAX_SEGMENTS];
    /* statistics */
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
    for (int i = 0; i < self->nmaps; i++)
        PyBuffer_Release(&self->maps[i].buf);
    self->nmaps = 0;
    self->closed = 1;
}

/* -- translation ----------------------------------------------------------------------- */

/* Host address of [addr, addr+len) with the given right, or NULL; len > 0. */
static unsigned char *translate(const FastPath *self, uint64_t addr, uint64_t len, int write)
{
    for (int i = 0; i < self->nmaps; i++) {
        const struct mapping *m = &self->maps[i];
        uint64_t end = write ? m->write_end : m->read_end;
        if (addr >= m->start && addr < end && len <= end - addr)
            return m->base + (addr - m->start);
    }
    return NULL;
}

/* -- chains ---------------------------------------------------------------------------- */

/*
 * Walk the chain at `head` the way SplitQueue.pop's fast path accepts it: every buffer
 * non-empty, inside one known mapping with the right it needs, flags NEXT and WRITE
 * only (or the head one indirect descriptor, negotiated, table of 1..max_indirect
 * entries inside a readable mapping), no readable buffer after a writable one, at most
 * table-size descriptors, at most 4 GiB in all. Returns 0 and fills the scratch iovecs,
 * or -1 (nothing consumed) for anything else.
 */
static int walk(FastPath *self, uint32_t head, int *nr, int *nw)
{
    const volatile struct desc *table = self->desc;
    uint32_t table_len = self->size;
    struct desc d;
    d.addr = table[head].addr;
    d.len = table[head].len;
    d.flags = table[head].flags;
    d.next = table[head].next;
    if (d.flags & DESC_F_INDIRECT) {
        if ((d.flags & ~DESC_F_WRITE) != DESC_F_INDIRECT || !self->indirect)
            return -1;
        if (d.len == 0 || d.len % sizeof(struct desc)
            || d.len / sizeof(struct desc) > self->max_indirect)
            return -1;
        table = (const volatile struct desc *)translate(self, d.addr, d.len, 0);
        if (table == NULL)
            return -1;
        table_len = d.len / sizeof(struct desc);
        d.addr = table[0].addr;
        d.len = table[0].len;
        d.flags = table[0].flags;
        d.next = table[0].next;
    }
    uint64_t total = 0;
    int r = 0, w = 0;
    for (uint32_t limit = table_len; limit; limit--) {
        if (d.len == 0)
            return -1;
        if (d.flags & DESC_F_WRITE) {
            if (d.flags & ~(DESC_F_WRITE | DESC_F_NEXT) || w == MAX_SEGMENTS)
                return -1;
            unsigned char *p = translate(self, d.addr, d.len, 1);
            if (p == NULL)
                return -1;
            self->writable[w].iov_base = p;
            self->writable[w].iov_len = d.len;
            w++;
        } else {
            if (w || d.flags & ~DESC_F_NEXT || r == MAX_SEGMENTS)
                return -1;
            unsigned char *p = translate(self, d.addr, d.len, 0);
            if (p == NULL)
                return -1;
            self->readable[r].iov_base = p;
            self->readable[r].iov_len = d.len;
            r++;
        }
        total += d.len;
        if (!(d.flags & DESC_F_NEXT)) {
            if (total > MAX_CHAIN_BYTES)
                return -1;
            *nr = r;
            *nw = w;
            return 0;
        }
        if (d.next >= table_len)
            return -1;
        uint16_t next = d.next;
        d.addr = table[next].addr;
        d.len = table[next].len;
        d.flags = table[next].flags;
        d.next = table[next].next;
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
static int range_ok(const FastPath *self, uint64_t sector, uint64_t length)
{
    uint64_t capacity = *self->capacity;
    if (length == 0 || length >= self->submit_min)
        return 0;
    if (sector > (capacity >> SECTOR_SHIFT))
        return 0;
    uint64_t offset = sector << SECTOR_SHIFT;
    if ((offset | length) & self->block_mask)
        return 0;
    return length <= capacity - offset;
}

/*
 * Serve the request whose chain is in the scratch iovecs. Returns the bytes written
 * into the chain (status included), or -1 if the Python path must take it (nothing
 * about the request was answered; an I/O it began is redone there).
 */
static int64_t serve(FastPath *self, int nr, int nw)
{
    if (!nr || !nw || self->readable[0].iov_len != BLK_HEADER
        || self->writable[nw - 1].iov_len != 1)
        return -1;
    unsigned char header[BLK_HEADER];
    memcpy(header, self->readable[0].iov_base, BLK_HEADER);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    unsigned char *status = self->writable[nw - 1].iov_base;
    if (type == BLK_T_IN) {
        if (nr != 1 || nw < 2)
            return -1;
        struct iovec *data = self->writable;
        int n = nw - 1;
        uint64_t length = total_length(data, n);
        if (!range_ok(self, sector, length))
            return -1;
        if (self->target == TARGET_FD) {
            if (transfer(self->fd, data, n, sector << SECTOR_SHIFT, 0) < 0)
                return -1;
        } else {
            for (int i = 0; i < n; i++)
                memset(data[i].iov_base, 0, data[i].iov_len);
        }
        *status = 0;
        return (int64_t)length + 1;
    }
    if (type == BLK_T_OUT) {
        if (nw != 1 || nr < 2 || !self->accepts_writes)
            return -1;
        struct iovec *data = self->readable + 1;
        int n = nr - 1;
        uint64_t length = total_length(data, n);
        if (!range_ok(self, sector, length))
            return -1;
        if (self->target == TARGET_FD
            && transfer(self->fd, data, n, sector << SECTOR_SHIFT, 1) < 0)
            return -1;
        *status = 0;
        return 1;
    }
    if (type == BLK_T_FLUSH) {
        if (nr != 1 || nw != 1 || !self->flush_ok)
            return -1;
        if (self->target == TARGET_FD) {
            while (fdatasync(self->fd) < 0) {
                if (errno != EINTR)
                    return -1;
            }
        }
        *status = 0;
        return 1;
    }
    return -1;
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
    if (self->held || self->nmaps) {
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
    if (target != TARGET_NULL && target != TARGET_FD) {
        PyErr_Format(PyExc_ValueError, "unknown target kind %d", target);
        return -1;
    }
    if (target == TARGET_FD && fd < 0) {
        PyErr_SetString(PyExc_ValueError, "a file target needs its descriptor");
        return -1;
    }
    if (take_buffer(desc, &self->desc_buf, 0, (Py_ssize_t)size * 16, "descriptor table") < 0)
        return -1;
    if (take_buffer(avail, &self->avail_buf, 0, 6 + 2 * (Py_ssize_t)size, "avail ring") < 0)
        goto fail_desc;
    if (take_buffer(used, &self->used_buf, 1, 6 + 8 * (Py_ssize_t)size, "used ring") < 0)
        goto fail_avail;
    if (take_buffer(slots, &self->slots_buf, 1, 8 * (Py_ssize_t)size, "log slots") < 0)
        goto fail_used;
    if (take_buffer(capacity, &self->capacity_buf, 0, 8, "capacity") < 0)
        goto fail_slots;
    if (((uintptr_t)self->desc_buf.buf | (uintptr_t)self->avail_buf.buf) & 1
        || ((uintptr_t)self->used_buf.buf | (uintptr_t)self->slots_buf.buf
            | (uintptr_t)self->capacity_buf.buf) & 3) {
        PyErr_SetString(PyExc_ValueError, "misaligned ring or log buffer");
        goto fail_capacity;
    }
    self->held = 1;
    self->desc = self->desc_buf.buf;
    self->avail = self->avail_buf.buf;
    self->used = self->used_buf.buf;
    self->slots = self->slots_buf.buf;
    self->capacity = self->capacity_buf.buf;
    self->size = size;
    self->mask = size - 1;
    self->indirect = indirect;
    self->max_indirect = max_indirect < size ? size : max_indirect;
    self->target = target;
    self->fd = fd;
    self->block_mask = block_size - 1;
    self->accepts_writes = accepts_writes;
    self->flush_ok = flush_ok;
    self->submit_min = submit_min;
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
    for (int i = 0; i < self->nmaps; i++) {
        const struct mapping *m = &self->maps[i];
        if (m->start == start && m->read_end == read_end && m->write_end == write_end
            && m->base == buf.buf) {
            PyBuffer_Release(&buf); /* known already */
            Py_RETURN_FALSE;
        }
    }
    int slot = self->nmaps;
    if (slot == MAX_MAPPINGS) {
        slot = self->next_evict;
        self->next_evict = (self->next_evict + 1) % MAX_MAPPINGS;
        PyBuffer_Release(&self->maps[slot].buf);
    } else {
        self->nmaps++;
    }
    struct mapping *m = &self->maps[slot];
    m->start = start;
    m->read_end = read_end;
    m->write_end = write_end;
    m->base = buf.buf;
    m->buf = buf;
    Py_RETURN_TRUE;
}

static PyObject *FastPath_run(FastPath *self, PyObject *args)
{
    unsigned int count, last_avail, used_idx;
    unsigned long long sequence;
    if (!PyArg_ParseTuple(args, "IIIK", &count, &last_avail, &used_idx, &sequence))
        return NULL;
    if (self->closed || self->close_pending) {
        PyErr_SetString(PyExc_ValueError, "the fast path is closed");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "run() is not reentrant");
        return NULL;
    }
    if (count > self->size)
        count = self->size;
    unsigned int served = 0;
    self->running = 1;
    Py_BEGIN_ALLOW_THREADS
    const uint32_t size = self->size, mask = self->mask;
    while (served < count && !self->close_pending) {
        uint16_t head = self->avail[2 + ((last_avail + served) & mask)];
        if (head >= size)
            break;
        int nr, nw;
        if (walk(self, head, &nr, &nw) < 0)
            break;
        /* Marked before the request starts; put back if Python is to take it. */
        uint64_t previous = self->slots[head];
        self->slots[head] = sequence;
        int64_t written = serve(self, nr, nw);
        if (written < 0) {
            self->slots[head] = previous;
            break;
        }
        if (self->close_pending)
            break; /* the queue was given up during the I/O: its completion is dropped */
        uint32_t slot = (used_idx & mask);
        self->used[1 + 2 * slot] = head;
        self->used[2 + 2 * slot] = (uint32_t)written;
        used_idx = (used_idx + 1) & 0xFFFF;
        sequence++;
        served++;
    }
    Py_END_ALLOW_THREADS
    self->running = 0;
    self->served += served;
    if (served < count)
        self->fallbacks++;
    if (self->close_pending)
        release_all(self);
    return Py_BuildValue("(IIIK)", served, (last_avail + served) & 0xFFFF, used_idx, sequence);
}

static PyObject *FastPath_retire(FastPath *self, PyObject *args)
{
    unsigned int position, used_idx;
    if (!PyArg_ParseTuple(args, "II", &position, &used_idx))
        return NULL;
    if (self->closed || self->close_pending) {
        PyErr_SetString(PyExc_ValueError, "the fast path is closed");
        return NULL;
    }
    position &= 0xFFFF;
    used_idx &= 0xFFFF;
    while (position != used_idx) {
        uint32_t head = self->used[1 + 2 * (position & self->mask)];
        if (head < self->size)
            self->slots[head] = 0;
        position = (position + 1) & 0xFFFF;
    }
    Py_RETURN_NONE;
}

static PyObject *FastPath_forget(FastPath *self, PyObject *Py_UNUSED(ignored))
{
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "forget() during run()");
        return NULL;
    }
    for (int i = 0; i < self->nmaps; i++)
        PyBuffer_Release(&self->maps[i].buf);
    self->nmaps = 0;
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
    return PyLong_FromLong(self->nmaps);
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
        || PyModule_AddIntConstant(module, "TARGET_NULL", TARGET_NULL) < 0
        || PyModule_AddIntConstant(module, "TARGET_FD", TARGET_FD) < 0
        || PyModule_AddIntConstant(module, "MAX_MAPPINGS", MAX_MAPPINGS) < 0
        || PyModule_AddIntConstant(module, "MAX_SEGMENTS", MAX_SEGMENTS) < 0) {
        Py_DECREF(&FastPathType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
