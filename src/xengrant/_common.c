/*
 * Helpers every part of _cext calls: argument checks, a Python lock taken
 * and given back from C, a signal handler's exception taken to be returned
 * with what a wait read, and the entries of a client's p2m mirror.
 */
#include "_cext.h"

static PyObject *str_acquire, *str_release;

/* an int argument; -1 with an exception set if it is not one (or out of range) */
int
xg_as_int(PyObject *o, int *out)
{
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "int argument out of range");
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* o as an unsigned value <= maxv; -1 (no exception) if it is not one (not
 * an int, negative, or too big) */
int
xg_fits(PyObject *o, unsigned long long maxv, unsigned long long *out)
{
    if (!PyLong_Check(o))
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    if (v > maxv)
        return -1;
    *out = v;
    return 0;
}

/* xg_fits for args[0..n) against vmax[0..n): 1 if every one fits (into v), else 0 */
int
xg_fit_all(PyObject *const *args, int n, const unsigned long long *vmax, unsigned long long *v)
{
    for (int i = 0; i < n; i++)
        if (xg_fits(args[i], vmax[i], &v[i]) < 0)
            return 0;
    return 1;
}

/* lock.acquire() unless lock is None; 0, or -1 with an exception set */
int
xg_lock(PyObject *lock)
{
    if (lock == Py_None)
        return 0;
    PyObject *r = PyObject_CallMethodObjArgs(lock, str_acquire, NULL);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* lock.release() unless lock is None, keeping an exception pending from the
 * locked work; rc, or -1 if the release failed (its exception set) */
int
xg_unlock(PyObject *lock, int rc)
{
    if (lock == Py_None)
        return rc;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyObject *r = PyObject_CallMethodObjArgs(lock, str_release, NULL);
    if (r == NULL) {
        Py_XDECREF(et);
        Py_XDECREF(ev);
        Py_XDECREF(tb);
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(et, ev, tb);
    return rc;
}

/* the exception a signal handler raised (taken from the error indicator, with
 * its traceback), for a wait that returns what it read with it */
PyObject *
xg_take_exception(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v != NULL && tb != NULL)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}

/* the client's p2m mirror: key (a gfn) -> (mfn, type), or no entry; 0, or -1
 * with an exception set */
int
xg_p2m_put(PyObject *p2m, PyObject *key, long long mfn, long long typ)
{
    PyObject *val = Py_BuildValue("(LL)", mfn, typ);
    int bad = val == NULL || PyDict_SetItem(p2m, key, val) < 0;
    Py_XDECREF(val);
    return bad ? -1 : 0;
}

int
xg_p2m_drop(PyObject *p2m, PyObject *key)
{
    if (PyDict_DelItem(p2m, key) == 0)
        return 0;
    if (!PyErr_ExceptionMatches(PyExc_KeyError))
        return -1;
    PyErr_Clear();
    return 0;
}

/* the interned names the helpers use: 0, or -1 with an exception set */
int
xg_common_init(void)
{
    str_acquire = PyUnicode_InternFromString("acquire");
    str_release = PyUnicode_InternFromString("release");
    return str_acquire == NULL || str_release == NULL ? -1 : 0;
}
