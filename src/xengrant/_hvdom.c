/*
 * The hypervisor's domains as the C runs (copy_run, map_run, unmap_run,
 * serve_gnttab) read them: a domain's attributes looked up once per call and
 * cached (xg_dom), a batch's buffers (xg_batch), and the p2m lookups
 * (get_paged_frame).  Only plain dicts and lists are read here, so no Python
 * code runs; a domain whose containers are anything else is left to Python.
 */
#include "_cext.h"

static const char *const xg_attr_names[XG_NATTR] = {"p2m", "gt", "is_dying", "shared", "active",
                                                    "version", "domid", "pv", "maptrack",
                                                    "entries", "_free"};
static PyObject *xg_attr_str[XG_NATTR];

void
xg_dom_clear(xg_dom *c, int n)
{
    for (int i = 0; i < n; i++) {
        Py_CLEAR(c[i].p2m);
        Py_CLEAR(c[i].shared);
        Py_CLEAR(c[i].active);
        c[i].obj = NULL;
    }
}

PyObject *
xg_getattr(PyObject *o, int which)
{
    return PyObject_GetAttr(o, xg_attr_str[which]);
}

/* The cached attributes of domain object d; NULL with an exception set, or
 * NULL without one when the cache is full.  Slots are never reused within a
 * call, so pointers to them stay valid. */
xg_dom *
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

void
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
int
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
int
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
int
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

/* the attribute names, interned: 0, or -1 with an exception set */
int
xg_hvdom_init(void)
{
    for (int i = 0; i < XG_NATTR; i++)
        if ((xg_attr_str[i] = PyUnicode_InternFromString(xg_attr_names[i])) == NULL)
            return -1;
    return 0;
}
