/*
 * What the C files of xengrant._cext share: the includes, the layouts and
 * numbers they hard-code (each from the Xen header or the Python module it
 * follows), the records and caches more than one file reads, and the
 * helpers they call across files.  Each .c file is one concept (see
 * _cext.c); all are compiled into the one extension module (setup.py).
 * Everything here is hidden outside the module but PyInit__cext.
 */
#ifndef XENGRANT_CEXT_H
#define XENGRANT_CEXT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include "structmember.h"
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <poll.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#pragma GCC visibility push(hidden)

#define XG_PAGE_SIZE 4096

/* Py_NewRef is Python 3.10+; the package supports 3.9 (pyproject's
 * requires-python), so give it the 3.10 definition there. */
#if PY_VERSION_HEX < 0x030A0000
static inline PyObject *xg_newref(PyObject *o)
{
    Py_INCREF(o);
    return o;
}
#define Py_NewRef(o) xg_newref((PyObject *)(o))
#endif

#define ARGCHECK(n, sig)                                                                           \
    if (nargs != (n)) {                                                                            \
        PyErr_SetString(PyExc_TypeError, sig);                                                     \
        return NULL;                                                                               \
    }

/* a METH_FASTCALL entry of a method table: xg_NAME */
#define FAST(name, doc) {#name, (PyCFunction)(void (*)(void))xg_##name, METH_FASTCALL, doc}

/* ------------------------------------------------ numbers from the headers */

/* xen/include/public/grant_table.h */
#define XG_DOMID_SELF 0x7FF0
#define XG_GNTCOPY_source_gref 1
#define XG_GNTCOPY_dest_gref 2
#define XG_GTF_permit_access 1
#define XG_GTF_type_mask 3
#define XG_GTF_readonly (1 << 2)
#define XG_GTF_reading (1 << 3)
#define XG_GTF_writing (1 << 4)
#define XG_GTF_sub_page (1 << 8)
#define XG_GNTMAP_device_map 1
#define XG_GNTMAP_host_map 2
#define XG_GNTMAP_readonly 4
#define XG_GNTMAP_application_map 8
#define XG_GNTMAP_contains_pte 16
#define XG_GNTTABOP_map_grant_ref 0
#define XG_GNTTABOP_unmap_grant_ref 1
#define XG_PER_V1 512          /* v1 entries per frame (8 bytes each) */
#define XG_MAP_OP_SIZE 32      /* struct gnttab_map_grant_ref */
#define XG_UNMAP_OP_SIZE 24    /* struct gnttab_unmap_grant_ref */
#define XG_COPY_OP_SIZE 40     /* struct gnttab_copy */
/* xen/common/grant_table.c: the pin counters of an active entry, and the
 * tries of _set_status_v1's cmpxchg loop */
#define XG_GNTPIN_hstw_inc 1L
#define XG_GNTPIN_hstr_inc (1L << 8)
#define XG_GNTPIN_WRITE_MASK 0x00FF00FFL
#define XG_CMPXCHG_TRIES 5

/* xengrant/emu/domain.py: P2M_* (tests/test_edges.py checks them) */
#define XG_P2M_RAM_RW 0
#define XG_P2M_GRANT_MAP_RW 1
#define XG_P2M_GRANT_MAP_RO 2
#define XG_P2M_GNTTAB_SHARED 3
#define XG_P2M_GNTTAB_STATUS 4

/* xengrant/service/protocol.py: HEADER "<IHHI" (length, type, flags, seq),
 * GNTTAB_REQ "<Iq" (cmd, count), a reply's p2m entry (gfn, mfn, type: three
 * "q" columns) */
#define XG_HDR 12
#define XG_MSG_GNTTAB_OP 10
#define XG_F_REPLY 0x1
#define XG_F_POSTED 0x4
#define XG_MAX_PAYLOAD (1 << 20)
#define XG_GNTTAB_REQ 12
#define XG_P2M_ENTRY 24

/* ------------------------------------------------------------- FrameView */

typedef struct {
    PyObject_HEAD
    char *addr;          /* start of the frames */
    Py_ssize_t len;      /* bytes */
    int readonly;
    int owned;           /* 1: we mmap()ed it and must munmap() it */
    int closed;
    Py_ssize_t exports;  /* live Py_buffer exports */
    Py_buffer base;      /* borrowed views hold their base buffer */
    int has_base;
    PyObject *on_close;  /* called once when the frames are unmapped, or NULL */
} FrameView;

extern PyTypeObject FrameView_Type;

/* ------------------------------------- the hypervisor's per-grant records */

/* struct active_grant_entry (_records.c) */
typedef struct {
    PyObject_HEAD
    long long pin, domid, mfn, start, length;
    char is_sub_page;
} XgActive;

/* struct grant_mapping plus the gfn it is mapped at (_records.c) */
typedef struct {
    PyObject_HEAD
    long long flags, domid, ref, mfn, host_gfn;
} XgMapping;

extern PyTypeObject XgActive_Type, XgMapping_Type;

/* ------------------------------- domains as the hypervisor runs read them */

#define XG_DOM_CACHE 8

/* The attributes the hot paths read, their names interned once at module
 * init: PyObject_GetAttrString would build (and hash) a new str each call. */
enum { XA_p2m, XA_gt, XA_is_dying, XA_shared, XA_active, XA_version, XA_domid, XA_pv,
       XA_maptrack, XA_entries, XA_free, XG_NATTR };

typedef struct {
    PyObject *obj;    /* borrowed DomainState (held by the domains dict) */
    PyObject *p2m;    /* new references from here on */
    PyObject *shared;
    PyObject *active;
    int p2m_ok;       /* p2m is a plain dict: gmfn sides may use it */
    int usable;       /* plain containers, v1 table, not dying: gref sides may use it */
} xg_dom;

/* What every batch run (copy_run, map_run, unmap_run) holds: the machine
 * memory and the ops as buffers, where the run starts and ends, and the
 * domain attributes looked up so far. */
typedef struct {
    Py_buffer mem, uop;
    int have_mem, have_uop;
    Py_ssize_t start, count;
    Py_ssize_t nframes;  /* frames in mem */
    xg_dom cache[XG_DOM_CACHE];
    int ncache;
    long last_dom;       /* the granter of the previous op, looked up once */
    xg_dom *last_rd;
} xg_batch;

/* attributes of the mapping domain used by the map and unmap runs */
typedef struct {
    uint16_t domid;
    PyObject *p2m;      /* new references */
    PyObject *entries;
    PyObject *free;
    PyObject *popleft;  /* free.popleft and free.append, bound once per run */
    PyObject *append;
    int usable;         /* HVM, plain dict p2m, plain list entries */
} xg_ld;

/* _hvdom.c */
PyObject *xg_getattr(PyObject *o, int which);
xg_dom *xg_dom_get(xg_dom *cache, int *ncache, PyObject *d);
void xg_dom_clear(xg_dom *c, int n);
int xg_batch_begin(xg_batch *b, PyObject *const *args, Py_ssize_t opsize, const char *name);
void xg_batch_end(xg_batch *b);
int xg_p2m_lookup(PyObject *p2m, unsigned long long gfn, long long *mfn, long long *typ);
int xg_p2m_frame(PyObject *p2m, unsigned long long gfn, Py_ssize_t nframes, Py_ssize_t *mfn);
int xg_hvdom_init(void);

/* _hvmap.c: one op of a map or unmap run: 1 done, 0 left to Python, -1 error */
int xg_ld_get(xg_ld *l, PyObject *ld);
void xg_ld_clear(xg_ld *l);
int xg_map_op(xg_batch *b, xg_ld *l, PyObject *domains, PyObject *refcount, unsigned char *op,
              char *m, Py_ssize_t nframes);
int xg_unmap_op(xg_batch *b, xg_ld *l, PyObject *domains, PyObject *refcount,
                unsigned char *op, char *m, Py_ssize_t nframes);
int xg_hvmap_init(void);

/* _serve.c */
Py_ssize_t xg_serve_msgs(unsigned char *inb, Py_ssize_t pos, Py_ssize_t end,
                         PyObject *const *sv, int unmap_ok, char **outp, Py_ssize_t *olenp,
                         Py_ssize_t *answeredp, Py_ssize_t *partialp);

/* ----------------------------------------------------------- _common.c */

int xg_as_int(PyObject *o, int *out);
int xg_fits(PyObject *o, unsigned long long maxv, unsigned long long *out);
int xg_fit_all(PyObject *const *args, int n, const unsigned long long *vmax,
               unsigned long long *v);
int xg_lock(PyObject *lock);
int xg_unlock(PyObject *lock, int rc);
PyObject *xg_take_exception(void);
int xg_p2m_put(PyObject *p2m, PyObject *key, long long mfn, long long typ);
int xg_p2m_drop(PyObject *p2m, PyObject *key);
int xg_common_init(void);

/* -------------------------------------------------------------- _wait.c */

/* acquire and release loads and stores of a shared u32 (a ring index) */
static inline uint32_t
xg_ld32(const unsigned char *p)
{
    return __atomic_load_n((const uint32_t *)p, __ATOMIC_ACQUIRE);
}

static inline void
xg_st32(unsigned char *p, uint32_t v)
{
    __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELEASE);
}

static inline double
xg_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

void xg_unkick(int fd);
int xg_wait_loop(int fd, Py_buffer *b, long long spin_ns, int timeout_ms, unsigned char *ring,
                 uint32_t cons, int kick_fd, ssize_t *n);
int xg_fd_buf(PyObject *const *args, int *fd, Py_buffer *b);

/* --------------------------------------------------------------- _ring.c */

#define XG_RING_PAGE 4096
#define XG_RING_HDR 64
#define XG_RING_SLOT 64
#define XG_RING_SIZE 32
#define XG_RSP_DONE 0
#define XG_RSP_SOCKET 1

static inline unsigned char *
xg_slot(unsigned char *ring, uint32_t idx)
{
    return ring + XG_RING_HDR + (size_t)(idx & (XG_RING_SIZE - 1)) * XG_RING_SLOT;
}

int xg_ring_bufs(PyObject *ring, PyObject *state, Py_buffer *rb, Py_buffer *sb);
void xg_ring_release(Py_buffer *rb, Py_buffer *sb);
void xg_kick(int fd);
int xg_push(unsigned char *p, uint32_t old, uint32_t new);
void xg_put_header(unsigned char *m, uint32_t length, uint16_t flags, uint32_t seq,
                   uint32_t cmd);

/* ------------------------------------------------ each file's functions */

extern PyMethodDef xg_frameview_methods[], xg_atomics_methods[], xg_hvcopy_methods[],
    xg_hvmap_methods[], xg_serve_methods[], xg_wait_methods[], xg_guest_methods[],
    xg_ring_methods[], xg_ring_client_methods[];

#pragma GCC visibility pop

#endif
