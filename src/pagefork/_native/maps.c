/* What /proc/self/maps says of one range, through the PROCMAP_QUERY ioctl
 * (Linux 6.11+): whether thread memory a workspace kept is still the one
 * mapping of the snapshot it made, so it may be used again without mapping
 * it afresh. A thread can change its memory's mappings behind our back
 * (mmap MAP_FIXED, munmap, mprotect, mremap through ctypes); no page-state
 * read (pagemap) can see that.
 */
#define _GNU_SOURCE
#include "pagefork.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

/* linux/fs.h of Linux 6.11; older system headers lack it. */
struct pf_procmap_query {
    uint64_t size;
    uint64_t query_flags;
    uint64_t query_addr;
    uint64_t vma_start;
    uint64_t vma_end;
    uint64_t vma_flags;
    uint64_t vma_page_size;
    uint64_t vma_offset;
    uint64_t inode;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint32_t vma_name_size;
    uint32_t build_id_size;
    uint64_t vma_name_addr;
    uint64_t build_id_addr;
};
#define PF_PROCMAP_QUERY _IOWR('f', 17, struct pf_procmap_query)
#define PF_VMA_READABLE 0x01
#define PF_VMA_WRITABLE 0x02
#define PF_VMA_SHARED 0x08

static int maps_fd = -1;
static pid_t maps_pid;

/* /proc/self is resolved at open(): a forked child must reopen it. Called
 * with the GIL held, so never by two threads at once. */
static int get_maps_fd(void)
{
    pid_t pid = getpid();
    if (maps_fd >= 0 && maps_pid == pid)
        return maps_fd;
    if (maps_fd >= 0)
        close(maps_fd);
    maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
    maps_pid = pid;
    return maps_fd;
}

/* 1 when [address, address + length) lies in one mapping that starts at
 * `address`, readable and writable, private, of the file `fd` from offset 0;
 * 0 when not; -1 with errno when the kernel cannot tell (ENOTTY: no
 * PROCMAP_QUERY before 6.11). */
static int maps_covers(uintptr_t address, size_t length, int fd)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -1;
    int mfd = get_maps_fd();
    if (mfd < 0)
        return -1;
    struct pf_procmap_query q;
    memset(&q, 0, sizeof q);
    q.size = sizeof q;
    q.query_addr = address;
    if (ioctl(mfd, PF_PROCMAP_QUERY, &q) < 0)
        return errno == ENOENT ? 0 : -1; /* ENOENT: nothing mapped there */
    return q.vma_start == address && q.vma_end >= address + length && q.vma_offset == 0 &&
           (q.vma_flags & (PF_VMA_READABLE | PF_VMA_WRITABLE | PF_VMA_SHARED)) ==
               (PF_VMA_READABLE | PF_VMA_WRITABLE) &&
           q.inode == (uint64_t)st.st_ino && q.dev_major == major(st.st_dev) &&
           q.dev_minor == minor(st.st_dev);
}

/* maps_covers(address, length, fd) -> True, False, or None where the kernel
 * cannot tell (callers then map afresh). */
PyObject *pf_maps_covers(PyObject *self, PyObject *args)
{
    unsigned long long address;
    Py_ssize_t length;
    int fd;
    if (!PyArg_ParseTuple(args, "Kni", &address, &length, &fd))
        return NULL;
    if (length <= 0) {
        PyErr_SetString(PyExc_ValueError, "maps_covers: length must be positive");
        return NULL;
    }
    int covers = maps_covers((uintptr_t)address, (size_t)length, fd);
    if (covers < 0) {
        if (errno == ENOTTY || errno == EINVAL)
            Py_RETURN_NONE;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyBool_FromLong(covers);
}
