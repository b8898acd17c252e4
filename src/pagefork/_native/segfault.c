/* `segfault` mode: pages are mprotect'ed read-only; the first write to each
 * raises SIGSEGV, whose handler marks the page and makes it writable again.
 *
 * The handler must never allocate, take a lock a faulting thread might hold,
 * or touch Python: it only reads the lock-free registry, stores flag bytes and
 * calls mprotect. Faults it does not own go to the handler that was installed
 * before it, so faulthandler and real crashes behave as without pagefork.
 * Kernel writes (read(2) into a protected page) fail with EFAULT: the kernel
 * does not raise SIGSEGV for them.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

/* The previous handler, double-buffered so a re-install never tears it
 * under a handler running on another thread. */
static struct sigaction previous[2];
static _Atomic int previous_index;

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

static void chain(int signo, siginfo_t *info, void *context)
{
    const struct sigaction *prev = &previous[atomic_load(&previous_index)];
    if (prev->sa_flags & SA_SIGINFO) {
        prev->sa_sigaction(signo, info, context);
    } else if (prev->sa_handler != SIG_DFL && prev->sa_handler != SIG_IGN) {
        prev->sa_handler(signo);
    } else {
        /* Default action: let the re-executed fault (or the re-raised
         * signal, when it was sent) terminate the process as usual. */
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(signo, &dfl, NULL);
        if (info->si_code <= 0)
            raise(signo);
        return;
    }
    /* A chained handler that reported and re-raised (faulthandler does this
     * after putting us back as its own "previous") would bounce between the
     * two forever: let the pending signal take the default action. */
    sigset_t pending;
    if (sigpending(&pending) == 0 && sigismember(&pending, signo)) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigaction(signo, &dfl, NULL);
    }
}

static void on_segv(int signo, siginfo_t *info, void *context)
{
    int saved_errno = errno;
    if (info->si_code == SEGV_ACCERR && is_write_fault(context)) {
        uintptr_t addr = (uintptr_t)info->si_addr;
        pf_range *r = pf_registry_acquire(addr, PF_MODE_SEGFAULT);
        if (r != NULL) {
            pf_range_mark(r, addr, 0);
            mprotect((void *)(addr & ~(uintptr_t)(pf_page_size - 1)), pf_page_size,
                     PROT_READ | PROT_WRITE);
            pf_registry_release(r);
            errno = saved_errno;
            return;
        }
    }
    errno = saved_errno;
    chain(signo, info, context);
}

/* Installs the handler unless it is already the current one (something like
 * faulthandler.enable() may have replaced it since the last start). */
static int ensure_handler(void)
{
    struct sigaction current;
    if (sigaction(SIGSEGV, NULL, &current) != 0) {
        pf_oserror("sigaction");
        return -1;
    }
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_segv)
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
    return 0;
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

static int segfault_collect(pf_range *r)
{
    (void)r;
    return 0; /* the handler marks pages as they are written */
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
