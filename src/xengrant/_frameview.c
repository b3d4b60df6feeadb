/*
 * FrameView: a buffer-protocol object over a run of 4 KiB frames, either
 * borrowed from an existing buffer (the machine memory mapping) or built by
 * mmap()ing frames of a file descriptor (the memfd holding machine memory)
 * into one contiguous virtual range (MAP_FIXED over a PROT_NONE
 * reservation), like xengnttab_map_grant_refs maps several grants
 * contiguously.  It counts its exports: close() refuses with BufferError
 * while any memoryview, slice or numpy array still uses it, so no Python
 * code can touch a frame after it was unmapped.
 */
#include "_cext.h"

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

PyTypeObject FrameView_Type = {
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

PyMethodDef xg_frameview_methods[] = {
    FAST(borrow, "borrow(base, offset, length, readonly) -> FrameView over part of base"),
    FAST(vmap, "vmap(fd, frames, readonly) -> FrameView mapping the frames contiguously"),
    {NULL, NULL, 0, NULL},
};
