/* Pages tracking must leave alone, and report written at every read.
 *
 * Alternate signal stacks (sigaltstack). The kernel writes a signal frame
 * there for every handler installed with SA_ONSTACK (Python's own handlers,
 * faulthandler, pagefork's SIGSEGV handler). Where the kernel's own writes to
 * an armed page fail (segfault mode's read-only pages; uffd when userfaultfd
 * is user-mode-only), it cannot write the frame and kills the process with
 * SIGSEGV at the thread's next signal; no handler runs, so nothing in one
 * could help. So every arm leaves the alternate stacks of the threads known
 * here unprotected (holes), and the pages count as written at every read
 * (signal frames do change them). A thread is known by the calls it makes:
 * each records its stack (pf_altstack_note). A thread that points its stack
 * into armed memory dies at its next signal unless it calls pagefork first.
 *
 * Long-term pins. io_uring fixed buffers (IORING_REGISTER_BUFFERS) are
 * written through the kernel's pin of the pages, never through the page
 * tables: no mode sees those writes. /proc/self/status VmPin says whether
 * anything is pinned; the ring's fdinfo lists its buffers. Pinned pages of a
 * range count as written at every read until they are unregistered. Other
 * long-term pins (RDMA memory regions, vfio) cannot be located.
 *
 * Everything here runs with the GIL held, never in a signal handler.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- spans -------------------------------------------------------------- */

/* Adds [first, first + count) to a sorted list of disjoint spans, merging
 * neighbours; past `max` spans the list collapses into one covering span
 * (more pages reported written, never fewer). */
void pf_spans_add(pf_span *spans, size_t *n, size_t max, size_t first, size_t count)
{
    if (count == 0)
        return;
    size_t end = first + count, i = 0;
    while (i < *n && spans[i].first + spans[i].count < first)
        i++;
    size_t j = i; /* spans i..j-1 touch the new one: merged into it */
    while (j < *n && spans[j].first <= end) {
        if (spans[j].first < first)
            first = spans[j].first;
        if (spans[j].first + spans[j].count > end)
            end = spans[j].first + spans[j].count;
        j++;
    }
    if (j == i && *n == max) {
        size_t lo = first < spans[0].first ? first : spans[0].first;
        size_t last = spans[*n - 1].first + spans[*n - 1].count;
        spans[0] = (pf_span){lo, (end > last ? end : last) - lo};
        *n = 1;
        return;
    }
    memmove(&spans[i + 1], &spans[j], (*n - j) * sizeof *spans);
    spans[i] = (pf_span){first, end - first};
    *n = *n - (j - i) + 1;
}

/* Whether [first, first + count) lies inside the spans. */
int pf_spans_cover(const pf_span *spans, size_t n, size_t first, size_t count)
{
    for (size_t i = 0; i < n; i++)
        if (spans[i].first <= first && first + count <= spans[i].first + spans[i].count)
            return 1;
    return 0;
}

/* Pages of [start, start + n_pages) that [lo, hi) touches, as a span. */
static int clip(uintptr_t start, size_t n_pages, uintptr_t lo, uintptr_t hi, pf_span *out)
{
    uintptr_t end = start + n_pages * pf_page_size;
    if (hi <= start || lo >= end || hi <= lo)
        return 0;
    if (lo < start)
        lo = start;
    if (hi > end)
        hi = end;
    out->first = (lo - start) / pf_page_size;
    out->count = (hi - start + pf_page_size - 1) / pf_page_size - out->first;
    return 1;
}

/* Marks every page of r's holes and pinned spans as written: for the
 * process, and for every tracked thread (the writer is unknown). */
void pf_spans_mark(pf_range *r)
{
    size_t n = atomic_load(&r->n_pages);
    const pf_span *lists[2] = {r->holes, r->pinned};
    size_t counts[2] = {r->n_holes, r->n_pinned};
    for (int l = 0; l < 2; l++)
        for (size_t i = 0; i < counts[l]; i++) {
            size_t first = lists[l][i].first;
            if (first >= n)
                continue;
            size_t count = lists[l][i].count;
            if (count > n - first)
                count = n - first;
            if (atomic_load(&r->global_active))
                memset(r->global + first, 1, count);
            for (int t = 0; atomic_load(&r->threads_active) > 0 && t < PF_MAX_THREADS; t++) {
                pf_thread_slot *s = &r->threads[t];
                if (atomic_load(&s->tid) != 0 && atomic_load(&s->active))
                    memset(s->flags + first, 1, count);
            }
        }
}

/* ---- alternate signal stacks ------------------------------------------- */

/* Threads that told us (by calling pagefork) about an enabled alternate
 * stack. Guarded by the GIL. The list grows with the threads: forgetting a
 * live thread's stack would protect it at the next arm and kill the thread
 * at its next signal, so entries go only when their thread has exited (or
 * when memory for one more entry cannot be had). */
typedef struct {
    pid_t tid;
    pid_t pid; /* the process that recorded it: a forked child forgets */
    uintptr_t lo, hi;
} known_stack;
static known_stack *known;
static size_t n_known, known_capacity, next_evict;

static int thread_alive(pid_t pid, pid_t tid)
{
    return pid == getpid() && (syscall(SYS_tgkill, pid, tid, 0) == 0 || errno != ESRCH);
}

/* Index of a free entry: drops exited threads first, then grows the list;
 * only without memory does it reuse a live thread's entry (round robin). */
static size_t known_slot(void)
{
    if (n_known == known_capacity)
        for (size_t k = 0; k < n_known;)
            if (!thread_alive(known[k].pid, known[k].tid))
                known[k] = known[--n_known];
            else
                k++;
    if (n_known == known_capacity) {
        size_t capacity = known_capacity ? 2 * known_capacity : 64;
        known_stack *grown = realloc(known, capacity * sizeof *known);
        if (grown == NULL)
            return n_known == 0 ? SIZE_MAX : next_evict++ % n_known;
        known = grown;
        known_capacity = capacity;
    }
    return n_known++;
}

int pf_altstack_note(stack_t *out)
{
    stack_t ss;
    if (sigaltstack(NULL, &ss) != 0)
        return 0;
    pid_t tid = pf_current_tid(), pid = getpid();
    int enabled = !(ss.ss_flags & SS_DISABLE) && ss.ss_size > 0;
    if (out != NULL)
        *out = ss;
    size_t i = 0;
    while (i < n_known && !(known[i].tid == tid && known[i].pid == pid))
        i++;
    if (!enabled) {
        if (i < n_known)
            known[i] = known[--n_known];
        return 0;
    }
    if (i == n_known && (i = known_slot()) == SIZE_MAX)
        return 1;
    known[i].tid = tid;
    known[i].pid = pid;
    known[i].lo = (uintptr_t)ss.ss_sp;
    known[i].hi = (uintptr_t)ss.ss_sp + ss.ss_size;
    return 1;
}

/* The holes of [first, first + count) of r: the known live threads'
 * alternate stacks, added to `out`. */
void pf_altstack_holes(pf_range *r, size_t first, size_t count, pf_span *out, size_t *n_out)
{
    pf_altstack_note(NULL);
    for (size_t i = 0; i < n_known;) {
        if (!thread_alive(known[i].pid, known[i].tid)) {
            known[i] = known[--n_known];
            continue;
        }
        pf_span s;
        if (clip(r->start + first * pf_page_size, count, known[i].lo, known[i].hi, &s))
            pf_spans_add(out, n_out, PF_MAX_SPANS, first + s.first, s.count);
        i++;
    }
}

/* The calling thread's alternate stack within r, if any (pages). */
int pf_altstack_own(pf_range *r, pf_span *out)
{
    stack_t ss;
    if (!pf_altstack_note(&ss))
        return 0;
    return clip(r->start, atomic_load(&r->n_pages), (uintptr_t)ss.ss_sp,
                (uintptr_t)ss.ss_sp + ss.ss_size, out);
}

/* ---- long-term pins ----------------------------------------------------- */

static char *status_text; /* grown to hold the whole file */
static size_t status_capacity;

/* VmPin of this process in kB, or -1 when it cannot be read. The file is
 * read whole, in one read (a consistent copy): lines before VmPin can be
 * long (Groups: up to 65536 supplementary groups), so a fixed buffer would
 * miss it. Opened on every call: a descriptor kept open could be closed and
 * its number reused by the program (pagefork would read another file, or
 * close the program's in a forked child). */
static long pinned_kb(void)
{
    int fd = open("/proc/self/status", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t got;
    for (;;) {
        if (status_capacity == 0 ||
            (got = pread(fd, status_text, status_capacity - 1, 0)) == (ssize_t)status_capacity - 1) {
            size_t capacity = status_capacity ? 2 * status_capacity : 4096;
            char *grown = capacity > ((size_t)1 << 24) ? NULL : realloc(status_text, capacity);
            if (grown == NULL) {
                close(fd);
                return -1;
            }
            status_text = grown;
            status_capacity = capacity;
            continue;
        }
        break;
    }
    close(fd);
    if (got <= 0)
        return -1;
    status_text[got] = '\0';
    const char *line = strstr(status_text, "\nVmPin:");
    return line == NULL ? -1 : strtol(line + 7, NULL, 10);
}

/* Adds the registered buffers of the io_uring behind descriptor `fd` that
 * touch [start, start + n_pages) to `out`. fdinfo lists them after a
 * "UserBufs:\t<count>" line as "<index>: 0x<address>/<length>", or
 * "<index>: <none>" for an empty slot (a sparse table, a buffer updated
 * away). Returns 0, or -1 when the list was incomplete: the kernel prints
 * the entries only when it gets the ring's lock without waiting (another
 * thread submitting or registering holds it). */
static int ring_buffers(int fd, uintptr_t start, size_t n_pages, pf_span *out, size_t *n_out)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0; /* closed meanwhile: its buffers went with it (or with a dup, seen there) */
    char line[256];
    int in_buffers = 0;
    unsigned long expected = 0, seen = 0;
    int header = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        if (strncmp(line, "UserBufs:", 9) == 0) {
            expected = strtoul(line + 9, NULL, 10);
            header = in_buffers = 1;
            continue;
        }
        if (!in_buffers)
            continue;
        unsigned index;
        int at = 0;
        if (sscanf(line, " %u:%n", &index, &at) != 1 || at == 0) {
            in_buffers = 0;
            continue;
        }
        seen++;
        unsigned long long address, length;
        pf_span s;
        if (sscanf(line + at, " 0x%llx/%llu", &address, &length) == 2 &&
            clip(start, n_pages, (uintptr_t)address, (uintptr_t)(address + length), &s))
            pf_spans_add(out, n_out, PF_MAX_SPANS, s.first, s.count);
    }
    fclose(f);
    return header && seen == expected ? 0 : -1;
}

/* Best effort: where /proc cannot be read, nothing is found. A ring whose
 * buffer list stays incomplete (its lock held at every try) may pin any
 * page: then the whole memory counts as pinned. */
void pf_pinned_spans(uintptr_t start, size_t n_pages, pf_span *out, size_t *n_out)
{
    if (pinned_kb() == 0) /* one read when nothing is pinned; unreadable: look anyway */
        return;
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL)
        return;
    struct dirent *e;
    while ((e = readdir(dir)) != NULL) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        char path[64], target[64];
        snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
        ssize_t len = readlink(path, target, sizeof target - 1);
        if (len <= 0)
            continue;
        target[len] = '\0';
        if (strcmp(target, "anon_inode:[io_uring]") != 0)
            continue;
        int complete = 0;
        for (int attempt = 0; !complete && attempt < 100; attempt++) {
            pf_span found[PF_MAX_SPANS];
            size_t n_found = 0;
            if (attempt > 0)
                sched_yield();
            if (ring_buffers(atoi(e->d_name), start, n_pages, found, &n_found) == 0) {
                complete = 1;
                for (size_t i = 0; i < n_found; i++)
                    pf_spans_add(out, n_out, PF_MAX_SPANS, found[i].first, found[i].count);
            }
        }
        if (!complete)
            pf_spans_add(out, n_out, PF_MAX_SPANS, 0, n_pages);
    }
    closedir(dir);
}

/* _native.pinned_pages(address, n_pages) -> [(first, count), ...]: pages of
 * that memory pinned by io_uring fixed buffers of this process. */
PyObject *pf_pinned_pages(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long address;
    Py_ssize_t n_pages;
    if (!PyArg_ParseTuple(args, "Kn", &address, &n_pages))
        return NULL;
    if (n_pages < 0 || address % pf_page_size != 0 ||
        (unsigned long long)n_pages > (UINTPTR_MAX - address) / pf_page_size) {
        PyErr_SetString(PyExc_ValueError, "pinned_pages: a page-aligned address and a page count");
        return NULL;
    }
    pf_span spans[PF_MAX_SPANS];
    size_t n = 0;
    pf_pinned_spans((uintptr_t)address, (size_t)n_pages, spans, &n);
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list != NULL && i < n; i++) {
        PyObject *item = Py_BuildValue("(nn)", (Py_ssize_t)spans[i].first, (Py_ssize_t)spans[i].count);
        if (item == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}
