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
/* Handlers between loading a range pointer and pinning it (inflight): an
 * unpublished range is freed only once none is left, so a handler never
 * reads a range that was freed under it. */
static _Atomic int registry_readers;

/* Every live range (published or not), for threads releasing their slots at
 * exit; they run without the GIL, so a mutex guards the list against
 * pf_range_free. Never taken in a signal handler. */
static pf_range *all_ranges;
static pthread_mutex_t all_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_key_t exit_key;

/* Initial-exec TLS: the default model of a dlopen'ed module may allocate on
 * first access, which a signal handler must never do. */
static __thread pid_t cached_tid __attribute__((tls_model("initial-exec")));

/* What each mechanism drops in a fork()ed child (pf_registry_add_fork_hook),
 * run in the order added. Filled at module init, before any fork. */
#define PF_MAX_FORK_HOOKS 8
static void (*fork_hooks[PF_MAX_FORK_HOOKS])(void);
static int n_fork_hooks;

int pf_registry_add_fork_hook(void (*hook)(void))
{
    if (n_fork_hooks == PF_MAX_FORK_HOOKS)
        return -1;
    fork_hooks[n_fork_hooks++] = hook;
    return 0;
}

static void lock_all(void) { pthread_mutex_lock(&all_lock); }
static void unlock_all(void) { pthread_mutex_unlock(&all_lock); }

/* The child has only the forking thread: handlers, fault threads and
 * read-and-re-arms that were running in other threads at fork() will never
 * finish here, so their counts must not make the child wait for them. */
static void forget_tid_in_child(void)
{
    for (pf_range *r = all_ranges; r != NULL; r = r->next_all) {
        atomic_store(&r->inflight, 0);
        atomic_store(&r->collecting, 0);
    }
    atomic_store(&registry_readers, 0);
    pthread_mutex_unlock(&all_lock); /* held across fork by lock_all */
    cached_tid = 0;
    for (int i = 0; i < n_fork_hooks; i++)
        fork_hooks[i]();
}

/* pthread key destructor: the thread is exiting. Runs without the GIL. */
static void release_thread_slots(void *unused)
{
    (void)unused;
    pid_t tid = pf_current_tid();
    pthread_mutex_lock(&all_lock);
    for (pf_range *r = all_ranges; r != NULL; r = r->next_all)
        for (int i = 0; i < PF_MAX_THREADS; i++) {
            pf_thread_slot *s = &r->threads[i];
            if (atomic_load(&s->tid) != tid)
                continue;
            if (atomic_exchange(&s->active, 0))
                atomic_fetch_sub(&r->threads_active, 1);
            atomic_store(&s->tid, 0);
        }
    pthread_mutex_unlock(&all_lock);
}

static void init_once(void)
{
    pthread_atfork(lock_all, unlock_all, forget_tid_in_child);
    pthread_key_create(&exit_key, release_thread_slots);
}

static pthread_once_t once = PTHREAD_ONCE_INIT;

void pf_thread_tracking_started(void)
{
    pthread_once(&once, init_once);
    pthread_setspecific(exit_key, (void *)1); /* non-NULL: the destructor runs */
}

pid_t pf_current_tid(void)
{
    if (cached_tid == 0)
        cached_tid = (pid_t)syscall(SYS_gettid);
    return cached_tid;
}

pf_range *pf_range_new(int mode, uintptr_t start, size_t n_pages, size_t max_pages, int shared)
{
    pthread_once(&once, init_once);

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
    pthread_mutex_lock(&all_lock);
    r->next_all = all_ranges;
    if (all_ranges != NULL)
        all_ranges->prev_all = r;
    all_ranges = r;
    pthread_mutex_unlock(&all_lock);
    return r;
}

void pf_range_free(pf_range *r)
{
    if (r == NULL)
        return;
    pthread_mutex_lock(&all_lock);
    if (r->prev_all != NULL)
        r->prev_all->next_all = r->next_all;
    else
        all_ranges = r->next_all;
    if (r->next_all != NULL)
        r->next_all->prev_all = r->prev_all;
    pthread_mutex_unlock(&all_lock);
    for (int i = 0; i < PF_MAX_THREADS; i++)
        free(r->threads[i].flags);
    free(r->swap_hashes);
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
    /* Lower the top past empty slots so handlers scan only what is in use.
     * Publishing and unpublishing both hold the GIL: no publish races this. */
    int top = atomic_load(&registry_top);
    while (top > 0 && atomic_load(&registry[top - 1]) == NULL)
        top--;
    atomic_store(&registry_top, top);
    while (atomic_load(&registry_readers) > 0)
        sched_yield();
    while (atomic_load(&r->inflight) > 0)
        sched_yield();
}

pf_range *pf_registry_acquire(uintptr_t addr, int mode)
{
    atomic_fetch_add(&registry_readers, 1);
    pf_range *found = NULL;
    int top = atomic_load(&registry_top);
    for (int i = 0; i < top && found == NULL; i++) {
        pf_range *r = atomic_load(&registry[i]);
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
            if (!atomic_load(&r->collecting)) {
                found = r; /* pinned: unpublish now waits for its release */
                break;
            }
            /* A read-and-re-arm is between re-protecting and taking the
             * flags: un-protecting now could leave a page writable whose
             * mark that read already took. Wait it out (it never waits on
             * anything a faulting thread holds). */
            atomic_fetch_sub(&r->inflight, 1);
            while (atomic_load(&r->collecting))
                sched_yield();
        }
    }
    atomic_fetch_sub(&registry_readers, 1);
    return found;
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
