/* pagefork._baseline: each tracking mechanism written plainly, in as few
 * lines of C as it takes, so benchmarks can put pagefork's cost beside the
 * kernel mechanism's own in the same process run. The library uses only its
 * write loop (`touch`), to measure each mode's write cost for `auto`.
 * Every function times itself with CLOCK_MONOTONIC and returns nanoseconds.
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../_native/pagefork.h" /* kernel constants the system headers may lack */

static size_t page;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* The write loop every measurement shares: one byte into each page. */
static int64_t touch_pages(uintptr_t start, size_t n, uint8_t value)
{
    int64_t t0 = now_ns();
    for (size_t i = 0; i < n; i++)
        *(volatile uint8_t *)(start + i * page) = value;
    return now_ns() - t0;
}

static PyObject *bl_touch(PyObject *self, PyObject *args)
{
    unsigned long long start;
    Py_ssize_t n;
    int value = 1;
    if (!PyArg_ParseTuple(args, "Kn|i", &start, &n, &value))
        return NULL;
    return PyLong_FromLongLong(touch_pages((uintptr_t)start, (size_t)n, (uint8_t)value));
}

/* ---- mprotect + SIGSEGV ----------------------------------------------------- */

static void raw_segv(int signo, siginfo_t *info, void *context)
{
    uintptr_t addr = (uintptr_t)info->si_addr & ~(uintptr_t)(page - 1);
    mprotect((void *)addr, page, PROT_READ | PROT_WRITE);
}

static PyObject *bl_segfault(PyObject *self, PyObject *args)
{
    unsigned long long start;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kn", &start, &n))
        return NULL;
    struct sigaction ours = {0}, old;
    ours.sa_sigaction = raw_segv;
    ours.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &ours, &old);
    int64_t t0 = now_ns();
    mprotect((void *)start, n * page, PROT_READ);
    int64_t arm = now_ns() - t0;
    int64_t touch = touch_pages(start, n, 2);
    t0 = now_ns();
    mprotect((void *)start, n * page, PROT_READ);
    int64_t rearm = now_ns() - t0;
    t0 = now_ns();
    mprotect((void *)start, n * page, PROT_READ | PROT_WRITE);
    int64_t disarm = now_ns() - t0;
    sigaction(SIGSEGV, &old, NULL);
    return Py_BuildValue("(LLLL)", arm, touch, rearm, disarm);
}

/* ---- userfaultfd ---------------------------------------------------------------- */

/* Like the tracker: when vm.unprivileged_userfaultfd=0 refuses a process
 * without CAP_SYS_PTRACE, fall back to user-mode-only (Linux 5.11+), where
 * only faults raised by user-space writes reach the handler. */
static int open_uffd(int features)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0 && errno == EPERM)
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (fd < 0)
        return -1;
    struct uffdio_api api = {.api = UFFD_API, .features = (__u64)features};
    if (ioctl(fd, UFFDIO_API, &api) != 0) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

/* Sets OSError from errno (or from `err` when non-zero) after closing `fd`s >= 0. */
static PyObject *fail_closing(int err, int fd1, int fd2)
{
    if (err == 0)
        err = errno;
    if (fd1 >= 0)
        close(fd1);
    if (fd2 >= 0)
        close(fd2);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static int wp(int fd, uintptr_t start, size_t len, int on)
{
    struct uffdio_writeprotect w = {.range = {start, len}, .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
    return ioctl(fd, UFFDIO_WRITEPROTECT, &w);
}

static int register_wp(int fd, uintptr_t start, size_t len)
{
    struct uffdio_register r = {.range = {start, len}, .mode = UFFDIO_REGISTER_MODE_WP};
    return ioctl(fd, UFFDIO_REGISTER, &r);
}

/* The fault thread's descriptors: the userfaultfd, and an eventfd that asks
 * it to return (pthread_cancel would unwind past instrumented frames and
 * leave ASan's stack poison behind). */
struct raw_fds {
    int uffd, stop;
};

static void *raw_fault_thread(void *arg)
{
    const struct raw_fds *fds = arg;
    struct uffd_msg msg;
    for (;;) {
        struct pollfd p[2] = {{fds->uffd, POLLIN, 0}, {fds->stop, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        if (p[1].revents || (p[0].revents & (POLLERR | POLLHUP)))
            return NULL;
        if (read(fds->uffd, &msg, sizeof msg) != sizeof msg)
            continue;
        if (msg.event == UFFD_EVENT_PAGEFAULT)
            wp(fds->uffd, msg.arg.pagefault.address & ~(uint64_t)(page - 1), page, 0);
    }
}

static PyObject *bl_uffd(PyObject *self, PyObject *args)
{
    unsigned long long start;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kn", &start, &n))
        return NULL;
    struct raw_fds fds = {open_uffd(UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM), -1};
    if (fds.uffd < 0)
        return fail_closing(0, -1, -1);
    fds.stop = eventfd(0, EFD_CLOEXEC);
    if (fds.stop < 0 || register_wp(fds.uffd, start, n * page) != 0)
        return fail_closing(0, fds.uffd, fds.stop);
    struct uffdio_range range = {start, n * page};
    pthread_t thread;
    int err = pthread_create(&thread, NULL, raw_fault_thread, &fds);
    if (err != 0) {
        ioctl(fds.uffd, UFFDIO_UNREGISTER, &range);
        return fail_closing(err, fds.uffd, fds.stop);
    }
    int64_t t0 = now_ns();
    wp(fds.uffd, start, n * page, 1);
    int64_t arm = now_ns() - t0;
    int64_t touch = touch_pages(start, n, 3);
    t0 = now_ns();
    wp(fds.uffd, start, n * page, 1);
    int64_t rearm = now_ns() - t0;
    t0 = now_ns();
    wp(fds.uffd, start, n * page, 0);
    int64_t disarm = now_ns() - t0;
    ioctl(fds.uffd, UFFDIO_UNREGISTER, &range);
    uint64_t one = 1;
    if (write(fds.stop, &one, sizeof one) != sizeof one)
        pthread_cancel(thread); /* cannot happen for an eventfd at 0; never hang in join */
    pthread_join(thread, NULL);
    close(fds.stop);
    close(fds.uffd);
    return Py_BuildValue("(LLLL)", arm, touch, rearm, disarm);
}

/* PAGEMAP_SCAN over [start, start + n pages); returns pages matched. */
static long scan(int pagemap, uintptr_t start, size_t n, struct pm_scan_arg *tmpl)
{
    static struct page_region vec[512];
    long found = 0;
    uintptr_t end = start + n * page, at = start;
    while (at < end) {
        struct pm_scan_arg a = *tmpl;
        a.size = sizeof a;
        a.start = at;
        a.end = end;
        a.vec = (uintptr_t)vec;
        a.vec_len = 512;
        long got = ioctl(pagemap, PAGEMAP_SCAN, &a);
        if (got < 0)
            return -1;
        for (long i = 0; i < got; i++)
            found += (long)((vec[i].end - vec[i].start) / page);
        at = a.walk_end;
    }
    return found;
}

static PyObject *bl_uffd_async(PyObject *self, PyObject *args)
{
    unsigned long long start;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kn", &start, &n))
        return NULL;
    int fd = open_uffd(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED |
                       UFFD_FEATURE_WP_HUGETLBFS_SHMEM);
    if (fd < 0)
        return fail_closing(0, -1, -1);
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pagemap < 0 || register_wp(fd, start, n * page) != 0)
        return fail_closing(0, fd, pagemap);
    int64_t t0 = now_ns();
    wp(fd, start, n * page, 1);
    int64_t arm = now_ns() - t0;
    int64_t touch = touch_pages(start, n, 4);
    struct pm_scan_arg tmpl = {.flags = PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                               .category_mask = PAGE_IS_WRITTEN, .return_mask = PAGE_IS_WRITTEN};
    t0 = now_ns();
    long found = scan(pagemap, start, n, &tmpl);
    int64_t rearm = now_ns() - t0;
    struct uffdio_range range = {start, n * page};
    ioctl(fd, UFFDIO_UNREGISTER, &range);
    close(pagemap);
    close(fd);
    return Py_BuildValue("(LLLl)", arm, touch, rearm, found);
}

/* ---- copy-on-write of a private memfd mapping ----------------------------------- */

static PyObject *bl_cow(PyObject *self, PyObject *args)
{
    unsigned long long start;
    Py_ssize_t n;
    int memfd;
    if (!PyArg_ParseTuple(args, "Kni", &start, &n, &memfd))
        return NULL;
    int64_t t0 = now_ns();
    if (mmap((void *)start, n * page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, memfd, 0) ==
        MAP_FAILED)
        return PyErr_SetFromErrno(PyExc_OSError);
    int64_t arm = now_ns() - t0;
    int64_t touch = touch_pages(start, n, 5);
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    struct pm_scan_arg tmpl = {.category_inverted = PAGE_IS_FILE | PAGE_IS_PFNZERO,
                               .category_mask = PAGE_IS_FILE | PAGE_IS_PFNZERO,
                               .category_anyof_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                               .return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED};
    t0 = now_ns();
    long found = scan(pagemap, start, n, &tmpl);
    int64_t read = now_ns() - t0;
    close(pagemap);
    return Py_BuildValue("(LLLl)", arm, touch, read, found);
}

/* ---- soft-dirty ----------------------------------------------------------------- */

static PyObject *bl_softpte(PyObject *self, PyObject *args)
{
    unsigned long long start;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "Kn", &start, &n))
        return NULL;
    int64_t t0 = now_ns();
    int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, "4", 1) != 1)
        return fail_closing(0, fd, -1);
    close(fd);
    int64_t arm = now_ns() - t0;
    int64_t touch = touch_pages(start, n, 6);
    int pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    uint64_t entries[512];
    long found = 0;
    t0 = now_ns();
    for (size_t done = 0; done < (size_t)n;) {
        size_t want = (size_t)n - done < 512 ? (size_t)n - done : 512;
        ssize_t got = pread(pagemap, entries, want * 8, (off_t)((start / page + done) * 8));
        if (got <= 0)
            break;
        for (size_t i = 0; i < (size_t)got / 8; i++)
            found += (entries[i] >> 55) & 1;
        done += (size_t)got / 8;
    }
    int64_t read = now_ns() - t0;
    close(pagemap);
    return Py_BuildValue("(LLLl)", arm, touch, read, found);
}

/* ---- memcmp of pages (the diff benchmarks' baseline) ------------------------------ */

static PyObject *bl_memcmp(PyObject *self, PyObject *args)
{
    Py_buffer a, b;
    if (!PyArg_ParseTuple(args, "y*y*", &a, &b))
        return NULL;
    Py_ssize_t len = a.len < b.len ? a.len : b.len;
    int64_t t0 = now_ns();
    volatile int sink = 0;
    for (Py_ssize_t off = 0; off < len; off += (Py_ssize_t)page) {
        Py_ssize_t chunk = len - off < (Py_ssize_t)page ? len - off : (Py_ssize_t)page;
        sink += memcmp((char *)a.buf + off, (char *)b.buf + off, (size_t)chunk) != 0;
    }
    int64_t elapsed = now_ns() - t0;
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyLong_FromLongLong(elapsed);
}

static PyMethodDef methods[] = {
    {"touch", bl_touch, METH_VARARGS, "touch(address, n_pages, value=1) -> ns"},
    {"segfault", bl_segfault, METH_VARARGS, "segfault(address, n) -> (arm, touch, rearm, disarm) ns"},
    {"uffd", bl_uffd, METH_VARARGS, "uffd(address, n) -> (arm, touch, rearm, disarm) ns"},
    {"uffd_async", bl_uffd_async, METH_VARARGS, "uffd_async(address, n) -> (arm, touch, rearm, found)"},
    {"cow", bl_cow, METH_VARARGS, "cow(address, n, memfd) -> (map, touch, read, found)"},
    {"softpte", bl_softpte, METH_VARARGS, "softpte(address, n) -> (arm, touch, read, found)"},
    {"memcmp", bl_memcmp, METH_VARARGS, "memcmp(a, b) -> ns to compare page by page"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pagefork._baseline",
    .m_doc = "Raw kernel mechanisms, for benchmarks.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__baseline(void)
{
    page = (size_t)sysconf(_SC_PAGESIZE);
    return PyModule_Create(&module);
}
