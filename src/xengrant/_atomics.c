/*
 * Atomics on 16- and 32-bit words of a shared buffer: load, store, cmpxchg,
 * fetch_or, fetch_and, plus full/read/write barriers.  They are what the
 * grant-entry update protocol of xen/include/public/grant_table.h needs
 * ("Check result of SMP-safe CMPXCHG(&ent->flags, flags, 0)") and what Xen
 * itself uses on the shared entry (guest_cmpxchg in _set_status_v1).
 * All are sequentially consistent (__atomic_*, __ATOMIC_SEQ_CST), so a
 * store is also the barrier the protocol asks for.
 */
#include "_cext.h"

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

PyMethodDef xg_atomics_methods[] = {
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
    {"mb", (PyCFunction)xg_mb, METH_NOARGS, "full memory barrier"},
    {"wmb", (PyCFunction)xg_wmb, METH_NOARGS, "write (release) barrier"},
    {"rmb", (PyCFunction)xg_rmb, METH_NOARGS, "read (acquire) barrier"},
    {NULL, NULL, 0, NULL},
};
