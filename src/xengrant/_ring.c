/*
 * The request ring of a service connection: its layout and rules, and the
 * service's side (the client's is _ring_client.c).
 *
 * A domain process and ``xengrant hypervisor`` share one page per connection
 * (a sealed memfd the service makes and passes over the socket): a shared
 * ring as xen/include/public/io/ring.h defines it, carrying one-op
 * GNTTABOP_map_grant_ref and (posted) GNTTABOP_unmap_grant_ref requests and
 * their responses without a system call on either side, and two eventfds,
 * the event channels that wake a side that went to sleep.  Everything else
 * stays on the socket; a request the service does not answer in C here is
 * answered there (the response says so), as a MSG_GNTTAB_OP reply with the
 * request's sequence number.
 *
 * Layout (io/ring.h, DEFINE_RING_TYPES on a 4 KiB page; tests/ compile it):
 *   0  u32 req_prod   the client's (the front end's)
 *   4  u32 req_event  notify the service when req_prod passes it
 *   8  u32 rsp_prod   the service's (the back end's)
 *  12  u32 rsp_event  notify the client when rsp_prod passes it
 *  16  pvt, __pad     (48 bytes)
 *  64  ring[XG_RING_SIZE] of 64-byte slots, request and response in turn:
 *      request:  u32 id (the seq), u16 cmd, u16 flags (0 or F_POSTED), the op
 *                at 8 (gnttab_map_grant_ref 32 bytes, gnttab_unmap_grant_ref 24)
 *      response: u32 id, u16 cmd, i16 kind (XG_RSP_DONE: the op at 8 as the
 *                hypervisor left it, then i64 mfn at 40 and i64 p2m type at 48,
 *                the p2m entry of the op's gfn; XG_RSP_SOCKET: the reply comes
 *                on the socket)
 * __RING_SIZE(s, 4096) = (4096 - 64) / 64 = 63, rounded down to a power of
 * two: 32.
 *
 * The producers and consumers follow ring.h's rules: a producer writes the
 * slots, then (write barrier) the producer index, then (full barrier) checks
 * the peer's event index (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY); a consumer
 * about to sleep sets its event index one past what it consumed, then (full
 * barrier) looks again (RING_FINAL_CHECK_FOR_REQUESTS).  A consumer that
 * polls leaves its event index behind, so the producer does not notify.
 * The service trusts nothing in the page: the indices are checked (a
 * front end more than a ring ahead is dropped, as blkback's
 * RING_REQUEST_PROD_OVERFLOW check drops it), each request is copied out
 * before it is read, and its op is checked as a socket message's is.
 */
#include "_cext.h"

/* the ring page and the 8-byte private state (two u32) of one side */
int
xg_ring_bufs(PyObject *ring, PyObject *state, Py_buffer *rb, Py_buffer *sb)
{
    if (PyObject_GetBuffer(ring, rb, PyBUF_WRITABLE) < 0)
        return -1;
    if (PyObject_GetBuffer(state, sb, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(rb);
        return -1;
    }
    if (rb->len < XG_RING_PAGE || sb->len < 8 || ((uintptr_t)rb->buf & 3) ||
        ((uintptr_t)sb->buf & 3)) {
        PyBuffer_Release(rb);
        PyBuffer_Release(sb);
        PyErr_SetString(PyExc_ValueError, "ring: a page and 8 bytes of state, 4-byte aligned");
        return -1;
    }
    return 0;
}

void
xg_ring_release(Py_buffer *rb, Py_buffer *sb)
{
    PyBuffer_Release(rb);
    PyBuffer_Release(sb);
}

/* event channel "notify": one increment of the eventfd (-1: none) */
void
xg_kick(int fd)
{
    if (fd >= 0) {
        uint64_t one = 1;
        ssize_t n;
        do
            n = write(fd, &one, sizeof one);
        while (n < 0 && errno == EINTR);
    }
}

/* push a producer index (prod at p, event at p + 4) from old to new and
 * say whether the peer asked to be notified: RING_PUSH_*_AND_CHECK_NOTIFY */
int
xg_push(unsigned char *p, uint32_t old, uint32_t new)
{
    xg_st32(p, new);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint32_t event = xg_ld32(p + 4);
    return (uint32_t)(new - event) < (uint32_t)(new - old);
}

void
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

/* ------------------------------------------------------------ the service */

/* the unconsumed requests (req_prod - req_cons), or -1 with ValueError if
 * the client claims more than a ring */
static long
xg_ring_pending(unsigned char *ring, uint32_t cons)
{
    uint32_t n = xg_ld32(ring) - cons;
    if (n > XG_RING_SIZE) {
        PyErr_Format(PyExc_ValueError,
                     "ring: req_prod is %u requests past req_cons (a ring holds %d)",
                     (unsigned)n, XG_RING_SIZE);
        return -1;
    }
    return (long)n;
}

/* write response kind at rsp_prod_pvt (state[1]) and advance it */
static void
xg_ring_put(unsigned char *ring, unsigned char *st, uint32_t id, uint16_t cmd, int16_t kind,
            const unsigned char *op, size_t opsize, long long mfn, long long typ)
{
    uint32_t pvt;
    memcpy(&pvt, st + 4, 4);
    unsigned char *s = xg_slot(ring, pvt);
    unsigned char rsp[XG_RING_SLOT] = {0};
    int64_t m64 = mfn, t64 = typ;
    memcpy(rsp, &id, 4);
    memcpy(rsp + 4, &cmd, 2);
    memcpy(rsp + 6, &kind, 2);
    if (op != NULL)
        memcpy(rsp + 8, op, opsize);
    memcpy(rsp + 40, &m64, 8);
    memcpy(rsp + 48, &t64, 8);
    memcpy(s, rsp, sizeof rsp);
    pvt++;
    memcpy(st + 4, &pvt, 4);
}

/* make the responses up to rsp_prod_pvt visible; kick the client if it asked */
static void
xg_ring_push_rsp(unsigned char *ring, unsigned char *st, int kick_fd)
{
    uint32_t pvt, old = xg_ld32(ring + 8);
    memcpy(&pvt, st + 4, 4);
    if (pvt != old && xg_push(ring + 8, old, pvt))
        xg_kick(kick_fd);
}

/*
 * ring_serve(ring, state, mem, ld, domains, refcount, unmap_ok, kick_fd) -> left
 *
 * The service's side: the requests between req_cons (state[0]) and req_prod,
 * copied out and answered by serve_gnttab (the same rules and replies as on
 * the socket: it takes the common success case only), each response written
 * at rsp_prod_pvt (state[1]) and pushed, the client kicked if it waits.
 * Stops at the first request serve_gnttab does not take; left is how many
 * are still unconsumed (the caller takes the next with ring_take).
 * Raises ValueError if the indices are bogus (drop the connection).
 */
/* ring_serve with the page and state held: left, or -1 with an exception set */
static long
xg_ring_serve_in(unsigned char *ring, unsigned char *st, PyObject *const *sv, int kick_fd)
{
    uint32_t cons;
    memcpy(&cons, st, 4);
    long n = xg_ring_pending(ring, cons);
    if (n < 0)
        return -1;
    int unmap_ok = PyObject_IsTrue(sv[4]);
    if (unmap_ok < 0)
        return -1;
    /* copy the requests out as socket messages, up to one of another kind */
    unsigned char req[XG_RING_SIZE][XG_RING_SLOT];
    unsigned char msgs[XG_RING_SIZE * (XG_HDR + XG_GNTTAB_REQ + XG_MAP_OP_SIZE)];
    unsigned char *m = msgs;
    long k = 0;
    for (; k < n; k++) {
        memcpy(req[k], xg_slot(ring, cons + (uint32_t)k), XG_RING_SLOT);
        uint32_t id;
        uint16_t cmd, flags;
        memcpy(&id, req[k], 4);
        memcpy(&cmd, req[k] + 4, 2);
        memcpy(&flags, req[k] + 6, 2);
        if ((cmd != XG_GNTTABOP_map_grant_ref && cmd != XG_GNTTABOP_unmap_grant_ref) ||
            (flags != 0 && flags != XG_F_POSTED))
            break;
        size_t opsize = cmd == XG_GNTTABOP_map_grant_ref ? XG_MAP_OP_SIZE : XG_UNMAP_OP_SIZE;
        xg_put_header(m, (uint32_t)(XG_GNTTAB_REQ + opsize), flags, id, cmd);
        memcpy(m + XG_HDR + XG_GNTTAB_REQ, req[k] + 8, opsize);
        m += XG_HDR + XG_GNTTAB_REQ + opsize;
    }
    if (k == 0)
        return n;
    /* serve_gnttab's rules, one reply per message taken, in order */
    char *out = NULL;
    Py_ssize_t olen = 0, answered, partial;
    if (xg_serve_msgs(msgs, 0, m - msgs, sv, unmap_ok, &out, &olen, &answered, &partial) < 0) {
        PyMem_Free(out);
        return -1;
    }
    const unsigned char *r = (const unsigned char *)out;
    Py_ssize_t off = 0;
    long taken = 0;
    while (olen - off >= XG_HDR + 12 && taken < k) {
        uint32_t flen, id, opsize;
        memcpy(&flen, r + off, 4);
        memcpy(&id, r + off + 8, 4);
        memcpy(&opsize, r + off + XG_HDR + 8, 4);
        const unsigned char *pl = r + off + XG_HDR;
        uint16_t cmd;
        memcpy(&cmd, req[taken] + 4, 2);
        long long mfn = -1, typ = 0;
        if (opsize == XG_MAP_OP_SIZE || opsize == XG_UNMAP_OP_SIZE) {
            int64_t m64, t64; /* the p2m columns: u32 count, gfn, mfn, type */
            memcpy(&m64, pl + 12 + opsize + 4 + 8, 8);
            memcpy(&t64, pl + 12 + opsize + 4 + 16, 8);
            mfn = m64;
            typ = t64;
        }
        xg_ring_put(ring, st, id, cmd, XG_RSP_DONE, pl + 12, opsize <= 32 ? opsize : 32, mfn,
                    typ);
        off += XG_HDR + (Py_ssize_t)flen;
        taken++;
    }
    PyMem_Free(out);
    cons += (uint32_t)taken;
    memcpy(st, &cons, 4);
    xg_ring_push_rsp(ring, st, kick_fd);
    return n - taken;
}

static PyObject *
xg_ring_serve(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(8, "ring_serve(ring, state, mem, ld, domains, refcount, unmap_ok, kick_fd) -> left")
    int kick_fd;
    if (xg_as_int(args[7], &kick_fd) < 0)
        return NULL;
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    long left = xg_ring_serve_in(rb.buf, sb.buf, args + 2, kick_fd);
    xg_ring_release(&rb, &sb);
    return left < 0 ? NULL : PyLong_FromLong(left);
}

/*
 * ring_take(ring, state) -> bytes | None
 *
 * The next unconsumed request's slot (64 bytes, copied out), consumed; None
 * if there is none.  Raises ValueError if the indices are bogus.
 */
static PyObject *
xg_ring_take(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(2, "ring_take(ring, state) -> bytes | None")
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    unsigned char *ring = rb.buf, *st = sb.buf;
    PyObject *res = NULL;
    uint32_t cons;
    memcpy(&cons, st, 4);
    long n = xg_ring_pending(ring, cons);
    if (n > 0) {
        res = PyBytes_FromStringAndSize((const char *)xg_slot(ring, cons), XG_RING_SLOT);
        if (res != NULL) {
            cons++;
            memcpy(st, &cons, 4);
        }
    } else if (n == 0) {
        res = Py_NewRef(Py_None);
    }
    xg_ring_release(&rb, &sb);
    return res;
}

/*
 * ring_redirect(ring, state, id, cmd, kick_fd)
 *
 * Respond to request id: its reply comes on the socket (XG_RSP_SOCKET).
 */
static PyObject *
xg_ring_redirect(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(5, "ring_redirect(ring, state, id, cmd, kick_fd)")
    unsigned long long v[2];
    static const unsigned long long vmax[2] = {0xFFFFFFFFULL, 0xFFFFULL};
    int kick_fd;
    if (!xg_fit_all(args + 2, 2, vmax, v)) {
        PyErr_SetString(PyExc_ValueError, "ring_redirect: id must fit u32, cmd u16");
        return NULL;
    }
    if (xg_as_int(args[4], &kick_fd) < 0)
        return NULL;
    Py_buffer rb, sb;
    if (xg_ring_bufs(args[0], args[1], &rb, &sb) < 0)
        return NULL;
    xg_ring_put(rb.buf, sb.buf, (uint32_t)v[0], (uint16_t)v[1], XG_RSP_SOCKET, NULL, 0, -1, 0);
    xg_ring_push_rsp(rb.buf, sb.buf, kick_fd);
    xg_ring_release(&rb, &sb);
    Py_RETURN_NONE;
}

static PyObject *str_dead, *str_is_dying;

/* attribute name of o is true: 1, 0, or -1 with an exception set */
static int
xg_attr_true(PyObject *o, PyObject **name, const char *s)
{
    if (*name == NULL && (*name = PyUnicode_InternFromString(s)) == NULL)
        return -1;
    PyObject *v = PyObject_GetAttr(o, *name);
    if (v == NULL)
        return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

/*
 * ring_serve_wait(fd, buf, spin_ns, ring, state, svc_kick, cli_kick, lock, conn, to_close,
 *                 mem, ld, domains, refcount, unmap_ok) -> n
 *
 * A connection thread's wait when it has a ring: recv_wait on the socket
 * that also returns as soon as the ring has a request, looked at before the
 * socket (a request the client put on the ring before it sent on the socket
 * is answered first), and sleeps with req_event set, so the client's first
 * request after that kicks svc_kick.  Ring requests are served here: under
 * lock, ring_serve runs while the connection is alive (not conn.dead), the
 * domain ld (None: serve nothing here) is not dying and no connection waits
 * to be closed (to_close is empty); then it waits again.
 * Returns the bytes the socket brought (0: closed), or -2 when the ring has
 * a request not served here (the caller serves it).  Raises OSError for a
 * failed recv, ValueError for bogus indices.
 */
static PyObject *
xg_ring_serve_wait(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(15, "ring_serve_wait(fd, buf, spin_ns, ring, state, svc_kick, cli_kick, lock, "
                 "conn, to_close, mem, ld, domains, refcount, unmap_ok) -> n")
    int fd, svc_kick, cli_kick;
    long long spin_ns = PyLong_AsLongLong(args[2]);
    if ((spin_ns == -1 && PyErr_Occurred()) || xg_as_int(args[5], &svc_kick) < 0 ||
        xg_as_int(args[6], &cli_kick) < 0)
        return NULL;
    if (!PyList_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "ring_serve_wait: to_close must be a list");
        return NULL;
    }
    long long spin_again = spin_ns;
    Py_buffer b, rb, sb;
    if (xg_fd_buf(args, &fd, &b) < 0)
        return NULL;
    if (xg_ring_bufs(args[3], args[4], &rb, &sb) < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    PyObject *lock = args[7], *res = NULL;
    ssize_t n = -1;
    for (;;) {
        uint32_t cons;
        memcpy(&cons, sb.buf, 4);
        if (xg_ring_pending(rb.buf, cons) < 0)
            goto out;
        int ringwork = xg_wait_loop(fd, &b, spin_ns, -1, rb.buf, cons, svc_kick, &n);
        if (ringwork < 0)
            goto out;
        if (!ringwork) {
            res = PyLong_FromSsize_t(n);
            goto out;
        }
        if (xg_lock(lock) < 0)
            goto out;
        long left = 1;
        int dead = xg_attr_true(args[8], &str_dead, "dead");
        int dying = dead == 0 && args[11] != Py_None
                        ? xg_attr_true(args[11], &str_is_dying, "is_dying")
                        : 1;
        if (dead == 0 && dying == 0 && PyList_GET_SIZE(args[9]) == 0)
            left = xg_ring_serve_in(rb.buf, sb.buf, args + 10, cli_kick);
        if (xg_unlock(lock, 0) < 0)
            goto out;
        if (dead < 0 || dying < 0 || left < 0)
            goto out;
        if (left > 0) {
            res = PyLong_FromLong(-2);
            goto out;
        }
        spin_ns = spin_again;
    }
out:
    xg_ring_release(&rb, &sb);
    PyBuffer_Release(&b);
    return res;
}

PyMethodDef xg_ring_methods[] = {
    FAST(ring_serve, "ring_serve(ring, state, mem, ld, domains, refcount, unmap_ok, kick_fd) -> "
                     "left: the service answers the ring's requests it can in C"),
    FAST(ring_take, "ring_take(ring, state) -> the next request's slot (consumed), or None"),
    FAST(ring_redirect, "ring_redirect(ring, state, id, cmd, kick_fd): respond that the reply "
                        "comes on the socket"),
    FAST(ring_serve_wait, "ring_serve_wait(fd, buf, spin_ns, ring, state, svc_kick, cli_kick, "
                          "lock, conn, to_close, mem, ld, domains, refcount, unmap_ok) -> n "
                          "(-2: ring work left): recv_wait that also waits for and serves the "
                          "ring"),
    {NULL, NULL, 0, NULL},
};
