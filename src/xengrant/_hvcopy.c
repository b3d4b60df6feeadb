/*
 * GNTTABOP_copy's fast path: the common success case of
 * xengrant.emu.gnttab_copy.copy_one, op by op, in C.
 */
#include "_cext.h"

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

PyMethodDef xg_hvcopy_methods[] = {
    FAST(copy_run, "copy_run(mem, uop, start, count, ld, domains) -> index of the first op "
                   "of a GNTTABOP_copy batch left to Python"),
    {NULL, NULL, 0, NULL},
};
