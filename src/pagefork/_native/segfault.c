/* `segfault` mode: pages are mprotect'ed read-only; the first write to each
 * raises SIGSEGV, whose handler marks the page and makes it writable again.
 *
 * The handler must never allocate, take a lock a faulting thread might hold,
 * or touch Python: it only reads the lock-free registry, stores flag bytes and
 * calls mprotect. Faults it does not own go to the handler that was installed
 * before it, so faulthandler and real crashes behave as without pagefork.
 * Kernel writes (read(2) into a protected page) fail with EFAULT: the kernel
 * does not raise SIGSEGV for them. When un-protecting one page fails (the
 * mapping split past vm.max_map_count) the handler un-protects the whole
 * range and marks it all, rather than letting the write fault forever.
 * Threads' alternate signal stacks are never protected (exempt.c): the
 * kernel could not write a signal frame there.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

/* The previous handler, double-buffered so a re-install never tears it
 * under a handler running on another thread. */
static struct sigaction previous[2];
static _Atomic int previous_index;
static int installed_once; /* ensure_handler ran at least once (GIL held) */

static int protect(pf_range *r, size_t first, size_t count, int prot);

/* ---- writers held for an executor window -----------------------------------
 * Where userfaultfd cannot hold the writers of main memory for a window
 * (window.c), the memory is made read-only and a write fault there parks
 * the thread on the hold's futex word until the window ends; the write then
 * runs again, on whatever is mapped there by then. A hold is published with
 * [start, end) set and withdrawn by clearing them before `seq` changes, so a
 * thread that read `seq` first and then found its address in the range
 * either sleeps until the change or sees it at once (EAGAIN). */
#define PF_MAX_HOLDS 64
typedef struct {
    _Atomic uintptr_t start, end;
    _Atomic uint32_t seq;
    _Atomic int used;
} pf_hold;
static pf_hold holds[PF_MAX_HOLDS];

/* Async-signal-safe: atomics and futex(2). 1 if the thread waited (or the
 * hold ended meanwhile): the caller returns, and the write runs again. */
static int park_if_held(uintptr_t addr)
{
    for (int i = 0; i < PF_MAX_HOLDS; i++) {
        pf_hold *h = &holds[i];
        if (!atomic_load(&h->used))
            continue;
        uint32_t seq = atomic_load(&h->seq);
        if (addr >= atomic_load(&h->start) && addr < atomic_load(&h->end)) {
            /* EINTR (another signal) or a spurious wake-up: the write runs
             * again and parks again while the hold lasts. */
            syscall(SYS_futex, &h->seq, FUTEX_WAIT_PRIVATE, seq, NULL, NULL, 0);
            return 1;
        }
    }
    return 0;
}

static int is_write_fault(void *context)
{
#if defined(__x86_64__)
    /* Page-fault error code: bit 1 is set for writes. An exec or read fault
     * in a tracked range is a real error and must not be "fixed" by us. */
    const ucontext_t *uc = context;
    return (uc->uc_mcontext.gregs[REG_ERR] & 0x2) != 0;
#else
    (void)context;
    return 1;
#endif
}

/* The last fault this thread passed on, to notice a previous handler that
 * returns without fixing anything (a disabled faulthandler, a Python-level
 * handler): the fault would re-execute forever. Initial-exec TLS: no
 * allocation on first access. */
static __thread uintptr_t last_chained __attribute__((tls_model("initial-exec")));
static __thread int chained_before __attribute__((tls_model("initial-exec")));
/* The last unowned write fault this thread re-executed once. */
static __thread uintptr_t retried_addr __attribute__((tls_model("initial-exec")));
static __thread int retried __attribute__((tls_model("initial-exec")));

static void take_default_action(int signo)
{
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    sigaction(signo, &dfl, NULL);
}

static void chain(int signo, siginfo_t *info, void *context)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    const struct sigaction *prev = &previous[atomic_load(&previous_index)];
    if (!(prev->sa_flags & SA_SIGINFO) && info->si_code > 0 && chained_before &&
        addr == last_chained) {
        /* Passed to a plain handler before and it came back: that handler
         * (the signal module's C handler, a disabled faulthandler) cannot fix a
         * fault. Die as the fault would by default instead of spinning.
         * SA_SIGINFO handlers may fix faults (another tracker): trusted. */
        take_default_action(signo);
        return;
    }
    chained_before = info->si_code > 0;
    last_chained = addr;
    if (prev->sa_flags & SA_SIGINFO) {
        prev->sa_sigaction(signo, info, context);
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(signo);
    } else {
        /* Default action: let the re-executed fault (or the re-raised
         * signal, when it was sent) terminate the process as usual. */
        take_default_action(signo);
        if (info->si_code <= 0)
            raise(signo);
        return;
    }
    /* A chained handler that reported and re-raised (faulthandler does this
     * after putting us back as its own "previous") would bounce between the
     * two forever: let the pending signal take the default action. */
    sigset_t pending;
    if (sigpending(&pending) == 0 && sigismember(&pending, signo))
        take_default_action(signo);
}

/* Marks every page for the process and each tracked thread. */
static void mark_all(pf_range *r, size_t n)
{
    if (atomic_load_explicit(&r->global_active, memory_order_relaxed))
        for (size_t i = 0; i < n; i++)
            __atomic_store_n(&r->global[i], 1, __ATOMIC_RELAXED);
    if (atomic_load_explicit(&r->threads_active, memory_order_relaxed) == 0)
        return;
    for (int t = 0; t < PF_MAX_THREADS; t++) {
        pf_thread_slot *s = &r->threads[t];
        if (atomic_load_explicit(&s->tid, memory_order_acquire) != 0 &&
            atomic_load_explicit(&s->active, memory_order_relaxed))
            for (size_t i = 0; i < n; i++)
                __atomic_store_n(&s->flags[i], 1, __ATOMIC_RELAXED);
    }
}

static void on_segv(int signo, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    if (info->si_code == SEGV_ACCERR && is_write_fault(context)) {
        uintptr_t addr = (uintptr_t)info->si_addr;
        if (park_if_held(addr)) {
            retried = 0;
            errno = saved_errno;
            return;
        }
        pf_range *r = pf_registry_acquire(addr, PF_MODE_SEGFAULT);
        if (r != NULL) {
            pf_range_mark(r, addr, 0);
            void *page = (void *)(addr & ~(uintptr_t)(pf_page_size - 1));
            int fixed = mprotect(page, pf_page_size, PROT_READ | PROT_WRITE) == 0;
            if (!fixed) {
                /* ENOMEM: splitting the mapping once more would pass
                 * vm.max_map_count. Un-protecting the whole range merges its
                 * pieces instead; every page counts as written from now on. */
                size_t n = atomic_load(&r->n_pages);
                mark_all(r, n);
                fixed = mprotect((void *)r->start, n * pf_page_size, PROT_READ | PROT_WRITE) == 0;
                if (fixed)
                    atomic_fetch_add(&r->fallbacks, 1);
            }
            pf_registry_release(r);
            if (fixed) {
                chained_before = 0;
                retried = 0;
                errno = saved_errno;
                return;
            }
        } else if (!retried || addr != retried_addr) {
            /* Tracking of this page may have ended (made writable, then
             * unpublished) between the fault and this lookup: re-execute the
             * write once. A real access error faults again right here. */
            retried = 1;
            retried_addr = addr;
            errno = saved_errno;
            return;
        }
    }
    retried = 0;
    errno = saved_errno;
    chain(signo, info, context);
}

static int is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == on_segv;
}

/* Installs the handler unless it is already the current one (something like
 * faulthandler.enable() may have replaced it since the last start); the
 * replaced one becomes the handler faults we do not own go to. */
static int ensure_handler(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current) != 0) {
        pf_oserror("sigaction");
        return -1;
    }
    if (is_ours(&current))
        return 0;
    int next = 1 - atomic_load(&previous_index);
    previous[next] = current;
    atomic_store(&previous_index, next);

    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_segv;
    ours.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
    sigemptyset(&ours.sa_mask);
    if (sigaction(SIGSEGV, &ours, NULL) != 0) {
        pf_oserror("sigaction");
        return -1;
    }
    installed_once = 1;
    return 0;
}

static int is_tracking(pf_range *r)
{
    return atomic_load(&r->global_active) || atomic_load(&r->threads_active) > 0;
}

/* Between another handler's sigaction and the re-assert, tracked writes
 * would reach that handler (faulthandler reports them as fatal and the
 * process dies). While Python code swaps handlers, tracked ranges are
 * therefore writable; a hash of each page taken before and compared after
 * tells which pages changed meanwhile, and those count as written (by every
 * tracked thread: the writer is unknown). Without memory for the hashes,
 * every page counts as written. */
static int suspended;

static uint64_t page_hash(uintptr_t address)
{
    const uint64_t *w = (const uint64_t *)address;
    uint64_t h = 0x9E3779B97F4A7C15ULL;
    for (size_t i = 0; i < pf_page_size / 8; i++) {
        h = (h ^ w[i]) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
    }
    return h;
}

static void mark_page(pf_range *r, size_t page)
{
    if (atomic_load(&r->global_active))
        __atomic_store_n(&r->global[page], 1, __ATOMIC_RELAXED);
    for (int t = 0; atomic_load(&r->threads_active) > 0 && t < PF_MAX_THREADS; t++) {
        pf_thread_slot *s = &r->threads[t];
        if (atomic_load(&s->tid) != 0 && atomic_load(&s->active))
            __atomic_store_n(&s->flags[page], 1, __ATOMIC_RELAXED);
    }
}

/* mprotect(prot) of the whole range but its holes (exempt.c: alternate
 * signal stacks, which must never be read-only even for an instant). */
static void protect_around_holes(pf_range *r, size_t n, int prot)
{
    size_t at = 0;
    for (size_t i = 0; i < r->n_holes && at < n; i++) {
        size_t lo = r->holes[i].first;
        if (lo > n)
            lo = n;
        if (lo > at)
            mprotect((void *)(r->start + at * pf_page_size), (lo - at) * pf_page_size, prot);
        if (r->holes[i].first + r->holes[i].count > at)
            at = r->holes[i].first + r->holes[i].count;
    }
    if (at < n)
        mprotect((void *)(r->start + at * pf_page_size), (n - at) * pf_page_size, prot);
}

static void suspend_range(pf_range *r)
{
    if (!is_tracking(r))
        return;
    size_t n = atomic_load(&r->n_pages);
    pf_range_begin_exclusive(r);
    /* Read-only while hashed; readable even where the user made a page
     * PROT_NONE (segfault mode undoes user protections anyway). Pages
     * already marked may be written meanwhile: they fault and wait. */
    protect_around_holes(r, n, PROT_READ);
    free(r->swap_hashes);
    r->swap_hashes = malloc((n ? n : 1) * sizeof(uint64_t));
    r->swap_n = n;
    if (r->swap_hashes == NULL)
        mark_all(r, n);
    else
        for (size_t i = 0; i < n; i++)
            r->swap_hashes[i] = page_hash(r->start + i * pf_page_size);
    mprotect((void *)r->start, n * pf_page_size, PROT_READ | PROT_WRITE);
    pf_range_end_exclusive(r);
}

static void resume_range(pf_range *r)
{
    if (is_tracking(r)) {
        size_t n = atomic_load(&r->n_pages);
        pf_range_begin_exclusive(r);
        protect_around_holes(r, n, PROT_READ);
        /* read-only now, handlers held out: the contents are final (holes
         * stay writable: they count as written at every read anyway) */
        for (size_t i = 0; r->swap_hashes != NULL && i < n; i++)
            if (i >= r->swap_n || page_hash(r->start + i * pf_page_size) != r->swap_hashes[i])
                mark_page(r, i);
        pf_range_end_exclusive(r);
    }
    free(r->swap_hashes);
    r->swap_hashes = NULL;
}

/* _native.segfault_suspend(): call before Python code replaces the SIGSEGV
 * handler; segfault_reassert() after it resumes tracking. */
PyObject *pf_segfault_suspend(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (installed_once && !suspended) {
        pf_registry_foreach(PF_MODE_SEGFAULT, NULL, suspend_range);
        suspended = 1;
    }
    Py_RETURN_NONE;
}

/* _native.segfault_reassert(): puts the handler back on top after Python
 * code replaced it (faulthandler.enable(), signal.signal(SIGSEGV, ...)),
 * keeping the replacement as the handler of faults we do not own, then
 * protects what segfault_suspend made writable. No-op until segfault mode
 * has been used. */
PyObject *pf_segfault_reassert(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    if (installed_once && ensure_handler() != 0)
        return NULL;
    if (suspended) {
        suspended = 0;
        pf_registry_foreach(PF_MODE_SEGFAULT, NULL, resume_range);
    }
    Py_RETURN_NONE;
}

static int protect(pf_range *r, size_t first, size_t count, int prot)
{
    if (count == 0)
        return 0;
    if (mprotect((void *)(r->start + first * pf_page_size), count * pf_page_size, prot) != 0) {
        pf_oserror("mprotect");
        return -1;
    }
    return 0;
}

/* A child forked while a hold lasted (fork(2) from a thread running
 * without the GIL, mid-window) inherits the read-only memory but not the
 * window that would end the hold: its first write there would park
 * forever. Its copy is its own, so the child ends every hold at once. */
static void end_holds_in_child(void)
{
    for (int i = 0; i < PF_MAX_HOLDS; i++) {
        pf_hold *h = &holds[i];
        uintptr_t start = atomic_load(&h->start), end = atomic_load(&h->end);
        if (atomic_load(&h->used) && end > start)
            mprotect((void *)start, end - start, PROT_READ | PROT_WRITE);
        atomic_store(&h->end, 0);
        atomic_store(&h->start, 0);
        atomic_fetch_add(&h->seq, 1);
        atomic_store(&h->used, 0);
    }
}

static void watch_forks(void)
{
    pthread_atfork(NULL, NULL, end_holds_in_child);
}

static pthread_once_t forks_watched = PTHREAD_ONCE_INIT;

int pf_segfault_hold(uintptr_t start, size_t len)
{
    if (ensure_handler() != 0)
        return -1;
    pthread_once(&forks_watched, watch_forks);
    for (int i = 0; i < PF_MAX_HOLDS; i++) {
        int expected = 0;
        if (!atomic_compare_exchange_strong(&holds[i].used, &expected, 1))
            continue;
        atomic_store(&holds[i].start, start);
        atomic_store(&holds[i].end, start + len);
        if (mprotect((void *)start, len, PROT_READ) != 0) {
            int err = errno;
            pf_segfault_unhold(i, 0);
            pf_oserror_errno(err, "mprotect");
            return -1;
        }
        return i;
    }
    PyErr_SetString(PyExc_RuntimeError, "too many writer holds at once");
    return -1;
}

void pf_segfault_unhold(int slot, int unprotect)
{
    pf_hold *h = &holds[slot];
    uintptr_t start = atomic_load(&h->start), end = atomic_load(&h->end);
    if (unprotect)
        mprotect((void *)start, end - start, PROT_READ | PROT_WRITE);
    atomic_store(&h->end, 0);
    atomic_store(&h->start, 0);
    atomic_fetch_add(&h->seq, 1);
    syscall(SYS_futex, &h->seq, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
    atomic_store(&h->used, 0);
}

static int segfault_attach(pf_range *r)
{
    (void)r;
    return ensure_handler();
}

static int segfault_arm(pf_range *r, size_t first, size_t count)
{
    if (ensure_handler() != 0)
        return -1;
    return protect(r, first, count, PROT_READ);
}

static int segfault_disarm(pf_range *r, size_t first, size_t count)
{
    return protect(r, first, count, PROT_READ | PROT_WRITE);
}

/* The handler marks pages as they are written; all there is to check is that
 * it still runs. A SIGSEGV handler installed behind Python's back (a C
 * sigaction) sees every tracked write first: writes may have gone unrecorded,
 * so tracking of this range ends here, loudly. */
static int segfault_collect(pf_range *r)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current) != 0) {
        pf_oserror("sigaction");
        return -1;
    }
    if (is_ours(&current))
        return 0;
    protect(r, 0, atomic_load(&r->n_pages), PROT_READ | PROT_WRITE);
    PyErr_Clear();
    PyObject *exc = PyObject_CallFunction(
        PyExc_OSError, "is", ENOTRECOVERABLE,
        "another SIGSEGV handler was installed after tracking started (not through "
        "faulthandler or signal.signal, which pagefork follows): writes since then may be "
        "unrecorded, so tracking of this region stopped and its memory is writable again; "
        "start it again to re-install pagefork's handler on top");
    if (exc != NULL) {
        PyErr_SetObject(PyExc_OSError, exc);
        Py_DECREF(exc);
    }
    return -1;
}

static int segfault_detach(pf_range *r, size_t first, size_t count)
{
    (void)r;
    (void)first;
    (void)count;
    return 0; /* the handler stays installed, chaining what it does not own */
}

const pf_mode_ops pf_segfault_ops = {
    .attach = segfault_attach,
    .arm = segfault_arm,
    .disarm = segfault_disarm,
    .collect = segfault_collect,
    .detach = segfault_detach,
};
