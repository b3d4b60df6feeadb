/*
 * Waiting for a message on a socket: poll briefly, then sleep (the
 * service's connection threads and its clients).
 */
#include "_cext.h"

/*
 * recv_wait(fd, buf, spin_ns, timeout_ms) -> n
 *
 * recv(fd) into buf as the service's connection threads and its clients
 * wait for a request or a reply, with the GIL released throughout:
 *
 * 1. for up to spin_ns nanoseconds, yield the CPU (sched_yield), then
 *    recv(MSG_DONTWAIT).  On a virtual machine a vCPU that goes idle takes
 *    tens of microseconds to wake again, more than a reply takes to come; a
 *    short poll keeps it busy instead, as Linux's busy polling
 *    (net.core.busy_read) and a guest's halt polling do.  The yield matters
 *    when the peer shares this CPU: polling must not keep it from sending
 *    what is polled for.  It comes before the first try too: a reply (or
 *    the client's next request) answers what this end just sent, so a first
 *    recv would find nothing while the peer waits for this CPU; a yield with
 *    nothing else to run costs less than a recv (bench: the same-CPU ping
 *    pong 17.1 -> 15.0 us, the split one 11.7 -> 10.4 us, medians of 12
 *    interleaved rounds).
 * 2. then poll(POLLIN) for up to timeout_ms (-1: forever) and recv.  poll,
 *    not a blocking recv: a recv sleeper is also woken when the peer reads
 *    what this end sent (a write-space wake-up), for nothing.
 *
 * Returns the bytes read (0: the peer closed), or -1 if nothing came within
 * timeout_ms.  A signal (EINTR) runs Python's handlers, then the wait goes
 * on; a handler's exception is raised.  Raises OSError for any other
 * failure.
 */

/* drain an eventfd (a kick) */
void
xg_unkick(int fd)
{
    uint64_t v;
    ssize_t r;
    do
        r = read(fd, &v, sizeof v);
    while (r < 0 && errno == EINTR);
}

/* recv_wait's wait, called with the GIL released.  With a request ring (ring
 * not NULL: see _ring.c) it also returns 1 as soon as req_prod is past cons,
 * looked at before the socket, and sleeps with req_event set, woken by its
 * kick_fd too.  Else 0 with *n the bytes read (0: closed) or -1 with *err
 * (ETIMEDOUT: nothing within timeout_ms; EAGAIN: woken for nothing, wait
 * again; EINTR) */
static int
xg_wait_recv(int fd, char *buf, size_t len, long long spin_ns, int timeout_ms,
             unsigned char *ring, uint32_t cons, int kick_fd, ssize_t *n, int *err)
{
    *n = -1;
    errno = EAGAIN;
    if (spin_ns > 0) {
        double end = xg_now_ns() + (double)spin_ns;
        for (;;) {
            /* yield first: what is waited for answers a send of ours, and a
             * peer on this CPU cannot answer before it runs */
            sched_yield();
            if (ring != NULL && xg_ld32(ring) != cons)
                return 1;
            *n = recv(fd, buf, len, MSG_DONTWAIT);
            if (*n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR))
                break;
            if (xg_now_ns() >= end)
                break;
        }
    }
    if (*n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        if (ring != NULL) { /* RING_FINAL_CHECK_FOR_REQUESTS: ask for a kick, look again */
            xg_st32(ring + 4, cons + 1);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (xg_ld32(ring) != cons)
                return 1;
        }
        struct pollfd pfd[2] = {{fd, POLLIN, 0}, {kick_fd, POLLIN, 0}};
        int r = poll(pfd, ring != NULL ? 2 : 1, timeout_ms);
        if (r > 0) {
            if (ring != NULL && (pfd[1].revents & POLLIN))
                xg_unkick(kick_fd);
            if (pfd[0].revents)
                *n = recv(fd, buf, len, MSG_DONTWAIT);
            else
                errno = EAGAIN; /* a kick: look again */
            if (*n < 0 && ring != NULL && xg_ld32(ring) != cons)
                return 1;
        } else if (r == 0) {
            errno = ETIMEDOUT;
        }
    }
    *err = *n < 0 ? errno : 0;
    return 0;
}

/* after a failed xg_wait_recv: 1 to wait again (EINTR with no handler raising,
 * or a spurious poll wake-up), 0 for a timeout, -1 with an exception set */
static int
xg_wait_again(int err)
{
    if (err == ETIMEDOUT)
        return 0;
    if (err == EINTR)
        return PyErr_CheckSignals() < 0 ? -1 : 1;
    if (err == EAGAIN || err == EWOULDBLOCK)
        return 1;
    errno = err;
    PyErr_SetFromErrno(PyExc_OSError);
    return -1;
}

/* xg_wait_recv until something comes, the GIL released around each wait:
 * 1 for ring work, 0 with *n (the bytes read, 0: closed, -1: timed out), -1
 * with an exception set */
int
xg_wait_loop(int fd, Py_buffer *b, long long spin_ns, int timeout_ms, unsigned char *ring,
             uint32_t cons, int kick_fd, ssize_t *n)
{
    int err, again = 1, ringwork;
    do {
        Py_BEGIN_ALLOW_THREADS
        ringwork = xg_wait_recv(fd, b->buf, (size_t)b->len, spin_ns, timeout_ms, ring, cons,
                                kick_fd, n, &err);
        Py_END_ALLOW_THREADS
        spin_ns = 0;
    } while (!ringwork && *n < 0 && (again = xg_wait_again(err)) > 0);
    return !ringwork && *n < 0 && again < 0 ? -1 : ringwork;
}

/* args[0], args[1]: (fd, buf) as an int and a writable buffer */
int
xg_fd_buf(PyObject *const *args, int *fd, Py_buffer *b)
{
    if (xg_as_int(args[0], fd) < 0)
        return -1;
    return PyObject_GetBuffer(args[1], b, PyBUF_WRITABLE);
}

static PyObject *
xg_recv_wait(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(4, "recv_wait(fd, buf, spin_ns, timeout_ms) -> n")
    int fd, timeout_ms;
    long long spin_ns = PyLong_AsLongLong(args[2]);
    if ((spin_ns == -1 && PyErr_Occurred()) || xg_as_int(args[3], &timeout_ms) < 0)
        return NULL;
    Py_buffer b;
    if (xg_fd_buf(args, &fd, &b) < 0)
        return NULL;
    ssize_t n;
    int rc = xg_wait_loop(fd, &b, spin_ns, timeout_ms, NULL, 0, -1, &n);
    PyBuffer_Release(&b);
    if (rc < 0)
        return NULL;
    return PyLong_FromSsize_t(n < 0 ? -1 : n);
}

/*
 * recv_fill(fd, buf, fill, spin_ns, timeout_ms) -> (n, signalled)
 *
 * recv_wait for a client that must not lose what it read: the bytes are
 * read into buf at fill (an 8-byte buffer holding an int64, e.g.
 * array('q')) and fill is advanced by them in this same call, before it
 * returns -- so a signal handler that raises once it has returned (Python
 * runs them between bytecodes) cannot take them: they are in buf[:fill]
 * for whoever sorts it next.  n is the bytes read (0: closed, -1: none
 * within timeout_ms, or a signal handler raised before anything came);
 * signalled None or the exception a signal handler raised while it waited
 * or as it returns, handed back with the bytes instead of raised.  Raises
 * ValueError if fill is not within buf (a full buffer: sort it first),
 * OSError for a failed recv.
 */
static PyObject *
xg_recv_fill(PyObject *Py_UNUSED(m), PyObject *const *args, Py_ssize_t nargs)
{
    ARGCHECK(5, "recv_fill(fd, buf, fill, spin_ns, timeout_ms) -> (n, signalled)")
    int fd, timeout_ms;
    long long spin_ns = PyLong_AsLongLong(args[3]);
    if ((spin_ns == -1 && PyErr_Occurred()) || xg_as_int(args[4], &timeout_ms) < 0)
        return NULL;
    Py_buffer b, f;
    if (xg_fd_buf(args, &fd, &b) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[2], &f, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&b);
        return NULL;
    }
    int64_t fill;
    if (f.len < 8 || (memcpy(&fill, f.buf, 8), fill < 0 || fill >= (int64_t)b.len)) {
        PyBuffer_Release(&f);
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "recv_fill: fill is not within the buffer");
        return NULL;
    }
    char *at = (char *)b.buf + fill;
    size_t room = (size_t)(b.len - fill);
    ssize_t n;
    int err;
    PyObject *sig = NULL;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        xg_wait_recv(fd, at, room, spin_ns, timeout_ms, NULL, 0, -1, &n, &err);
        Py_END_ALLOW_THREADS
        spin_ns = 0;
        if (n >= 0 || err == ETIMEDOUT)
            break;
        if (err == EINTR) {
            if (PyErr_CheckSignals() < 0) {
                sig = xg_take_exception();
                break;
            }
            continue;
        }
        if (err == EAGAIN || err == EWOULDBLOCK)
            continue;
        PyBuffer_Release(&f);
        PyBuffer_Release(&b);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (n > 0) { /* counted before anything else can run */
        fill += n;
        memcpy(f.buf, &fill, 8);
    }
    PyBuffer_Release(&f);
    PyBuffer_Release(&b);
    if (sig == NULL && PyErr_CheckSignals() < 0)
        sig = xg_take_exception();
    if (sig == NULL) {
        Py_INCREF(Py_None);
        sig = Py_None;
    }
    return Py_BuildValue("(nN)", n < 0 ? (Py_ssize_t)-1 : (Py_ssize_t)n, sig);
}

PyMethodDef xg_wait_methods[] = {
    FAST(recv_wait, "recv_wait(fd, buf, spin_ns, timeout_ms) -> bytes read (0: closed, -1: "
                    "timed out): poll up to spin_ns yielding the CPU, then sleep in poll()"),
    FAST(recv_fill, "recv_fill(fd, buf, fill, spin_ns, timeout_ms) -> (n, signalled): recv_wait "
                    "into buf at fill, fill advanced in the same call, a signal handler's "
                    "exception returned with what it read"),
    {NULL, NULL, 0, NULL},
};
