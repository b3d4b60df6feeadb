/*
 * GNTTABOP_map_grant_ref and GNTTABOP_unmap_grant_ref's fast paths: the
 * common success case of xengrant.emu.gnttab_map, op by op, in C.
 */
#include "_cext.h"

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

/* interned method names, set at module init */
static PyObject *str_popleft, *str_append;

void
xg_ld_clear(xg_ld *l)
{
    Py_CLEAR(l->p2m);
    Py_CLEAR(l->entries);
    Py_CLEAR(l->free);
    Py_CLEAR(l->popleft);
    Py_CLEAR(l->append);
}

int
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

int
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
int
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

/* the interned names: 0, or -1 with an exception set */
int
xg_hvmap_init(void)
{
    str_popleft = PyUnicode_InternFromString("popleft");
    str_append = PyUnicode_InternFromString("append");
    return str_popleft == NULL || str_append == NULL ? -1 : 0;
}

PyMethodDef xg_hvmap_methods[] = {
    FAST(map_run, "map_run(mem, uop, start, count, ld, domains, refcount) -> index of the first "
                  "op of a GNTTABOP_map_grant_ref batch left to Python"),
    FAST(unmap_run, "unmap_run(mem, uop, start, count, ld, domains, refcount) -> index of the "
                    "first op of a GNTTABOP_unmap_grant_ref batch left to Python"),
    {NULL, NULL, 0, NULL},
};
