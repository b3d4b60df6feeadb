/*
 * xengrant._cext: the hot primitives Python cannot express.
 *
 * 1. Atomics on 16- and 32-bit words of a shared buffer: load, store, cmpxchg,
 *    fetch_or, fetch_and, plus full/read/write barriers.  They are what the
 *    grant-entry update protocol of xen/include/public/grant_table.h needs
 *    ("Check result of SMP-safe CMPXCHG(&ent->flags, flags, 0)") and what Xen
 *    itself uses on the shared entry (guest_cmpxchg in _set_status_v1).
 *    All are sequentially consistent (__atomic_*, __ATOMIC_SEQ_CST), so a
 *    store is also the barrier the protocol asks for.
 *
 * 2. FrameView: a buffer-protocol object over a run of 4 KiB frames, either
 *    borrowed from an existing buffer (the machine memory mapping) or built by
 *    mmap()ing frames of a file descriptor (the memfd holding machine memory)
 *    into one contiguous virtual range (MAP_FIXED over a PROT_NONE
 *    reservation), like xengnttab_map_grant_refs maps several grants
 *    contiguously.  It counts its exports: close() refuses with BufferError
 *    while any memoryview, slice or numpy array still uses it, so no Python
 *    code can touch a frame after it was unmapped.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include "structmember.h"
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define XG_PAGE_SIZE 4096

/* Py_NewRef is Python 3.10+; the package supports 3.9 (pyproject's
 * requires-python), so give it the 3.10 definition there. */
#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *xg_newref(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
#define Py_NewRef(o) xg_newref((PyObject *)(o))
#endif

/* ------------------------------------------------------------------ */
/* FrameView                                                            */
/* ------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    char *addr;          /* start of the frames */
    Py_ssize_t len;      /* bytes */
    int readonly;
    int owned;           /* 1: we mmap()ed it and must munmap() it */
    int closed;
    Py_ssize_t exports;  /* live Py_buffer exports */
    Py_buffer base;      /* borrowed views hold their base buffer */
    int has_base;
    PyObject *on_close;  /* called once when the frames are unmapped, or NULL */
} FrameView;

static PyTypeObject FrameView_Type;

static int
fv_getbuffer(PyObject *obj, Py_buffer *view, int flags)
{
    FrameView *self = (FrameView *)obj;
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "FrameView is closed (the frames were unmapped)");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, obj, self->addr, self->len, self->readonly, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void
fv_releasebuffer(PyObject *obj, Py_buffer *view)
{
    (void)view;
    ((FrameView *)obj)->exports--;
}

static PyBufferProcs fv_as_buffer = {fv_getbuffer, fv_releasebuffer};

/* Run and drop on_close (the hypervisor's put_page_from_l1e of a PV guest's
 * own frames).  An exception it raises is reported as unraisable: closing
 * cannot fail once the frames are unmapped. */
static void
fv_run_on_close(FrameView *self)
{
    PyObject *cb = self->on_close;
    if (cb == NULL)
        return;
    self->on_close = NULL;
    PyObject *exc_type, *exc_value, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
    PyObject *r = PyObject_CallNoArgs(cb);
    if (r == NULL)
        PyErr_WriteUnraisable(cb);
    Py_XDECREF(r);
    Py_DECREF(cb);
    PyErr_Restore(exc_type, exc_value, exc_tb);
}

static void
fv_do_close(FrameView *self)
{
    if (self->closed)
        return;
    self->closed = 1;
    if (self->owned && self->addr != NULL && self->len > 0)
        munmap(self->addr, (size_t)self->len);
    if (self->has_base) {
        PyBuffer_Release(&self->base);
        self->has_base = 0;
    }
    self->addr = NULL;
    fv_run_on_close(self);
}

static PyObject *
fv_close(FrameView *self, PyObject *Py_UNUSED(ignored))
{
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError,
                     "cannot unmap: %zd exported view(s) of these frames are still alive "
                     "(release memoryviews/numpy arrays first)",
                     self->exports);
        return NULL;
    }
    fv_do_close(self);
    Py_RETURN_NONE;
}

static void
fv_dealloc(FrameView *self)
{
    /* exports cannot be > 0 here: every export holds a reference. */
    fv_do_close(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
fv_get_exports(FrameView *self, void *Py_UNUSED(c))
{
    return PyLong_FromSsize_t(self->exports);
}
static PyObject *
fv_get_closed(FrameView *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->closed);
}
static PyObject *
fv_get_readonly(FrameView *self, void *Py_UNUSED(c))
{
    return PyBool_FromLong(self->readonly);
}
static PyObject *
fv_get_address(FrameView *self, void *Py_UNUSED(c))
{
    return PyLong_FromVoidPtr(self->addr);
}
static PyObject *
fv_get_on_close(FrameView *self, void *Py_UNUSED(c))
{
    PyObject *cb = self->on_close != NULL ? self->on_close : Py_None;
    Py_INCREF(cb);
    return cb;
}
static int
fv_set_on_close(FrameView *self, PyObject *value, void *Py_UNUSED(c))
{
    if (value == NULL || value == Py_None) {
        Py_CLEAR(self->on_close);
        return 0;
    }
    if (!PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "on_close must be callable or None");
        return -1;
    }
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "FrameView is closed");
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(self->on_close, value);
    return 0;
}

static Py_ssize_t
fv_length(FrameView *self)
{
    return self->closed ? 0 : self->len;
}

static PySequenceMethods fv_as_sequence = {.sq_length = (lenfunc)fv_length};

static PyGetSetDef fv_getset[] = {
    {"exports", (getter)fv_get_exports, NULL, "number of live buffer exports", NULL},
    {"closed", (getter)fv_get_closed, NULL, "True once close() succeeded", NULL},
    {"readonly", (getter)fv_get_readonly, NULL, "True if writes are refused", NULL},
    {"address", (getter)fv_get_address, NULL, "virtual address of the first byte", NULL},
    {"on_close", (getter)fv_get_on_close, (setter)fv_set_on_close,
     "callable run once when the frames are unmapped (close() or deallocation), or None",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef fv_methods[] = {
    {"close", (PyCFunction)fv_close, METH_NOARGS,
     "Unmap the frames. Raises BufferError while exports are alive."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FrameView_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xengrant._cext.FrameView",
    .tp_basicsize = sizeof(FrameView),
    .tp_dealloc = (destructor)fv_dealloc,
    .tp_as_buffer = &fv_as_buffer,
    .tp_as_sequence = &fv_as_sequence,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Frames of machine memory seen as one contiguous buffer.",
    .tp_methods = fv_methods,
    .tp_getset = fv_getset,
};

/* borrow(base, offset, length, readonly) -> FrameView */
static PyObject *
xg_borrow(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "borrow(base, offset, length, readonly)");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    Py_ssize_t len = PyLong_AsSsize_t(args[2]);
    int ro = PyObject_IsTrue(args[3]);
    if ((off == -1 || len == -1 || ro == -1) && PyErr_Occurred())
        return NULL;
    FrameView *fv = PyObject_New(FrameView, &FrameView_Type);
    if (fv == NULL)
        return NULL;
    fv->addr = NULL;
    fv->len = 0;
    fv->readonly = ro;
    fv->owned = 0;
    fv->on_close = NULL;
    fv->closed = 1; /* until fully initialised */
    fv->exports = 0;
    fv->has_base = 0;
    if (PyObject_GetBuffer(args[0], &fv->base, PyBUF_WRITABLE) < 0) {
        Py_DECREF(fv);
        return NULL;
    }
    fv->has_base = 1;
    if (off < 0 || len < 0 || off > fv->base.len || len > fv->base.len - off) {
        PyErr_Format(PyExc_ValueError, "range [%zd, %zd) outside the %zd-byte base buffer", off,
                     off + len, fv->base.len);
        Py_DECREF(fv);
        return NULL;
    }
    fv->addr = (char *)fv->base.buf + off;
    fv->len = len;
    fv->closed = 0;
    return (PyObject *)fv;
}

/* vmap(fd, frames, readonly) -> FrameView; frames is a sequence of page numbers in the
 * file(s); fd is one descriptor, or a sequence of one descriptor per frame (each frame
 * from its own file: the service's per-domain memfds) */
static PyObject *
xg_vmap(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "vmap(fd, frames, readonly)");
        return NULL;
    }
    int fd = -1;
    PyObject *fdseq = NULL;
    if (PyLong_Check(args[0])) {
        long fdl = PyLong_AsLong(args[0]);
        if (fdl == -1 && PyErr_Occurred())
            return NULL;
        if (fdl < 0 || fdl > INT_MAX) {
            PyErr_SetString(PyExc_ValueError, "bad file descriptor");
            return NULL;
        }
        fd = (int)fdl;
    } else {
        fdseq = PySequence_Fast(args[0], "fd must be an int or a sequence of ints");
        if (fdseq == NULL)
            return NULL;
    }
    int ro = PyObject_IsTrue(args[2]);
    if (ro == -1) {
        Py_XDECREF(fdseq);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[1], "frames must be a sequence of ints");
    if (seq == NULL) {
        Py_XDECREF(fdseq);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n <= 0 || (fdseq != NULL && PySequence_Fast_GET_SIZE(fdseq) != n)) {
        Py_DECREF(seq);
        Py_XDECREF(fdseq);
        PyErr_SetString(PyExc_ValueError,
                        "vmap needs at least one frame (and one fd per frame)");
        return NULL;
    }
    size_t total = (size_t)n * XG_PAGE_SIZE;
    char *base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        Py_DECREF(seq);
        Py_XDECREF(fdseq);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int prot = ro ? PROT_READ : (PROT_READ | PROT_WRITE);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject **fds = fdseq != NULL ? PySequence_Fast_ITEMS(fdseq) : NULL;
    Py_ssize_t i = 0;
    while (i < n) {
        long long first = PyLong_AsLongLong(items[i]);
        if (first < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "negative frame number");
            goto fail;
        }
        if (fds != NULL) {
            long f = PyLong_AsLong(fds[i]);
            if (f < 0 || f > INT_MAX) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "bad file descriptor");
                goto fail;
            }
            fd = (int)f;
        }
        Py_ssize_t run = 1;
        while (i + run < n) {
            long long next = PyLong_AsLongLong(items[i + run]);
            if (next == -1 && PyErr_Occurred())
                goto fail;
            if (next != first + run)
                break;
            if (fds != NULL) {
                long f = PyLong_AsLong(fds[i + run]);
                if (f == -1 && PyErr_Occurred())
                    goto fail;
                if (f != fd)
                    break;
            }
            run++;
        }
        void *want = base + (size_t)i * XG_PAGE_SIZE;
        void *got = mmap(want, (size_t)run * XG_PAGE_SIZE, prot, MAP_SHARED | MAP_FIXED, fd,
                         (off_t)first * XG_PAGE_SIZE);
        if (got == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        i += run;
    }
    Py_DECREF(seq);
    Py_XDECREF(fdseq);
    FrameView *fv = PyObject_New(FrameView, &FrameView_Type);
    if (fv == NULL) {
        munmap(base, total);
        return NULL;
    }
    fv->addr = base;
    fv->len = (Py_ssize_t)total;
    fv->readonly = ro;
    fv->owned = 1;
    fv->on_close = NULL;
    fv->closed = 0;
    fv->exports = 0;
    fv->has_base = 0;
    return (PyObject *)fv;
fail:
    munmap(base, total);
    Py_DECREF(seq);
    Py_XDECREF(fdseq);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* Atomics                                                              */
/* ------------------------------------------------------------------ */

/* Resolve (buffer, offset) to an aligned, writable address of `size` bytes. */
static void *
resolve(PyObject *obj, PyObject *offobj, size_t size, Py_buffer *view, int *have_view)
{
    Py_ssize_t off = PyLong_AsSsize_t(offobj);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    char *buf;
    Py_ssize_t len;
    *have_view = 0;
    if (Py_IS_TYPE(obj, &FrameView_Type)) {
        FrameView *fv = (FrameView *)obj;
        if (fv->closed) {
            PyErr_SetString(PyExc_ValueError, "FrameView is closed");
            return NULL;
        }
        if (fv->readonly) {
            PyErr_SetString(PyExc_TypeError, "atomic access needs writable memory");
            return NULL;
        }
        buf = fv->addr;
        len = fv->len;
    } else {
        if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE) < 0)
            return NULL;
        *have_view = 1;
        buf = view->buf;
        len = view->len;
    }
    if (off < 0 || (size_t)off + size > (size_t)len) {
        PyErr_Format(PyExc_IndexError, "offset %zd out of range for a %zd-byte buffer", off, len);
        goto fail;
    }
    if (((uintptr_t)(buf + off)) % size != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zu-byte aligned", off, size);
        goto fail;
    }
    return buf + off;
fail:
    if (*have_view)
        PyBuffer_Release(view);
    *have_view = 0;
    return NULL;
}

#define DONE()                                                                                     \
    do {                                                                                           \
        if (have_view)                                                                             \
            PyBuffer_Release(&view);                                                               \
    } while (0)

#define ARGCHECK(n, sig)                                                                           \
    if (nargs != (n)) {                                                                            \
        PyErr_SetString(PyExc_TypeError, sig);                                                     \
        return NULL;                                                                               \
    }

/* an int argument; -1 with an exception set if it is not one (or out of range) */
static int
xg_as_int(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "int argument out of range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* o as an unsigned value <= maxv; -1 (no exception) if it is not one (not
 * an int, negative, or too big) */
static int
xg_fits(PyObject *o, unsigned long long maxv, unsigned long long *out)
{
    if (!PyLong_Check(o))
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (v > maxv)
        return -1;
    *out = v;
    return 0;
}

/* xg_fits for args[0..n) against vmax[0..n): 1 if every one fits (into v), else 0 */
static int
xg_fit_all(PyObject *const *args, int n, const unsigned long long *vmax, unsigned long long *v)
{
    for (int i = 0; i < n; i++)
        if (xg_fits(args[i], vmax[i], &v[i]) < 0)
            return 0;
    return 1;
}

#define GET_U(var, obj, T, maxv)                                                                   \
    unsigned long long var##_ll = PyLong_AsUnsignedLongLong(obj);                                  \
    if (var##_ll == (unsigned long long)-1 && PyErr_Occurred())                                    \
        return NULL;                                                                               \
    if (var##_ll > (maxv)) {                                                                       \
        PyErr_SetString(PyExc_OverflowError, #var " does not fit the word");                       \
        return NULL;                                                                               \
    }                                                                                              \
    T var = (T)var##_ll;

#define DEFINE_ATOMICS(bits, T, maxv)                                                              \
    static PyObject *xg_load##bits(PyObject *m, PyObject *const *args, Py_ssize_t nargs)           \
    {                                                                                              \
        (void)m;                                                                                   \
        ARGCHECK(2, "load" #bits "(buffer, offset)")                                               \
        Py_buffer view;                                                                            \
        int have_view;                                                                             \
        T *p = resolve(args[0], args[1], sizeof(T), &view, &have_view);                            \
        if (p == NULL)                                                                             \
            return NULL;                                                                           \
        T v = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                                \
        DONE();                                                                                    \
        return PyLong_FromUnsignedLong(v);                                                         \
    }                                                                                              \
    static PyObject *xg_store##bits(PyObject *m, PyObject *const *args, Py_ssize_t nargs)          \
    {                                                                                              \
        (void)m;                                                                                   \
        ARGCHECK(3, "store" #bits "(buffer, offset, value)")                                       \
        GET_U(val, args[2], T, maxv)                                                               \
        Py_buffer view;                                                                            \
        int have_view;                                                                             \
        T *p = resolve(args[0], args[1], sizeof(T), &view, &have_view);                            \
        if (p == NULL)                                                                             \
            return NULL;                                                                           \
        __atomic_store_n(p, val, __ATOMIC_SEQ_CST);                                                \
        DONE();                                                                                    \
        Py_RETURN_NONE;                                                                            \
    }                                                                                              \
    static PyObject *xg_cmpxchg##bits(PyObject *m, PyObject *const *args, Py_ssize_t nargs)        \
    {                                                                                              \
        (void)m;                                                                                   \
        ARGCHECK(4, "cmpxchg" #bits "(buffer, offset, old, new) -> previous value")                \
        GET_U(old, args[2], T, maxv)                                                               \
        GET_U(new, args[3], T, maxv)                                                               \
        Py_buffer view;                                                                            \
        int have_view;                                                                             \
        T *p = resolve(args[0], args[1], sizeof(T), &view, &have_view);                            \
        if (p == NULL)                                                                             \
            return NULL;                                                                           \
        T expected = old;                                                                          \
        __atomic_compare_exchange_n(p, &expected, new, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
        DONE();                                                                                    \
        return PyLong_FromUnsignedLong(expected);                                                  \
    }                                                                                              \
    static PyObject *xg_fetch_or##bits(PyObject *m, PyObject *const *args, Py_ssize_t nargs)       \
    {                                                                                              \
        (void)m;                                                                                   \
        ARGCHECK(3, "fetch_or" #bits "(buffer, offset, bits) -> previous value")                   \
        GET_U(val, args[2], T, maxv)                                                               \
        Py_buffer view;                                                                            \
        int have_view;                                                                             \
        T *p = resolve(args[0], args[1], sizeof(T), &view, &have_view);                            \
        if (p == NULL)                                                                             \
            return NULL;                                                                           \
        T prev = __atomic_fetch_or(p, val, __ATOMIC_SEQ_CST);                                      \
        DONE();                                                                                    \
        return PyLong_FromUnsignedLong(prev);                                                      \
    }                                                                                              \
    static PyObject *xg_fetch_and##bits(PyObject *m, PyObject *const *args, Py_ssize_t nargs)      \
    {                                                                                              \
        (void)m;                                                                                   \
        ARGCHECK(3, "fetch_and" #bits "(buffer, offset, mask) -> previous value")                  \
        GET_U(val, args[2], T, maxv)                                                               \
        Py_buffer view;                                                                            \
        int have_view;                                                                             \
        T *p = resolve(args[0], args[1], sizeof(T), &view, &have_view);                            \
        if (p == NULL)                                                                             \
            return NULL;                                                                           \
        T prev = __atomic_fetch_and(p, val, __ATOMIC_SEQ_CST);                                     \
        DONE();                                                                                    \
        return PyLong_FromUnsignedLong(prev);                                                      \
    }

DEFINE_ATOMICS(16, uint16_t, 0xffffULL)
DEFINE_ATOMICS(32, uint32_t, 0xffffffffULL)

static PyObject *
xg_mb(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}
static PyObject *
xg_wmb(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    Py_RETURN_NONE;
}
static PyObject *
xg_rmb(PyObject *m, PyObject *Py_UNUSED(a))
{
    (void)m;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ */
/* GNTTABOP_copy fast path                                              */
/* ------------------------------------------------------------------ */

/*
 * copy_run(mem, uop, start, count, ld, domains) -> index
 *
 * Runs ops start.. of a GNTTABOP_copy batch while every op is the common
 * success case of xengrant.emu.gnttab_copy.copy_one, and returns the index of
 * the first op it does not handle (count if none): Python runs that one.
 * An op is handled only if: both domains exist (DOMID_SELF is ld), a gmfn
 * side says DOMID_SELF and its gfn is RAM or a grant-table frame of ld; a
 * gref side's domain is not dying, has a v1 table, the ref is in range and
 * has no active entry (no pins), both sides are not the same entry, and
 * offset + len <= 4096 on both sides.  The pin is the one of
 * acquire_grant_for_copy/_set_status_v1 (5 cmpxchg tries of the {flags,
 * domid} word), source then destination, each frame read after its pin and
 * resolved through the granter's p2m; the release is release_grant_for_copy's
 * (clear GTF_writing, then GTF_reading), destination first.  If a pin or a
 * frame fails, the pins taken for that op are released the same way and the
 * op is left to Python, which runs it again from the start.  No Python code
 * runs in here (only dict/list/int reads), so the domain objects are stable.
 */

#define XG_DOMID_SELF 0x7FF0
#define XG_GNTCOPY_source_gref 1
#define XG_GNTCOPY_dest_gref 2
#define XG_GTF_permit_access 1
#define XG_GTF_type_mask 3
#define XG_GTF_readonly (1 << 2)
#define XG_GTF_reading (1 << 3)
#define XG_GTF_writing (1 << 4)
#define XG_PER_V1 512
#define XG_COPY_OP_SIZE 40
#define XG_CMPXCHG_TRIES 5
/* domain.py: P2M_RAM_RW, P2M_GNTTAB_SHARED, P2M_GNTTAB_STATUS */
#define XG_P2M_RAM_RW 0
#define XG_P2M_GNTTAB_SHARED 3
#define XG_P2M_GNTTAB_STATUS 4
#define XG_DOM_CACHE 8

typedef struct {
    PyObject *obj;    /* borrowed DomainState (held by the domains dict) */
    PyObject *p2m;    /* new references from here on */
    PyObject *shared;
    PyObject *active;
    int p2m_ok;       /* p2m is a plain dict: gmfn sides may use it */
    int usable;       /* plain containers, v1 table, not dying: gref sides may use it */
} xg_dom;

static void
xg_dom_clear(xg_dom *c, int n)
{
    for (int i = 0; i < n; i++) {
        Py_CLEAR(c[i].p2m);
        Py_CLEAR(c[i].shared);
        Py_CLEAR(c[i].active);
        c[i].obj = NULL;
    }
}

/* The attributes the hot paths read, their names interned once at module
 * init: PyObject_GetAttrString would build (and hash) a new str each call. */
enum { XA_p2m, XA_gt, XA_is_dying, XA_shared, XA_active, XA_version, XA_domid, XA_pv, XA_maptrack, XA_entries, XA_free, XG_NATTR };
static const char *const xg_attr_names[XG_NATTR] = {"p2m", "gt", "is_dying", "shared", "active", "version", "domid", "pv", "maptrack", "entries", "_free"};
static PyObject *xg_attr_str[XG_NATTR];

static PyObject *
xg_getattr(PyObject *o, int which)
{
    return PyObject_GetAttr(o, xg_attr_str[which]);
}

/* The cached attributes of domain object d; NULL with an exception set, or
 * NULL without one when the cache is full.  Slots are never reused within a
 * call, so pointers to them stay valid. */
static xg_dom *
xg_dom_get(xg_dom *cache, int *ncache, PyObject *d)
{
    for (int i = 0; i < *ncache; i++)
        if (cache[i].obj == d)
            return &cache[i];
    if (*ncache == XG_DOM_CACHE)
        return NULL; /* no exception: the caller leaves the op to Python */
    xg_dom *c = &cache[*ncache];
    PyObject *gt = NULL, *ver = NULL, *dying = NULL;
    c->p2m = xg_getattr(d, XA_p2m);
    gt = xg_getattr(d, XA_gt);
    dying = xg_getattr(d, XA_is_dying);
    if (c->p2m == NULL || gt == NULL || dying == NULL)
        goto fail;
    c->shared = xg_getattr(gt, XA_shared);
    c->active = xg_getattr(gt, XA_active);
    ver = xg_getattr(gt, XA_version);
    if (c->shared == NULL || c->active == NULL || ver == NULL)
        goto fail;
    long v = PyLong_AsLong(ver);
    int y = PyObject_IsTrue(dying);
    if ((v == -1 && PyErr_Occurred()) || y < 0)
        goto fail;
    /* subclasses (e.g. the service's mirrored p2m) may run Python code on
     * lookups: the ops of such a domain are left to Python */
    c->p2m_ok = PyDict_CheckExact(c->p2m);
    c->usable = c->p2m_ok && PyList_CheckExact(c->shared) && PyDict_CheckExact(c->active) &&
                v == 1 && !y;
    c->obj = d;
    (*ncache)++;
    Py_DECREF(gt);
    Py_DECREF(ver);
    Py_DECREF(dying);
    return c;
fail:
    Py_XDECREF(gt);
    Py_XDECREF(ver);
    Py_XDECREF(dying);
    Py_CLEAR(c->p2m);
    Py_CLEAR(c->shared);
    Py_CLEAR(c->active);
    return NULL;
}

/* What every batch run (copy_run, map_run, unmap_run) holds: the machine
 * memory and the ops as buffers, where the run starts and ends, and the
 * domain attributes looked up so far. */
typedef struct {
    Py_buffer mem, uop;
    int have_mem, have_uop;
    Py_ssize_t start, count;
    Py_ssize_t nframes;  /* frames in mem */
    xg_dom cache[XG_DOM_CACHE];
    int ncache;
    long last_dom;       /* the granter of the previous op, looked up once */
    xg_dom *last_rd;
} xg_batch;

static void
xg_batch_end(xg_batch *b)
{
    xg_dom_clear(b->cache, b->ncache);
    if (b->have_uop)
        PyBuffer_Release(&b->uop);
    if (b->have_mem)
        PyBuffer_Release(&b->mem);
    b->have_uop = b->have_mem = 0;
}

/* args[0..3] = (mem, uop, start, count) of a run over ops of opsize bytes;
 * 0, or -1 with an exception set and nothing held */
static int
xg_batch_begin(xg_batch *b, PyObject *const *args, Py_ssize_t opsize, const char *name)
{
    memset(b, 0, sizeof(*b));
    b->last_dom = -1;
    b->start = PyLong_AsSsize_t(args[2]);
    if (b->start == -1 && PyErr_Occurred())
        return -1;
    b->count = PyLong_AsSsize_t(args[3]);
    if (b->count == -1 && PyErr_Occurred())
        return -1;
    if (PyObject_GetBuffer(args[0], &b->mem, PyBUF_WRITABLE) < 0)
        return -1;
    b->have_mem = 1;
    if (PyObject_GetBuffer(args[1], &b->uop, PyBUF_WRITABLE) < 0) {
        xg_batch_end(b);
        return -1;
    }
    b->have_uop = 1;
    b->nframes = b->mem.len / XG_PAGE_SIZE;
    if (b->start < 0 || b->count > b->uop.len / opsize) {
        PyErr_Format(PyExc_ValueError, "%s: start/count out of range", name);
        xg_batch_end(b);
        return -1;
    }
    return 0;
}

/* p2m[gfn]: 1 with *mfn and *typ set for an (mfn, type) pair, 0 if gfn holds
 * nothing, 2 if it holds something else, -1 on error. */
static int
xg_p2m_lookup(PyObject *p2m, unsigned long long gfn, long long *mfn, long long *typ)
{
    PyObject *k = PyLong_FromUnsignedLongLong(gfn);
    if (k == NULL)
        return -1;
    PyObject *e = PyDict_GetItemWithError(p2m, k);
    Py_DECREF(k);
    if (e == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 2)
        return 2;
    *typ = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 1));
    if (*typ == -1 && PyErr_Occurred())
        return -1;
    *mfn = PyLong_AsLongLong(PyTuple_GET_ITEM(e, 0));
    return (*mfn == -1 && PyErr_Occurred()) ? -1 : 1;
}

/* get_paged_frame: 1 and *mfn if gfn is RAM or a grant-table frame, 0 if
 * not, -1 on error. */
static int
xg_p2m_frame(PyObject *p2m, unsigned long long gfn, Py_ssize_t nframes, Py_ssize_t *mfn)
{
    long long f, t;
    int r = xg_p2m_lookup(p2m, gfn, &f, &t);
    if (r != 1)
        return r < 0 ? -1 : 0;
    if (t != XG_P2M_RAM_RW && t != XG_P2M_GNTTAB_SHARED && t != XG_P2M_GNTTAB_STATUS)
        return 0;
    if (f < 0 || f >= nframes)
        return 0;
    *mfn = (Py_ssize_t)f;
    return 1;
}

typedef struct {
    int is_gref;
    xg_dom *dom;
    uint32_t ref;
    uint16_t *flags;  /* the entry's v1 flags word (gref sides) */
    unsigned long long gfn;
    uint16_t off;
    int readonly;
} xg_side;

/* acquire_grant_for_copy for an entry without pins: _set_status_v1, then
 * the frame through the granter's p2m.  1: pinned, *mfn set; 0: refused
 * (nothing left set); -1: error (nothing left set). */
static int
xg_pin(xg_side *s, uint16_t ldomid, Py_ssize_t nframes, Py_ssize_t *mfn)
{
    uint32_t *word = (uint32_t *)s->flags;
    uint32_t scombo = __atomic_load_n(word, __ATOMIC_SEQ_CST);
    int ok = 0;
    for (int t = 0; t < XG_CMPXCHG_TRIES; t++) {
        uint16_t flags = (uint16_t)(scombo & 0xFFFF), domid = (uint16_t)(scombo >> 16);
        if ((flags & XG_GTF_type_mask) != XG_GTF_permit_access || domid != ldomid)
            return 0;
        uint32_t new = scombo | XG_GTF_reading;
        if (!s->readonly) {
            new |= XG_GTF_writing;
            if (flags & XG_GTF_readonly)
                return 0;
        }
        if (__atomic_compare_exchange_n(word, &scombo, new, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST)) {
            ok = 1;
            break;
        }
    }
    if (!ok)
        return 0;
    /* the frame is read once the entry is pinned, as Python reads it */
    uint32_t frame;
    memcpy(&frame, (char *)s->flags + 4, 4);
    int r = xg_p2m_frame(s->dom->p2m, frame, nframes, mfn);
    if (r != 1) {
        if (!s->readonly)
            __atomic_fetch_and(s->flags, (uint16_t)~XG_GTF_writing, __ATOMIC_SEQ_CST);
        __atomic_fetch_and(s->flags, (uint16_t)~XG_GTF_reading, __ATOMIC_SEQ_CST);
    }
    return r;
}

/* release_grant_for_copy of the last pin: _undo_pin's two clears. */
static void
xg_unpin(xg_side *s)
{
    if (!s->readonly)
        __atomic_fetch_and(s->flags, (uint16_t)~XG_GTF_writing, __ATOMIC_SEQ_CST);
    __atomic_fetch_and(s->flags, (uint16_t)~XG_GTF_reading, __ATOMIC_SEQ_CST);
}

static PyObject *
xg_copy_run(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    ARGCHECK(6, "copy_run(mem, uop, start, count, ld, domains) -> index")
    PyObject *ld = args[4], *domains = args[5];
    if (!PyDict_Check(domains)) {
        PyErr_SetString(PyExc_TypeError, "copy_run: domains must be a dict");
        return NULL;
    }
    xg_batch b;
    if (xg_batch_begin(&b, args, XG_COPY_OP_SIZE, "copy_run") < 0)
        return NULL;
    PyObject *ret = NULL;
    char *m = b.mem.buf;
    Py_ssize_t nframes = b.nframes, i = b.start, count = b.count;
    long ldomid_l;
    {
        PyObject *o = xg_getattr(ld, XA_domid);
        if (o == NULL)
            goto out;
        ldomid_l = PyLong_AsLong(o);
        Py_DECREF(o);
        if (ldomid_l == -1 && PyErr_Occurred())
            goto out;
    }
    uint16_t ldomid = (uint16_t)ldomid_l;
    xg_dom *ldc = xg_dom_get(b.cache, &b.ncache, ld);
    if (ldc == NULL)
        goto out;
    for (; i < count; i++) {
        unsigned char *op = (unsigned char *)b.uop.buf + i * XG_COPY_OP_SIZE;
        uint64_t u[2];
        uint16_t dom[2], off[2], len, flags;
        memcpy(&u[0], op, 8);
        memcpy(&dom[0], op + 8, 2);
        memcpy(&off[0], op + 10, 2);
        memcpy(&u[1], op + 16, 8);
        memcpy(&dom[1], op + 24, 2);
        memcpy(&off[1], op + 26, 2);
        memcpy(&len, op + 32, 2);
        memcpy(&flags, op + 34, 2);
        xg_side side[2];
        Py_ssize_t mfn[2];
        int bad = 0;
        for (int k = 0; k < 2 && !bad; k++) {
            xg_side *s = &side[k];
            s->is_gref = (flags & (k == 0 ? XG_GNTCOPY_source_gref : XG_GNTCOPY_dest_gref)) != 0;
            s->readonly = k == 0;
            s->off = off[k];
            if ((unsigned)off[k] + len > XG_PAGE_SIZE) {
                bad = 1;
                break;
            }
            PyObject *d;
            if (dom[k] == XG_DOMID_SELF) {
                d = ld;
            } else {
                if (!s->is_gref) {
                    bad = 1;
                    break;
                }
                PyObject *key = PyLong_FromLong(dom[k]);
                if (key == NULL)
                    goto out;
                d = PyDict_GetItemWithError(domains, key);
                Py_DECREF(key);
                if (d == NULL) {
                    if (PyErr_Occurred())
                        goto out;
                    bad = 1;
                    break;
                }
            }
            s->dom = xg_dom_get(b.cache, &b.ncache, d);
            if (s->dom == NULL) {
                if (PyErr_Occurred())
                    goto out;
                bad = 1;
                break;
            }
            if (!s->is_gref) {
                if (!s->dom->p2m_ok) {
                    bad = 1;
                    break;
                }
                s->gfn = u[k];
                int r = xg_p2m_frame(s->dom->p2m, s->gfn, nframes, &mfn[k]);
                if (r < 0)
                    goto out;
                if (r == 0)
                    bad = 1;
                continue;
            }
            s->ref = (uint32_t)u[k];
            if (!s->dom->usable ||
                (Py_ssize_t)s->ref >= PyList_GET_SIZE(s->dom->shared) * XG_PER_V1) {
                bad = 1;
                break;
            }
            PyObject *key = PyLong_FromUnsignedLong(s->ref);
            if (key == NULL)
                goto out;
            int in = PyDict_Contains(s->dom->active, key);
            Py_DECREF(key);
            if (in < 0)
                goto out;
            Py_ssize_t sf = PyLong_AsSsize_t(PyList_GET_ITEM(s->dom->shared, s->ref / XG_PER_V1));
            if (sf == -1 && PyErr_Occurred())
                goto out;
            if (in || sf < 0 || sf >= nframes) {
                bad = 1;
                break;
            }
            s->flags = (uint16_t *)(m + sf * XG_PAGE_SIZE + (s->ref % XG_PER_V1) * 8);
            if (k == 1 && side[0].is_gref && side[0].flags == s->flags) {
                bad = 1;  /* the same entry twice: the second claim sees a pin */
                break;
            }
        }
        if (bad)
            break;
        /* claim the source, then the destination (gnttab_copy_claim_buf) */
        if (side[0].is_gref) {
            int r = xg_pin(&side[0], ldomid, nframes, &mfn[0]);
            if (r < 0)
                goto out;
            if (r == 0)
                break;
        }
        if (side[1].is_gref) {
            int r = xg_pin(&side[1], ldomid, nframes, &mfn[1]);
            if (r != 1) {
                if (side[0].is_gref)
                    xg_unpin(&side[0]);
                if (r < 0)
                    goto out;
                break;
            }
        }
        if (len)
            memmove(m + mfn[1] * XG_PAGE_SIZE + off[1], m + mfn[0] * XG_PAGE_SIZE + off[0], len);
        if (side[1].is_gref)
            xg_unpin(&side[1]);
        if (side[0].is_gref)
            xg_unpin(&side[0]);
        memset(op + 36, 0, 2);  /* GNTST_okay */
    }
    ret = PyLong_FromSsize_t(i);
out:
    xg_batch_end(&b);
    return ret;
}

/* ------------------------------------------------------------------ */
/* GNTTABOP_map_grant_ref / unmap_grant_ref fast paths                  */
/* ------------------------------------------------------------------ */

/*
 * map_run(mem, uop, start, count, ld, domains, refcount) -> index
 *
 * Runs ops start.. of a GNTTABOP_map_grant_ref batch while every op is the
 * common success case of xengrant.emu.gnttab_map.map_grant_ref and returns
 * the index of the first op it does not take (count if none); Python runs
 * that one.  An op is taken only if: the caller is HVM (not pv) with a plain
 * dict p2m; the flags ask for a host map and no device, application or PTE
 * map; the granter exists, is not dying and has a v1 table; the maptrack free
 * list holds more than its sentinel (no growth); the ref is in range and has
 * no active entry (first pin); the entry is permit_access (not sub_page) for
 * the caller and, for a writable map, not readonly; the host gfn is a hole.
 * The pin is _set_status_v1's (5 cmpxchg tries); the frame is read after the
 * pin and must be RAM or a grant-table frame in the granter's p2m, else the
 * pin is dropped as _undo_pin drops it and the op is left to Python, which
 * runs it again.  Then, as map_grant_ref does: the handle is the free list's
 * head (popleft), the maptrack entry a GrantMapping(flags & (host|device|
 * readonly), dom, ref, mfn, gfn), the active entry an ActiveGrant(ldomid, mfn,
 * 0, 4096, False) with one host pin, the p2m entry (mfn, grant_map_ro/rw), one
 * more machine reference; status, handle and dev_bus_addr are written back.
 * The records are C structs filled in place, so no Python code runs in here.
 */

#define XG_GNTMAP_device_map 1
#define XG_GNTMAP_host_map 2
#define XG_GNTMAP_readonly 4
#define XG_GNTMAP_application_map 8
#define XG_GNTMAP_contains_pte 16
#define XG_GTF_sub_page (1 << 8)
#define XG_MAP_OP_SIZE 32
#define XG_UNMAP_OP_SIZE 24
#define XG_P2M_GRANT_MAP_RW 1
#define XG_P2M_GRANT_MAP_RO 2
#define XG_GNTPIN_hstw_inc 1L
#define XG_GNTPIN_hstr_inc (1L << 8)
#define XG_GNTPIN_WRITE_MASK 0x00FF00FFL

/* _set_status_v1 for a map of an entry without pins: 1 pinned, 0 refused
 * (nothing changed). */
static int
xg_pin_map(uint32_t *word, uint16_t ldomid, int readonly)
{
    uint32_t scombo = __atomic_load_n(word, __ATOMIC_SEQ_CST);
    for (int t = 0; t < XG_CMPXCHG_TRIES; t++) {
        uint16_t flags = (uint16_t)(scombo & 0xFFFF), domid = (uint16_t)(scombo >> 16);
        if ((flags & (XG_GTF_type_mask | XG_GTF_sub_page)) != XG_GTF_permit_access ||
            domid != ldomid)
            return 0;
        uint32_t new = scombo | XG_GTF_reading;
        if (!readonly) {
            new |= XG_GTF_writing;
            if (flags & XG_GTF_readonly)
                return 0;
        }
        if (__atomic_compare_exchange_n(word, &scombo, new, 0, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
            return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* ActiveGrant and GrantMapping: the hypervisor's per-grant records     */
/* ------------------------------------------------------------------ */

/*
 * ActiveGrant is grant_table.c's struct active_grant_entry and GrantMapping
 * its struct grant_mapping (one maptrack entry plus the gfn it is mapped at).
 * They are plain C structs with int members so that the map/unmap runs below
 * create and update them without running Python code, and so that they are
 * not tracked by the cyclic GC (they hold no references).  Python code uses
 * them as ordinary objects with attributes (xengrant.emu.grant_table and
 * xengrant.emu.maptrack re-export them).
 */
typedef struct {
    PyObject_HEAD
    long long pin, domid, mfn, start, length;
    char is_sub_page;
} XgActive;

static PyTypeObject XgActive_Type;

static PyMemberDef act_members[] = {
    {"pin", T_LONGLONG, offsetof(XgActive, pin), 0, "the four packed pin counters (GNTPIN_*)"},
    {"domid", T_LONGLONG, offsetof(XgActive, domid), 0, "the domain the grant is pinned for"},
    {"mfn", T_LONGLONG, offsetof(XgActive, mfn), 0, "the machine frame granted"},
    {"start", T_LONGLONG, offsetof(XgActive, start), 0, "first byte usable (sub-page grants)"},
    {"length", T_LONGLONG, offsetof(XgActive, length), 0, "bytes usable from start"},
    {"is_sub_page", T_BOOL, offsetof(XgActive, is_sub_page), 0,
     "a v2 sub-page grant (never mappable)"},
    {NULL, 0, 0, 0, NULL},
};

static int
act_init(XgActive *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = {"domid", "mfn", "start", "length", "is_sub_page", NULL};
    int sub = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLp:ActiveGrant", kwl, &self->domid,
                                     &self->mfn, &self->start, &self->length, &sub))
        return -1;
    self->pin = 0;
    self->is_sub_page = (char)(sub != 0);
    return 0;
}

static PyObject *
act_repr(XgActive *s)
{
    return PyUnicode_FromFormat(
        "ActiveGrant(pin=0x%08x, domid=%lld, mfn=%lld, start=%lld, length=%lld, is_sub_page=%s)",
        (unsigned int)s->pin, s->domid, s->mfn, s->start, s->length,
        s->is_sub_page ? "True" : "False");
}

static PyTypeObject XgActive_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xengrant._cext.ActiveGrant",
    .tp_basicsize = sizeof(XgActive),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ActiveGrant(domid, mfn, start, length, is_sub_page): struct active_grant_entry, "
              "pin 0",
    .tp_members = act_members,
    .tp_init = (initproc)act_init,
    .tp_new = PyType_GenericNew,
    .tp_repr = (reprfunc)act_repr,
};

typedef struct {
    PyObject_HEAD
    long long flags, domid, ref, mfn, host_gfn;
} XgMapping;

static PyTypeObject XgMapping_Type;

static PyMemberDef gm_members[] = {
    {"flags", T_LONGLONG, offsetof(XgMapping, flags), 0,
     "GNTMAP_* still in force (0 once fully unmapped)"},
    {"domid", T_LONGLONG, offsetof(XgMapping, domid), 0, "the granting domain"},
    {"ref", T_LONGLONG, offsetof(XgMapping, ref), 0, "the grant reference in its table"},
    {"mfn", T_LONGLONG, offsetof(XgMapping, mfn), 0, "the frame mapped"},
    {"host_gfn", T_LONGLONG, offsetof(XgMapping, host_gfn), 0,
     "the mapper's gfn holding a host mapping, or -1"},
    {NULL, 0, 0, 0, NULL},
};

static int
gm_init(XgMapping *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = {"flags", "domid", "ref", "mfn", "host_gfn", NULL};
    return PyArg_ParseTupleAndKeywords(args, kw, "LLLLL:GrantMapping", kwl, &self->flags,
                                       &self->domid, &self->ref, &self->mfn, &self->host_gfn)
               ? 0
               : -1;
}

static PyObject *
gm_repr(XgMapping *s)
{
    return PyUnicode_FromFormat("GrantMapping(flags=%lld, domid=%lld, ref=%lld, mfn=%lld, "
                                "host_gfn=%lld)",
                                s->flags, s->domid, s->ref, s->mfn, s->host_gfn);
}

static PyTypeObject XgMapping_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xengrant._cext.GrantMapping",
    .tp_basicsize = sizeof(XgMapping),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GrantMapping(flags, domid, ref, mfn, host_gfn): struct grant_mapping",
    .tp_members = gm_members,
    .tp_init = (initproc)gm_init,
    .tp_new = PyType_GenericNew,
    .tp_repr = (reprfunc)gm_repr,
};

/* interned method names, set at module init */
static PyObject *str_popleft, *str_append;

/* attributes of the mapping domain used by both runs */
typedef struct {
    uint16_t domid;
    PyObject *p2m;      /* new references */
    PyObject *entries;
    PyObject *free;
    PyObject *popleft;  /* free.popleft and free.append, bound once per run */
    PyObject *append;
    int usable;         /* HVM, plain dict p2m, plain list entries */
} xg_ld;

static void
xg_ld_clear(xg_ld *l)
{
    Py_CLEAR(l->p2m);
    Py_CLEAR(l->entries);
    Py_CLEAR(l->free);
    Py_CLEAR(l->popleft);
    Py_CLEAR(l->append);
}

static int
xg_ld_get(xg_ld *l, PyObject *ld)
{
    PyObject *o, *mt = NULL;
    memset(l, 0, sizeof(*l));
    o = xg_getattr(ld, XA_domid);
    if (o == NULL)
        return -1;
    long v = PyLong_AsLong(o);
    Py_DECREF(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    l->domid = (uint16_t)v;
    o = xg_getattr(ld, XA_pv);
    if (o == NULL)
        return -1;
    int pv = PyObject_IsTrue(o);
    Py_DECREF(o);
    if (pv < 0)
        return -1;
    l->p2m = xg_getattr(ld, XA_p2m);
    mt = xg_getattr(ld, XA_maptrack);
    if (l->p2m == NULL || mt == NULL)
        goto fail;
    l->entries = xg_getattr(mt, XA_entries);
    l->free = xg_getattr(mt, XA_free);
    if (l->entries == NULL || l->free == NULL)
        goto fail;
    l->popleft = PyObject_GetAttr(l->free, str_popleft);
    l->append = PyObject_GetAttr(l->free, str_append);
    if (l->popleft == NULL || l->append == NULL)
        goto fail;
    Py_DECREF(mt);
    l->usable = !pv && PyDict_CheckExact(l->p2m) && PyList_CheckExact(l->entries);
    return 0;
fail:
    Py_XDECREF(mt);
    xg_ld_clear(l);
    return -1;
}

/* the granter of dom through the batch's domain cache (the previous op's
 * granter without a lookup); NULL without an exception when it is missing or
 * not usable */
static xg_dom *
xg_batch_granter(xg_batch *b, PyObject *domains, long dom)
{
    if (dom == b->last_dom)
        return b->last_rd;
    PyObject *key = PyLong_FromLong(dom);
    if (key == NULL)
        return NULL;
    PyObject *d = PyDict_GetItemWithError(domains, key);
    Py_DECREF(key);
    if (d == NULL)
        return NULL;
    xg_dom *c = xg_dom_get(b->cache, &b->ncache, d);
    if (c == NULL || !c->usable)
        return NULL;
    b->last_dom = dom;
    b->last_rd = c;
    return c;
}

/* refcount[mfn] += delta; -1 on error */
static int
xg_ref_add(PyObject *refcount, Py_ssize_t mfn, long delta)
{
    long rc = PyLong_AsLong(PyList_GET_ITEM(refcount, mfn));
    if (rc == -1 && PyErr_Occurred())
        return -1;
    PyObject *n = PyLong_FromLong(rc + delta);
    if (n == NULL)
        return -1;
    PyList_SetItem(refcount, mfn, n); /* steals n */
    return 0;
}

static int
xg_map_op(xg_batch *b, xg_ld *l, PyObject *domains, PyObject *refcount, unsigned char *op,
          char *m, Py_ssize_t nframes)
{
    uint64_t host_addr;
    uint32_t flags, ref;
    uint16_t dom;
    memcpy(&host_addr, op, 8);
    memcpy(&flags, op + 8, 4);
    memcpy(&ref, op + 12, 4);
    memcpy(&dom, op + 16, 2);
    if ((flags & (XG_GNTMAP_host_map | XG_GNTMAP_device_map | XG_GNTMAP_application_map |
                  XG_GNTMAP_contains_pte)) != XG_GNTMAP_host_map)
        return 0;
    int readonly = (flags & XG_GNTMAP_readonly) != 0;
    xg_dom *rd = xg_batch_granter(b, domains, dom);
    if (rd == NULL) {
        if (PyErr_Occurred())
            return -1;
        return 0;
    }
    Py_ssize_t nfree = PyObject_Size(l->free);
    if (nfree < 0)
        return -1;
    if (nfree <= 1 || (Py_ssize_t)ref >= PyList_GET_SIZE(rd->shared) * XG_PER_V1)
        return 0;
    PyObject *refkey = PyLong_FromUnsignedLong(ref);
    if (refkey == NULL)
        return -1;
    int in = PyDict_Contains(rd->active, refkey);
    if (in != 0) {
        Py_DECREF(refkey);
        if (in < 0)
            return -1;
        return 0;
    }
    Py_ssize_t sf = PyLong_AsSsize_t(PyList_GET_ITEM(rd->shared, ref / XG_PER_V1));
    if (sf == -1 && PyErr_Occurred()) {
        Py_DECREF(refkey);
        return -1;
    }
    if (sf < 0 || sf >= b->nframes) {
        Py_DECREF(refkey);
        return 0;
    }
    PyObject *gfnkey = PyLong_FromUnsignedLongLong(host_addr >> 12);
    if (gfnkey == NULL) {
        Py_DECREF(refkey);
        return -1;
    }
    in = PyDict_Contains(l->p2m, gfnkey);
    if (in != 0) {
        Py_DECREF(refkey);
        Py_DECREF(gfnkey);
        if (in < 0)
            return -1;
        return 0;
    }
    char *ent = m + sf * XG_PAGE_SIZE + (ref % XG_PER_V1) * 8;
    uint16_t *eflags = (uint16_t *)ent;
    if (!xg_pin_map((uint32_t *)ent, l->domid, readonly)) {
        Py_DECREF(refkey);
        Py_DECREF(gfnkey);
        return 0;
    }
    /* the frame is read once the entry is pinned, as Python reads it */
    uint32_t frame;
    memcpy(&frame, ent + 4, 4);
    Py_ssize_t mfn;
    int r = xg_p2m_frame(rd->p2m, frame, nframes, &mfn);
    XgActive *act = NULL;
    XgMapping *mp = NULL;
    PyObject *p2e = NULL, *handle = NULL;
    if (r == 1) {
        PyObject *mfn_o = PyLong_FromSsize_t(mfn);
        PyObject *typ = PyLong_FromLong(readonly ? XG_P2M_GRANT_MAP_RO : XG_P2M_GRANT_MAP_RW);
        act = PyObject_New(XgActive, &XgActive_Type);
        mp = PyObject_New(XgMapping, &XgMapping_Type);
        if (mfn_o && typ)
            p2e = PyTuple_Pack(2, mfn_o, typ);
        Py_XDECREF(mfn_o);
        Py_XDECREF(typ);
        if (act == NULL || mp == NULL || p2e == NULL) {
            r = -1;
        } else {
            act->pin = readonly ? XG_GNTPIN_hstr_inc : XG_GNTPIN_hstw_inc;
            act->domid = l->domid;
            act->mfn = mfn;
            act->start = 0;
            act->length = XG_PAGE_SIZE;
            act->is_sub_page = 0;
            mp->flags =
                flags & (XG_GNTMAP_host_map | XG_GNTMAP_device_map | XG_GNTMAP_readonly);
            mp->domid = dom;
            mp->ref = ref;
            mp->mfn = mfn;
            mp->host_gfn = (long long)(host_addr >> 12);
        }
    }
    if (r != 1) {
        /* _undo_pin with no pin: clear GTF_writing (writable), then GTF_reading */
        if (!readonly)
            __atomic_fetch_and(eflags, (uint16_t)~XG_GTF_writing, __ATOMIC_SEQ_CST);
        __atomic_fetch_and(eflags, (uint16_t)~XG_GTF_reading, __ATOMIC_SEQ_CST);
        Py_XDECREF(act);
        Py_XDECREF(mp);
        Py_XDECREF(p2e);
        Py_DECREF(refkey);
        Py_DECREF(gfnkey);
        if (r < 0)
            return -1;
        return 0;
    }
    /* commit, in map_grant_ref's order */
    handle = PyObject_CallNoArgs(l->popleft);
    Py_ssize_t h = handle ? PyLong_AsSsize_t(handle) : -1;
    int bad = handle == NULL || (h == -1 && PyErr_Occurred());
    if (!bad && (h < 0 || h >= PyList_GET_SIZE(l->entries))) {
        PyErr_SetString(PyExc_AssertionError, "map_run: maptrack handle out of range");
        bad = 1;
    }
    if (!bad) {
        PyList_SetItem(l->entries, h, (PyObject *)mp); /* steals mp */
        mp = NULL;
        bad = PyDict_SetItem(rd->active, refkey, (PyObject *)act) < 0 ||
              PyDict_SetItem(l->p2m, gfnkey, p2e) < 0 || xg_ref_add(refcount, mfn, 1) < 0;
    }
    Py_XDECREF(handle);
    Py_XDECREF(mp);
    Py_DECREF(act);
    Py_DECREF(p2e);
    Py_DECREF(refkey);
    Py_DECREF(gfnkey);
    if (bad)
        return -1;
    int16_t st = 0;
    uint32_t h32 = (uint32_t)h;
    uint64_t dba = (uint64_t)mfn << 12;
    memcpy(op + 18, &st, 2);
    memcpy(op + 20, &h32, 4);
    memcpy(op + 24, &dba, 8);
    return 1;
}

/* One op of a map or unmap run: 1 done, 0 left to Python, -1 error. */
typedef int (*xg_op_fn)(xg_batch *, xg_ld *, PyObject *, PyObject *, unsigned char *, char *,
                        Py_ssize_t);

/* args = (mem, uop, start, count, ld, domains, refcount): run ops start.. of
 * opsize bytes with one while it takes them; the index of the first it does
 * not take. */
static PyObject *
xg_ops_run(PyObject *const *args, Py_ssize_t opsize, xg_op_fn one, const char *name)
{
    PyObject *domains = args[5], *refcount = args[6];
    if (!PyDict_Check(domains) || !PyList_CheckExact(refcount)) {
        PyErr_Format(PyExc_TypeError, "%s: domains must be a dict, refcount a list", name);
        return NULL;
    }
    xg_batch b;
    if (xg_batch_begin(&b, args, opsize, name) < 0)
        return NULL;
    xg_ld l;
    memset(&l, 0, sizeof(l));
    PyObject *ret = NULL;
    char *m = b.mem.buf;
    Py_ssize_t nframes = b.nframes, i = b.start, count = b.count;
    if (PyList_GET_SIZE(refcount) < nframes)
        nframes = PyList_GET_SIZE(refcount);
    if (xg_ld_get(&l, args[4]) < 0)
        goto out;
    for (; l.usable && i < count; i++) {
        int r = one(&b, &l, domains, refcount, (unsigned char *)b.uop.buf + i * opsize, m,
                    nframes);
        if (r < 0)
            goto out;
        if (r == 0)
            break;
    }
    ret = PyLong_FromSsize_t(i);
out:
    xg_ld_clear(&l);
    xg_batch_end(&b);
    return ret;
}

static PyObject *
xg_map_run(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    ARGCHECK(7, "map_run(mem, uop, start, count, ld, domains, refcount) -> index")
    return xg_ops_run(args, XG_MAP_OP_SIZE, xg_map_op, "map_run");
}

/*
 * unmap_run(mem, uop, start, count, ld, domains, refcount) -> index
 *
 * Runs ops start.. of a GNTTABOP_unmap_grant_ref batch while every op is the
 * common success case of xengrant.emu.gnttab_map.unmap_grant_ref (new_addr 0)
 * and returns the index of the first op it does not take.  An op is taken
 * only if: the caller is HVM with a plain dict p2m; host_addr is not 0 and
 * dev_bus_addr is 0; the handle names a live mapping whose flags hold a host
 * map and no device map; its granter exists, is not dying and has a v1
 * table; the ref is in range and active; the caller's p2m at host_addr >> 12
 * holds (act.mfn, grant_map_rw/ro); and the frame keeps a reference after
 * this one goes (machine.put would scrub and free it otherwise).  Then, as
 * unmap_grant_ref/_complete_unmap/_undo_pin do: the p2m entry is removed, the
 * host pin dropped, the machine reference dropped, GTF_writing cleared when
 * no write pin is left (writable maps), GTF_reading cleared and the active
 * entry removed when no pin is left, the mapping's flags lose host_map and
 * its handle is freed (entries[h] = None, appended to the free list).
 */
static int
xg_unmap_op(xg_batch *b, xg_ld *l, PyObject *domains, PyObject *refcount, unsigned char *op,
            char *m, Py_ssize_t nframes)
{
    uint64_t host_addr, dba;
    uint32_t h;
    memcpy(&host_addr, op, 8);
    memcpy(&dba, op + 8, 8);
    memcpy(&h, op + 16, 4);
    if (host_addr == 0 || dba != 0 || (Py_ssize_t)h >= PyList_GET_SIZE(l->entries))
        return 0;
    PyObject *mp = PyList_GET_ITEM(l->entries, h);
    if (mp == Py_None)
        return 0;
    Py_INCREF(mp);
    long long mflags, mdom, mref, mfn, pin;
    XgMapping *gm = (XgMapping *)mp;
    XgActive *ga = NULL;
    PyObject *act = NULL, *refkey = NULL, *gfnkey = NULL;
    int fail = 0; /* 1: error, 0: leave to Python */
    if (!Py_IS_TYPE(mp, &XgMapping_Type))
        goto op_end;
    mflags = gm->flags;
    if ((mflags & (XG_GNTMAP_host_map | XG_GNTMAP_device_map)) != XG_GNTMAP_host_map)
        goto op_end;
    mdom = gm->domid;
    mref = gm->ref;
    xg_dom *rd = xg_batch_granter(b, domains, (long)mdom);
    if (rd == NULL) {
        fail = PyErr_Occurred() != NULL;
        goto op_end;
    }
    if (mref < 0 || mref >= PyList_GET_SIZE(rd->shared) * XG_PER_V1)
        goto op_end;
    fail = 1;
    refkey = PyLong_FromLongLong(mref);
    if (refkey == NULL)
        goto op_end;
    act = PyDict_GetItemWithError(rd->active, refkey);
    if (act == NULL) {
        fail = PyErr_Occurred() != NULL;
        goto op_end;
    }
    Py_INCREF(act);
    fail = 0;
    if (!Py_IS_TYPE(act, &XgActive_Type))
        goto op_end;
    ga = (XgActive *)act;
    mfn = ga->mfn;
    pin = ga->pin;
    fail = 1;
    gfnkey = PyLong_FromUnsignedLongLong(host_addr >> 12);
    if (gfnkey == NULL)
        goto op_end;
    PyObject *ent = PyDict_GetItemWithError(l->p2m, gfnkey);
    if (ent == NULL) {
        fail = PyErr_Occurred() != NULL;
        goto op_end;
    }
    fail = 0;
    if (!PyTuple_CheckExact(ent) || PyTuple_GET_SIZE(ent) != 2)
        goto op_end;
    fail = 1;
    long emfn = PyLong_AsLong(PyTuple_GET_ITEM(ent, 0));
    if (emfn == -1 && PyErr_Occurred())
        goto op_end;
    long etyp = PyLong_AsLong(PyTuple_GET_ITEM(ent, 1));
    if (etyp == -1 && PyErr_Occurred())
        goto op_end;
    fail = 0;
    if ((etyp != XG_P2M_GRANT_MAP_RW && etyp != XG_P2M_GRANT_MAP_RO) || emfn != mfn ||
        mfn < 0 || mfn >= nframes)
        goto op_end;
    fail = 1;
    long rc = PyLong_AsLong(PyList_GET_ITEM(refcount, mfn));
    if (rc == -1 && PyErr_Occurred())
        goto op_end;
    fail = 0;
    if (rc <= 1)
        goto op_end; /* machine.put would free the frame: Python does that */
    Py_ssize_t sf = PyLong_AsSsize_t(PyList_GET_ITEM(rd->shared, mref / XG_PER_V1));
    if (sf == -1 && PyErr_Occurred()) {
        fail = 1;
        goto op_end;
    }
    if (sf < 0 || sf >= b->nframes)
        goto op_end;
    /* commit */
    fail = 1;
    int ro = (mflags & XG_GNTMAP_readonly) != 0;
    long long npin = pin - (ro ? XG_GNTPIN_hstr_inc : XG_GNTPIN_hstw_inc);
    if (PyDict_DelItem(l->p2m, gfnkey) < 0 || xg_ref_add(refcount, mfn, -1) < 0)
        goto op_end;
    gm->flags = mflags & ~(long long)XG_GNTMAP_host_map;
    ga->pin = npin;
    uint16_t *eflags = (uint16_t *)(m + sf * XG_PAGE_SIZE + (mref % XG_PER_V1) * 8);
    if (!ro && !(npin & XG_GNTPIN_WRITE_MASK))
        __atomic_fetch_and(eflags, (uint16_t)~XG_GTF_writing, __ATOMIC_SEQ_CST);
    if (!npin) {
        __atomic_fetch_and(eflags, (uint16_t)~XG_GTF_reading, __ATOMIC_SEQ_CST);
        if (PyDict_DelItem(rd->active, refkey) < 0)
            goto op_end;
    }
    /* maptrack.put(handle) */
    Py_INCREF(Py_None);
    PyList_SetItem(l->entries, h, Py_None);
    PyObject *hk = PyLong_FromUnsignedLong(h);
    if (hk == NULL)
        goto op_end;
    PyObject *r = PyObject_CallOneArg(l->append, hk);
    Py_DECREF(hk);
    if (r == NULL)
        goto op_end;
    Py_DECREF(r);
    memset(op + 20, 0, 2); /* GNTST_okay */
    fail = -1;             /* done */
op_end:
    Py_DECREF(mp);
    Py_XDECREF(act);
    Py_XDECREF(refkey);
    Py_XDECREF(gfnkey);
    if (fail == 1)
        return -1;
    return fail == 0 ? 0 : 1;
}

static PyObject *
xg_unmap_run(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    ARGCHECK(7, "unmap_run(mem, uop, start, count, ld, domains, refcount) -> index")
    return xg_ops_run(args, XG_UNMAP_OP_SIZE, xg_unmap_op, "unmap_run");
}


/* ------------------------------------------------------------------ */
/* The service's hot path: one-op map/unmap messages                    */
/* ------------------------------------------------------------------ */

/*
 * serve_gnttab(mem, buf, pos, end, ld, domains, refcount, unmap_ok, fd, held)
 *     -> (pos, replies, answered, partial, sent)
 *
 * What xengrant.service.server.Server._on_data does for the complete
 * messages in buf[pos:end], for the messages it takes: a GNTTAB_OP request
 * (flags 0 or F_POSTED) of GNTTABOP_map_grant_ref or (with unmap_ok: no
 * unmap notify is set for the caller) GNTTABOP_unmap_grant_ref ops, exactly
 * count of them, whose ops are the common success case of map_run/unmap_run.
 * Each is answered, in stream order, with the bytes Server._gnttab_reply
 * builds for it: status 0, the hypercall's rc 0, the ops with their OUT
 * fields, the caller's p2m entries of the ops' gfns as they are now (the
 * columns of protocol.pack_p2m), and no debug reasons.  It stops at the
 * first message it does not take.  Ops run one at a time, in order, as
 * do_grant_table_op runs them: if op i > 0 of a message is not taken, ops
 * 0..i-1 stay done and partial is i -- the caller runs the rest of that
 * message from op i (its reply covers every op); partial 0: the message is
 * untouched.  Returns where it stopped, the replies (bytes, b"" for none),
 * how many of them answer requests that are not F_POSTED (the caller sends
 * those at once), and partial.  The message layout is
 * xengrant/service/protocol.py's (HEADER, GNTTAB_REQ, pack_p2m); a
 * differential test compares these replies with the Python path's, byte for
 * byte, together with the whole hypervisor state.
 *
 * Sending: with fd >= 0, answered > 0 and every message taken (pos == end:
 * no other reply of this read is to follow), held (the bytes the connection
 * holds unsent: posted replies) and then the replies are sent at once, in
 * one sendmsg(MSG_DONTWAIT), as Server._flush would send them; sent is how
 * many bytes of held + replies went (0: the socket had no room; -errno: the
 * send failed), and the caller queues the rest.  Otherwise sent is 0 and
 * nothing is sent.
 */

#define XG_HDR 12              /* HEADER "<IHHI": length, type, flags, seq */
#define XG_MSG_GNTTAB_OP 10
#define XG_F_REPLY 0x1
#define XG_F_POSTED 0x4
#define XG_MAX_PAYLOAD (1 << 20)
#define XG_GNTTAB_REQ 12       /* GNTTAB_REQ "<Iq": cmd, count */
#define XG_GNTTABOP_map_grant_ref 0
#define XG_GNTTABOP_unmap_grant_ref 1
/* reply: header, "<iiI" (status, rc, size), the ops, u32 n + n gfns, mfns and
 * types ("q" columns), u16 0 (no reasons) */
#define XG_P2M_ENTRY 24

/* the p2m entry of gfn as the reply carries it: (mfn, type), (-1, 0) if none */
static int
xg_p2m_entry(PyObject *p2m, unsigned long long gfn, long long *mfn, long long *typ)
{
    *mfn = -1;
    *typ = 0;
    int r = xg_p2m_lookup(p2m, gfn, mfn, typ);
    if (r == 2) {
        PyErr_SetString(PyExc_TypeError, "serve_gnttab: p2m entry is not (mfn, type)");
        return -1;
    }
    return r < 0 ? -1 : 0;
}

/*
 * serve_gnttab's work on the whole messages in inb[pos:end]: those it takes
 * (map and unmap ops in the common success case, see serve_gnttab) run in
 * place and their replies go in *outp (PyMem memory, the caller's to free,
 * *olenp bytes); *answeredp counts those not posted, *partialp as
 * serve_gnttab's partial.  sv: (mem, ld, domains, refcount).  Returns where
 * the messages it did not take start, or -1 with an exception set.
 */
static Py_ssize_t
xg_serve_msgs(unsigned char *inb, Py_ssize_t pos, Py_ssize_t end, PyObject *const *sv,
              int unmap_ok, char **outp, Py_ssize_t *olenp, Py_ssize_t *answeredp,
              Py_ssize_t *partialp)
{
    PyObject *domains = sv[2], *refcount = sv[3];
    xg_batch b;
    memset(&b, 0, sizeof(b));
    b.last_dom = -1;
    xg_ld l;
    memset(&l, 0, sizeof(l));
    char *out = NULL;
    Py_ssize_t olen = 0, ocap = 0, answered = 0, partial = 0, ret = -1;
    if (!PyDict_Check(domains) || !PyList_CheckExact(refcount)) {
        PyErr_SetString(PyExc_TypeError, "serve_gnttab: domains must be a dict, refcount a list");
        goto out;
    }
    if (PyObject_GetBuffer(sv[0], &b.mem, PyBUF_WRITABLE) < 0)
        goto out;
    b.have_mem = 1;
    b.nframes = b.mem.len / XG_PAGE_SIZE;
    Py_ssize_t nframes = b.nframes;
    if (PyList_GET_SIZE(refcount) < nframes)
        nframes = PyList_GET_SIZE(refcount);
    if (xg_ld_get(&l, sv[1]) < 0)
        goto out;
    while (l.usable && end - pos >= XG_HDR) {
        unsigned char *h = inb + pos;
        uint32_t length, seq;
        uint16_t mtype, flags;
        memcpy(&length, h, 4);
        memcpy(&mtype, h + 4, 2);
        memcpy(&flags, h + 6, 2);
        memcpy(&seq, h + 8, 4);
        if (length > XG_MAX_PAYLOAD || (Py_ssize_t)length > end - pos - XG_HDR)
            break;
        if (mtype != XG_MSG_GNTTAB_OP || (flags != 0 && flags != XG_F_POSTED) ||
            length < XG_GNTTAB_REQ)
            break;
        uint32_t cmd;
        int64_t count;
        memcpy(&cmd, h + XG_HDR, 4);
        memcpy(&count, h + XG_HDR + 4, 8);
        Py_ssize_t opsize;
        if (cmd == XG_GNTTABOP_map_grant_ref)
            opsize = XG_MAP_OP_SIZE;
        else if (cmd == XG_GNTTABOP_unmap_grant_ref && unmap_ok)
            opsize = XG_UNMAP_OP_SIZE;
        else
            break;
        if (count < 1 || count > XG_MAX_PAYLOAD / opsize ||
            (Py_ssize_t)length != XG_GNTTAB_REQ + count * opsize)
            break;
        /* room for this reply before any op runs: no allocation fails after one */
        Py_ssize_t rlen = 12 + count * (opsize + XG_P2M_ENTRY) + 4 + 2;
        Py_ssize_t need = olen + XG_HDR + rlen;
        if (need > ocap) {
            Py_ssize_t cap = ocap ? ocap * 2 : 512;
            while (cap < need)
                cap *= 2;
            char *grown = PyMem_Realloc(out, (size_t)cap);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto out;
            }
            out = grown;
            ocap = cap;
        }
        unsigned char *uop = h + XG_HDR + XG_GNTTAB_REQ;
        Py_ssize_t i = 0;
        for (; i < count; i++) {
            unsigned char *op = uop + i * opsize;
            int r = cmd == XG_GNTTABOP_map_grant_ref
                        ? xg_map_op(&b, &l, domains, refcount, op, b.mem.buf, nframes)
                        : xg_unmap_op(&b, &l, domains, refcount, op, b.mem.buf, nframes);
            if (r < 0)
                goto out;
            if (r == 0)
                break;
        }
        if (i < count) {
            partial = i; /* 0: untouched */
            break;
        }
        char *o = out + olen;
        uint32_t rlen32 = (uint32_t)rlen, size = (uint32_t)(count * opsize), n32 = (uint32_t)count;
        uint16_t rtype = XG_MSG_GNTTAB_OP, rflags = XG_F_REPLY, noreasons = 0;
        int32_t zero = 0;
        memcpy(o, &rlen32, 4);
        memcpy(o + 4, &rtype, 2);
        memcpy(o + 6, &rflags, 2);
        memcpy(o + 8, &seq, 4);
        memcpy(o + 12, &zero, 4);
        memcpy(o + 16, &zero, 4);
        memcpy(o + 20, &size, 4);
        memcpy(o + 24, uop, (size_t)size);
        o += 24 + size;
        memcpy(o, &n32, 4);
        o += 4;
        for (i = 0; i < count; i++) {
            uint64_t host_addr;
            memcpy(&host_addr, uop + i * opsize, 8);
            long long e_mfn, e_typ;
            if (xg_p2m_entry(l.p2m, host_addr >> 12, &e_mfn, &e_typ) < 0)
                goto out;
            int64_t gfn = (int64_t)(host_addr >> 12), mfn64 = e_mfn, typ64 = e_typ;
            memcpy(o + i * 8, &gfn, 8);
            memcpy(o + (count + i) * 8, &mfn64, 8);
            memcpy(o + (2 * count + i) * 8, &typ64, 8);
        }
        o += 24 * count;
        memcpy(o, &noreasons, 2);
        olen += XG_HDR + rlen;
        if (flags == 0)
            answered++;
        pos += XG_HDR + (Py_ssize_t)length;
    }
    ret = pos;
out:
    xg_ld_clear(&l);
    xg_batch_end(&b);
    *outp = out;
    *olenp = olen;
    *answeredp = answered;
    *partialp = partial;
    return ret;
}

static PyObject *
xg_serve_gnttab(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    ARGCHECK(10, "serve_gnttab(mem, buf, pos, end, ld, domains, refcount, unmap_ok, fd, held) "
                 "-> (pos, replies, answered, partial, sent)")
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    int unmap_ok = PyObject_IsTrue(args[7]);
    if (unmap_ok < 0)
        return NULL;
    int fd;
    if (xg_as_int(args[8], &fd) < 0)
        return NULL;
    if (!PyBytes_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "serve_gnttab: held must be bytes");
        return NULL;
    }
    Py_buffer in;
    char *out = NULL;
    Py_ssize_t olen = 0, answered = 0, partial = 0;
    PyObject *ret = NULL;
    if (PyObject_GetBuffer(args[1], &in, PyBUF_WRITABLE) < 0)
        return NULL;
    if (pos < 0 || end > in.len || pos > end) {
        PyErr_SetString(PyExc_ValueError, "serve_gnttab: pos/end out of range");
        goto out;
    }
    PyObject *sv[4] = {args[0], args[4], args[5], args[6]};
    pos = xg_serve_msgs(in.buf, pos, end, sv, unmap_ok, &out, &olen, &answered, &partial);
    if (pos < 0)
        goto out;
    {
        Py_ssize_t sent = 0;
        if (fd >= 0 && answered > 0 && pos == end) {
            struct iovec iov[2] = {
                {PyBytes_AS_STRING(args[9]), (size_t)PyBytes_GET_SIZE(args[9])},
                {out, (size_t)olen},
            };
            struct msghdr mh;
            memset(&mh, 0, sizeof(mh));
            mh.msg_iov = iov[0].iov_len ? iov : iov + 1;
            mh.msg_iovlen = iov[0].iov_len ? 2 : 1;
            ssize_t n;
            do
                n = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
            while (n < 0 && errno == EINTR);
            sent = n >= 0 ? n : (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
        }
        PyObject *replies = PyBytes_FromStringAndSize(out ? out : "", olen);
        if (replies != NULL)
            ret = Py_BuildValue("(nNnnn)", pos, replies, answered, partial, sent);
    }
out:
    PyMem_Free(out);
    PyBuffer_Release(&in);
    return ret;
}

/* ------------------------------------------------------------------ */
/* Waiting for a message: poll briefly, then sleep                      */
/* ------------------------------------------------------------------ */

/*
 * recv_wait(fd, buf, spin_ns, timeout_ms) -> n
 *
 * recv(fd) into buf as the service's connection threads and its clients
 * wait for a request or a reply, with the GIL released throughout:
 *
 * 1. for up to spin_ns nanoseconds, yield the CPU (sched_yield), then
 *    recv(MSG_DONTWAIT).  On a virtual machine a vCPU that goes idle takes
 *    tens of microseconds to wake again, more than a reply takes to come; a
 *    short poll keeps it busy instead, as Linux's busy polling
 *    (net.core.busy_read) and a guest's halt polling do.  The yield matters
 *    when the peer shares this CPU: polling must not keep it from sending
 *    what is polled for.  It comes before the first try too: a reply (or
 *    the client's next request) answers what this end just sent, so a first
 *    recv would find nothing while the peer waits for this CPU; a yield with
 *    nothing else to run costs less than a recv (bench: the same-CPU ping
 *    pong 17.1 -> 15.0 us, the split one 11.7 -> 10.4 us, medians of 12
 *    interleaved rounds).
 * 2. then poll(POLLIN) for up to timeout_ms (-1: forever) and recv.  poll,
 *    not a blocking recv: a recv sleeper is also woken when the peer reads
 *    what this end sent (a write-space wake-up), for nothing.
 *
 * Returns the bytes read (0: the peer closed), or -1 if nothing came within
 * timeout_ms.  A signal (EINTR) runs Python's handlers, then the wait goes
 * on; a handler's exception is raised.  Raises OSError for any other
 * failure.
 */
static double
xg_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

/* acquire and release loads and stores of a shared u32 (a ring index) */
static uint32_t
xg_ld32(const unsigned char *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}

static void
xg_st32(unsigned char *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}

/* drain an eventfd (a kick) */
static void
xg_unkick(int fd)
{
    uint64_t v;
    ssize_t r;
    do
        r = read(fd, &v, sizeof v);
    while (r < 0 && errno == EINTR);
}

/* recv_wait's wait, called with the GIL released.  With a request ring (ring
 * not NULL: see _ring.c) it also returns 1 as soon as req_prod is past cons,
 * looked at before the socket, and sleeps with req_event set, woken by its
 * kick_fd too.  Else 0 with *n the bytes read (0: closed) or -1 with *err
 * (ETIMEDOUT: nothing within timeout_ms; EAGAIN: woken for nothing, wait
 * again; EINTR) */
static int
xg_wait_recv(int fd, char *buf, size_t len, long long spin_ns, int timeout_ms,
             unsigned char *ring, uint32_t cons, int kick_fd, ssize_t *n, int *err)
{
    *n = -1;
    errno = EAGAIN;
    if (spin_ns > 0) {
        double end = xg_now_ns() + (double)spin_ns;
        for (;;) {
            /* yield first: what is waited for answers a send of ours, and a
             * peer on this CPU cannot answer before it runs */
            sched_yield();
            if (ring != NULL && xg_ld32(ring) != cons)
                return 1;
            *n = recv(fd, buf, len, MSG_DONTWAIT);
            if (*n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                break;
            if (xg_now_ns() >= end)
                break;
        }
    }
    if (*n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        if (ring != NULL) { /* RING_FINAL_CHECK_FOR_REQUESTS: ask for a kick, look again */
            xg_st32(ring + 4, cons + 1);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (xg_ld32(ring) != cons)
                return 1;
        }
        struct pollfd pfd[2] = {{fd, POLLIN, 0}, {kick_fd, POLLIN, 0}};
        int r = poll(pfd, ring != NULL ? 2 : 1, timeout_ms);
        if (r > 0) {
            if (ring != NULL && (pfd[1].revents & POLLIN))
                xg_unkick(kick_fd);
            if (pfd[0].revents)
                *n = recv(fd, buf, len, MSG_DONTWAIT);
            else
                errno = EAGAIN; /* a kick: look again */
            if (*n < 0 && ring != NULL && xg_ld32(ring) != cons)
                return 1;
        } else if (r == 0) {
            errno = ETIMEDOUT;
        }
    }
    *err = *n < 0 ? errno : 0;
    return 0;
}

/* after a failed xg_wait_recv: 1 to wait again (EINTR with no handler raising,
 * or a spurious poll wake-up), 0 for a timeout, -1 with an exception set */
static int
xg_wait_again(int err)
{
    if (err == ETIMEDOUT)
        return 0;
    if (err == EINTR)
        return PyErr_CheckSignals() < 0 ? -1 : 1;
    if (err == EAGAIN || err == EWOULDBLOCK)
        return 1;
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* xg_wait_recv until something comes, the GIL released around each wait:
 * 1 for ring work, 0 with *n (the bytes read, 0: closed, -1: timed out), -1
 * with an exception set */
static int
xg_wait_loop(int fd, Py_buffer *b, long long spin_ns, int timeout_ms, unsigned char *ring,
             uint32_t cons, int kick_fd, ssize_t *n)
{
    int err, again = 1, ringwork;
    do {
        Py_BEGIN_ALLOW_THREADS
        ringwork = xg_wait_recv(fd, b->buf, (size_t)b->len, spin_ns, timeout_ms, ring, cons,
                                kick_fd, n, &err);
        Py_END_ALLOW_THREADS
        spin_ns = 0;
    } while (!ringwork && *n < 0 && (again = xg_wait_again(err)) > 0);
    return !ringwork && *n < 0 && again < 0 ? -1 : ringwork;
}

/* args[0], args[1]: (fd, buf) as an int and a writable buffer */
static int
xg_fd_buf(PyObject *const *args, int *fd, Py_buffer *b)
{
    if (xg_as_int(args[0], fd) < 0)
        return -1;
    return PyObject_GetBuffer(args[1], b, PyBUF_WRITABLE);
}

static PyObject *
xg_recv_wait(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(4, "recv_wait(fd, buf, spin_ns, timeout_ms) -> n")
    int fd, timeout_ms;
    long long spin_ns = PyLong_AsLongLong(args[2]);
    if ((spin_ns == -1 && PyErr_Occurred()) || xg_as_int(args[3], &timeout_ms) < 0)
        return NULL;
    Py_buffer b;
    if (xg_fd_buf(args, &fd, &b) < 0)
        return NULL;
    ssize_t n;
    int rc = xg_wait_loop(fd, &b, spin_ns, timeout_ms, NULL, 0, -1, &n);
    PyBuffer_Release(&b);
    if (rc < 0)
        return NULL;
    return PyLong_FromSsize_t(n < 0 ? -1 : n);
}

/* the exception a signal handler raised (taken from the error indicator, with
 * its traceback), for a wait that returns what it read with it */
static PyObject *
xg_take_exception(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

/*
 * recv_held(fd, buf, spin_ns, timeout_ms) -> (n, signalled)
 *
 * recv_wait for a client that must not lose what it read: n is the bytes
 * read into buf (0: closed, -1: none within timeout_ms, or a signal handler
 * raised before anything came), and signalled None or the exception a
 * signal handler raised while it waited or as it returns, handed back with
 * the bytes instead of raised (the caller keeps them, then decides).
 * Raises OSError for a failed recv.
 */
static PyObject *
xg_recv_held(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(4, "recv_held(fd, buf, spin_ns, timeout_ms) -> (n, signalled)")
    int fd, timeout_ms;
    long long spin_ns = PyLong_AsLongLong(args[2]);
    if ((spin_ns == -1 && PyErr_Occurred()) || xg_as_int(args[3], &timeout_ms) < 0)
        return NULL;
    Py_buffer b;
    if (xg_fd_buf(args, &fd, &b) < 0)
        return NULL;
    ssize_t n;
    int err;
    PyObject *sig = NULL;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        xg_wait_recv(fd, b.buf, (size_t)b.len, spin_ns, timeout_ms, NULL, 0, -1, &n, &err);
        Py_END_ALLOW_THREADS
        spin_ns = 0;
        if (n >= 0 || err == ETIMEDOUT)
            break;
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                sig = xg_take_exception();
                break;
            }
            continue;
        }
        if (err == EAGAIN || err == EWOULDBLOCK)
            continue;
        PyBuffer_Release(&b);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyBuffer_Release(&b);
    if (sig == NULL && PyErr_CheckSignals() < 0)
        sig = xg_take_exception();
    if (sig == NULL) {
        Py_INCREF(Py_None);
        sig = Py_None;
    }
    return Py_BuildValue("(nN)", n < 0 ? (Py_ssize_t)-1 : (Py_ssize_t)n, sig);
}

/*
 * The request ring's client side (_ring.c) packs its one-op requests with
 * these.  Every layout is protocol.py's: HEADER "<IHHI", GNTTAB_REQ "<Iq",
 * the ops of xen/include/public/grant_table.h (gnttab_map_grant_ref 32
 * bytes, gnttab_unmap_grant_ref 24).
 */

static PyObject *str_acquire, *str_release;

/* lock.acquire() unless lock is None; 0, or -1 with an exception set */
static int
xg_lock(PyObject *lock)
{
    if (lock == Py_None)
        return 0;
    PyObject *r = PyObject_CallMethodObjArgs(lock, str_acquire, NULL);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* lock.release() unless lock is None, keeping an exception pending from the
 * locked work; rc, or -1 if the release failed (its exception set) */
static int
xg_unlock(PyObject *lock, int rc)
{
    if (lock == Py_None)
        return rc;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *r = PyObject_CallMethodObjArgs(lock, str_release, NULL);
    if (r == NULL) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(et, ev, tb);
    return rc;
}

static void
xg_put_header(unsigned char *m, uint32_t length, uint16_t flags, uint32_t seq, uint32_t cmd)
{
    uint16_t type = XG_MSG_GNTTAB_OP;
    int64_t count = 1;
    memcpy(m, &length, 4);
    memcpy(m + 4, &type, 2);
    memcpy(m + 6, &flags, 2);
    memcpy(m + 8, &seq, 4);
    memcpy(m + XG_HDR, &cmd, 4);
    memcpy(m + XG_HDR + 4, &count, 8);
}

/* the one-op lanes' values, each within its op field: (seq, gfn, flags, ref,
 * dom) for a map, (seq, gfn, handle) for an unmap (host_addr is gfn << 12) */
static const unsigned long long xg_map_one_max[5] = {
    0xFFFFFFFFULL, (1ULL << 52) - 1, 0xFFFFFFFFULL, 0xFFFFFFFFULL, 0xFFFFULL};
static const unsigned long long xg_unmap_one_max[3] = {0xFFFFFFFFULL, (1ULL << 52) - 1,
                                                       0xFFFFFFFFULL};

/* gnttab_map_grant_ref's IN fields at op from v = (seq, gfn, flags, ref, dom) */
static void
xg_put_map_op(unsigned char *op, const unsigned long long *v)
{
    uint64_t host_addr = v[1] << 12;
    uint32_t flags = (uint32_t)v[2], ref = (uint32_t)v[3];
    uint16_t dom = (uint16_t)v[4];
    memcpy(op, &host_addr, 8);
    memcpy(op + 8, &flags, 4);
    memcpy(op + 12, &ref, 4);
    memcpy(op + 16, &dom, 2);
}

/* gnttab_unmap_grant_ref's IN fields at op from v = (seq, gfn, handle) */
static void
xg_put_unmap_op(unsigned char *op, const unsigned long long *v)
{
    uint64_t host_addr = v[1] << 12;
    uint32_t handle = (uint32_t)v[2];
    memcpy(op, &host_addr, 8);
    memcpy(op + 16, &handle, 4);
}

/* the client's p2m mirror: key (a gfn) -> (mfn, type), or no entry; 0, or -1
 * with an exception set */
static int
xg_p2m_put(PyObject *p2m, PyObject *key, long long mfn, long long typ)
{
    PyObject *val = Py_BuildValue("(LL)", mfn, typ);
    int bad = val == NULL || PyDict_SetItem(p2m, key, val) < 0;
    Py_XDECREF(val);
    return bad ? -1 : 0;
}

static int
xg_p2m_drop(PyObject *p2m, PyObject *key)
{
    if (PyDict_DelItem(p2m, key) == 0)
        return 0;
    if (!PyErr_ExceptionMatches(PyExc_KeyError))
        return -1;
    PyErr_Clear();
    return 0;
}

/* a posted one-op unmap that succeeded, done as its on_reply would do it:
 * posted[key] popped, gfnobj out of the p2m mirror and on freed (a hole
 * again); 0, or -1 with an exception set */
static int
xg_unmap_done(PyObject *posted, PyObject *key, PyObject *gfnobj, PyObject *p2m, PyObject *freed)
{
    Py_INCREF(gfnobj); /* posted's entry holds it until popped */
    int bad = PyList_Append(freed, gfnobj) < 0 || PyDict_DelItem(posted, key) < 0 ||
              xg_p2m_drop(p2m, gfnobj) < 0;
    Py_DECREF(gfnobj);
    return bad ? -1 : 0;
}

/* p2m[gfn] = (mfn, type) in a client's p2m mirror: 0, or -1 with an exception set */
static int
xg_p2m_set(PyObject *p2m, unsigned long long gfn, long long mfn, long long typ)
{
    PyObject *key = PyLong_FromUnsignedLongLong(gfn);
    int bad = key == NULL || xg_p2m_put(p2m, key, mfn, typ) < 0;
    Py_XDECREF(key);
    return bad ? -1 : 0;
}

/* the one-page lanes' (posted, p2m, freed) at args[0..2]: 0, or -1 with TypeError */
static int
xg_lane_args(PyObject *const *args, PyObject **posted, PyObject **p2m, PyObject **freed)
{
    *posted = args[0];
    *p2m = args[1];
    *freed = args[2];
    if (!PyDict_Check(*posted) || !PyDict_Check(*p2m) || !PyList_Check(*freed)) {
        PyErr_SetString(PyExc_TypeError, "posted and p2m must be dicts, freed a list");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ */
/* Guest side: runs over a v1 grant table's shared entries              */
/* ------------------------------------------------------------------ */

/*
 * The guest maps its grant-table frames as FrameViews (one per frame, in
 * table order).  These runs do, for many refs at once, what
 * xengrant.guest.gnttab does per ref, with the same atomic protocol
 * (xen/include/public/grant_table.h): each returns the index of the first ref
 * it does not take, so Python handles that one (and raises what it always
 * raised).  Only v1 tables (8-byte entries, 512 per frame) are handled.
 */

#define XG_REF_FREE 0
#define XG_REF_USED 1
#define XG_REF_RESERVED 2

/* the flags word of ref's entry (esize bytes each: 8 for v1, 16 for v2) in
 * the table's frames, or NULL if it is outside the mapped frames (or they are
 * read-only and writable is asked for) */
static uint16_t *
xg_entry(PyObject *frames, Py_ssize_t ref, Py_ssize_t esize, int writable)
{
    if (ref < 0)
        return NULL;
    Py_ssize_t per = XG_PAGE_SIZE / esize, fi = ref / per;
    if (fi >= PyList_GET_SIZE(frames))
        return NULL;
    PyObject *f = PyList_GET_ITEM(frames, fi);
    if (!Py_IS_TYPE(f, &FrameView_Type))
        return NULL;
    FrameView *fv = (FrameView *)f;
    if (fv->closed || (writable && fv->readonly) || fv->len < XG_PAGE_SIZE)
        return NULL;
    return (uint16_t *)(fv->addr + (ref % per) * esize);
}

/* the v1 entry of ref, to write, or NULL if it is outside the mapped frames */
static uint16_t *
xg_v1_entry(PyObject *frames, Py_ssize_t ref)
{
    return xg_entry(frames, ref, 8, 1);
}

/* common argument checks: frames a list, refs a list, start an index */
static int
xg_run_args(PyObject *frames, PyObject *refs, PyObject *starto, Py_ssize_t *start)
{
    if (!PyList_CheckExact(frames) || !PyList_CheckExact(refs)) {
        PyErr_SetString(PyExc_TypeError, "frames and refs must be lists");
        return -1;
    }
    *start = PyLong_AsSsize_t(starto);
    if (*start == -1 && PyErr_Occurred())
        return -1;
    if (*start < 0) {
        PyErr_SetString(PyExc_ValueError, "start must be >= 0");
        return -1;
    }
    return 0;
}

/*
 * grant_run(frames, refs, gfns, start, domid, flags) -> index
 *
 * Introduces entries refs[i] -> (domid, gfns[i]) for i = start.. as
 * grant_table.h (2004) says: write domid, write frame, write barrier, write
 * flags with the type.  Stops at a ref whose entry already has a type (the
 * caller raises "already granted"), outside the frames, or a gfn that does
 * not fit the v1 32-bit frame.
 */
static PyObject *
xg_grant_run(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(6, "grant_run(frames, refs, gfns, start, domid, flags) -> index")
    PyObject *frames = args[0], *refs = args[1], *gfns = args[2];
    Py_ssize_t i;
    if (xg_run_args(frames, refs, args[3], &i) < 0)
        return NULL;
    if (!PyList_CheckExact(gfns) || PyList_GET_SIZE(gfns) != PyList_GET_SIZE(refs)) {
        PyErr_SetString(PyExc_TypeError, "gfns must be a list as long as refs");
        return NULL;
    }
    long domid = PyLong_AsLong(args[4]);
    long flags = PyLong_AsLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (domid < 0 || domid > 0xFFFF || flags < 0 || flags > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "domid and flags are 16-bit");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(refs);
    for (; i < n; i++) {
        Py_ssize_t ref = PyLong_AsSsize_t(PyList_GET_ITEM(refs, i));
        if (ref == -1 && PyErr_Occurred())
            return NULL;
        unsigned long long gfn = PyLong_AsUnsignedLongLong(PyList_GET_ITEM(gfns, i));
        if (gfn == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            break;
        }
        uint16_t *e = xg_v1_entry(frames, ref);
        if (e == NULL || gfn > 0xFFFFFFFFULL ||
            (__atomic_load_n(e, __ATOMIC_SEQ_CST) & XG_GTF_type_mask))
            break;
        __atomic_store_n(e + 1, (uint16_t)domid, __ATOMIC_SEQ_CST);
        __atomic_store_n((uint32_t *)(e + 2), (uint32_t)gfn, __ATOMIC_SEQ_CST);
        __atomic_thread_fence(__ATOMIC_RELEASE); /* wmb() */
        __atomic_store_n(e, (uint16_t)flags, __ATOMIC_SEQ_CST);
    }
    return PyLong_FromSsize_t(i);
}

/*
 * end_run(frames, state, refs, start) -> index
 *
 * Ends access to refs[i], i = start.., as try_end_access does on a v1 entry:
 * the ref must be handed out (state[ref] == used), then read the flags and,
 * while neither GTF_reading nor GTF_writing is set, cmpxchg them to 0
 * (grant_table.h: "Check result of SMP-safe CMPXCHG(&ent->flags, flags, 0)").
 * Stops at a ref that is busy, not handed out, or outside the table.
 */
static PyObject *
xg_end_run(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(4, "end_run(frames, state, refs, start) -> index")
    PyObject *frames = args[0], *refs = args[2];
    Py_ssize_t i;
    if (xg_run_args(frames, refs, args[3], &i) < 0)
        return NULL;
    if (!PyByteArray_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "state must be a bytearray");
        return NULL;
    }
    const char *state = PyByteArray_AS_STRING(args[1]);
    Py_ssize_t nstate = PyByteArray_GET_SIZE(args[1]);
    Py_ssize_t n = PyList_GET_SIZE(refs);
    for (; i < n; i++) {
        Py_ssize_t ref = PyLong_AsSsize_t(PyList_GET_ITEM(refs, i));
        if (ref == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            break;
        }
        if (ref < 0 || ref >= nstate || state[ref] != XG_REF_USED)
            break;
        uint16_t *e = xg_v1_entry(frames, ref);
        if (e == NULL)
            break;
        uint16_t fl = __atomic_load_n(e, __ATOMIC_SEQ_CST);
        int ended = 0;
        for (;;) {
            if (fl & (XG_GTF_reading | XG_GTF_writing))
                break;
            if (__atomic_compare_exchange_n(e, &fl, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
                ended = 1;
                break;
            }
        }
        if (!ended)
            break;
    }
    return PyLong_FromSsize_t(i);
}

/*
 * put_run(frames, state, refs, entry_size) -> index
 *
 * Checks that every ref may go back to the free list (handed out, not
 * reserved, in the table, its entry without a type) and, only if all may,
 * marks them all free in state.  Returns -1 when done, else the index of
 * the first ref that may not (nothing changed); a ref listed twice is
 * caught as a double put.
 */
static PyObject *
xg_put_run(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(4, "put_run(frames, state, refs, entry_size) -> index")
    PyObject *frames = args[0], *refs = args[2];
    if (!PyList_CheckExact(frames) || !PyList_CheckExact(refs) || !PyByteArray_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "put_run(list, bytearray, list, int)");
        return NULL;
    }
    long esize = PyLong_AsLong(args[3]);
    if (esize == -1 && PyErr_Occurred())
        return NULL;
    if (esize != 8 && esize != 16) {
        PyErr_SetString(PyExc_ValueError, "entry_size must be 8 or 16");
        return NULL;
    }
    char *state = PyByteArray_AS_STRING(args[1]);
    Py_ssize_t nstate = PyByteArray_GET_SIZE(args[1]);
    Py_ssize_t n = PyList_GET_SIZE(refs);
    Py_ssize_t i;
    for (i = 0; i < n; i++) {
        Py_ssize_t ref = PyLong_AsSsize_t(PyList_GET_ITEM(refs, i));
        if (ref == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            return PyLong_FromSsize_t(i);
        }
        if (ref < 0 || ref >= nstate || state[ref] != XG_REF_USED)
            return PyLong_FromSsize_t(i);
        uint16_t *e = xg_entry(frames, ref, esize, 0);
        if (e == NULL || (__atomic_load_n(e, __ATOMIC_SEQ_CST) & XG_GTF_type_mask))
            return PyLong_FromSsize_t(i);
    }
    for (i = 0; i < n; i++) {
        Py_ssize_t ref = PyLong_AsSsize_t(PyList_GET_ITEM(refs, i));
        if (state[ref] != XG_REF_USED) { /* listed twice: undo */
            for (Py_ssize_t j = 0; j < i; j++)
                state[PyLong_AsSsize_t(PyList_GET_ITEM(refs, j))] = XG_REF_USED;
            return PyLong_FromSsize_t(i);
        }
        state[ref] = XG_REF_FREE;
    }
    return PyLong_FromLong(-1);
}

/* memset(buffer, offset, length, byte): fill part of a writable buffer */
static PyObject *
xg_memset(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(4, "memset(buffer, offset, length, byte)")
    Py_ssize_t off = PyLong_AsSsize_t(args[1]), len = PyLong_AsSsize_t(args[2]);
    long byte = PyLong_AsLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_WRITABLE) < 0)
        return NULL;
    if (off < 0 || len < 0 || off > b.len || len > b.len - off || byte < 0 || byte > 255) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "memset: range or byte out of bounds");
        return NULL;
    }
    memset((char *)b.buf + off, (int)byte, (size_t)len);
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}


/* runs(frames) -> [(start, length), ...]: each run of consecutive ints, in order */
static PyObject *
xg_runs(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(1, "runs(frames) -> list of (start, length)")
    PyObject *seq = PySequence_Fast(args[0], "runs: frames must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(0);
    long long start = 0, prev = 0;
    Py_ssize_t len = 0;
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i <= n; i++) {
        long long f = 0;
        if (i < n) {
            f = PyLong_AsLongLong(items[i]);
            if (f == -1 && PyErr_Occurred())
                goto fail;
            if (len && f == prev + 1 && prev != LLONG_MAX) {
                prev = f;
                len++;
                continue;
            }
        }
        if (len) {
            PyObject *t = Py_BuildValue("(Ln)", start, len);
            if (t == NULL || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
        }
        start = prev = f;
        len = 1;
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/*
 * pack_map_ops(gfns, flags, refs, domids) -> bytearray or None
 * pack_unmap_ops(gfns, handles) -> bytearray or None
 *
 * A batch of struct gnttab_map_grant_ref (host_addr = gfn << 12, flags, ref,
 * dom; status, handle and dev_bus_addr 0) or struct gnttab_unmap_grant_ref
 * (host_addr, dev_bus_addr 0, handle; status 0), laid out as
 * xen/include/public/grant_table.h has them (xengrant/guest/ops.py MAP_OP and
 * UNMAP_OP; the ABI tests check those against the header).  Native byte
 * order: for little-endian hosts only (ops.VECTOR).  None when a value does
 * not fit its field or is not an int: the caller's per-op path then names
 * the grant.
 */
#define XG_MAP_OP 32
#define XG_UNMAP_OP 24

static PyObject *
xg_pack_ops(PyObject *const *seqs, int nseq, Py_ssize_t opsize, uint32_t flags)
{
    PyObject *fast[3] = {NULL, NULL, NULL}, *out = NULL;
    Py_ssize_t n = -1;
    for (int k = 0; k < nseq; k++) {
        fast[k] = PySequence_Fast(seqs[k], "pack_ops: sequences of ints");
        if (fast[k] == NULL)
            goto done;
        Py_ssize_t len = PySequence_Fast_GET_SIZE(fast[k]);
        if (n >= 0 && len != n) {
            PyErr_SetString(PyExc_ValueError, "pack_ops: sequences of different lengths");
            goto done;
        }
        n = len;
    }
    out = PyByteArray_FromStringAndSize(NULL, n * opsize);
    if (out == NULL)
        goto done;
    char *buf = PyByteArray_AS_STRING(out);
    memset(buf, 0, (size_t)(n * opsize));
    for (Py_ssize_t i = 0; i < n; i++) {
        char *op = buf + i * opsize;
        unsigned long long gfn, a, b = 0;
        if (xg_fits(PySequence_Fast_GET_ITEM(fast[0], i), ULLONG_MAX >> 12, &gfn) < 0 ||
            xg_fits(PySequence_Fast_GET_ITEM(fast[1], i), UINT32_MAX, &a) < 0 ||
            (nseq == 3 && xg_fits(PySequence_Fast_GET_ITEM(fast[2], i), UINT16_MAX, &b) < 0)) {
            Py_CLEAR(out);
            Py_INCREF(Py_None);
            out = Py_None;
            goto done;
        }
        uint64_t host_addr = gfn << 12;
        memcpy(op, &host_addr, 8);
        if (nseq == 3) { /* map: flags +8, ref +12, dom +16 */
            uint32_t ref = (uint32_t)a;
            uint16_t dom = (uint16_t)b;
            memcpy(op + 8, &flags, 4);
            memcpy(op + 12, &ref, 4);
            memcpy(op + 16, &dom, 2);
        } else { /* unmap: handle +16 */
            uint32_t handle = (uint32_t)a;
            memcpy(op + 16, &handle, 4);
        }
    }
done:
    for (int k = 0; k < nseq; k++)
        Py_XDECREF(fast[k]);
    return out;
}

static PyObject *
xg_pack_map_ops(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(4, "pack_map_ops(gfns, flags, refs, domids) -> bytearray or None")
    unsigned long long flags;
    if (xg_fits(args[1], UINT32_MAX, &flags) < 0) {
        PyErr_SetString(PyExc_ValueError, "pack_map_ops: flags must fit 32 bits");
        return NULL;
    }
    PyObject *const seqs[3] = {args[0], args[2], args[3]};
    return xg_pack_ops(seqs, 3, XG_MAP_OP, (uint32_t)flags);
}

static PyObject *
xg_pack_unmap_ops(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(2, "pack_unmap_ops(gfns, handles) -> bytearray or None")
    return xg_pack_ops(args, 2, XG_UNMAP_OP, 0);
}

/* mark(state, refs, value): state[ref] = value for every ref (all checked first) */
static PyObject *
xg_mark(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(3, "mark(state, refs, value)")
    if (!PyByteArray_CheckExact(args[0]) || !PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "mark(bytearray, list, int)");
        return NULL;
    }
    long v = PyLong_AsLong(args[2]);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (v < 0 || v > 255) {
        PyErr_SetString(PyExc_ValueError, "mark: value is a byte");
        return NULL;
    }
    char *state = PyByteArray_AS_STRING(args[0]);
    Py_ssize_t ns = PyByteArray_GET_SIZE(args[0]), n = PyList_GET_SIZE(args[1]);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t r = PyLong_AsSsize_t(PyList_GET_ITEM(args[1], i));
        if (r == -1 && PyErr_Occurred())
            return NULL;
        if (r < 0 || r >= ns) {
            PyErr_Format(PyExc_IndexError, "mark: ref %zd outside the table", r);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)
        state[PyLong_AsSsize_t(PyList_GET_ITEM(args[1], i))] = (char)v;
    Py_RETURN_NONE;
}


/*
 * p2m_apply(p2m, body, pos) -> end
 *
 * A service client's p2m mirror takes the entries a reply carries: at
 * body[pos:], u32 n (P2M_FULL 0x80000000 set: they are the whole p2m, so the
 * mirror is cleared first), then three little-endian i64 columns of n:
 * gfns, mfns (-1: the gfn holds nothing now) and p2m types
 * (xengrant/service/protocol.py pack_p2m).  p2m[gfn] = (mfn, type), or
 * p2m.pop(gfn, None) for mfn -1, in order.  Returns the position after the
 * columns.  Raises ValueError if they are truncated (nothing is applied),
 * TypeError if p2m is not a dict.
 */
#define XG_P2M_FULL 0x80000000u

static int64_t
xg_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return (int64_t)v;
}

static PyObject *
xg_p2m_apply(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(3, "p2m_apply(p2m, body, pos) -> end")
    PyObject *p2m = args[0];
    if (!PyDict_Check(p2m)) {
        PyErr_SetString(PyExc_TypeError, "p2m_apply: p2m must be a dict");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer b;
    if (PyObject_GetBuffer(args[1], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *d = b.buf;
    PyObject *ret = NULL;
    if (pos < 0 || b.len - pos < 4) {
        PyErr_SetString(PyExc_ValueError, "p2m delta: truncated count");
        goto out;
    }
    uint32_t n = (uint32_t)d[pos] | (uint32_t)d[pos + 1] << 8 | (uint32_t)d[pos + 2] << 16 |
                 (uint32_t)d[pos + 3] << 24;
    int full = (n & XG_P2M_FULL) != 0;
    n &= ~XG_P2M_FULL;
    pos += 4;
    if ((b.len - pos) / 24 < (Py_ssize_t)n) {
        PyErr_SetString(PyExc_ValueError, "p2m delta: truncated entries");
        goto out;
    }
    if (full)
        PyDict_Clear(p2m);
    const unsigned char *gcol = d + pos, *mcol = gcol + 8 * (size_t)n, *tcol = mcol + 8 * (size_t)n;
    for (uint32_t i = 0; i < n; i++) {
        int64_t mfn = xg_le64(mcol + 8 * (size_t)i);
        PyObject *key = PyLong_FromLongLong(xg_le64(gcol + 8 * (size_t)i));
        if (key == NULL)
            goto out;
        int r = mfn < 0 ? xg_p2m_drop(p2m, key)
                        : xg_p2m_put(p2m, key, mfn, xg_le64(tcol + 8 * (size_t)i));
        Py_DECREF(key);
        if (r < 0)
            goto out;
    }
    ret = PyLong_FromSsize_t(pos + 24 * (Py_ssize_t)n);
out:
    PyBuffer_Release(&b);
    return ret;
}

/*
 * translate(p2m, gfns, ro_type) -> list of mfns, or the index of the first
 * gfn that does not translate
 *
 * The MMU walk of Hypervisor.translate at C speed: each gfn must be in the
 * p2m (a plain dict of gfn -> (mfn, p2m type)); with ro_type >= 0 (a write)
 * an entry of that type (a read-only grant mapping) does not translate
 * either.  Returns an int when one fails, so Python raises its error.
 */
static PyObject *
xg_translate(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(3, "translate(p2m, gfns, ro_type) -> list | int")
    PyObject *p2m = args[0], *gfns = args[1];
    if (!PyDict_CheckExact(p2m) || !PyList_CheckExact(gfns)) {
        PyErr_SetString(PyExc_TypeError, "translate(dict, list, int)");
        return NULL;
    }
    long ro = PyLong_AsLong(args[2]);
    if (ro == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(gfns);
    PyObject *out = PyList_New(n);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyDict_GetItemWithError(p2m, PyList_GET_ITEM(gfns, i));
        if (e == NULL) {
            Py_DECREF(out);
            return PyErr_Occurred() ? NULL : PyLong_FromSsize_t(i);
        }
        if (!PyTuple_CheckExact(e) || PyTuple_GET_SIZE(e) != 2) {
            Py_DECREF(out);
            return PyLong_FromSsize_t(i);
        }
        if (ro >= 0) {
            long t = PyLong_AsLong(PyTuple_GET_ITEM(e, 1));
            if (t == -1 && PyErr_Occurred()) {
                Py_DECREF(out);
                return NULL;
            }
            if (t == ro) {
                Py_DECREF(out);
                return PyLong_FromSsize_t(i);
            }
        }
        PyObject *mfn = PyTuple_GET_ITEM(e, 0);
        Py_INCREF(mfn);
        PyList_SET_ITEM(out, i, mfn);
    }
    return out;
}

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))xg_##name, METH_FASTCALL, doc}

/* the request ring: see _ring.c */
#include "_ring.c"

static PyMethodDef module_methods[] = {
    FAST(load16, "load16(buffer, offset) -> int: atomic 16-bit load"),
    FAST(load32, "load32(buffer, offset) -> int: atomic 32-bit load"),
    FAST(store16, "store16(buffer, offset, value): atomic 16-bit store (full barrier)"),
    FAST(store32, "store32(buffer, offset, value): atomic 32-bit store (full barrier)"),
    FAST(cmpxchg16, "cmpxchg16(buffer, offset, old, new) -> previous value"),
    FAST(cmpxchg32, "cmpxchg32(buffer, offset, old, new) -> previous value"),
    FAST(fetch_or16, "fetch_or16(buffer, offset, bits) -> previous value"),
    FAST(fetch_or32, "fetch_or32(buffer, offset, bits) -> previous value"),
    FAST(fetch_and16, "fetch_and16(buffer, offset, mask) -> previous value"),
    FAST(fetch_and32, "fetch_and32(buffer, offset, mask) -> previous value"),
    FAST(borrow, "borrow(base, offset, length, readonly) -> FrameView over part of base"),
    FAST(vmap, "vmap(fd, frames, readonly) -> FrameView mapping the frames contiguously"),
    FAST(copy_run, "copy_run(mem, uop, start, count, ld, domains) -> index of the first op "
                   "of a GNTTABOP_copy batch left to Python"),
    FAST(map_run, "map_run(mem, uop, start, count, ld, domains, refcount) -> index of the first "
                  "op of a GNTTABOP_map_grant_ref batch left to Python"),
    FAST(unmap_run, "unmap_run(mem, uop, start, count, ld, domains, refcount) -> index of the "
                    "first op of a GNTTABOP_unmap_grant_ref batch left to Python"),
    FAST(serve_gnttab, "serve_gnttab(mem, buf, pos, end, ld, domains, refcount, unmap_ok, fd, "
                       "held) -> (pos, replies, answered, partial, sent): the service's map/unmap "
                       "messages, answered (and sent)"),
    FAST(recv_wait, "recv_wait(fd, buf, spin_ns, timeout_ms) -> bytes read (0: closed, -1: "
                    "timed out): poll up to spin_ns yielding the CPU, then sleep in poll()"),
    FAST(recv_held, "recv_held(fd, buf, spin_ns, timeout_ms) -> (n, signalled): recv_wait that "
                    "returns a signal handler's exception with what it read"),
    FAST(ring_serve, "ring_serve(ring, state, mem, ld, domains, refcount, unmap_ok, kick_fd) -> "
                     "left: the service answers the ring's requests it can in C"),
    FAST(ring_take, "ring_take(ring, state) -> the next request's slot (consumed), or None"),
    FAST(ring_redirect, "ring_redirect(ring, state, id, cmd, kick_fd): respond that the reply "
                        "comes on the socket"),
    FAST(ring_serve_wait, "ring_serve_wait(fd, buf, spin_ns, ring, state, svc_kick, cli_kick, "
                          "lock, conn, to_close, mem, ld, domains, refcount, unmap_ok) -> n "
                          "(-2: ring work left): recv_wait that also waits for and serves the "
                          "ring"),
    FAST(ring_post_map, "ring_post_map(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom) "
                        "-> 1 sent, 0 does not fit, -1 ring full"),
    FAST(ring_post_unmap, "ring_post_unmap(ring, state, lock, kick_fd, seq, gfn, handle) -> 1 "
                          "sent, 0 does not fit, -1 ring full"),
    FAST(ring_collect, "ring_collect(ring, state, posted, p2m, freed, later) -> status: the "
                       "ring's responses there are, consumed"),
    FAST(ring_map_one, "ring_map_one(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom, "
                       "spin_ns, timeout_ms, posted, p2m, freed, later, wait_fd, sock_fd) -> "
                       "(status, handle, mfn, p2mt): the one-page lane on the ring"),
    FAST(pack_map_ops, "pack_map_ops(gfns, flags, refs, domids) -> bytearray of map ops, or None "
                       "if a value does not fit"),
    FAST(pack_unmap_ops, "pack_unmap_ops(gfns, handles) -> bytearray of unmap ops, or None if a "
                         "value does not fit"),
    FAST(p2m_apply, "p2m_apply(p2m, body, pos) -> end: apply the p2m columns at body[pos:] to "
                    "a dict mirror"),
    FAST(grant_run, "grant_run(frames, refs, gfns, start, domid, flags) -> index of the first "
                    "v1 entry not introduced"),
    FAST(end_run, "end_run(frames, state, refs, start) -> index of the first v1 entry whose "
                  "access did not end"),
    FAST(put_run, "put_run(frames, state, refs, entry_size) -> -1 once all refs are marked "
                  "free, else the index of the first that may not be"),
    FAST(memset, "memset(buffer, offset, length, byte): fill part of a writable buffer"),
    FAST(translate, "translate(p2m, gfns, ro_type) -> mfns, or the index of the first gfn "
                    "that does not translate"),
    FAST(runs, "runs(frames) -> [(start, length), ...]: each run of consecutive ints"),
    FAST(mark, "mark(state, refs, value): state[ref] = value for every ref"),
    {"mb", (PyCFunction)xg_mb, METH_NOARGS, "full memory barrier"},
    {"wmb", (PyCFunction)xg_wmb, METH_NOARGS, "write (release) barrier"},
    {"rmb", (PyCFunction)xg_rmb, METH_NOARGS, "read (acquire) barrier"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef cext_module = {
    PyModuleDef_HEAD_INIT, "xengrant._cext", "Atomics and frame views for xengrant.", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__cext(void)
{
    if (PyType_Ready(&FrameView_Type) < 0 || PyType_Ready(&XgActive_Type) < 0 ||
        PyType_Ready(&XgMapping_Type) < 0)
        return NULL;
    for (int i = 0; i < XG_NATTR; i++)
        if ((xg_attr_str[i] = PyUnicode_InternFromString(xg_attr_names[i])) == NULL)
            return NULL;
    str_popleft = PyUnicode_InternFromString("popleft");
    str_append = PyUnicode_InternFromString("append");
    str_acquire = PyUnicode_InternFromString("acquire");
    str_release = PyUnicode_InternFromString("release");
    if (str_popleft == NULL || str_append == NULL || str_acquire == NULL || str_release == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&cext_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FrameView_Type);
    if (PyModule_AddObject(m, "FrameView", (PyObject *)&FrameView_Type) < 0) {
        Py_DECREF(&FrameView_Type);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&XgActive_Type);
    if (PyModule_AddObject(m, "ActiveGrant", (PyObject *)&XgActive_Type) < 0) {
        Py_DECREF(&XgActive_Type);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&XgMapping_Type);
    if (PyModule_AddObject(m, "GrantMapping", (PyObject *)&XgMapping_Type) < 0) {
        Py_DECREF(&XgMapping_Type);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "PAGE_SIZE", XG_PAGE_SIZE);
    return m;
}
