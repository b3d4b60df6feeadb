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
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define XG_PAGE_SIZE 4096

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

/* vmap(fd, frames, readonly) -> FrameView; frames is a sequence of frame numbers */
static PyObject *
xg_vmap(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "vmap(fd, frames, readonly)");
        return NULL;
    }
    long fdl = PyLong_AsLong(args[0]);
    int fd = (int)fdl;
    if (fdl == -1 && PyErr_Occurred())
        return NULL;
    int ro = PyObject_IsTrue(args[2]);
    if (ro == -1)
        return NULL;
    PyObject *seq = PySequence_Fast(args[1], "frames must be a sequence of ints");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n <= 0) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "vmap needs at least one frame");
        return NULL;
    }
    size_t total = (size_t)n * XG_PAGE_SIZE;
    char *base = mmap(NULL, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        Py_DECREF(seq);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    int prot = ro ? PROT_READ : (PROT_READ | PROT_WRITE);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_ssize_t i = 0;
    while (i < n) {
        long long first = PyLong_AsLongLong(items[i]);
        if (first < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "negative frame number");
            goto fail;
        }
        Py_ssize_t run = 1;
        while (i + run < n) {
            long long next = PyLong_AsLongLong(items[i + run]);
            if (next == -1 && PyErr_Occurred())
                goto fail;
            if (next != first + run)
                break;
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
    FrameView *fv = PyObject_New(FrameView, &FrameView_Type);
    if (fv == NULL) {
        munmap(base, total);
        return NULL;
    }
    fv->addr = base;
    fv->len = (Py_ssize_t)total;
    fv->readonly = ro;
    fv->owned = 1;
    fv->closed = 0;
    fv->exports = 0;
    fv->has_base = 0;
    return (PyObject *)fv;
fail:
    munmap(base, total);
    Py_DECREF(seq);
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

#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))xg_##name, METH_FASTCALL, doc}

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
    if (PyType_Ready(&FrameView_Type) < 0)
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
    PyModule_AddIntConstant(m, "PAGE_SIZE", XG_PAGE_SIZE);
    return m;
}
