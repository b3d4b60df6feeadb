/*
 * The guest side: runs over a v1 grant table's shared entries, the packing
 * of op batches, and a service client's p2m mirror.
 */
#include "_cext.h"

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
    return xg_pack_ops(seqs, 3, XG_MAP_OP_SIZE, (uint32_t)flags);
}

static PyObject *
xg_pack_unmap_ops(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(2, "pack_unmap_ops(gfns, handles) -> bytearray or None")
    return xg_pack_ops(args, 2, XG_UNMAP_OP_SIZE, 0);
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

PyMethodDef xg_guest_methods[] = {
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
    {NULL, NULL, 0, NULL},
};
