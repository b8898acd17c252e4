/* _native.Tracking: one region tracked in one mode. It drives the mode's
 * mechanism (pf_mode_ops) through start/stop, thread-local start/stop, reads
 * and resizes, and owns the flags the mechanisms write.
 *
 * Protection is armed while the region is tracked globally or by any thread;
 * a write is recorded for the process while global tracking is on, and for
 * the writing thread while that thread's tracking is on. Every call holds the
 * GIL, which serialises them; fault handlers run concurrently and only touch
 * the range through the lock-free registry.
 */
#include "pagefork.h"

#include <errno.h>
#include <string.h>

#include <unistd.h>

static const pf_mode_ops *ops_for(int mode)
{
    switch (mode) {
    case PF_MODE_SOFTPTE: return &pf_softpte_ops;
    case PF_MODE_SEGFAULT: return &pf_segfault_ops;
    case PF_MODE_UFFD: return &pf_uffd_ops;
    case PF_MODE_UFFD_ASYNC: return &pf_uffd_async_ops;
    case PF_MODE_COW: return &pf_cow_ops;
    default: return NULL;
    }
}

static int thread_local_capable(int mode)
{
    return mode == PF_MODE_NONE || mode == PF_MODE_SEGFAULT || mode == PF_MODE_UFFD;
}

static void link_mapping(PfTracking *self, PfMapping *m)
{
    self->mapping = m;
    self->next = m->trackings;
    m->trackings = self;
}

static void unlink_mapping(PfTracking *self)
{
    PfMapping *m = self->mapping;
    if (m == NULL)
        return;
    for (PfTracking **p = &m->trackings; *p != NULL; p = &(*p)->next)
        if (*p == self) {
            *p = self->next;
            break;
        }
    self->mapping = NULL;
    self->next = NULL;
}

static int tracking_init(PfTracking *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mode", "region", "max_pages", NULL};
    int mode;
    PyObject *region;
    Py_ssize_t max_pages;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iO!n", kwlist, &mode, &PfMappingType, &region,
                                     &max_pages))
        return -1;
    PfMapping *m = (PfMapping *)region;
    if (m->closed || !m->mapped) {
        PyErr_SetString(PyExc_ValueError, "Tracking: the region is closed");
        return -1;
    }
    size_t n_pages = m->size / pf_page_size;
    if (mode < 0 || mode >= PF_N_MODES || max_pages < (Py_ssize_t)n_pages ||
        (size_t)max_pages * pf_page_size > m->max_size) {
        PyErr_SetString(PyExc_ValueError, "Tracking: bad mode or page counts");
        return -1;
    }
    if (self->range != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Tracking already initialised");
        return -1;
    }
    self->range = pf_range_new(mode, m->address, n_pages, (size_t)max_pages, m->shared);
    if (self->range == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->ops = ops_for(mode);
    self->owner = getpid();
    link_mapping(self, m);
    return 0;
}

/* A Tracking copied into a forked child acts on nothing of its own: its
 * userfaultfd is the parent's. */
/* OSError(ENOSPC, message): pagefork maps it to a PageforkError that says
 * which limit was reached (never "No space left on device"). */
static PyObject *limit_error(const char *format, int limit)
{
    char message[256];
    snprintf(message, sizeof message, format, limit);
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", ENOSPC, message);
    if (exc != NULL) {
        PyErr_SetObject(PyExc_OSError, exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static int inherited(PfTracking *self)
{
    return self->owner != getpid();
}

/* Every operation but close: the region must exist and be this process's. */
static int check_usable(PfTracking *self)
{
    if (self->range == NULL) {
        PyErr_SetString(PyExc_ValueError, "Tracking is not initialised");
        return -1;
    }
    if (inherited(self)) {
        PyErr_Format(PyExc_RuntimeError,
                     "this tracking was inherited through fork() from process %d; a child cannot "
                     "use it (it would act on the parent's memory)", (int)self->owner);
        return -1;
    }
    if (self->mapping == NULL) {
        PyErr_SetString(PyExc_ValueError, "the region is closed");
        return -1;
    }
    return 0;
}

static int any_active(pf_range *r)
{
    return atomic_load(&r->global_active) || atomic_load(&r->threads_active) > 0;
}

static int attach(PfTracking *self)
{
    if (self->attached || self->ops == NULL)
        return 0;
    if (pf_registry_publish(self->range) != 0) {
        limit_error("too many tracked regions: at most %d regions can be tracked at once in "
                    "one process (stop or close some)", PF_MAX_RANGES);
        return -1;
    }
    if (self->ops->attach(self->range) != 0) {
        pf_registry_unpublish(self->range);
        return -1;
    }
    self->attached = 1;
    return 0;
}

/* Drops protection and kernel registrations once nothing is tracked. In a
 * forked child, state shared with the parent (userfaultfd) is left alone; the
 * child's own (its page protections, its copy of the registry) is cleaned. */
static int detach_if_idle(PfTracking *self)
{
    pf_range *r = self->range;
    if (!self->attached || any_active(r))
        return 0;
    size_t n = atomic_load(&r->n_pages);
    int rc = 0;
    if (!inherited(self) || !self->ops->shared_across_fork) {
        rc = self->ops->disarm(r, 0, n);
        if (self->ops->detach(r, 0, n) != 0)
            rc = -1;
        if (rc != 0 && inherited(self)) {
            /* The child may not have the memory at all (MADV_DONTFORK):
             * cleaning its copy is best effort, and closing stays silent. */
            PyErr_Clear();
            rc = 0;
        }
    }
    pf_registry_unpublish(r);
    self->attached = 0;
    return rc;
}

/* Modes in which the kernel's own write to an armed page fails, so a
 * signal frame on an armed alternate stack kills the process (exempt.c). */
static int kernel_writes_fail(pf_range *r)
{
    return r->mode == PF_MODE_SEGFAULT || (r->mode == PF_MODE_UFFD && pf_uffd_kernel_writes_fail());
}

/* Modes that read page tables or faults, blind to writes through a pin. */
static int blind_to_pins(pf_range *r)
{
    return r->mode != PF_MODE_NONE && r->mode != PF_MODE_COW;
}

/* How an arm treats [first, first + count). */
enum {
    ARM_AGAIN = 0,      /* armed before: holes must be un-protected */
    ARM_FRESH = 1,      /* never armed (grown, mapped anew): holes need nothing */
    ARM_LOOK_PINS = 2,  /* also look for io_uring fixed buffers again */
};

/* Recomputes the pages of [first, first + count) that tracking leaves
 * alone: the known threads' alternate signal stacks (holes, where the
 * kernel's writes to armed pages fail) and, with `look_pins`, io_uring
 * fixed buffers (pinned, in modes blind to them). Looking for pins reads
 * /proc/self/status (~5-20 us), so the read-and-re-arm of read loops keeps
 * the pins found before instead. Spans elsewhere in the range are kept.
 * Call after the read that reports the old spans: a span dropped before
 * that read would lose what was written there since the last one. */
static void refresh_spans(PfTracking *self, size_t first, size_t count, int look_pins)
{
    pf_range *r = self->range;
    pf_span holes[PF_MAX_SPANS], pinned[PF_MAX_SPANS];
    size_t n_holes = 0, n_pinned = 0, end = first + count;
    if (kernel_writes_fail(r))
        pf_altstack_holes(r, first, count, holes, &n_holes);
    if (look_pins && blind_to_pins(r)) {
        pf_pinned_spans(r->start + first * pf_page_size, count, pinned, &n_pinned);
        for (size_t i = 0; i < n_pinned; i++)
            pinned[i].first += first;
    }
    for (size_t i = 0; i < r->n_holes; i++)
        if (r->holes[i].first + r->holes[i].count <= first || r->holes[i].first >= end)
            pf_spans_add(holes, &n_holes, PF_MAX_SPANS, r->holes[i].first, r->holes[i].count);
    for (size_t i = 0; i < r->n_pinned; i++)
        if (!look_pins || r->pinned[i].first + r->pinned[i].count <= first ||
            r->pinned[i].first >= end)
            pf_spans_add(pinned, &n_pinned, PF_MAX_SPANS, r->pinned[i].first, r->pinned[i].count);
    memcpy(r->holes, holes, n_holes * sizeof *holes);
    r->n_holes = n_holes;
    memcpy(r->pinned, pinned, n_pinned * sizeof *pinned);
    r->n_pinned = n_pinned;
}

/* Un-protects the parts of r's holes outside [first, end) (an arm of part
 * of the range): past PF_MAX_SPANS the holes merge into one span that also
 * covers armed pages between them, and a page in a hole must be writable
 * (rescue_own_stack trusts it). */
static int disarm_holes_outside(PfTracking *self, size_t first, size_t end)
{
    pf_range *r = self->range;
    size_t n = atomic_load(&r->n_pages);
    for (size_t i = 0; i < r->n_holes; i++) {
        size_t lo = r->holes[i].first, hi = r->holes[i].first + r->holes[i].count;
        if (hi > n)
            hi = n;
        size_t parts[2][2] = {{lo, hi < first ? hi : first}, {lo > end ? lo : end, hi}};
        for (int k = 0; k < 2; k++)
            if (parts[k][0] < parts[k][1] &&
                self->ops->disarm(r, parts[k][0], parts[k][1] - parts[k][0]) != 0)
                return -1;
    }
    return 0;
}

/* Arms [first, first + count) around its holes, which are un-protected
 * instead (refresh_spans); `how`: ARM_* flags. */
static int arm_range(PfTracking *self, size_t first, size_t count, int how)
{
    pf_range *r = self->range;
    int fresh = how & ARM_FRESH;
    refresh_spans(self, first, count, how & ARM_LOOK_PINS);
    /* Protecting a hole even for an instant could kill its thread, should
     * a signal come then: protect around them. */
    size_t at = first, end = first + count;
    for (size_t i = 0; i < r->n_holes && at < end; i++) {
        size_t lo = r->holes[i].first, hi = r->holes[i].first + r->holes[i].count;
        if (hi <= at || lo >= end)
            continue;
        if (lo > at && self->ops->arm(r, at, lo - at) != 0)
            return -1;
        if (hi > end)
            hi = end;
        if (lo < at)
            lo = at;
        if (!fresh && self->ops->disarm(r, lo, hi - lo) != 0)
            return -1;
        at = hi;
    }
    if (at < end && self->ops->arm(r, at, end - at) != 0)
        return -1;
    return disarm_holes_outside(self, first, end);
}

/* A thread that pointed its alternate stack into armed memory after the
 * last arm dies at its next signal, unless it calls pagefork first: this
 * is that call. Its stack is un-protected and becomes a hole. */
static int rescue_own_stack(PfTracking *self)
{
    pf_range *r = self->range;
    pf_span own;
    if (!kernel_writes_fail(r) || !pf_altstack_own(r, &own) ||
        pf_spans_cover(r->holes, r->n_holes, own.first, own.count))
        return 0;
    pf_spans_add(r->holes, &r->n_holes, PF_MAX_SPANS, own.first, own.count);
    /* The hole now holding the stack may be larger: merged with others, or
     * past PF_MAX_SPANS all of them merged into one that also covers armed
     * pages between them. Un-protect all of it, so that a stack found in a
     * hole (the check above) is always writable. */
    for (size_t i = 0; i < r->n_holes; i++)
        if (pf_spans_cover(&r->holes[i], 1, own.first, own.count))
            return self->ops->disarm(r, r->holes[i].first, r->holes[i].count);
    return self->ops->disarm(r, own.first, own.count);
}

static int collect(PfTracking *self)
{
    if (self->ops == NULL || !self->attached)
        return 0;
    if (rescue_own_stack(self) != 0)
        return -1;
    int rc = self->ops->collect(self->range);
    pf_spans_mark(self->range);
    return rc;
}

/* Starts whole-process tracking; `how`: ARM_* flags for the arm. */
static PyObject *start_with(PfTracking *self, int how)
{
    if (check_usable(self) != 0)
        return NULL;
    pf_range *r = self->range;
    if (attach(self) != 0)
        return NULL;
    /* Handlers held out while the flags are cleared and the pages protected
     * (the region may be tracked already: a restart, or thread scope): one
     * straddling both would un-protect its page after the protect, with its
     * mark cleared, and later writes there would go unseen. */
    pf_range_begin_exclusive(r);
    memset(r->global, 0, atomic_load(&r->n_pages)); /* pages past n were cleared on shrink */
    atomic_store(&r->global_active, 1);
    if (!(how & ARM_LOOK_PINS))
        r->n_pinned = 0; /* pins held the pages mapped before, not these (start_mapped) */
    int rc = self->ops != NULL ? arm_range(self, 0, atomic_load(&r->n_pages), how) : 0;
    pf_range_end_exclusive(r);
    if (rc != 0) {
        atomic_store(&r->global_active, 0);
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        detach_if_idle(self);
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *tracking_start(PfTracking *self, PyObject *unused)
{
    (void)unused;
    return start_with(self, ARM_LOOK_PINS);
}

/* start_mapped(): start on memory the caller has just mapped anew
 * (Snapshot.map_to, thread memory before each thread). A pin holds the
 * pages it was registered on, which the new mapping replaced: none can
 * hold the new ones yet, so io_uring buffers are not looked for (reading
 * /proc/self/status and every io_uring's fdinfo, ~10-20 us per start);
 * pinned spans found before are dropped. Buffers registered later are seen
 * as in start (reported once, by the fault registering them takes). */
static PyObject *tracking_start_mapped(PfTracking *self, PyObject *unused)
{
    (void)unused;
    return start_with(self, ARM_AGAIN);
}

/* start_fresh(): start on memory its owner has just mapped from its file
 * (the executor, right after a window). For cow a page copied since then is
 * a write to report, not memory that was never freshly mapped: no check. */
static PyObject *tracking_start_fresh(PfTracking *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self) != 0)
        return NULL;
    if (self->range->mode != PF_MODE_COW)
        return tracking_start(self, NULL);
    pf_range *r = self->range;
    if (attach(self) != 0)
        return NULL;
    pf_range_begin_exclusive(r);
    memset(r->global, 0, atomic_load(&r->n_pages));
    atomic_store(&r->global_active, 1);
    pf_range_end_exclusive(r);
    Py_RETURN_NONE;
}

static PyObject *tracking_stop(PfTracking *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self) != 0)
        return NULL;
    pf_range *r = self->range;
    if (!atomic_load(&r->global_active))
        Py_RETURN_NONE;
    int rc = collect(self);
    atomic_store(&r->global_active, 0);
    if (detach_if_idle(self) != 0 || rc != 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *tracking_start_thread(PfTracking *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self) != 0)
        return NULL;
    pf_range *r = self->range;
    if (!thread_local_capable(r->mode)) {
        PyErr_SetString(PyExc_NotImplementedError, "this mode has no thread-local scope");
        return NULL;
    }
    pf_thread_slot *slot = pf_range_thread_slot(r, pf_current_tid(), 1);
    if (slot == NULL && errno == ENOMEM)
        return PyErr_NoMemory();
    if (slot == NULL)
        return limit_error("too many threads track this region: at most %d threads can track "
                           "one region at once (stop_thread, or let finished threads exit)",
                           PF_MAX_THREADS);
    pf_thread_tracking_started();
    if (attach(self) != 0)
        return NULL;
    /* Handlers held out, as in start. */
    pf_range_begin_exclusive(r);
    memset(slot->flags, 0, r->max_pages);
    if (!atomic_exchange(&slot->active, 1))
        atomic_fetch_add(&r->threads_active, 1);
    /* Pages other threads already wrote are writable again: re-protect all
     * so this thread's first write to each is seen. */
    int rc = self->ops != NULL ? arm_range(self, 0, atomic_load(&r->n_pages), ARM_LOOK_PINS) : 0;
    pf_range_end_exclusive(r);
    if (rc != 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *tracking_stop_thread(PfTracking *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self) != 0)
        return NULL;
    pf_range *r = self->range;
    pf_thread_slot *slot = pf_range_thread_slot(r, pf_current_tid(), 0);
    if (slot == NULL || !atomic_exchange(&slot->active, 0))
        Py_RETURN_NONE;
    atomic_fetch_sub(&r->threads_active, 1);
    if (detach_if_idle(self) != 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Copies the flags of `scope` (0 global, 1 calling thread, 2 both) into dst
 * and, with `clear`, zeroes the flags it read. */
static void take_flags(pf_range *r, int scope, uint8_t *dst, size_t n, int clear)
{
    pf_thread_slot *slot = scope == 0 ? NULL : pf_range_thread_slot(r, pf_current_tid(), 0);
    if (scope == 1) {
        if (slot != NULL)
            memcpy(dst, slot->flags, n);
        else
            memset(dst, 0, n);
    } else {
        memcpy(dst, r->global, n);
        if (slot != NULL)
            for (size_t i = 0; i < n; i++)
                dst[i] |= slot->flags[i];
    }
    if (!clear)
        return;
    if (scope != 1)
        memset(r->global, 0, r->max_pages);
    if (slot != NULL)
        memset(slot->flags, 0, r->max_pages);
}

/* Re-arms protection and takes the flags as one step with respect to the
 * fault handlers. Protecting first and keeping handlers out until the flags
 * are taken means every write lands in this read or the next: a handler that
 * un-protected a page before the re-protect has finished (its mark is read
 * now); one that comes after marks for the next read. Without the exclusion a
 * handler straddling the re-protect would leave its page writable with its
 * mark already taken, and later writes to that page would never be seen. */
static int read_and_rearm(PfTracking *self, int scope, uint8_t *dst, size_t n)
{
    pf_range *r = self->range;
    int armed = self->attached && any_active(r);
    if (r->mode == PF_MODE_UFFD_ASYNC) {
        /* One PAGEMAP_SCAN reads PAGE_IS_WRITTEN and re-protects atomically. */
        if (armed && collect(self) != 0)
            return -1;
        take_flags(r, scope, dst, n, 1);
        return 0;
    }
    pf_range_begin_exclusive(r);
    /* collect before re-protecting: it reads what only the kernel knows
     * (pages that lost their protection without a fault). */
    int rc = armed ? collect(self) : 0;
    if (rc == 0 && armed)
        rc = arm_range(self, 0, n, ARM_AGAIN);
    if (rc == 0)
        take_flags(r, scope, dst, n, 1);
    pf_range_end_exclusive(r);
    return rc;
}

/* dirty(out, scope, reset=False): fills the writable buffer `out` (n_pages
 * bytes) with 0/1 flags. scope: 0 global, 1 calling thread, 2 both. reset
 * clears the flags read and re-arms in the same step. */
static PyObject *tracking_dirty(PfTracking *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"out", "scope", "reset", NULL};
    Py_buffer out;
    int scope, reset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "w*i|p", kwlist, &out, &scope, &reset))
        return NULL;
    if (check_usable(self) != 0) {
        PyBuffer_Release(&out);
        return NULL;
    }
    pf_range *r = self->range;
    size_t n = atomic_load(&r->n_pages);
    if ((size_t)out.len != n || scope < 0 || scope > 2) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "dirty: buffer must hold n_pages bytes; scope 0..2");
        return NULL;
    }
    uintptr_t out_start = (uintptr_t)out.buf, region_end = r->start + r->max_pages * pf_page_size;
    if (out_start < region_end && out_start + n > r->start) {
        /* Writing flags into the tracked memory itself would fault while
         * handlers are held out: this thread would wait for itself. */
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "dirty: the output buffer lies in the tracked region");
        return NULL;
    }
    if (reset && (r->mode == PF_MODE_COW || r->mode == PF_MODE_SOFTPTE)) {
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_NotImplementedError, "this mode cannot read and re-arm in one step");
        return NULL;
    }
    uint8_t *dst = out.buf;
    int rc = 0;
    if (self->ops == NULL)
        memset(dst, 1, n);
    else if (reset)
        rc = read_and_rearm(self, scope, dst, n);
    else if (any_active(r) && collect(self) != 0)
        rc = -1;
    else
        take_flags(r, scope, dst, n, 0);
    PyBuffer_Release(&out);
    if (rc != 0)
        return NULL;
    Py_RETURN_NONE;
}

/* Clears every flag and re-arms. Writes between an earlier dirty() and this
 * call are forgotten: dirty(reset=True) is the race-free form. */
static PyObject *tracking_reset(PfTracking *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self) != 0)
        return NULL;
    pf_range *r = self->range;
    int armed = self->attached && any_active(r) && self->ops != NULL;
    /* Consume the kernel's state first (uffd-async re-protects as it reads). */
    if (armed && collect(self) != 0)
        return NULL;
    pf_range_begin_exclusive(r);
    int rc = 0;
    if (armed && r->mode != PF_MODE_COW)
        rc = arm_range(self, 0, atomic_load(&r->n_pages), ARM_LOOK_PINS);
    if (rc == 0) {
        memset(r->global, 0, r->max_pages);
        for (int i = 0; i < PF_MAX_THREADS; i++)
            if (r->threads[i].flags != NULL)
                memset(r->threads[i].flags, 0, r->max_pages);
    }
    pf_range_end_exclusive(r);
    if (rc != 0)
        return NULL;
    Py_RETURN_NONE;
}

/* The region grew to n pages (called after the memory is accessible) or is
 * about to shrink to n (called before it goes away), from Mapping._resize
 * itself, so no Python code (another thread) can run in between and write a
 * grown page before it is armed. In a forked child only the size is kept:
 * the kernel state may be the parent's. */
int pf_tracking_resize(PfTracking *self, size_t n)
{
    pf_range *r = self->range;
    if (r == NULL)
        return 0;
    if (n > r->max_pages) {
        PyErr_SetString(PyExc_ValueError, "resize: beyond the tracked maximum");
        return -1;
    }
    int live = self->attached && !inherited(self);
    size_t old = atomic_load(&r->n_pages);
    if (n < old) {
        if (live && collect(self) != 0)
            return -1;
        /* Handlers already inside finish before the size drops: none can
         * un-protect a page of the tail after it became reservation again. */
        pf_range_begin_exclusive(r);
        atomic_store(&r->n_pages, n);
        pf_range_end_exclusive(r);
        memset(r->global + n, 0, old - n);
        for (int i = 0; i < PF_MAX_THREADS; i++)
            if (r->threads[i].flags != NULL)
                memset(r->threads[i].flags + n, 0, old - n);
        if (live && self->ops->detach(r, n, old - n) != 0)
            return -1;
    } else if (n > old) {
        atomic_store(&r->n_pages, n);
        if (live && any_active(r) && arm_range(self, old, n - old, ARM_FRESH | ARM_LOOK_PINS) != 0)
            return -1;
    }
    return 0;
}

/* Stops everything and drops kernel state; safe in any state and in a forked
 * child (where it only forgets). Returns -1 with an exception set on error. */
static int close_tracking(PfTracking *self)
{
    pf_range *r = self->range;
    if (r == NULL)
        return 0;
    atomic_store(&r->global_active, 0);
    for (int i = 0; i < PF_MAX_THREADS; i++)
        atomic_store(&r->threads[i].active, 0);
    atomic_store(&r->threads_active, 0);
    return detach_if_idle(self);
}

static PyObject *tracking_close(PfTracking *self, PyObject *unused)
{
    (void)unused;
    if (close_tracking(self) != 0)
        return NULL;
    Py_RETURN_NONE;
}

void pf_tracking_region_gone(PfTracking *self)
{
    if (close_tracking(self) != 0)
        PyErr_Clear(); /* the memory is going away: nothing is left to protect */
    unlink_mapping(self);
}

int pf_tracking_before_remap(PfTracking *self)
{
    if (inherited(self) || self->ops == NULL || !self->attached || !any_active(self->range))
        return 0;
    return collect(self);
}

int pf_tracking_region_remapped(PfTracking *self)
{
    pf_range *r = self->range;
    if (inherited(self) || self->ops == NULL || !self->attached || !any_active(r) ||
        r->mode == PF_MODE_COW) /* cow: mapping the file again is its re-arm */
        return 0;
    return arm_range(self, 0, atomic_load(&r->n_pages), ARM_FRESH | ARM_LOOK_PINS);
}

/* ---- executor windows (window.c), GIL held -------------------------------- */

int pf_tracking_global_mode(PfTracking *self)
{
    pf_range *r = self->range;
    if (r == NULL || inherited(self) || self->mapping == NULL || !atomic_load(&r->global_active))
        return -1;
    return r->mode;
}

int pf_tracking_read_into(PfTracking *self, uint8_t *flags, size_t n)
{
    pf_range *r = self->range;
    if (self->ops == NULL) { /* "none": every page counts as written */
        memset(flags, 1, n);
        return 0;
    }
    if (collect(self) != 0)
        return -1;
    size_t have = atomic_load(&r->n_pages);
    for (size_t i = 0; i < n && i < have; i++)
        flags[i] |= r->global[i];
    return 0;
}

/* The memory was just mapped again from its file (no page of it written
 * before this call can be in the flags: the window held every writer). cow
 * is armed by the mapping itself; a page copied since is a write. */
int pf_tracking_rearm_fresh(PfTracking *self)
{
    pf_range *r = self->range;
    pf_range_begin_exclusive(r);
    memset(r->global, 0, atomic_load(&r->n_pages));
    pf_range_end_exclusive(r);
    if (self->ops == NULL || !self->attached || r->mode == PF_MODE_COW)
        return 0;
    return arm_range(self, 0, atomic_load(&r->n_pages), ARM_FRESH | ARM_LOOK_PINS);
}

int pf_tracking_close(PfTracking *self)
{
    return close_tracking(self);
}

static void tracking_dealloc(PfTracking *self)
{
    if (self->weakrefs != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->range != NULL) {
        /* Never report through self (that would revive it mid-dealloc) and
         * never disturb an exception being propagated. */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        if (close_tracking(self) != 0)
            PyErr_WriteUnraisable(NULL);
        PyErr_Restore(type, value, tb);
        unlink_mapping(self);
        if (!self->attached)
            pf_range_free(self->range);
        /* else: still published after a failed detach; leaking beats a
         * handler reading freed memory */
        self->range = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *tracking_get_active(PfTracking *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->range != NULL && atomic_load(&self->range->global_active));
}

static PyObject *tracking_get_thread_active(PfTracking *self, void *closure)
{
    (void)closure;
    pf_thread_slot *slot =
        self->range == NULL ? NULL : pf_range_thread_slot(self->range, pf_current_tid(), 0);
    return PyBool_FromLong(slot != NULL && atomic_load(&slot->active));
}

static PyObject *tracking_get_n_pages(PfTracking *self, void *closure)
{
    (void)closure;
    return PyLong_FromSize_t(self->range == NULL ? 0 : atomic_load(&self->range->n_pages));
}

static PyObject *tracking_get_fallbacks(PfTracking *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->range == NULL ? 0 : atomic_load(&self->range->fallbacks));
}

static PyMethodDef tracking_methods[] = {
    {"start", (PyCFunction)tracking_start, METH_NOARGS, "Start tracking the whole process."},
    {"start_mapped", (PyCFunction)tracking_start_mapped, METH_NOARGS,
     "Start tracking memory just mapped anew (no look for io_uring pins)."},
    {"start_fresh", (PyCFunction)tracking_start_fresh, METH_NOARGS,
     "Start on memory just mapped from its file (cow: pages copied since are writes)."},
    {"stop", (PyCFunction)tracking_stop, METH_NOARGS, "Stop whole-process tracking."},
    {"start_thread", (PyCFunction)tracking_start_thread, METH_NOARGS, "Track the calling thread."},
    {"stop_thread", (PyCFunction)tracking_stop_thread, METH_NOARGS, "Stop tracking the calling thread."},
    {"dirty", (PyCFunction)(void (*)(void))tracking_dirty, METH_VARARGS | METH_KEYWORDS,
     "dirty(out, scope, reset=False): write flags into out; reset re-arms in the same step."},
    {"reset", (PyCFunction)tracking_reset, METH_NOARGS, "Clear all flags and re-arm."},
    {"close", (PyCFunction)tracking_close, METH_NOARGS, "Stop everything and drop kernel state."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef tracking_getset[] = {
    {"active", (getter)tracking_get_active, NULL, "Global tracking is on.", NULL},
    {"thread_active", (getter)tracking_get_thread_active, NULL, "The calling thread is tracked.", NULL},
    {"n_pages", (getter)tracking_get_n_pages, NULL, "Pages tracked.", NULL},
    {"fallbacks", (getter)tracking_get_fallbacks, NULL,
     "Times segfault mode un-protected the whole range (mprotect failed: vm.max_map_count).",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyTypeObject PfTrackingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pagefork._native.Tracking",
    .tp_basicsize = sizeof(PfTracking),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Tracking(mode, address, n_pages, max_pages, shared=False): one tracked region.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)tracking_init,
    .tp_dealloc = (destructor)tracking_dealloc,
    .tp_methods = tracking_methods,
    .tp_getset = tracking_getset,
    .tp_weaklistoffset = offsetof(PfTracking, weakrefs),
};
