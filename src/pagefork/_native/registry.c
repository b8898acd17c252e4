/* Tracked ranges, shared by the fault handlers.
 *
 * The SIGSEGV handler and the userfaultfd thread look ranges up here without
 * locks: a fixed array of pointers published with release stores. A handler
 * pins a range by bumping its `inflight` count and re-checking the slot;
 * unpublishing clears the slot and then waits for `inflight` to drain, so a
 * range is never freed under a handler. Functions marked async-signal-safe
 * use only atomics and syscalls.
 */
#include "pagefork.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static pf_range *_Atomic registry[PF_MAX_RANGES];
static _Atomic int registry_top; /* slots at or above this index are empty */

/* Initial-exec TLS: the default model of a dlopen'ed module may allocate on
 * first access, which a signal handler must never do. */
static __thread pid_t cached_tid __attribute__((tls_model("initial-exec")));

static void forget_tid_in_child(void) { cached_tid = 0; }
static void register_atfork(void) { pthread_atfork(NULL, NULL, forget_tid_in_child); }

pid_t pf_current_tid(void)
{
    if (cached_tid == 0)
        cached_tid = (pid_t)syscall(SYS_gettid);
    return cached_tid;
}

pf_range *pf_range_new(int mode, uintptr_t start, size_t n_pages, size_t max_pages, int shared)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_atfork);

    pf_range *r = calloc(1, sizeof *r);
    if (r == NULL)
        return NULL;
    r->global = calloc(max_pages ? max_pages : 1, 1);
    if (r->global == NULL) {
        free(r);
        return NULL;
    }
    r->start = start;
    r->n_pages = n_pages;
    r->max_pages = max_pages;
    r->mode = mode;
    r->shared = shared;
    return r;
}

void pf_range_free(pf_range *r)
{
    if (r == NULL)
        return;
    for (int i = 0; i < PF_MAX_THREADS; i++)
        free(r->threads[i].flags);
    free(r->global);
    free(r);
}

int pf_registry_publish(pf_range *r)
{
    for (int i = 0; i < PF_MAX_RANGES; i++) {
        pf_range *expected = NULL;
        if (atomic_compare_exchange_strong(&registry[i], &expected, r)) {
            int top = atomic_load(&registry_top);
            while (top < i + 1 && !atomic_compare_exchange_weak(&registry_top, &top, i + 1))
                ;
            return 0;
        }
    }
    errno = ENOSPC;
    return -1;
}

void pf_registry_unpublish(pf_range *r)
{
    for (int i = 0; i < PF_MAX_RANGES; i++) {
        pf_range *expected = r;
        if (atomic_compare_exchange_strong(&registry[i], &expected, NULL))
            break;
    }
    while (atomic_load(&r->inflight) > 0)
        sched_yield();
}

pf_range *pf_registry_acquire(uintptr_t addr, int mode)
{
    int top = atomic_load_explicit(&registry_top, memory_order_acquire);
    for (int i = 0; i < top; i++) {
        pf_range *r = atomic_load_explicit(&registry[i], memory_order_acquire);
        if (r == NULL || r->mode != mode || addr < r->start)
            continue;
        size_t n = atomic_load_explicit(&r->n_pages, memory_order_relaxed);
        if (addr >= r->start + n * pf_page_size)
            continue;
        for (;;) {
            atomic_fetch_add(&r->inflight, 1);
            if (atomic_load(&registry[i]) != r) {
                atomic_fetch_sub(&r->inflight, 1); /* unpublished meanwhile */
                break;
            }
            if (!atomic_load(&r->collecting))
                return r;
            /* A read-and-re-arm is between re-protecting and taking the
             * flags: un-protecting now could leave a page writable whose
             * mark that read already took. Wait it out (it never waits on
             * anything a faulting thread holds). */
            atomic_fetch_sub(&r->inflight, 1);
            while (atomic_load(&r->collecting))
                sched_yield();
        }
    }
    return NULL;
}

void pf_range_begin_exclusive(pf_range *r)
{
    atomic_store(&r->collecting, 1);
    while (atomic_load(&r->inflight) > 0)
        sched_yield();
}

void pf_range_end_exclusive(pf_range *r)
{
    atomic_store(&r->collecting, 0);
}

void pf_registry_release(pf_range *r)
{
    atomic_fetch_sub_explicit(&r->inflight, 1, memory_order_release);
}

void pf_registry_foreach(int mode, pf_range *skip, void (*fn)(pf_range *))
{
    int top = atomic_load(&registry_top);
    for (int i = 0; i < top; i++) {
        pf_range *r = atomic_load(&registry[i]);
        if (r != NULL && r != skip && r->mode == mode)
            fn(r);
    }
}

void pf_range_mark(pf_range *r, uintptr_t addr, pid_t tid)
{
    size_t page = (addr - r->start) / pf_page_size;
    if (page >= r->max_pages)
        return;
    if (atomic_load_explicit(&r->global_active, memory_order_relaxed))
        __atomic_store_n(&r->global[page], 1, __ATOMIC_RELAXED);
    if (atomic_load_explicit(&r->threads_active, memory_order_relaxed) == 0)
        return;
    if (tid == 0)
        tid = pf_current_tid();
    for (int i = 0; i < PF_MAX_THREADS; i++) {
        pf_thread_slot *s = &r->threads[i];
        if (atomic_load_explicit(&s->tid, memory_order_acquire) == tid) {
            if (atomic_load_explicit(&s->active, memory_order_relaxed))
                __atomic_store_n(&s->flags[page], 1, __ATOMIC_RELAXED);
            return;
        }
    }
}

pf_thread_slot *pf_range_thread_slot(pf_range *r, pid_t tid, int create)
{
    pf_thread_slot *unused = NULL, *stopped = NULL;
    for (int i = 0; i < PF_MAX_THREADS; i++) {
        pf_thread_slot *s = &r->threads[i];
        pid_t owner = atomic_load(&s->tid);
        if (owner == tid)
            return s;
        if (owner == 0 && unused == NULL)
            unused = s;
        else if (owner != 0 && stopped == NULL && !atomic_load(&s->active))
            stopped = s;
    }
    /* Prefer a never-used slot so stopped threads keep their flags readable. */
    pf_thread_slot *slot = unused ? unused : stopped;
    if (!create || slot == NULL) {
        errno = create ? ENOSPC : ENOENT;
        return NULL;
    }
    atomic_store(&slot->tid, 0); /* hide it from handlers while it is reset */
    atomic_store(&slot->active, 0);
    if (slot->flags == NULL) {
        slot->flags = calloc(r->max_pages ? r->max_pages : 1, 1);
        if (slot->flags == NULL)
            return NULL;
    } else {
        memset(slot->flags, 0, r->max_pages);
    }
    atomic_store_explicit(&slot->tid, tid, memory_order_release);
    return slot;
}
