/* Kernel I/O for the tests of what dirty tracking cannot see
 * (tests/test_tracking_kernel.py builds it with the system cc and loads it
 * with ctypes). Test code, raw syscalls, no liburing:
 * - a minimal io_uring client: one ring, one request at a time: submit a
 *   read (plain or into a registered "fixed" buffer, optionally
 *   IOSQE_ASYNC), then wait for its completion;
 * - a blocker: one page whose first touch waits until the test releases it
 *   (userfaultfd in missing mode), to hold a direct read between pinning
 *   its pages and reading into them.
 * Every function returns 0 (or a byte count) on success and -errno on
 * failure. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/io_uring.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

struct ring {
    int fd;
    void *sq_map, *cq_map;
    size_t sq_len, cq_len, sqes_len;
    unsigned *sq_tail, *sq_mask, *sq_array;
    struct io_uring_sqe *sqes;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_cqe *cqes;
};

void ring_close(struct ring *r)
{
    if (r == NULL)
        return;
    if (r->sqes != NULL && r->sqes != MAP_FAILED)
        munmap(r->sqes, r->sqes_len);
    if (r->cq_map != NULL && r->cq_map != MAP_FAILED && r->cq_map != r->sq_map)
        munmap(r->cq_map, r->cq_len);
    if (r->sq_map != NULL && r->sq_map != MAP_FAILED)
        munmap(r->sq_map, r->sq_len);
    if (r->fd >= 0)
        close(r->fd);
    free(r);
}

/* Opens a ring of 8 entries into *out. -errno: io_uring_setup refused
 * (ENOSYS: no io_uring; EPERM: kernel.io_uring_disabled or seccomp). */
int ring_open(struct ring **out)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    int fd = (int)syscall(__NR_io_uring_setup, 8, &p);
    if (fd < 0)
        return -errno;
    struct ring *r = calloc(1, sizeof *r);
    if (r == NULL) {
        close(fd);
        return -ENOMEM;
    }
    r->fd = fd;
    r->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    if (p.features & IORING_FEAT_SINGLE_MMAP) {
        if (r->cq_len > r->sq_len)
            r->sq_len = r->cq_len;
        r->cq_len = r->sq_len;
    }
    r->sq_map = mmap(NULL, r->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                     IORING_OFF_SQ_RING);
    if (r->sq_map == MAP_FAILED)
        goto fail;
    if (p.features & IORING_FEAT_SINGLE_MMAP)
        r->cq_map = r->sq_map;
    else
        r->cq_map = mmap(NULL, r->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                         IORING_OFF_CQ_RING);
    if (r->cq_map == MAP_FAILED)
        goto fail;
    r->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqes = mmap(NULL, r->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                   IORING_OFF_SQES);
    if (r->sqes == MAP_FAILED)
        goto fail;
    char *sq = r->sq_map, *cq = r->cq_map;
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    r->sq_array = (unsigned *)(sq + p.sq_off.array);
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    *out = r;
    return 0;
fail:;
    int err = errno;
    ring_close(r);
    return -err;
}

/* IORING_REGISTER_BUFFERS with one buffer: the kernel pins its pages
 * (FOLL_LONGTERM) and READ_FIXED writes into them through that pin. */
int ring_register(struct ring *r, void *address, size_t length)
{
    struct iovec iov = {.iov_base = address, .iov_len = length};
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_BUFFERS, &iov, 1) != 0)
        return -errno;
    return 0;
}

int ring_unregister(struct ring *r)
{
    if (syscall(__NR_io_uring_register, r->fd, IORING_UNREGISTER_BUFFERS, NULL, 0) != 0)
        return -errno;
    return 0;
}

/* Submits one read of `length` bytes at file offset `offset` into `address`:
 * fixed=1 uses registered buffer 0 (IORING_OP_READ_FIXED), async=1 sets
 * IOSQE_ASYNC (a kernel worker thread carries it out). Does not wait. */
int ring_submit_read(struct ring *r, int fd, void *address, unsigned length, long long offset,
                     int fixed, int async)
{
    unsigned tail = *r->sq_tail;
    unsigned index = tail & *r->sq_mask;
    struct io_uring_sqe *sqe = &r->sqes[index];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = fixed ? IORING_OP_READ_FIXED : IORING_OP_READ;
    sqe->fd = fd;
    sqe->addr = (uint64_t)(uintptr_t)address;
    sqe->len = length;
    sqe->off = (uint64_t)offset;
    sqe->buf_index = 0;
    sqe->flags = async ? IOSQE_ASYNC : 0;
    r->sq_array[index] = index;
    __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
    int n = (int)syscall(__NR_io_uring_enter, r->fd, 1, 0, 0, NULL, 0);
    if (n < 0)
        return -errno;
    return n == 1 ? 0 : -EAGAIN;
}

/* Completions posted and not yet consumed (0: the request is in flight). */
int ring_ready(struct ring *r)
{
    return (int)(__atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) - *r->cq_head);
}

/* Waits for one completion and returns its result (bytes read, -errno). */
int ring_wait(struct ring *r)
{
    while (ring_ready(r) == 0) {
        if (syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0 &&
            errno != EINTR)
            return -errno;
    }
    unsigned head = *r->cq_head;
    int res = r->cqes[head & *r->cq_mask].res;
    __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
    return res;
}

/* ---- the blocker --------------------------------------------------------- */

/* Maps one page at *page whose first access waits until blocker_release;
 * returns the userfaultfd (kernel faults included: EPERM for a process that
 * may only handle user-mode faults). */
int blocker_open(void **page)
{
    size_t size = (size_t)sysconf(_SC_PAGESIZE);
    int fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        return -errno;
    struct uffdio_api api = {.api = UFFD_API};
    void *p = MAP_FAILED;
    if (ioctl(fd, UFFDIO_API, &api) != 0)
        goto fail;
    p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        goto fail;
    struct uffdio_register reg = {.range = {.start = (uintptr_t)p, .len = size},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) != 0)
        goto fail;
    *page = p;
    return fd;
fail:;
    int err = errno;
    if (p != MAP_FAILED)
        munmap(p, size);
    close(fd);
    return -err;
}

/* Waits up to timeout_ms for a thread (or the kernel on its behalf) to
 * touch the page: 0 once it waits there, -ETIMEDOUT. */
int blocker_wait(int fd, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int n = poll(&p, 1, timeout_ms);
    if (n < 0)
        return -errno;
    if (n == 0)
        return -ETIMEDOUT;
    struct uffd_msg msg;
    if (read(fd, &msg, sizeof msg) != sizeof msg)
        return -errno;
    return msg.event == UFFD_EVENT_PAGEFAULT ? 0 : -EPROTO;
}

/* Fills the page with zeroes, which wakes whoever waits on it. */
int blocker_release(int fd, void *page)
{
    struct uffdio_zeropage zero = {
        .range = {.start = (uintptr_t)page, .len = (size_t)sysconf(_SC_PAGESIZE)}};
    if (ioctl(fd, UFFDIO_ZEROPAGE, &zero) != 0)
        return -errno;
    return 0;
}

void blocker_close(int fd, void *page)
{
    munmap(page, (size_t)sysconf(_SC_PAGESIZE));
    close(fd);
}
