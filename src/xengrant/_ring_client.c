/*
 * The request ring's client side (the layout and rules are in _ring.c): it
 * writes one-op requests, and reads responses: it copies each response slot
 * out as it consumes it and hands the bytes back, in order, for
 * xengrant.service.frontring to decide what they mean (a map done, a posted
 * unmap done, a reply coming on the socket, or a response the service never
 * sends) and to update the client's state (its p2m mirror, its posted
 * requests, its holes).  xengrant.service.ringio is the same in Python, and
 * tests/test_ring_client_diff.py holds the two to each other.
 *
 * The only things decided here are the ring's own: whether there is room
 * for a request (RING_FULL), whether a response is the one waited for (its
 * id), and whether the service's rsp_prod is possible at all: more
 * responses than requests made is bogus (stricter than
 * RING_RESPONSE_PROD_OVERFLOW, which Linux's front ends check), and nothing
 * is read then.  So a call reads at most the slots of requests it made, each
 * once, and never outside the page.
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

/* ringio.py's _post: write a request at req_prod_pvt (state[0]) under lock
 * and push it; 1 sent, -1 the ring is full (nothing sent), -2 with an
 * exception set */
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

/* ringio.py's _wait_rsp, the GIL released: 0 the ring has responses, -2
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

/* the responses taken so far by one call: their slots, in order (PyMem) */
typedef struct {
    unsigned char *buf;
    size_t len, cap;
} xg_rsps;

static int
xg_rsps_add(xg_rsps *r, const unsigned char *slot)
{
    if (r->len + XG_RING_SLOT > r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 4 * XG_RING_SLOT;
        unsigned char *grown = PyMem_Realloc(r->buf, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        r->buf = grown;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, slot, XG_RING_SLOT);
    r->len += XG_RING_SLOT;
    return 0;
}

/* ringio.py's _consume: copy the responses out from rsp_cons (state[1]),
 * each slot freed (rsp_cons advanced) as it is copied, up to and including
 * the one whose id is seq (seq < 0: all there are).  1: seq's response was
 * taken (the last one added); 0: not (yet); -4: rsp_prod is bogus, nothing
 * taken; -1 with an exception set. */
static int
xg_consume(unsigned char *ring, unsigned char *st, long long seq, xg_rsps *out)
{
    uint32_t cons = xg_ld32(st + 4), prod = xg_ld32(ring + 8);
    if ((uint32_t)(prod - cons) > (uint32_t)(xg_ld32(st) - cons))
        return -4; /* more responses than requests */
    while (cons != prod) {
        unsigned char rsp[XG_RING_SLOT];
        memcpy(rsp, xg_slot(ring, cons), XG_RING_SLOT);
        xg_st32(st + 4, ++cons); /* the slot is free again */
        if (xg_rsps_add(out, rsp) < 0)
            return -1;
        uint32_t id;
        memcpy(&id, rsp, 4);
        if (seq >= 0 && id == (uint32_t)seq)
            return 1;
    }
    return 0;
}

/* ringio.py's ring_map_one, its loop: consume until seq's response, waiting
 * (spinning up to spin_ns first) while there is none.  A signal handler that raises
 * while it waits does not end the wait (a hypercall is not given up): its
 * exception goes to *signalled (the first one), for the caller to raise
 * once the response is in.  0: taken; -2: the socket hung up; -3: timed
 * out; -4: rsp_prod is bogus; -1 with an exception set. */
static int
xg_await_rsp(unsigned char *ring, unsigned char *st, long long seq, long long spin_ns,
             int timeout_ms, int wait_fd, int sock_fd, xg_rsps *out, PyObject **signalled)
{
    double deadline = timeout_ms < 0 ? 0 : xg_now_ns() + (double)timeout_ms * 1e6;
    for (;;) {
        int got = xg_consume(ring, st, seq, out);
        if (got != 0)
            return got == 1 ? 0 : got;
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
        if (w != 0)
            return w;
    }
}

/*
 * ring_collect(ring, state) -> bytes | None
 *
 * The client's side: the responses there are, from rsp_cons (state[1]) on,
 * consumed without waiting: their 64-byte slots, in order (b"" if none).
 * None if the service's rsp_prod is bogus (more responses than requests
 * made): nothing is consumed then.
 */
static PyObject *
xg_ring_collect(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(2, "ring_collect(ring, state) -> bytes | None")
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    xg_rsps out = {NULL, 0, 0};
    int got = xg_consume(rb.buf, sb.buf, -1, &out);
    PyObject *res = NULL;
    if (got == -4)
        res = Py_NewRef(Py_None);
    else if (got != -1)
        res = PyBytes_FromStringAndSize((const char *)out.buf, (Py_ssize_t)out.len);
    PyMem_Free(out.buf);
    xg_ring_release(&rb, &sb);
    return res;
}

/*
 * ring_map_one(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom, spin_ns, timeout_ms,
 *              wait_fd, sock_fd) -> (status, rsps, signalled)
 *
 * The one-page map on the ring: ring_post_map (a full ring is collected
 * first, then tried again), then the responses consumed until the one to
 * seq: polling up to spin_ns, then sleeping with rsp_event set until
 * wait_fd is kicked (the socket is watched for a hang-up only).  rsps is
 * every response slot consumed, in order, seq's last when status is 0;
 * the caller decides what each means.
 *   status 0: seq's response is the last of rsps;
 *   status 5: nothing sent (a value does not fit the op; the ring is full);
 *   status -2: the socket hung up; -3: timed out; -4: the service's rsp_prod
 *   is bogus (nothing more consumed).
 * signalled: None, or the exception a signal handler raised while it waited
 * (the wait went on) or as it returns: the caller raises it once it took
 * the result.
 */
static PyObject *
xg_ring_map_one(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(13, "ring_map_one(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom, spin_ns, "
                 "timeout_ms, wait_fd, sock_fd) -> (status, rsps, signalled)")
    int kick_fd, timeout_ms, wait_fd, sock_fd;
    long long spin_ns = PyLong_AsLongLong(args[9]);
    if ((spin_ns == -1 && PyErr_Occurred()) || xg_as_int(args[3], &kick_fd) < 0 ||
        xg_as_int(args[10], &timeout_ms) < 0 || xg_as_int(args[11], &wait_fd) < 0 ||
        xg_as_int(args[12], &sock_fd) < 0)
        return NULL;
    unsigned long long v[5]; /* seq, gfn, flags, ref, dom */
    if (!xg_fit_all(args + 4, 5, xg_map_one_max, v))
        return Py_BuildValue("(iyO)", 5, "", Py_None);
    unsigned char slot[XG_RING_SLOT];
    xg_ring_slot(slot, XG_GNTTABOP_map_grant_ref, v);
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    PyObject *res = NULL, *signalled = NULL;
    xg_rsps out = {NULL, 0, 0};
    int status = 5;
    int sent = xg_ring_post(rb.buf, sb.buf, args[2], kick_fd, slot);
    if (sent == -1) { /* full: what is there first */
        int got = xg_consume(rb.buf, sb.buf, -1, &out);
        if (got == -1)
            goto out;
        if (got == -4)
            status = -4;
        else
            sent = xg_ring_post(rb.buf, sb.buf, args[2], kick_fd, slot);
    }
    if (sent == -2)
        goto out;
    if (sent == 1) {
        status = xg_await_rsp(rb.buf, sb.buf, (long long)v[0], spin_ns, timeout_ms, wait_fd,
                              sock_fd, &out, &signalled);
        if (status == -1)
            goto out;
    }
    /* a signal that came as it returns: handled here, returned with the result */
    if (signalled == NULL && PyErr_CheckSignals() < 0)
        signalled = xg_take_exception();
    res = Py_BuildValue("(iy#O)", status, out.buf != NULL ? (const char *)out.buf : "",
                        (Py_ssize_t)out.len, signalled != NULL ? signalled : Py_None);
out:
    Py_XDECREF(signalled);
    PyMem_Free(out.buf);
    xg_ring_release(&rb, &sb);
    return res;
}

PyMethodDef xg_ring_client_methods[] = {
    FAST(ring_post_map, "ring_post_map(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom) "
                        "-> 1 sent, 0 does not fit, -1 ring full"),
    FAST(ring_post_unmap, "ring_post_unmap(ring, state, lock, kick_fd, seq, gfn, handle) -> 1 "
                          "sent, 0 does not fit, -1 ring full"),
    FAST(ring_collect, "ring_collect(ring, state) -> the response slots there are (consumed), "
                       "or None if rsp_prod is bogus"),
    FAST(ring_map_one, "ring_map_one(ring, state, lock, kick_fd, seq, gfn, flags, ref, dom, "
                       "spin_ns, timeout_ms, wait_fd, sock_fd) -> (status, rsps, signalled): "
                       "the one-page map on the ring"),
    {NULL, NULL, 0, NULL},
};
