/*
 * The service's hot path: GNTTAB_OP messages of map and unmap ops answered
 * straight from the receive buffer (see serve_gnttab below).
 */
#include "_cext.h"

/*
 * serve_gnttab(mem, buf, pos, end, ld, domains, refcount, unmap_ok, fd, held)
 *     -> (pos, replies, answered, partial, sent)
 *
 * What xengrant.service.server.Server._on_data does for the complete
 * messages in buf[pos:end], for the messages it takes: a GNTTAB_OP request
 * (flags 0 or F_POSTED) of GNTTABOP_map_grant_ref or (with unmap_ok: no
 * unmap notify is set for the caller) GNTTABOP_unmap_grant_ref ops, exactly
 * count of them, whose ops are the common success case of map_run/unmap_run.
 * Each is answered, in stream order, with the bytes Server._gnttab_reply
 * builds for it: status 0, the hypercall's rc 0, the ops with their OUT
 * fields, the caller's p2m entries of the ops' gfns as they are now (the
 * columns of protocol.pack_p2m), and no debug reasons.  It stops at the
 * first message it does not take.  Ops run one at a time, in order, as
 * do_grant_table_op runs them: if op i > 0 of a message is not taken, ops
 * 0..i-1 stay done and partial is i -- the caller runs the rest of that
 * message from op i (its reply covers every op); partial 0: the message is
 * untouched.  Returns where it stopped, the replies (bytes, b"" for none),
 * how many of them answer requests that are not F_POSTED (the caller sends
 * those at once), and partial.  The message layout is
 * xengrant/service/protocol.py's (HEADER, GNTTAB_REQ, pack_p2m); a
 * differential test compares these replies with the Python path's, byte for
 * byte, together with the whole hypervisor state.
 *
 * Sending: with fd >= 0, answered > 0 and every message taken (pos == end:
 * no other reply of this read is to follow), held (the bytes the connection
 * holds unsent: posted replies) and then the replies are sent at once, in
 * one sendmsg(MSG_DONTWAIT), as Server._flush would send them; sent is how
 * many bytes of held + replies went (0: the socket had no room; -errno: the
 * send failed), and the caller queues the rest.  Otherwise sent is 0 and
 * nothing is sent.
 */

/* the p2m entry of gfn as the reply carries it: (mfn, type), (-1, 0) if none */
static int
xg_p2m_entry(PyObject *p2m, unsigned long long gfn, long long *mfn, long long *typ)
{
    *mfn = -1;
    *typ = 0;
    int r = xg_p2m_lookup(p2m, gfn, mfn, typ);
    if (r == 2) {
        PyErr_SetString(PyExc_TypeError, "serve_gnttab: p2m entry is not (mfn, type)");
        return -1;
    }
    return r < 0 ? -1 : 0;
}

/*
 * serve_gnttab's work on the whole messages in inb[pos:end]: those it takes
 * (map and unmap ops in the common success case, see serve_gnttab) run in
 * place and their replies go in *outp (PyMem memory, the caller's to free,
 * *olenp bytes); *answeredp counts those not posted, *partialp as
 * serve_gnttab's partial.  sv: (mem, ld, domains, refcount).  Returns where
 * the messages it did not take start, or -1 with an exception set.
 */
Py_ssize_t
xg_serve_msgs(unsigned char *inb, Py_ssize_t pos, Py_ssize_t end, PyObject *const *sv,
              int unmap_ok, char **outp, Py_ssize_t *olenp, Py_ssize_t *answeredp,
              Py_ssize_t *partialp)
{
    PyObject *domains = sv[2], *refcount = sv[3];
    xg_batch b;
    memset(&b, 0, sizeof(b));
    b.last_dom = -1;
    xg_ld l;
    memset(&l, 0, sizeof(l));
    char *out = NULL;
    Py_ssize_t olen = 0, ocap = 0, answered = 0, partial = 0, ret = -1;
    if (!PyDict_Check(domains) || !PyList_CheckExact(refcount)) {
        PyErr_SetString(PyExc_TypeError, "serve_gnttab: domains must be a dict, refcount a list");
        goto out;
    }
    if (PyObject_GetBuffer(sv[0], &b.mem, PyBUF_WRITABLE) < 0)
        goto out;
    b.have_mem = 1;
    b.nframes = b.mem.len / XG_PAGE_SIZE;
    Py_ssize_t nframes = b.nframes;
    if (PyList_GET_SIZE(refcount) < nframes)
        nframes = PyList_GET_SIZE(refcount);
    if (xg_ld_get(&l, sv[1]) < 0)
        goto out;
    while (l.usable && end - pos >= XG_HDR) {
        unsigned char *h = inb + pos;
        uint32_t length, seq;
        uint16_t mtype, flags;
        memcpy(&length, h, 4);
        memcpy(&mtype, h + 4, 2);
        memcpy(&flags, h + 6, 2);
        memcpy(&seq, h + 8, 4);
        if (length > XG_MAX_PAYLOAD || (Py_ssize_t)length > end - pos - XG_HDR)
            break;
        if (mtype != XG_MSG_GNTTAB_OP || (flags != 0 && flags != XG_F_POSTED) ||
            length < XG_GNTTAB_REQ)
            break;
        uint32_t cmd;
        int64_t count;
        memcpy(&cmd, h + XG_HDR, 4);
        memcpy(&count, h + XG_HDR + 4, 8);
        Py_ssize_t opsize;
        if (cmd == XG_GNTTABOP_map_grant_ref)
            opsize = XG_MAP_OP_SIZE;
        else if (cmd == XG_GNTTABOP_unmap_grant_ref && unmap_ok)
            opsize = XG_UNMAP_OP_SIZE;
        else
            break;
        if (count < 1 || count > XG_MAX_PAYLOAD / opsize ||
            (Py_ssize_t)length != XG_GNTTAB_REQ + count * opsize)
            break;
        /* room for this reply before any op runs: no allocation fails after one */
        Py_ssize_t rlen = 12 + count * (opsize + XG_P2M_ENTRY) + 4 + 2;
        Py_ssize_t need = olen + XG_HDR + rlen;
        if (need > ocap) {
            Py_ssize_t cap = ocap ? ocap * 2 : 512;
            while (cap < need)
                cap *= 2;
            char *grown = PyMem_Realloc(out, (size_t)cap);
            if (grown == NULL) {
                PyErr_NoMemory();
                goto out;
            }
            out = grown;
            ocap = cap;
        }
        unsigned char *uop = h + XG_HDR + XG_GNTTAB_REQ;
        Py_ssize_t i = 0;
        for (; i < count; i++) {
            unsigned char *op = uop + i * opsize;
            int r = cmd == XG_GNTTABOP_map_grant_ref
                        ? xg_map_op(&b, &l, domains, refcount, op, b.mem.buf, nframes)
                        : xg_unmap_op(&b, &l, domains, refcount, op, b.mem.buf, nframes);
            if (r < 0)
                goto out;
            if (r == 0)
                break;
        }
        if (i < count) {
            partial = i; /* 0: untouched */
            break;
        }
        char *o = out + olen;
        uint32_t rlen32 = (uint32_t)rlen, size = (uint32_t)(count * opsize), n32 = (uint32_t)count;
        uint16_t rtype = XG_MSG_GNTTAB_OP, rflags = XG_F_REPLY, noreasons = 0;
        int32_t zero = 0;
        memcpy(o, &rlen32, 4);
        memcpy(o + 4, &rtype, 2);
        memcpy(o + 6, &rflags, 2);
        memcpy(o + 8, &seq, 4);
        memcpy(o + 12, &zero, 4);
        memcpy(o + 16, &zero, 4);
        memcpy(o + 20, &size, 4);
        memcpy(o + 24, uop, (size_t)size);
        o += 24 + size;
        memcpy(o, &n32, 4);
        o += 4;
        for (i = 0; i < count; i++) {
            uint64_t host_addr;
            memcpy(&host_addr, uop + i * opsize, 8);
            long long e_mfn, e_typ;
            if (xg_p2m_entry(l.p2m, host_addr >> 12, &e_mfn, &e_typ) < 0)
                goto out;
            int64_t gfn = (int64_t)(host_addr >> 12), mfn64 = e_mfn, typ64 = e_typ;
            memcpy(o + i * 8, &gfn, 8);
            memcpy(o + (count + i) * 8, &mfn64, 8);
            memcpy(o + (2 * count + i) * 8, &typ64, 8);
        }
        o += 24 * count;
        memcpy(o, &noreasons, 2);
        olen += XG_HDR + rlen;
        if (flags == 0)
            answered++;
        pos += XG_HDR + (Py_ssize_t)length;
    }
    ret = pos;
out:
    xg_ld_clear(&l);
    xg_batch_end(&b);
    *outp = out;
    *olenp = olen;
    *answeredp = answered;
    *partialp = partial;
    return ret;
}

static PyObject *
xg_serve_gnttab(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    (void)mod;
    ARGCHECK(10, "serve_gnttab(mem, buf, pos, end, ld, domains, refcount, unmap_ok, fd, held) "
                 "-> (pos, replies, answered, partial, sent)")
    Py_ssize_t pos = PyLong_AsSsize_t(args[2]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t end = PyLong_AsSsize_t(args[3]);
    if (end == -1 && PyErr_Occurred())
        return NULL;
    int unmap_ok = PyObject_IsTrue(args[7]);
    if (unmap_ok < 0)
        return NULL;
    int fd;
    if (xg_as_int(args[8], &fd) < 0)
        return NULL;
    if (!PyBytes_Check(args[9])) {
        PyErr_SetString(PyExc_TypeError, "serve_gnttab: held must be bytes");
        return NULL;
    }
    Py_buffer in;
    char *out = NULL;
    Py_ssize_t olen = 0, answered = 0, partial = 0;
    PyObject *ret = NULL;
    if (PyObject_GetBuffer(args[1], &in, PyBUF_WRITABLE) < 0)
        return NULL;
    if (pos < 0 || end > in.len || pos > end) {
        PyErr_SetString(PyExc_ValueError, "serve_gnttab: pos/end out of range");
        goto out;
    }
    PyObject *sv[4] = {args[0], args[4], args[5], args[6]};
    pos = xg_serve_msgs(in.buf, pos, end, sv, unmap_ok, &out, &olen, &answered, &partial);
    if (pos < 0)
        goto out;
    {
        Py_ssize_t sent = 0;
        if (fd >= 0 && answered > 0 && pos == end) {
            struct iovec iov[2] = {
                {PyBytes_AS_STRING(args[9]), (size_t)PyBytes_GET_SIZE(args[9])},
                {out, (size_t)olen},
            };
            struct msghdr mh;
            memset(&mh, 0, sizeof(mh));
            mh.msg_iov = iov[0].iov_len ? iov : iov + 1;
            mh.msg_iovlen = iov[0].iov_len ? 2 : 1;
            ssize_t n;
            do
                n = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
            while (n < 0 && errno == EINTR);
            sent = n >= 0 ? n : (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -errno;
        }
        PyObject *replies = PyBytes_FromStringAndSize(out ? out : "", olen);
        if (replies != NULL)
            ret = Py_BuildValue("(nNnnn)", pos, replies, answered, partial, sent);
    }
out:
    PyMem_Free(out);
    PyBuffer_Release(&in);
    return ret;
}

PyMethodDef xg_serve_methods[] = {
    FAST(serve_gnttab, "serve_gnttab(mem, buf, pos, end, ld, domains, refcount, unmap_ok, fd, "
                       "held) -> (pos, replies, answered, partial, sent): the service's map/unmap "
                       "messages, answered (and sent)"),
    {NULL, NULL, 0, NULL},
};
