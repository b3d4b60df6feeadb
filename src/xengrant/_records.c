/*
 * ActiveGrant is grant_table.c's struct active_grant_entry and GrantMapping
 * its struct grant_mapping (one maptrack entry plus the gfn it is mapped at).
 * They are plain C structs with int members so that the map/unmap runs
 * (_hvmap.c) create and update them without running Python code, and so
 * that they are not tracked by the cyclic GC (they hold no references).
 * Python code uses them as ordinary objects with attributes
 * (xengrant.emu.grant_table and xengrant.emu.maptrack re-export them).
 */
#include "_cext.h"

static PyMemberDef act_members[] = {
    {"pin", T_LONGLONG, offsetof(XgActive, pin), 0, "the four packed pin counters (GNTPIN_*)"},
    {"domid", T_LONGLONG, offsetof(XgActive, domid), 0, "the domain the grant is pinned for"},
    {"mfn", T_LONGLONG, offsetof(XgActive, mfn), 0, "the machine frame granted"},
    {"start", T_LONGLONG, offsetof(XgActive, start), 0, "first byte usable (sub-page grants)"},
    {"length", T_LONGLONG, offsetof(XgActive, length), 0, "bytes usable from start"},
    {"is_sub_page", T_BOOL, offsetof(XgActive, is_sub_page), 0,
     "a v2 sub-page grant (never mappable)"},
    {NULL, 0, 0, 0, NULL},
};

static int
act_init(XgActive *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = {"domid", "mfn", "start", "length", "is_sub_page", NULL};
    int sub = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "LLLLp:ActiveGrant", kwl, &self->domid,
                                     &self->mfn, &self->start, &self->length, &sub))
        return -1;
    self->pin = 0;
    self->is_sub_page = (char)(sub != 0);
    return 0;
}

static PyObject *
act_repr(XgActive *s)
{
    return PyUnicode_FromFormat(
        "ActiveGrant(pin=0x%08x, domid=%lld, mfn=%lld, start=%lld, length=%lld, is_sub_page=%s)",
        (unsigned int)s->pin, s->domid, s->mfn, s->start, s->length,
        s->is_sub_page ? "True" : "False");
}
PyTypeObject XgActive_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xengrant._cext.ActiveGrant",
    .tp_basicsize = sizeof(XgActive),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "ActiveGrant(domid, mfn, start, length, is_sub_page): struct active_grant_entry, "
              "pin 0",
    .tp_members = act_members,
    .tp_init = (initproc)act_init,
    .tp_new = PyType_GenericNew,
    .tp_repr = (reprfunc)act_repr,
};

static PyMemberDef gm_members[] = {
    {"flags", T_LONGLONG, offsetof(XgMapping, flags), 0,
     "GNTMAP_* still in force (0 once fully unmapped)"},
    {"domid", T_LONGLONG, offsetof(XgMapping, domid), 0, "the granting domain"},
    {"ref", T_LONGLONG, offsetof(XgMapping, ref), 0, "the grant reference in its table"},
    {"mfn", T_LONGLONG, offsetof(XgMapping, mfn), 0, "the frame mapped"},
    {"host_gfn", T_LONGLONG, offsetof(XgMapping, host_gfn), 0,
     "the mapper's gfn holding a host mapping, or -1"},
    {NULL, 0, 0, 0, NULL},
};

static int
gm_init(XgMapping *self, PyObject *args, PyObject *kw)
{
    static char *kwl[] = {"flags", "domid", "ref", "mfn", "host_gfn", NULL};
    return PyArg_ParseTupleAndKeywords(args, kw, "LLLLL:GrantMapping", kwl, &self->flags,
                                       &self->domid, &self->ref, &self->mfn, &self->host_gfn)
               ? 0
               : -1;
}

static PyObject *
gm_repr(XgMapping *s)
{
    return PyUnicode_FromFormat("GrantMapping(flags=%lld, domid=%lld, ref=%lld, mfn=%lld, "
                                "host_gfn=%lld)",
                                s->flags, s->domid, s->ref, s->mfn, s->host_gfn);
}
PyTypeObject XgMapping_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xengrant._cext.GrantMapping",
    .tp_basicsize = sizeof(XgMapping),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "GrantMapping(flags, domid, ref, mfn, host_gfn): struct grant_mapping",
    .tp_members = gm_members,
    .tp_init = (initproc)gm_init,
    .tp_new = PyType_GenericNew,
    .tp_repr = (reprfunc)gm_repr,
};
