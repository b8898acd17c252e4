/* Executor windows: main memory carried into its snapshot, a batch merged
 * into the snapshot and main memory mapped from it again, with every other
 * writer of main memory held until the new mapping is in place.
 *
 * Main memory is a MAP_PRIVATE mapping of the snapshot's memfd. A page
 * written after the written pages were read, or while a merge changes the
 * file under it, is a private copy the new mapping drops: the write would
 * be lost. So for the window:
 *   - no Python code runs: the window is one call that keeps the GIL. A
 *     Python thread stopped inside a write holds the GIL; if the window
 *     needed it back, it would wait for that thread forever;
 *   - code that runs without the GIL (numpy loops, read(2) or recv_into into
 *     an array, threads of native libraries) is held by write protection:
 *     userfaultfd synchronous write-protect on a descriptor nobody reads
 *     (writers, the kernel's writes included unless userfaultfd is
 *     user-mode-only, sleep in the kernel until UFFDIO_WAKE), or where
 *     userfaultfd cannot register the memory (no support, or a tracker's
 *     userfaultfd has it), mprotect(PROT_READ) with faulting threads parked
 *     in the SIGSEGV handler (segfault.c); there the kernel's writes fail
 *     with EFAULT for the window.
 * The new mapping drops the old one's registration or protection; held
 * writers are woken once it is armed and write again, on it.
 *
 * Which pages to carry: those the trackers of the memory saw written, and,
 * for memory mapped from the snapshot, every private copy. Private copies
 * are read before the hold (all of them) and after it (the present ones:
 * under userfaultfd an unpopulated page holds a marker that reads like a
 * swapped copy; a page written between the two reads is present, its
 * accessed bit keeps reclaim from swapping it out that soon).
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 1U
#endif

enum { HOLD_AUTO = 0, HOLD_MPROTECT = 1, HOLD_NONE = 2 };
enum { HELD_NOT = 0, HELD_UFFD, HELD_MPROTECT };
static const char *const held_names[] = {"none", "uffd", "mprotect"};

/* ---- the userfaultfd that holds writers ------------------------------------ */

static int hold_fd = -1;
static pid_t hold_pid;
static int hold_features;
static int hold_user_mode_only;
/* -1 unknown, 0 refused (hold_refusal says why), 1 works on a private memfd mapping */
static int hold_state = -1;
static char hold_refusal[200];

void pf_window_forget_after_fork(void)
{
    if (hold_fd >= 0)
        close(hold_fd); /* the parent's: its held writers are not the child's */
    hold_fd = -1;
    hold_state = -1;
}

static int refuse(const char *why, int err)
{
    snprintf(hold_refusal, sizeof hold_refusal, "%s%s%s", why, err ? ": " : "", err ? strerror(err) : "");
    hold_state = 0;
    return -1;
}

static int uffd_register_wp(int fd, uintptr_t start, size_t len)
{
    struct uffdio_register reg = {.range = {.start = start, .len = len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0)
        return -1;
    struct uffdio_writeprotect wp = {.range = {.start = start, .len = len},
                                     .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    for (;;) {
        if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) == 0)
            return 0;
        if (errno != EAGAIN)
            break;
    }
    int err = errno;
    struct uffdio_range range = {.start = start, .len = len};
    ioctl(fd, UFFDIO_UNREGISTER, &range);
    errno = err;
    return -1;
}

/* Whether synchronous write-protect holds a MAP_PRIVATE memfd mapping here:
 * both pages of a scratch mapping (one populated, one not) must read as
 * write-protected once protected. */
static int probe_private_memfd(int fd)
{
    size_t ps = pf_page_size;
    int file = (int)syscall(SYS_memfd_create, "pagefork-hold-probe", MFD_CLOEXEC);
    if (file < 0)
        return refuse("memfd_create", errno);
    char *p = MAP_FAILED;
    int ok = -1;
    if (ftruncate(file, (off_t)(2 * ps)) != 0) {
        refuse("ftruncate", errno);
        goto done;
    }
    p = mmap(NULL, 2 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE, file, 0);
    if (p == MAP_FAILED) {
        refuse("mmap", errno);
        goto done;
    }
    p[0] = 1; /* a private copy; page 1 stays unpopulated */
    if (uffd_register_wp(fd, (uintptr_t)p, 2 * ps) != 0) {
        refuse("userfaultfd cannot write-protect a private mapping of a memfd (UFFDIO_REGISTER/"
               "UFFDIO_WRITEPROTECT)", errno);
        goto done;
    }
    uint8_t protected[2] = {0, 0};
    ssize_t unprotected = pf_pagemap_find((uintptr_t)p, 2, PF_PAGEMAP_UNPROTECTED, protected);
    struct uffdio_range range = {.start = (uintptr_t)p, .len = 2 * ps};
    ioctl(fd, UFFDIO_WRITEPROTECT, &(struct uffdio_writeprotect){.range = range, .mode = 0});
    ioctl(fd, UFFDIO_UNREGISTER, &range);
    if (unprotected != 0) {
        refuse(unprotected < 0 ? "read(/proc/self/pagemap)"
                               : "userfaultfd left pages of a private memfd mapping writable",
               unprotected < 0 ? errno : 0);
        goto done;
    }
    ok = 0;
done:
    if (p != MAP_FAILED)
        munmap(p, 2 * ps);
    close(file);
    return ok;
}

/* The holding descriptor (synchronous write-protect, never read), or -1. */
static int hold_descriptor(void)
{
    if (hold_fd >= 0 && hold_pid == getpid())
        return hold_fd;
    if (hold_state == 0 && hold_pid == getpid())
        return -1;
    hold_pid = getpid();
    int supported = 0, user_mode_only = 0;
    int fd = pf_uffd_open(0, &supported, &user_mode_only);
    if (fd < 0)
        return refuse("userfaultfd", errno);
    close(fd);
    if (!(supported & UFFD_FEATURE_WP_HUGETLBFS_SHMEM))
        return refuse("the kernel lacks UFFD_FEATURE_WP_HUGETLBFS_SHMEM (Linux 5.19): no "
                      "write-protection of memfd mappings", 0);
    int want = supported & (UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED);
    fd = pf_uffd_open(want, NULL, &user_mode_only);
    if (fd < 0)
        return refuse("ioctl(UFFDIO_API)", errno);
    if (probe_private_memfd(fd) != 0) {
        close(fd);
        return -1;
    }
    hold_fd = fd;
    hold_features = want;
    hold_user_mode_only = user_mode_only;
    hold_state = 1;
    return fd;
}

/* _native.hold_probe() -> (userfaultfd holds writers here, why not, kernel
 * writes are held too (False: they fail with EFAULT for the window)) */
PyObject *pf_hold_probe(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    int ok = hold_descriptor() >= 0;
    return Py_BuildValue("(OsO)", ok ? Py_True : Py_False, ok ? "" : hold_refusal,
                         ok && !hold_user_mode_only ? Py_True : Py_False);
}

/* ---- holding and releasing ---------------------------------------------------- */

typedef struct {
    int kind; /* HELD_* */
    int slot; /* mprotect: the segfault hold */
    uintptr_t start;
    size_t len;
} hold;

/* Holds the writers of [start, start + len); `anonymous`: not a file
 * mapping (userfaultfd then needs WP_UNPOPULATED to protect unpopulated
 * pages). Falls back from userfaultfd to mprotect; with neither, returns -1
 * with an exception set (nothing held). */
static int hold_writers(hold *h, uintptr_t start, size_t len, int want, int anonymous)
{
    h->kind = HELD_NOT;
    h->start = start;
    h->len = len;
    if (want == HOLD_NONE || len == 0)
        return 0;
    if (want == HOLD_AUTO) {
        int fd = hold_descriptor();
        /* EBUSY: a tracker's userfaultfd has the memory (uffd, uffd-async) */
        if (fd >= 0 && (!anonymous || hold_features & UFFD_FEATURE_WP_UNPOPULATED) &&
            uffd_register_wp(fd, start, len) == 0) {
            h->kind = HELD_UFFD;
            return 0;
        }
    }
    h->slot = pf_segfault_hold(start, len);
    if (h->slot < 0)
        return -1;
    h->kind = HELD_MPROTECT;
    return 0;
}

/* Wakes the held writers. `remapped`: a new mapping replaced the held one
 * (its registration or protection went with it); else the protection is
 * taken off the memory that stayed. */
static void release_writers(hold *h, int remapped)
{
    struct uffdio_range range = {.start = h->start, .len = h->len};
    if (h->kind == HELD_UFFD) {
        if (remapped) {
            ioctl(hold_fd, UFFDIO_WAKE, &range);
        } else { /* mode 0 wakes them too */
            struct uffdio_writeprotect wp = {.range = range, .mode = 0};
            while (ioctl(hold_fd, UFFDIO_WRITEPROTECT, &wp) != 0 && errno == EAGAIN)
                ;
            ioctl(hold_fd, UFFDIO_UNREGISTER, &range);
        }
    } else if (h->kind == HELD_MPROTECT) {
        pf_segfault_unhold(h->slot, !remapped);
    }
    h->kind = HELD_NOT;
}

/* ---- the window --------------------------------------------------------------- */

/* Tests hold a merge open this long (nanoseconds), writers held, to write
 * into it from other threads (_native._set_window_pause). */
static long long window_pause_ns;

PyObject *pf_set_window_pause(PyObject *self, PyObject *arg)
{
    (void)self;
    double seconds = PyFloat_AsDouble(arg);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    window_pause_ns = seconds > 0 ? (long long)(seconds * 1e9) : 0;
    Py_RETURN_NONE;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Keeps the first error's message and clears the exception: none may be
 * raised before the writers are let go. (The native core raises OSError
 * and friends from C, without a traceback: freeing one runs no Python.) */
static void note_error(char *into, size_t cap, const char *what)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (into[0] == '\0') {
        const char *text = NULL;
        PyObject *str = value != NULL ? PyObject_Str(value) : NULL;
        if (str != NULL)
            text = PyUnicode_AsUTF8(str);
        snprintf(into, cap, "%s: %s", what, text != NULL ? text : "unknown error");
        Py_XDECREF(str);
        PyErr_Clear();
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* window(memory, snapshot, fd, flags, scan, merges, closing, hold) ->
 *     (hold used, why not held or None, merge problem or None, tracking
 *      problem or None, seconds)
 *
 * memory: main memory (a Mapping). snapshot: the snapshot's bytes (a
 * writable buffer, the file's shared mapping), fd: its memfd, at least as
 * long as memory. flags: one byte per page of memory, 1 for pages to carry
 * whatever the trackers say; on return, the pages carried. scan: memory is
 * mapped from the snapshot (private copies are written pages). merges: a
 * sequence of (offsets, lengths, dtypes, ops, data) applied after the
 * carry, all or none (checked first). closing: Trackings of memory to close
 * before the new mapping (the rest are armed on it). hold: 0 userfaultfd
 * else mprotect, 1 mprotect, 2 none (the GIL alone).
 *
 * Returns the hold used ("uffd", "mprotect" or "none"), why writers could
 * not be held (None when they were, or not asked to be), (problem, message)
 * if the merges were refused (nothing merged; problem as pf_merge_check),
 * the message of the first tracking failure (a tracker could not read or
 * re-arm: the caller must count every page as written from now on), and
 * (held, carry, merge, remap) seconds. Raises OSError when the memory could
 * not be mapped again (nothing mapped; writers let go). */
PyObject *pf_window(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *memory_obj, *merges_obj, *closing_obj;
    Py_buffer snap, flags;
    int fd, scan, want;
    if (!PyArg_ParseTuple(args, "O!w*iw*iOOi", &PfMappingType, &memory_obj, &snap, &fd, &flags, &scan,
                          &merges_obj, &closing_obj, &want))
        return NULL;
    PfMapping *m = (PfMapping *)memory_obj;
    PyObject *result = NULL, *merges = NULL, *closing = NULL;
    Py_buffer(*columns)[5] = NULL;
    pf_diff_columns *diffs = NULL;
    Py_ssize_t n_merges = 0, got = 0;
    size_t ps = pf_page_size;
    if (m->closed || !m->mapped) {
        PyErr_SetString(PyExc_ValueError, "window: the memory is closed");
        goto done;
    }
    size_t size = m->size, n_pages = size / ps;
    struct stat st;
    if ((size_t)flags.len != n_pages || want < HOLD_AUTO || want > HOLD_NONE) {
        PyErr_SetString(PyExc_ValueError, "window: one flag per page of memory; hold 0, 1 or 2");
        goto done;
    }
    if (fstat(fd, &st) != 0 || (size_t)st.st_size < size) {
        PyErr_SetString(PyExc_ValueError, "window: the snapshot's file is shorter than the memory");
        goto done;
    }
    merges = PySequence_Fast(merges_obj, "window: merges must be a sequence");
    closing = PySequence_Fast(closing_obj, "window: closing must be a sequence");
    if (merges == NULL || closing == NULL)
        goto done;
    n_merges = PySequence_Fast_GET_SIZE(merges);
    columns = PyMem_Calloc((size_t)n_merges + 1, sizeof *columns);
    diffs = PyMem_Calloc((size_t)n_merges + 1, sizeof *diffs);
    if (columns == NULL || diffs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(closing); i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(closing, i);
        if (!PyObject_TypeCheck(t, &PfTrackingType) || ((PfTracking *)t)->mapping != m) {
            PyErr_SetString(PyExc_ValueError, "window: closing holds a Tracking of another memory");
            goto done;
        }
    }
    /* Every buffer is taken before anything is held: taking one may run
     * code (a buffer exporter), which must never happen while writers wait. */
    for (; got < n_merges; got++) {
        PyObject *batch = PySequence_Fast_GET_ITEM(merges, got);
        if (!PyTuple_Check(batch) || PyTuple_GET_SIZE(batch) != 5) {
            PyErr_SetString(PyExc_ValueError, "window: a merge is (offsets, lengths, dtypes, ops, data)");
            goto done;
        }
        int k = 0;
        for (; k < 5; k++)
            if (PyObject_GetBuffer(PyTuple_GET_ITEM(batch, k), &columns[got][k], PyBUF_SIMPLE) != 0)
                break;
        if (k < 5 || pf_diff_columns_of(&diffs[got], &columns[got][0], &columns[got][1],
                                        &columns[got][2], &columns[got][3], &columns[got][4]) != 0) {
            while (k-- > 0)
                PyBuffer_Release(&columns[got][k]);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "window: malformed merge columns");
            goto done;
        }
    }

    /* Nothing below may run Python code until the writers are let go: no
     * collection (its finalizers could run any code), no exception raised. */
    int gc_was_enabled = PyGC_Disable();
    uint8_t *out = flags.buf;
    char tracking_error[300] = "", merge_error[300] = "", hold_error[300] = "";
    int problem = 0, remap_errno = 0, markers = 0;
    for (PfTracking *t = m->trackings; t != NULL; t = t->next) {
        int mode = pf_tracking_global_mode(t);
        markers |= mode == PF_MODE_UFFD || mode == PF_MODE_UFFD_ASYNC;
    }
    /* A userfaultfd tracker's markers read as swapped copies: there only
     * present copies count (the tracker saw every write to the others). */
    if (scan && pf_pagemap_find(m->address, n_pages, markers ? PF_PAGEMAP_COW_PRESENT : PF_PAGEMAP_COW,
                                out) < 0)
        memset(out, 1, n_pages); /* unknown: every page */
    double t0 = now();
    hold h = {HELD_NOT, -1, 0, 0};
    if (hold_writers(&h, m->address, size, want, !scan) != 0)
        note_error(hold_error, sizeof hold_error, "mprotect");
    for (PfTracking *t = m->trackings; t != NULL; t = t->next) {
        int mode = pf_tracking_global_mode(t);
        if (mode < 0 || (mode == PF_MODE_COW && scan)) /* the scans below see what cow sees */
            continue;
        if (pf_tracking_read_into(t, out, n_pages) != 0) {
            note_error(tracking_error, sizeof tracking_error, "reading tracked pages");
            memset(out, 1, n_pages);
        }
    }
    if (scan && pf_pagemap_find(m->address, n_pages,
                                markers || h.kind == HELD_UFFD ? PF_PAGEMAP_COW_PRESENT : PF_PAGEMAP_COW,
                                out) < 0)
        memset(out, 1, n_pages);
    /* the carry: written pages into the snapshot */
    size_t limit = (size_t)snap.len < size ? (size_t)snap.len : size;
    uint8_t *dst = snap.buf;
    const uint8_t *src = (const uint8_t *)m->address;
    for (size_t p = 0; p * ps < limit;) {
        const uint8_t *hit = memchr(out + p, 1, n_pages - p);
        if (hit == NULL)
            break;
        p = (size_t)(hit - out);
        size_t q = p + 1;
        while (q < n_pages && q * ps < limit && out[q])
            q++;
        size_t a = p * ps, b = q * ps < limit ? q * ps : limit;
        if (a < b)
            memcpy(dst + a, src + a, b - a);
        p = q;
    }
    if (window_pause_ns > 0) {
        struct timespec pause = {.tv_sec = window_pause_ns / 1000000000LL,
                                 .tv_nsec = window_pause_ns % 1000000000LL};
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR)
            ;
    }
    double t1 = now();
    /* the merge: every batch checked against the carried snapshot first */
    for (Py_ssize_t i = 0; i < n_merges && !problem; i++)
        problem = pf_merge_check(&diffs[i], dst, (size_t)snap.len, (size_t)snap.len, merge_error,
                                 sizeof merge_error);
    for (Py_ssize_t i = 0; i < n_merges && !problem; i++)
        pf_merge_write(&diffs[i], dst);
    double t2 = now();
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(closing); i++)
        if (pf_tracking_close((PfTracking *)PySequence_Fast_GET_ITEM(closing, i)) != 0)
            PyErr_Clear(); /* the mapping goes: nothing of it is left to protect */
    /* (Trackers arm the new mapping before the writers go: a write that
     * slips in first, from a thread that was not held, is a private copy
     * the next window's scan finds.) */
    void *want_at = (void *)m->address;
    if (mmap(want_at, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) == MAP_FAILED) {
        remap_errno = errno;
    } else {
        madvise(want_at, size, MADV_NOHUGEPAGE);
        if (size > m->file_end)
            m->file_end = size;
        for (PfTracking *t = m->trackings; t != NULL; t = t->next)
            if (pf_tracking_global_mode(t) >= 0 && pf_tracking_rearm_fresh(t) != 0) {
                note_error(tracking_error, sizeof tracking_error, "re-arming tracking");
                /* Half armed: stopped for good (the caller starts it again
                 * later), so nothing is left to undo on a mapping that
                 * never had it (closing the App must not fail on it). */
                if (pf_tracking_close(t) != 0)
                    PyErr_Clear();
            }
    }
    int used = h.kind;
    release_writers(&h, remap_errno == 0);
    double t4 = now();
    if (remap_errno != 0) {
        /* The old mapping stays, unprotected (segfault tracking included):
         * its trackers may have missed writes from now on. */
        for (PfTracking *t = m->trackings; t != NULL; t = t->next)
            if (pf_tracking_global_mode(t) >= 0 && pf_tracking_rearm_fresh(t) != 0)
                PyErr_Clear();
    }
    if (gc_was_enabled)
        PyGC_Enable();
    if (remap_errno != 0) {
        pf_oserror_errno(remap_errno, "mmap");
        goto done;
    }
    PyObject *merge_result = problem ? Py_BuildValue("(is)", problem, merge_error) : Py_NewRef(Py_None);
    PyObject *tracking_result = tracking_error[0] ? PyUnicode_FromString(tracking_error) : Py_NewRef(Py_None);
    PyObject *hold_result = hold_error[0] ? PyUnicode_FromString(hold_error) : Py_NewRef(Py_None);
    if (merge_result != NULL && tracking_result != NULL && hold_result != NULL)
        result = Py_BuildValue("(sOOO(dddd))", held_names[used], hold_result, merge_result,
                               tracking_result, t4 - t0, t1 - t0, t2 - t1, t4 - t2);
    Py_XDECREF(merge_result);
    Py_XDECREF(tracking_result);
    Py_XDECREF(hold_result);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        for (int k = 0; k < 5; k++)
            PyBuffer_Release(&columns[i][k]);
    PyMem_Free(columns);
    PyMem_Free(diffs);
    Py_XDECREF(merges);
    Py_XDECREF(closing);
    PyBuffer_Release(&snap);
    PyBuffer_Release(&flags);
    return result;
}
