/* Shared declarations of the pagefork native core.
 *
 * One file per mechanism (segfault.c, uffd.c, uffd_async.c, softpte.c, cow.c),
 * the range registry shared by the fault handlers (registry.c), memory mappings
 * (mapping.c), the tracking object that drives a mode (tracking.c), pagemap
 * reading (pagemap.c), pages tracking leaves alone (exempt.c) and errno
 * errors (errors.c).
 */
#ifndef PAGEFORK_H
#define PAGEFORK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/types.h>

#ifndef PAGEFORK_NATIVE_VERSION /* set by setup.py from pagefork/_version.py */
#define PAGEFORK_NATIVE_VERSION "unknown"
#endif

/* ---- kernel interfaces newer than the system headers ------------------ */

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif
/* Older than the glibc 2.17 headers the manylinux2014 wheels build against
 * (memfd_create: Linux 3.17, MADV_FREE: 4.5; glibc declared them in 2.27/2.24). */
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 0x0001U
#define MFD_ALLOW_SEALING 0x0002U
#endif
#ifndef MADV_FREE
#define MADV_FREE 8
#endif

#ifndef PAGEMAP_SCAN
/* Linux 6.7 uapi (include/uapi/linux/fs.h). */
#define PAGE_IS_WPALLOWED (1 << 0)
#define PAGE_IS_WRITTEN (1 << 1)
#define PAGE_IS_FILE (1 << 2)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PAGE_IS_SOFT_DIRTY (1 << 7)

struct page_region {
    __u64 start;
    __u64 end;
    __u64 categories;
};

#define PM_SCAN_WP_MATCHING (1 << 0)
#define PM_SCAN_CHECK_WPASYNC (1 << 1)

struct pm_scan_arg {
    __u64 size;
    __u64 flags;
    __u64 start;
    __u64 end;
    __u64 walk_end;
    __u64 vec;
    __u64 vec_len;
    __u64 max_pages;
    __u64 category_inverted;
    __u64 category_mask;
    __u64 category_anyof_mask;
    __u64 return_mask;
};

#define PAGEMAP_SCAN _IOWR('f', 16, struct pm_scan_arg)
#endif

/* ---- globals ----------------------------------------------------------- */

extern size_t pf_page_size;
extern PyTypeObject PfMappingType;
extern PyTypeObject PfTrackingType;
extern PyTypeObject PfBufferType;

/* errors.c: raise OSError(errno, "<syscall>: <strerror>") and return NULL. */
PyObject *pf_oserror(const char *syscall_name);
PyObject *pf_oserror_errno(int err, const char *syscall_name);

/* ---- tracked ranges (registry.c) --------------------------------------- */

enum pf_mode {
    PF_MODE_NONE = 0,
    PF_MODE_SOFTPTE,
    PF_MODE_SEGFAULT,
    PF_MODE_UFFD,
    PF_MODE_UFFD_ASYNC,
    PF_MODE_COW,
    PF_N_MODES
};

/* Regions tracked at once per process (the fault handlers scan the published
 * ones linearly, up to the highest slot in use) and threads tracking one
 * region at once (a thread's slot is freed when it stops or exits). */
#define PF_MAX_RANGES 4096
#define PF_MAX_THREADS 1024

/* Pages [first, first + count) of a range. */
typedef struct {
    size_t first, count;
} pf_span;
#define PF_MAX_SPANS 16

typedef struct {
    _Atomic pid_t tid;  /* 0: free */
    _Atomic int active; /* this thread's writes are being recorded */
    uint8_t *flags;     /* max_pages bytes, written before tid is published */
} pf_thread_slot;

typedef struct pf_range {
    uintptr_t start;
    _Atomic size_t n_pages; /* current size; flags are allocated for max_pages */
    size_t max_pages;
    int mode;
    int shared;          /* MAP_SHARED memory (uffd needs shmem WP support) */
    _Atomic int global_active;
    _Atomic int threads_active;
    _Atomic int inflight; /* fault handlers currently using this range */
    _Atomic int collecting; /* a read-and-re-arm is running: handlers wait */
    _Atomic unsigned fallbacks; /* segfault: whole range un-protected (vm.max_map_count) */
    uint64_t *swap_hashes; /* segfault: page hashes while a SIGSEGV handler swap runs */
    size_t swap_n;
    /* Reported written at every read (exempt.c; GIL held): holes are left
     * unprotected (alternate signal stacks), pinned pages are written
     * through io_uring's pin. Sorted, disjoint. */
    pf_span holes[PF_MAX_SPANS];
    size_t n_holes;
    pf_span pinned[PF_MAX_SPANS];
    size_t n_pinned;
    uint8_t *global;
    struct pf_range *prev_all, *next_all; /* every live range, for exiting threads */
    pf_thread_slot threads[PF_MAX_THREADS];
} pf_range;

pf_range *pf_range_new(int mode, uintptr_t start, size_t n_pages, size_t max_pages, int shared);
void pf_range_free(pf_range *r);
int pf_registry_publish(pf_range *r);     /* 0, or -1 with errno=ENOSPC */
void pf_registry_unpublish(pf_range *r);  /* waits for handlers still inside */
/* Pins the range holding addr; waits while a read-and-re-arm of it runs. */
pf_range *pf_registry_acquire(uintptr_t addr, int mode); /* async-signal-safe */
void pf_registry_release(pf_range *r);                   /* async-signal-safe */
/* Calls fn on every published range of `mode` except `skip` (GIL held). */
void pf_registry_foreach(int mode, pf_range *skip, void (*fn)(pf_range *));
void pf_range_mark(pf_range *r, uintptr_t addr, pid_t tid); /* async-signal-safe */
pid_t pf_current_tid(void);                                 /* async-signal-safe */
pf_thread_slot *pf_range_thread_slot(pf_range *r, pid_t tid, int create);
/* The calling thread tracks something: when it exits, its slots in every
 * range are released, so a thread that never calls stop_thread neither keeps
 * a slot nor hands its flags to a later thread with the same id. */
void pf_thread_tracking_started(void);
/* Adds a function a fork()ed child runs (in the order added, once the
 * registry's pthread_atfork handlers are installed) to drop what it inherited
 * of a mechanism. Call at module init; returns -1 when the list is full. */
int pf_registry_add_fork_hook(void (*hook)(void));
/* Keeps fault handlers out of r between begin and end (GIL held): a handler
 * already inside finishes first, new ones wait until end. */
void pf_range_begin_exclusive(pf_range *r);
void pf_range_end_exclusive(pf_range *r);

/* ---- regions and their trackings (mapping.c, tracking.c) ----------------
 * A Mapping owns its memory; each Tracking of it only borrows the address.
 * Before the memory is unmapped (close, dealloc) or replaced (MAP_FIXED of a
 * file over it), the Mapping tells every Tracking linked to it, so no tracked
 * range ever outlives or silently loses its memory. Both sides hold only
 * borrowed pointers; the GIL serialises them. */
struct PfTracking;

typedef struct PfMapping {
    PyObject_HEAD
    uintptr_t address;
    size_t size;
    size_t max_size; /* bytes reserved */
    int shared;
    int fd; /* memfd backing the region, or -1 */
    int mapped;
    int closed;
    Py_ssize_t exports;
    size_t file_end; /* [0, file_end) may have a file (a snapshot) mapped over it */
    struct PfTracking *trackings; /* linked through PfTracking.next */
} PfMapping;

typedef struct PfTracking {
    PyObject_HEAD
    struct pf_range *range;
    const struct pf_mode_ops *ops; /* NULL for mode "none" */
    int attached;                  /* published, and the kernel state is set up */
    pid_t owner;                   /* the process that created it; a forked child is not */
    PfMapping *mapping;            /* borrowed; NULL once the region is gone */
    struct PfTracking *next;       /* next Tracking of the same Mapping */
    PyObject *weakrefs;
} PfTracking;

/* tracking.c, called by mapping.c with the GIL: the memory is about to go
 * away (stop for good, unlink), or a file was just mapped over it (re-arm
 * what was armed). region_remapped returns -1 with an exception set. */
void pf_tracking_region_gone(PfTracking *t);
int pf_tracking_region_remapped(PfTracking *t);
/* tracking.c: the region grew to n_pages (call after) or will shrink (call
 * before); -1 with an exception set. */
int pf_tracking_resize(PfTracking *t, size_t n_pages);
/* tracking.c: collects kernel state that a remap would discard. */
int pf_tracking_before_remap(PfTracking *t);
/* tracking.c, for executor windows (window.c), GIL held: whether t tracks the
 * whole process now (and in which mode); ORs the pages it saw written into
 * `flags` (n pages; every page for "none"); after the memory was mapped
 * again, clears its flags and arms the new mapping (cow: the mapping is the
 * arming); closes it for good. -1 with an exception set on failure. */
int pf_tracking_global_mode(PfTracking *t); /* -1 when not tracking globally */
int pf_tracking_read_into(PfTracking *t, uint8_t *flags, size_t n);
int pf_tracking_rearm_fresh(PfTracking *t);
int pf_tracking_close(PfTracking *t);

/* ---- mechanisms ----------------------------------------------------------
 * Each returns 0 on success or -1 with a Python exception set. Ranges are in
 * pages relative to r->start. */
typedef struct pf_mode_ops {
    int (*attach)(pf_range *r);                           /* before first arm */
    int (*arm)(pf_range *r, size_t first, size_t count);  /* start recording */
    int (*disarm)(pf_range *r, size_t first, size_t count);
    int (*collect)(pf_range *r);                          /* kernel state -> flags */
    int (*detach)(pf_range *r, size_t first, size_t count); /* stop for good */
    /* The kernel state lives in a descriptor a forked child shares with its
     * parent (userfaultfd): a child must never touch it. */
    int shared_across_fork;
} pf_mode_ops;

extern const pf_mode_ops pf_segfault_ops;
extern const pf_mode_ops pf_uffd_ops;
extern const pf_mode_ops pf_uffd_async_ops;
extern const pf_mode_ops pf_softpte_ops;
extern const pf_mode_ops pf_cow_ops;

/* exempt.c (GIL held): pages tracking leaves alone and reports written. */
void pf_spans_add(pf_span *spans, size_t *n, size_t max, size_t first, size_t count);
int pf_spans_cover(const pf_span *spans, size_t n, size_t first, size_t count);
void pf_spans_mark(pf_range *r); /* marks holes and pinned pages written */
/* Records the calling thread's alternate signal stack (sigaltstack) and,
 * when it is enabled, returns 1 with it in *out (may be NULL). */
int pf_altstack_note(stack_t *out);
/* Adds the known threads' alternate stacks within [first, first + count). */
void pf_altstack_holes(pf_range *r, size_t first, size_t count, pf_span *out, size_t *n_out);
/* The calling thread's alternate stack within r: 1 and *out, else 0. */
int pf_altstack_own(pf_range *r, pf_span *out);
/* Adds pages of [start, start + n pages) pinned by io_uring fixed buffers. */
void pf_pinned_spans(uintptr_t start, size_t n_pages, pf_span *out, size_t *n_out);
PyObject *pf_pinned_pages(PyObject *self, PyObject *args);

/* pagemap.c */
enum pf_pagemap_kind {
    PF_PAGEMAP_COW,         /* a private copy: present or swapped, not the file's page */
    PF_PAGEMAP_SOFT_DIRTY,  /* soft-dirty bit set */
    PF_PAGEMAP_UNPROTECTED, /* no userfaultfd write-protection (PAGE_IS_WRITTEN) */
    PF_PAGEMAP_ZAPPED,      /* unprotected and unpopulated: dropped by madvise */
    PF_PAGEMAP_COW_PRESENT, /* a private copy mapped now (a swapped one is left out) */
};
/* Marks in `out` (one byte per page) the pages of [start, start + n pages)
 * that match `kind`. Uses PAGEMAP_SCAN when the kernel has it, else
 * /proc/self/pagemap. Returns the number of pages found, or -1 with errno. */
ssize_t pf_pagemap_find(uintptr_t start, size_t n_pages, int kind, uint8_t *out);
/* Issues PAGEMAP_SCAN over [start, end) with the masks of `tmpl`, looping on
 * walk_end, and marks every returned page in `out` (may be NULL). Returns the
 * number of pages returned, or -1 with errno. */
ssize_t pf_pagemap_scan(uintptr_t start, uintptr_t end, struct pm_scan_arg *tmpl, uint8_t *out);
int pf_pagemap_scan_available(void);

/* segfault.c: writers held for an executor window (window.c). The range is
 * made read-only; a write fault there parks the faulting thread on a futex
 * in the SIGSEGV handler until pf_segfault_unhold. Returns the hold's slot,
 * or -1 with an exception set. unhold makes the range writable again only
 * with `unprotect` (when nothing was mapped over it meanwhile). */
int pf_segfault_hold(uintptr_t start, size_t len);
void pf_segfault_unhold(int slot, int unprotect);

/* uffd.c / uffd_async.c: process-wide descriptors and probes. */
int pf_uffd_open(int features, int *got_features, int *user_mode_only);
int pf_uffd_register(int fd, pf_range *r, size_t first, size_t count);
int pf_uffd_unregister(int fd, pf_range *r, size_t first, size_t count);
int pf_uffd_protect(int fd, pf_range *r, size_t first, size_t count, int protect);
/* The sync mode's descriptor is user-mode-only: the kernel's own writes to
 * protected pages fail (read(2) gets EFAULT, a signal frame kills). */
int pf_uffd_kernel_writes_fail(void);
/* madvise(MADV_UNMERGEABLE): KSM merges drop userfaultfd write-protection. */
void pf_keep_out_of_ksm(pf_range *r, size_t first, size_t count);
PyObject *pf_uffd_probe(PyObject *self, PyObject *args);
/* Fork hooks (pf_registry_add_fork_hook): close the inherited (parent's) descriptors. */
void pf_uffd_forget_after_fork(void);
void pf_uffd_async_forget_after_fork(void);

/* module-level switches for tests */
extern int pf_pagemap_scan_disabled;
extern int pf_uffd_feature_mask;

/* ---- diffs (diff.c, merge.c) ---------------------------------------------- */

/* Codes shared with pagefork.snapshot.DataType / MergeOp and the wire format. */
enum pf_dtype {
    PF_RAW = 0, PF_BOOL, PF_INT8, PF_INT16, PF_INT32, PF_INT64,
    PF_UINT8, PF_UINT16, PF_UINT32, PF_UINT64, PF_FLOAT32, PF_FLOAT64, PF_N_DTYPES
};
enum pf_op {
    PF_OVERWRITE = 0, PF_XOR, PF_SUM, PF_PRODUCT, PF_SUBTRACT, PF_MAX, PF_MIN, PF_IGNORE, PF_N_OPS
};
extern const int pf_itemsize[PF_N_DTYPES];
/* 0 if `op` is defined for `dtype`, else -1 (arithmetic needs a number type). */
int pf_op_valid(int dtype, int op);
/* Typed ops work on whole values of their dtype; OVERWRITE, XOR and IGNORE
 * on bytes (pagefork.merge.MergeOp.bytewise says the same in Python). */
/* What check_columns finds wrong with a DiffBatch's columns (exported to
 * Python as COLUMN_* constants; pagefork.diffs words each). */
enum pf_column_problem {
    PF_COLUMN_NEGATIVE = 1,   /* negative offset or length */
    PF_COLUMN_OVERFLOW,       /* end past 2**63-1 */
    PF_COLUMN_PAST_DATA,      /* longer than the data */
    PF_COLUMN_UNKNOWN_CODE,   /* unknown dtype or op code */
    PF_COLUMN_INVALID_OP,     /* op not defined for the dtype */
    PF_COLUMN_PARTIAL_VALUE,  /* typed diff not a whole number of values */
    PF_COLUMN_DATA_LENGTH,    /* lengths not adding up to the data (index = count) */
};
static inline int pf_op_is_typed(int op)
{
    return op != PF_OVERWRITE && op != PF_XOR && op != PF_IGNORE;
}

/* A growable column: malloc while small; past PF_COLUMN_MMAP bytes a large
 * NORESERVE mapping (huge pages advised) that grows with mremap, so big
 * batches are never copied while they grow and only touched pages cost. */
typedef struct {
    uint8_t *p;
    size_t cap;    /* bytes usable */
    size_t mapped; /* bytes mapped, 0 while malloc'ed */
} pf_column;

/* A DiffBatch under construction. */
typedef struct {
    int64_t *offsets;
    int64_t *lengths;
    uint8_t *dtypes;
    uint8_t *ops;
    size_t n, cap;
    uint8_t *data;
    size_t data_len;
    pf_column col[5]; /* offsets, lengths, dtypes, ops, data */
} pf_batch;

/* Seeds an empty batch with cached column mappings; call with the GIL. */
void pf_batch_prepare(pf_batch *b);
/* Makes room for one more diff with `length` data bytes; -1: no memory. */
int pf_batch_reserve(pf_batch *b, size_t length);

/* Appends a diff and returns where its `length` data bytes go (NULL: no
 * memory). Inline: the dense diff loop calls it once per run. */
static inline uint8_t *pf_batch_add(pf_batch *b, int64_t offset, size_t length, int dtype, int op)
{
    if ((b->n == b->cap || b->data_len + length > b->col[4].cap) && pf_batch_reserve(b, length) != 0)
        return NULL;
    b->offsets[b->n] = offset;
    b->lengths[b->n] = (int64_t)length;
    b->dtypes[b->n] = (uint8_t)dtype;
    b->ops[b->n] = (uint8_t)op;
    b->n++;
    uint8_t *dst = b->data + b->data_len;
    b->data_len += length;
    return dst;
}
/* Returns (offsets, lengths, dtypes, ops, data) as _native.Buffer objects
 * that take over b's memory. Call with the GIL, like pf_batch_free. */
PyObject *pf_batch_finish(pf_batch *b);
void pf_batch_free(pf_batch *b);

/* The columns of a DiffBatch (merge.c). */
typedef struct {
    size_t n;
    const int64_t *offsets;
    const int64_t *lengths;
    const uint8_t *dtypes;
    const uint8_t *ops;
    const uint8_t *data;
    size_t data_len;
} pf_diff_columns;
enum { PF_MERGE_BAD_INDEX = 1, PF_MERGE_BAD_VALUE, PF_MERGE_BAD_PRODUCT };
int pf_diff_columns_of(pf_diff_columns *c, const Py_buffer *offsets, const Py_buffer *lengths,
                       const Py_buffer *dtypes, const Py_buffer *ops, const Py_buffer *data);
int pf_merge_check(const pf_diff_columns *c, const uint8_t *dst, size_t mapped, size_t size,
                   char *why, size_t why_len);
void pf_merge_write(const pf_diff_columns *c, uint8_t *dst);
PyObject *pf_merge_error_type(int problem);

PyObject *pf_diff(PyObject *self, PyObject *args);
PyObject *pf_identity_diff(PyObject *self, PyObject *args);
PyObject *pf_apply(PyObject *self, PyObject *args);
PyObject *pf_copy_pages(PyObject *self, PyObject *args);
PyObject *pf_mark_pages(PyObject *self, PyObject *args);
PyObject *pf_check_columns(PyObject *self, PyObject *args);
PyObject *pf_crc32c(PyObject *self, PyObject *args);
uint32_t pf_crc32c_update(uint32_t crc, const uint8_t *data, size_t len);
uint32_t pf_crc32c_concat(uint32_t crc_a, uint32_t crc_b, uint64_t len_b);
PyObject *pf_crc32c_combine(PyObject *self, PyObject *args);
PyObject *pf_read_checked(PyObject *self, PyObject *args);
PyObject *pf_delta_encode(PyObject *self, PyObject *args);
PyObject *pf_delta_apply(PyObject *self, PyObject *args);
PyObject *pf_delta_check(PyObject *self, PyObject *args);
#define PF_DELTA_CHECK_STATE 40 /* bytes of delta_check's state */
PyObject *pf_scribble(PyObject *self, PyObject *args);
PyObject *pf_write_sequence(PyObject *self, PyObject *args);
PyObject *pf_set_window_pause(PyObject *self, PyObject *arg);
PyObject *pf_segfault_reassert(PyObject *self, PyObject *unused);
PyObject *pf_compact_encode(PyObject *self, PyObject *args);
PyObject *pf_compact_decode(PyObject *self, PyObject *args);
PyObject *pf_gather(PyObject *self, PyObject *args);
PyObject *pf_private_pages(PyObject *self, PyObject *args);
PyObject *pf_maps_covers(PyObject *self, PyObject *args);
PyObject *pf_keep_changed(PyObject *self, PyObject *args);
PyObject *pf_fold(PyObject *self, PyObject *args);
PyObject *pf_segfault_suspend(PyObject *self, PyObject *unused);
PyObject *pf_new_mappings_locked(PyObject *self, PyObject *unused);
PyObject *pf_window(PyObject *self, PyObject *args);
PyObject *pf_hold_probe(PyObject *self, PyObject *args);
void pf_window_forget_after_fork(void);

#endif
