/* _native.Mapping: page-aligned memory with address space reserved up to
 * max_size, so it grows and shrinks in place. The base class of
 * pagefork.Region; it exports the writable buffer protocol.
 *
 * Kinds: anonymous private, anonymous shared (MAP_SHARED|MAP_ANONYMOUS),
 * memfd private and memfd shared. The reservation is PROT_NONE beyond `size`.
 * close() with buffers still exported (numpy views) marks the mapping closed
 * and unmaps when the last view goes away, so no view ever points at
 * unmapped memory.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The system call itself: glibc declares memfd_create() only since 2.27, and
 * the manylinux2014 wheels are built against glibc 2.17. */
static int pf_memfd_create(const char *name, unsigned int flags)
{
    return (int)syscall(SYS_memfd_create, name, flags);
}

/* Stops every tracking of m for good, before its memory goes away. */
static void stop_trackings(PfMapping *m)
{
    while (m->trackings != NULL)
        pf_tracking_region_gone(m->trackings); /* unlinks it */
}

static int map_fixed_file(PfMapping *m, size_t from, size_t to, int fd, int shared)
{
    void *want = (void *)(m->address + from);
    void *got = mmap(want, to - from, PROT_READ | PROT_WRITE,
                     (shared ? MAP_SHARED : MAP_PRIVATE) | MAP_FIXED, fd, (off_t)from);
    if (got == MAP_FAILED) {
        pf_oserror("mmap");
        return -1;
    }
    madvise(want, to - from, MADV_NOHUGEPAGE);
    return 0;
}

/* Fresh private anonymous memory over [0, length), zeroed. `huge` lets it
 * take transparent huge pages: for memory filled whole and remapped from a
 * file later, where 2 MiB faults beat 4 KiB ones and nothing tracks pages. */
static int map_fixed_anonymous(PfMapping *m, size_t length, int huge)
{
    void *want = (void *)m->address;
    void *got = mmap(want, length, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
    if (got == MAP_FAILED) {
        pf_oserror("mmap");
        return -1;
    }
    madvise(want, length, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    return 0;
}

/* Turns [from, to) back into PROT_NONE reservation, dropping its pages. */
static int unmap_tail(PfMapping *m, size_t from, size_t to)
{
    void *where = (void *)(m->address + from);
    size_t len = to - from;
    if (m->fd >= 0) {
        if (mmap(where, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1,
                 0) == MAP_FAILED) {
            pf_oserror("mmap");
            return -1;
        }
        if (ftruncate(m->fd, (off_t)from) != 0) {
            pf_oserror("ftruncate");
            return -1;
        }
        return 0;
    }
    if (from < m->file_end) {
        /* A file mapped over anonymous memory (Snapshot.map_to) would show
         * its bytes again after MADV_DONTNEED: put fresh anonymous
         * reservation there instead, so regrown pages read as zero. */
        int kind = (m->shared ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS | MAP_NORESERVE;
        if (mmap(where, len, PROT_NONE, kind | MAP_FIXED, -1, 0) == MAP_FAILED) {
            pf_oserror("mmap");
            return -1;
        }
        madvise(where, len, MADV_NOHUGEPAGE);
        m->file_end = from;
        return 0;
    }
    /* Anonymous: free the pages (shmem needs REMOVE) so regrowth reads zeroes. */
    if (madvise(where, len, m->shared ? MADV_REMOVE : MADV_DONTNEED) != 0) {
        pf_oserror("madvise");
        return -1;
    }
    if (mprotect(where, len, PROT_NONE) != 0) {
        pf_oserror("mprotect");
        return -1;
    }
    return 0;
}

static int grow(PfMapping *m, size_t from, size_t to)
{
    struct stat st;
    if (m->fd >= 0) {
        /* Never shrink a file another process may share (an attached one). */
        if (fstat(m->fd, &st) != 0) {
            pf_oserror("fstat");
            return -1;
        }
        if ((size_t)st.st_size < to && ftruncate(m->fd, (off_t)to) != 0) {
            pf_oserror("ftruncate");
            return -1;
        }
        return map_fixed_file(m, from, to, m->fd, m->shared);
    }
    if (mprotect((void *)(m->address + from), to - from, PROT_READ | PROT_WRITE) != 0) {
        pf_oserror("mprotect");
        return -1;
    }
    return 0;
}

static void release_memory(PfMapping *m)
{
    stop_trackings(m);
    if (m->mapped) {
        munmap((void *)m->address, m->max_size);
        m->mapped = 0;
    }
    if (m->fd >= 0) {
        close(m->fd);
        m->fd = -1;
    }
}

/* _map(size, max_size, shared, memfd, fd=-1): both sizes whole pages. With
 * memfd and fd >= 0, maps a duplicate of that file (e.g. a snapshot sent by
 * another process) instead of a new memfd. */
static PyObject *mapping_map(PfMapping *self, PyObject *args)
{
    Py_ssize_t size, max_size;
    int shared, use_memfd, existing = -1;
    if (!PyArg_ParseTuple(args, "nnpp|i", &size, &max_size, &shared, &use_memfd, &existing))
        return NULL;
    if (self->mapped || self->closed) {
        PyErr_SetString(PyExc_RuntimeError, "Mapping already mapped");
        return NULL;
    }
    if (size < 0 || max_size < size || size % (Py_ssize_t)pf_page_size ||
        max_size % (Py_ssize_t)pf_page_size || max_size == 0) {
        PyErr_SetString(PyExc_ValueError, "_map: sizes must be whole pages, 0 < max_size >= size");
        return NULL;
    }
    int flags = (shared && !use_memfd ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS | MAP_NORESERVE;
    void *addr = mmap(NULL, (size_t)max_size, PROT_NONE, flags, -1, 0);
    if (addr == MAP_FAILED)
        return pf_oserror("mmap");
    self->address = (uintptr_t)addr;
    self->max_size = (size_t)max_size;
    self->size = 0;
    self->shared = shared;
    self->fd = -1;
    self->mapped = 1;
    madvise(addr, (size_t)max_size, MADV_NOHUGEPAGE);
    if (use_memfd) {
        self->fd = existing >= 0 ? fcntl(existing, F_DUPFD_CLOEXEC, 0)
                                 : pf_memfd_create("pagefork-region", MFD_CLOEXEC | MFD_ALLOW_SEALING);
        if (self->fd < 0) {
            pf_oserror(existing >= 0 ? "fcntl(F_DUPFD_CLOEXEC)" : "memfd_create");
            release_memory(self);
            return NULL;
        }
    }
    if (size > 0 && grow(self, 0, (size_t)size) != 0) {
        release_memory(self);
        return NULL;
    }
    self->size = (size_t)size;
    Py_RETURN_NONE;
}

static int check_open(PfMapping *self)
{
    if (self->closed || !self->mapped) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return -1;
    }
    return 0;
}

static PyObject *mapping_resize(PfMapping *self, PyObject *args)
{
    Py_ssize_t new_size;
    if (!PyArg_ParseTuple(args, "n", &new_size))
        return NULL;
    if (check_open(self) != 0)
        return NULL;
    if (new_size < 0 || (size_t)new_size > self->max_size || new_size % (Py_ssize_t)pf_page_size) {
        PyErr_SetString(PyExc_ValueError, "_resize: whole pages within max_size");
        return NULL;
    }
    size_t n = (size_t)new_size;
    if (n < self->size) {
        if (self->exports > 0) {
            PyErr_SetString(PyExc_BufferError,
                            "cannot shrink a region while views of it exist (memoryview/numpy)");
            return NULL;
        }
        for (PfTracking *t = self->trackings; t != NULL; t = t->next)
            if (pf_tracking_resize(t, n / pf_page_size) != 0)
                return NULL;
        if (unmap_tail(self, n, self->size) != 0)
            return NULL;
    } else if (n > self->size) {
        if (grow(self, self->size, n) != 0)
            return NULL;
        /* Arm the new pages before any Python code (another thread) can
         * see the new size and write them. */
        self->size = n;
        for (PfTracking *t = self->trackings; t != NULL; t = t->next)
            if (pf_tracking_resize(t, n / pf_page_size) != 0)
                return NULL;
    }
    self->size = n;
    Py_RETURN_NONE;
}

/* Maps [0, length) of the region anew, in place: fd >= 0 maps that file
 * (MAP_SHARED if `shared`), fd < 0 fresh anonymous memory (THP if `huge`). */
static PyObject *remap_start(PfMapping *self, int fd, Py_ssize_t length, int shared, int huge)
{
    if (check_open(self) != 0)
        return NULL;
    if (length < 0 || (size_t)length > self->size || length % (Py_ssize_t)pf_page_size) {
        PyErr_SetString(PyExc_ValueError, "remap: whole pages within the region's size");
        return NULL;
    }
    if (length == 0)
        Py_RETURN_NONE;
    /* A new mapping has none of the old one's protection or userfaultfd
     * registration: collect what only the kernel knows first, re-arm after. */
    for (PfTracking *t = self->trackings; t != NULL; t = t->next)
        if (pf_tracking_before_remap(t) != 0)
            return NULL;
    PyObject *type = NULL, *value = NULL, *tb = NULL; /* the first error */
    if ((fd >= 0 ? map_fixed_file(self, 0, (size_t)length, fd, shared)
                 : map_fixed_anonymous(self, (size_t)length, huge)) != 0)
        PyErr_Fetch(&type, &value, &tb);
    for (PfTracking *t = self->trackings; t != NULL; t = t->next) {
        if (pf_tracking_region_remapped(t) == 0)
            continue;
        if (type == NULL)
            PyErr_Fetch(&type, &value, &tb);
        else
            PyErr_Clear();
    }
    if (type != NULL) {
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    if (fd >= 0 && (size_t)length > self->file_end)
        self->file_end = (size_t)length;
    Py_RETURN_NONE;
}

/* _map_file(fd, length, shared): maps [0, length) of fd over the start of the
 * region, in place (MAP_FIXED), e.g. a snapshot's memfd copy-on-write. */
static PyObject *mapping_map_file(PfMapping *self, PyObject *args)
{
    int fd, shared;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "inp", &fd, &length, &shared))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "_map_file: a negative file descriptor");
        return NULL;
    }
    return remap_start(self, fd, length, shared, 0);
}

/* _map_anonymous(length, huge): fresh zeroed private anonymous memory over
 * [0, length) of an anonymous private region, in place (views stay valid). */
static PyObject *mapping_map_anonymous(PfMapping *self, PyObject *args)
{
    int huge;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "np", &length, &huge))
        return NULL;
    if (self->fd >= 0 || self->shared) {
        PyErr_SetString(PyExc_ValueError, "_map_anonymous: only on an anonymous private region");
        return NULL;
    }
    return remap_start(self, -1, length, 0, huge);
}

/* _grow_file(fd, size): grows a private region whose pages so far all map
 * a file (a snapshot, Snapshot.map_to) to `size`, mapping the file's pages
 * [old size, size) privately over the reservation, so the pages it had
 * stay as they are (written ones too). Trackings arm the new pages. */
static PyObject *mapping_grow_file(PfMapping *self, PyObject *args)
{
    int fd;
    Py_ssize_t new_size;
    if (!PyArg_ParseTuple(args, "in", &fd, &new_size))
        return NULL;
    if (check_open(self) != 0)
        return NULL;
    if (fd < 0 || new_size < 0 || (size_t)new_size > self->max_size || new_size % (Py_ssize_t)pf_page_size) {
        PyErr_SetString(PyExc_ValueError, "_grow_file: a file and whole pages within max_size");
        return NULL;
    }
    if (self->fd >= 0 || self->shared || self->file_end < self->size) {
        PyErr_SetString(PyExc_ValueError, "_grow_file: only on a private region mapped from a file");
        return NULL;
    }
    size_t n = (size_t)new_size;
    if (n <= self->size)
        Py_RETURN_NONE;
    if (map_fixed_file(self, self->size, n, fd, 0) != 0)
        return NULL;
    self->file_end = n;
    self->size = n;
    for (PfTracking *t = self->trackings; t != NULL; t = t->next)
        if (pf_tracking_resize(t, n / pf_page_size) != 0)
            return NULL;
    Py_RETURN_NONE;
}

/* _advise_huge(huge): MADV_HUGEPAGE (memory about to be filled whole, where
 * 2 MiB faults beat 4 KiB ones) or back to MADV_NOHUGEPAGE (so khugepaged
 * builds no new huge pages in memory that is tracked page by page; those it
 * has are split by the first tracked write to them). Anonymous private
 * regions only: a file's pages follow the file. A hint: a kernel built
 * without transparent huge pages refuses both with EINVAL, and its pages
 * are 4 KiB anyway. */
static PyObject *mapping_advise_huge(PfMapping *self, PyObject *arg)
{
    int huge = PyObject_IsTrue(arg);
    if (huge < 0 || check_open(self) != 0)
        return NULL;
    if (self->fd >= 0 || self->shared || self->file_end > 0) {
        PyErr_SetString(PyExc_ValueError, "_advise_huge: only on an anonymous private region");
        return NULL;
    }
    if (madvise((void *)self->address, self->max_size, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE) != 0 &&
        errno != EINVAL)
        return pf_oserror("madvise");
    Py_RETURN_NONE;
}

static PyObject *mapping_close(PfMapping *self, PyObject *unused)
{
    (void)unused;
    if (self->closed)
        Py_RETURN_NONE;
    self->closed = 1;
    stop_trackings(self); /* views may keep the memory: leave it writable */
    if (self->exports == 0)
        release_memory(self);
    Py_RETURN_NONE;
}

static int mapping_getbuffer(PfMapping *self, Py_buffer *view, int flags)
{
    if (self->closed || !self->mapped) {
        PyErr_SetString(PyExc_BufferError, "region is closed");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, (void *)self->address, (Py_ssize_t)self->size, 0,
                          flags) != 0)
        return -1;
    self->exports++;
    return 0;
}

static void mapping_releasebuffer(PfMapping *self, Py_buffer *view)
{
    (void)view;
    if (--self->exports == 0 && self->closed)
        release_memory(self);
}

static PyBufferProcs mapping_as_buffer = {
    .bf_getbuffer = (getbufferproc)mapping_getbuffer,
    .bf_releasebuffer = (releasebufferproc)mapping_releasebuffer,
};

static void mapping_dealloc(PfMapping *self)
{
    release_memory(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *mapping_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    PfMapping *self = (PfMapping *)type->tp_alloc(type, 0);
    if (self != NULL)
        self->fd = -1;
    return (PyObject *)self;
}

#define GETTER(name, expr)                                              \
    static PyObject *mapping_get_##name(PfMapping *self, void *closure) \
    {                                                                   \
        (void)closure;                                                  \
        return expr;                                                    \
    }
GETTER(address, PyLong_FromUnsignedLongLong((unsigned long long)self->address))
GETTER(size, PyLong_FromSize_t(self->size))
GETTER(max_size, PyLong_FromSize_t(self->max_size))
GETTER(shared, PyBool_FromLong(self->shared))
GETTER(closed, PyBool_FromLong(self->closed))
GETTER(fd, PyLong_FromLong(self->fd))
GETTER(exports, PyLong_FromSsize_t(self->exports))

static PyGetSetDef mapping_getset[] = {
    {"address", (getter)mapping_get_address, NULL, "Start address.", NULL},
    {"size", (getter)mapping_get_size, NULL, "Size in bytes (whole pages).", NULL},
    {"max_size", (getter)mapping_get_max_size, NULL, "Bytes reserved for growth.", NULL},
    {"shared", (getter)mapping_get_shared, NULL, "MAP_SHARED memory.", NULL},
    {"closed", (getter)mapping_get_closed, NULL, "close() was called.", NULL},
    {"_fd", (getter)mapping_get_fd, NULL, "Backing memfd, or -1.", NULL},
    {"_exports", (getter)mapping_get_exports, NULL, "Buffers currently exported.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef mapping_methods[] = {
    {"_map", (PyCFunction)mapping_map, METH_VARARGS, NULL},
    {"_resize", (PyCFunction)mapping_resize, METH_VARARGS, NULL},
    {"_map_file", (PyCFunction)mapping_map_file, METH_VARARGS, NULL},
    {"_map_anonymous", (PyCFunction)mapping_map_anonymous, METH_VARARGS, NULL},
    {"_grow_file", (PyCFunction)mapping_grow_file, METH_VARARGS, NULL},
    {"_advise_huge", (PyCFunction)mapping_advise_huge, METH_O, NULL},
    {"_close", (PyCFunction)mapping_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

PyTypeObject PfMappingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pagefork._native.Mapping",
    .tp_basicsize = sizeof(PfMapping),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Page-aligned memory reserved up to max_size (base of pagefork.Region).",
    .tp_new = mapping_new,
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_as_buffer = &mapping_as_buffer,
    .tp_getset = mapping_getset,
    .tp_methods = mapping_methods,
};
