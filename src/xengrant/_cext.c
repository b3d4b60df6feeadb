/*
 * xengrant._cext: the hot primitives Python cannot express, and the C runs
 * that a benchmark needs, each held to its Python reference by a
 * differential test.  One file per concept, one extension module:
 *
 *   _cext.h        what the files share (layouts, numbers, records, helpers)
 *   _common.c      argument checks, a Python lock from C, p2m mirror entries
 *   _atomics.c     atomics and barriers on shared words (grant entries)
 *   _frameview.c   FrameView: frames of machine memory as one buffer
 *   _records.c     ActiveGrant and GrantMapping, the hypervisor's records
 *   _hvdom.c       domains as the hypervisor's C runs read them
 *   _hvcopy.c      GNTTABOP_copy's fast path (copy_run)
 *   _hvmap.c       GNTTABOP_map/unmap_grant_ref's fast paths (map_run, unmap_run)
 *   _serve.c       the service's hot path (serve_gnttab)
 *   _wait.c        waiting for a message on a socket (recv_wait, recv_fill)
 *   _ring.c        the request ring: its rules and the service's side
 *   _ring_client.c the request ring: the client's side
 *   _guest.c       the guest's runs over its grant table, op packing, the p2m mirror
 *
 * This file is the module: its table is each file's table in turn.
 */
#include "_cext.h"

static struct PyModuleDef cext_module = {
    PyModuleDef_HEAD_INIT, "xengrant._cext", "Atomics, frame views and the C paths of xengrant.",
    -1, NULL, NULL, NULL, NULL, NULL,
};

/* type under its name in m: 0, or -1 with an exception set */
static int
xg_add_type(PyObject *m, const char *name, PyTypeObject *type)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(m, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC
PyInit__cext(void)
{
    static PyMethodDef *const tables[] = {
        xg_atomics_methods, xg_frameview_methods, xg_hvcopy_methods, xg_hvmap_methods,
        xg_serve_methods,   xg_wait_methods,      xg_ring_methods,   xg_ring_client_methods,
        xg_guest_methods,
    };
    if (xg_common_init() < 0 || xg_hvdom_init() < 0 || xg_hvmap_init() < 0)
        return NULL;
    PyObject *m = PyModule_Create(&cext_module);
    if (m == NULL)
        return NULL;
    for (size_t i = 0; i < sizeof tables / sizeof tables[0]; i++)
        if (PyModule_AddFunctions(m, tables[i]) < 0)
            goto fail;
    if (xg_add_type(m, "FrameView", &FrameView_Type) < 0 ||
        xg_add_type(m, "ActiveGrant", &XgActive_Type) < 0 ||
        xg_add_type(m, "GrantMapping", &XgMapping_Type) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", XG_PAGE_SIZE) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
