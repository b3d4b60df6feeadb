/*
 * The request ring's client side (the layout and rules are in _ring.c).
 */
#include "_cext.h"

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

/* write a request at req_prod_pvt (state[0]) under lock and push it; 1 sent,
 * -1 the ring is full (nothing sent), -2 with an exception set */
static int
xg_ring_post(unsigned char *ring, unsigned char *st, PyObject *lock, int kick_fd,
             const unsigned char *slot)
{
    if (xg_lock(lock) < 0)
        return -2;
    uint32_t pvt = xg_ld32(st), cons = xg_ld32(st + 4);
    int rc = -1;
    if ((uint32_t)(pvt - cons) < XG_RING_SIZE) { /* !RING_FULL */
        memcpy(xg_slot(ring, pvt), slot, XG_RING_SLOT);
        xg_st32(st, pvt + 1);
        if (xg_push(ring, pvt, pvt + 1))
            xg_kick(kick_fd);
        rc = 1;
    }
    return xg_unlock(lock, 0) < 0 ? -2 : rc;
}

/* ring_post_* with the page and state held: the PyObject result */
static PyObject *
xg_ring_post_obj(PyObject *const *args, int kick_fd, const unsigned char *slot)
{
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    int rc = xg_ring_post(rb.buf, sb.buf, args[2], kick_fd, slot);
    xg_ring_release(&rb, &sb);
    return rc == -2 ? NULL : PyLong_FromLong(rc);
}

/* a request slot: id v[0], cmd, flags (F_POSTED for an unmap), the op's IN
 * fields from v as xg_put_map_op / xg_put_unmap_op take them */
static void
xg_ring_slot(unsigned char *slot, uint16_t cmd, const unsigned long long *v)
{
    uint32_t id = (uint32_t)v[0];
    uint16_t flags = cmd == XG_GNTTABOP_unmap_grant_ref ? XG_F_POSTED : 0;
    memset(slot, 0, XG_RING_SLOT);
    memcpy(slot, &id, 4);
    memcpy(slot + 4, &cmd, 2);
    memcpy(slot + 6, &flags, 2);
    if (cmd == XG_GNTTABOP_map_grant_ref)
        xg_put_map_op(slot + 8, v);
    else
        xg_put_unmap_op(slot + 8, v);
}

/* ring_post_map, ring_post_unmap: kick_fd at args[3], the op's n values from
 * args[4] within vmax */
static PyObject *
xg_ring_post_op(PyObject *const *args, int n, const unsigned long long *vmax, uint16_t cmd)
{
    int kick_fd;
    if (xg_as_int(args[3], &kick_fd) < 0)
        return NULL;
    unsigned long long v[5];
    if (!xg_fit_all(args + 4, n, vmax, v))
        return PyLong_FromLong(0);
    unsigned char slot[XG_RING_SLOT];
    xg_ring_slot(slot, cmd, v);
    return xg_ring_post_obj(args, kick_fd, slot);
}

/*
 * ring_post_map(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom) -> int
 *
 * The client's side: request seq, a GNTTABOP_map_grant_ref of one op
 * (host_addr gfn << 12), on the ring under lock, the service kicked if it
 * sleeps.  1: sent; 0: a value does not fit the op; -1: the ring is full
 * (nothing sent either way).
 */
static PyObject *
xg_ring_post_map(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(9, "ring_post_map(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom) -> int")
    return xg_ring_post_op(args, 5, xg_map_one_max, XG_GNTTABOP_map_grant_ref);
}

/*
 * ring_post_unmap(ring, state, lock, kick_fd, seq, gfn, handle) -> int
 *
 * As ring_post_map, for a posted GNTTABOP_unmap_grant_ref of one op.
 */
static PyObject *
xg_ring_post_unmap(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(7, "ring_post_unmap(ring, state, lock, kick_fd, seq, gfn, handle) -> int")
    return xg_ring_post_op(args, 3, xg_unmap_one_max, XG_GNTTABOP_unmap_grant_ref);
}

/* one response for the client: a posted one-op unmap that succeeded is done
 * (popped, its gfn out of the p2m and on freed), one answered on the socket
 * goes on later (if not NULL); 1 if it is the response to seq (*kind, and
 * for a done map the handle, mfn and p2mt), 0 otherwise, -1 with an
 * exception set */
static int
xg_ring_answer(const unsigned char *rsp, long long seq, PyObject *posted, PyObject *p2m,
               PyObject *freed, PyObject *later, int *kind, long long *handle, long long *mfn,
               long long *typ)
{
    uint32_t id;
    uint16_t cmd;
    int16_t k;
    memcpy(&id, rsp, 4);
    memcpy(&cmd, rsp + 4, 2);
    memcpy(&k, rsp + 6, 2);
    if (seq >= 0 && id == (uint32_t)seq) {
        *kind = k;
        int16_t status;
        uint32_t h;
        int64_t m64, t64;
        memcpy(&status, rsp + 8 + 18, 2);
        memcpy(&h, rsp + 8 + 20, 4);
        memcpy(&m64, rsp + 40, 8);
        memcpy(&t64, rsp + 48, 8);
        if (k == XG_RSP_DONE && (cmd != XG_GNTTABOP_map_grant_ref || status != 0 || m64 < 0))
            *kind = -1; /* not what the service sends */
        *handle = h;
        *mfn = m64;
        *typ = t64;
        return 1;
    }
    int16_t status;
    memcpy(&status, rsp + 8 + 20, 2);
    PyObject *key = PyLong_FromUnsignedLong(id);
    if (key == NULL)
        return -1;
    if (k != XG_RSP_DONE || cmd != XG_GNTTABOP_unmap_grant_ref || status != 0) {
        /* on the socket (its seq on later: the posted entry waits there), or a
         * map done for an entry of another kind (its slot on later, for Python
         * to finish), or not the service's */
        int bad = 0;
        if (later != NULL && PyDict_Contains(posted, key) == 1) {
            PyObject *item = k == XG_RSP_SOCKET ? Py_NewRef(key)
                             : k == XG_RSP_DONE && cmd == XG_GNTTABOP_map_grant_ref
                                 ? PyBytes_FromStringAndSize((const char *)rsp, XG_RING_SLOT)
                                 : NULL;
            bad = item != NULL ? PyList_Append(later, item) < 0 : PyErr_Occurred() != NULL;
            Py_XDECREF(item);
        }
        Py_DECREF(key);
        return bad || PyErr_Occurred() ? -1 : 0;
    }
    PyObject *entry = PyDict_GetItemWithError(posted, key); /* borrowed */
    if (entry == NULL || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) {
        Py_DECREF(key);
        return PyErr_Occurred() ? -1 : 0; /* no entry: nobody waits for it */
    }
    int bad = xg_unmap_done(posted, key, PyTuple_GET_ITEM(entry, 0), p2m, freed);
    Py_DECREF(key);
    return bad;
}

/* the wait of ring_collect, the GIL released: 0 the ring has responses, -2
 * the socket hung up, -3 timed out, 4 EINTR.  The socket is watched for a
 * hang-up only: its messages are for whoever reads it. */
static int
xg_ring_wait_rsp(unsigned char *ring, unsigned char *st, long long spin_ns, double deadline,
                 int wait_fd, int sock_fd)
{
    uint32_t cons = xg_ld32(st + 4);
    if (spin_ns > 0) {
        double end = xg_now_ns() + (double)spin_ns;
        do {
            sched_yield();
            if (xg_ld32(ring + 8) != cons)
                return 0;
        } while (xg_now_ns() < end);
    }
    for (;;) {
        /* RING_FINAL_CHECK_FOR_RESPONSES */
        xg_st32(ring + 12, cons + 1);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (xg_ld32(ring + 8) != cons)
            return 0;
        int ms = -1;
        if (deadline > 0) {
            double left = (deadline - xg_now_ns()) / 1e6;
            if (left <= 0)
                return -3;
            ms = (int)left + 1;
        }
        struct pollfd pfd[2] = {{wait_fd, POLLIN, 0}, {sock_fd, 0, 0}};
        int r = poll(pfd, 2, ms);
        if (r < 0)
            return errno == EINTR ? 4 : -2;
        if (pfd[0].revents & POLLIN)
            xg_unkick(wait_fd);
        if (xg_ld32(ring + 8) != cons)
            return 0;
        if (pfd[1].revents & (POLLHUP | POLLERR | POLLNVAL))
            return -2;
    }
}

/* consume responses and wait as ring_collect says, with the page and state
 * already held; 0, or -1 with an exception set.  A signal handler that raises
 * while it waits does not end the wait (a hypercall is not given up): its
 * exception goes to *signalled (the first one; NULL if none), for the caller
 * to raise once the response is in. */
static int
xg_ring_collect_in(unsigned char *ring, unsigned char *st, long long seq, long long spin_ns,
                   int timeout_ms, PyObject *posted, PyObject *p2m, PyObject *freed,
                   PyObject *later, int wait_fd, int sock_fd, int *status, long long *handle,
                   long long *mfn, long long *typ, PyObject **signalled)
{
    double deadline = timeout_ms < 0 ? 0 : xg_now_ns() + (double)timeout_ms * 1e6;
    int kind = 0;
    *status = 3;
    for (;;) {
        uint32_t cons = xg_ld32(st + 4), prod = xg_ld32(ring + 8);
        if ((uint32_t)(prod - cons) > XG_RING_SIZE) {
            *status = -4;
            return 0;
        }
        int mine = 0;
        while (cons != prod && !mine) {
            unsigned char rsp[XG_RING_SLOT];
            memcpy(rsp, xg_slot(ring, cons), XG_RING_SLOT);
            xg_st32(st + 4, ++cons); /* the slot is free again */
            mine = xg_ring_answer(rsp, seq, posted, p2m, freed, later, &kind, handle, mfn, typ);
            if (mine < 0)
                return -1;
        }
        if (mine) {
            *status = kind == XG_RSP_DONE ? 0 : kind == XG_RSP_SOCKET ? 1 : -1;
            return 0;
        }
        if (seq < 0)
            return 0; /* drained: 3 */
        int w;
        Py_BEGIN_ALLOW_THREADS
        w = xg_ring_wait_rsp(ring, st, spin_ns, deadline, wait_fd, sock_fd);
        Py_END_ALLOW_THREADS
        spin_ns = 0;
        if (w == 4) {
            if (PyErr_CheckSignals() < 0) {
                PyObject *e = xg_take_exception();
                if (*signalled == NULL)
                    *signalled = e;
                else
                    Py_XDECREF(e);
            }
            continue;
        }
        if (w != 0) {
            *status = w;
            return 0;
        }
    }
}

/*
 * ring_collect(ring, state, posted, p2m, freed, later) -> status
 *
 * The client's side: consume the responses there are, from rsp_cons
 * (state[1]) in order, without waiting.  Each posted one-op unmap that
 * succeeded (its entry (gfn, on_reply) in posted) is done as its
 * on_reply would do it: popped, its gfn out of the p2m mirror and on freed.
 * One answered on the socket keeps its entry (its reply comes there; its
 * seq goes on later); a map done for a posted entry of another kind keeps
 * it too, its response slot on later (the client posts none such today).
 * Returns 3, or -4 if the service's rsp_prod is bogus.
 */
static PyObject *
xg_ring_collect(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(6, "ring_collect(ring, state, posted, p2m, freed, later) -> status")
    PyObject *posted, *p2m, *freed, *later = args[5];
    if (xg_lane_args(args + 2, &posted, &p2m, &freed) < 0)
        return NULL;
    if (!PyList_Check(later)) {
        PyErr_SetString(PyExc_TypeError, "ring_collect: later must be a list");
        return NULL;
    }
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    int status;
    long long handle, mfn, typ;
    PyObject *signalled = NULL; /* (it does not wait) */
    int rc = xg_ring_collect_in(rb.buf, sb.buf, -1, 0, 0, posted, p2m, freed, later, -1, -1,
                                &status, &handle, &mfn, &typ, &signalled);
    Py_XDECREF(signalled);
    xg_ring_release(&rb, &sb);
    return rc < 0 ? NULL : PyLong_FromLong(status);
}

/*
 * ring_map_one(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom, spin_ns, timeout_ms,
 *              posted, p2m, freed, later, wait_fd, sock_fd)
 *     -> (status, handle, mfn, p2mt, signalled)
 *
 * The one-page lane on the ring: ring_post_map (a full ring is collected
 * first, then tried again), then the responses consumed as ring_collect
 * does (the seqs of posted requests answered on the socket go on later:
 * the caller reads their replies before it returns), waiting for the one
 * to seq: polling up to spin_ns, then sleeping
 * with rsp_event set until wait_fd is kicked (the socket is watched for a
 * hang-up only).
 *   status 0: mapped: p2m[gfn] = (mfn, p2mt), handle the op's;
 *   status 1: its reply comes on the socket;
 *   status 5: nothing sent (a value does not fit; the ring is full);
 *   status -1: a response the service does not send; -2: the socket hung
 *   up; -3: timed out; -4: the service's rsp_prod is bogus.
 * signalled: None, or the exception a signal handler raised while it waited
 * (the wait went on) or as it returned: the caller raises it once it took
 * the result.
 */
static PyObject *
xg_ring_map_one(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(17, "ring_map_one(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom, spin_ns, "
                 "timeout_ms, posted, p2m, freed, later, wait_fd, sock_fd) -> (status, handle, "
                 "mfn, p2mt, signalled)")
    PyObject *posted, *p2m, *freed, *later = args[14];
    if (xg_lane_args(args + 11, &posted, &p2m, &freed) < 0)
        return NULL;
    if (!PyList_Check(later)) {
        PyErr_SetString(PyExc_TypeError, "ring_map_one: later must be a list");
        return NULL;
    }
    int kick_fd, timeout_ms, wait_fd, sock_fd;
    long long spin_ns = PyLong_AsLongLong(args[9]);
    if ((spin_ns == -1 && PyErr_Occurred()) || xg_as_int(args[3], &kick_fd) < 0 ||
        xg_as_int(args[10], &timeout_ms) < 0 || xg_as_int(args[15], &wait_fd) < 0 ||
        xg_as_int(args[16], &sock_fd) < 0)
        return NULL;
    unsigned long long v[5]; /* seq, gfn, flags, ref, dom */
    long long handle = -1, mfn = -1, typ = 0;
    if (!xg_fit_all(args + 4, 5, xg_map_one_max, v))
        return Py_BuildValue("(iLLLO)", 5, handle, mfn, typ, Py_None);
    unsigned char slot[XG_RING_SLOT];
    xg_ring_slot(slot, XG_GNTTABOP_map_grant_ref, v);
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    PyObject *res = NULL, *signalled = NULL;
    int status = 5;
    int sent = xg_ring_post(rb.buf, sb.buf, args[2], kick_fd, slot);
    if (sent == -1) { /* full: what is there first */
        if (xg_ring_collect_in(rb.buf, sb.buf, -1, 0, 0, posted, p2m, freed, later, -1, -1,
                               &status, &handle, &mfn, &typ, &signalled) < 0)
            goto out;
        status = status == -4 ? -4 : 5;
        if (status == 5)
            sent = xg_ring_post(rb.buf, sb.buf, args[2], kick_fd, slot);
    }
    if (sent == -2)
        goto out;
    if (sent == 1) {
        if (xg_ring_collect_in(rb.buf, sb.buf, (long long)v[0], spin_ns, timeout_ms, posted, p2m,
                               freed, later, wait_fd, sock_fd, &status, &handle, &mfn, &typ,
                               &signalled) < 0)
            goto out;
        if (status == 0 && xg_p2m_set(p2m, v[1], mfn, typ) < 0)
            goto out;
    }
    /* a signal that came as it returns: handled here, returned with the result */
    if (signalled == NULL && PyErr_CheckSignals() < 0)
        signalled = xg_take_exception();
    res = Py_BuildValue("(iLLLO)", status, handle, mfn, typ,
                        signalled != NULL ? signalled : Py_None);
out:
    Py_XDECREF(signalled);
    xg_ring_release(&rb, &sb);
    return res;
}

PyMethodDef xg_ring_client_methods[] = {
    FAST(ring_post_map, "ring_post_map(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom) "
                        "-> 1 sent, 0 does not fit, -1 ring full"),
    FAST(ring_post_unmap, "ring_post_unmap(ring, state, lock, kick_fd, seq, gfn, handle) -> 1 "
                          "sent, 0 does not fit, -1 ring full"),
    FAST(ring_collect, "ring_collect(ring, state, posted, p2m, freed, later) -> status: the "
                       "ring's responses there are, consumed"),
    FAST(ring_map_one, "ring_map_one(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom, "
                       "spin_ns, timeout_ms, posted, p2m, freed, later, wait_fd, sock_fd) -> "
                       "(status, handle, mfn, p2mt): the one-page lane on the ring"),
    {NULL, NULL, 0, NULL},
};
