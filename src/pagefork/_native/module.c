/* pagefork._native: the method table, constants and module init. The code
 * lives in one file per mechanism; see pagefork.h. */
#include "pagefork.h"

#include <unistd.h>

size_t pf_page_size;

static PyObject *native_pagemap_scan_available(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyBool_FromLong(pf_pagemap_scan_available());
}

static PyObject *native_set_pagemap_scan(PyObject *self, PyObject *arg)
{
    (void)self;
    int enabled = PyObject_IsTrue(arg);
    if (enabled < 0)
        return NULL;
    pf_pagemap_scan_disabled = !enabled;
    Py_RETURN_NONE;
}

static PyObject *native_set_uffd_feature_mask(PyObject *self, PyObject *arg)
{
    (void)self;
    long mask = PyLong_AsLong(arg);
    if (mask == -1 && PyErr_Occurred())
        return NULL;
    pf_uffd_feature_mask = (int)mask;
    Py_RETURN_NONE;
}

static PyMethodDef native_methods[] = {
    {"uffd_probe", pf_uffd_probe, METH_NOARGS,
     "uffd_probe() -> (errno, supported_features, user_mode_only)"},
    {"pagemap_scan_available", native_pagemap_scan_available, METH_NOARGS,
     "Whether the PAGEMAP_SCAN ioctl works here."},
    {"diff", pf_diff, METH_VARARGS,
     "diff(memory, original, dirty, page_size, starts, ends, dtypes, ops) -> columns"},
    {"identity_diff", pf_identity_diff, METH_VARARGS,
     "identity_diff(memory, identity, dtype, op) -> columns"},
    {"apply", pf_apply, METH_VARARGS,
     "apply(target, offsets, lengths, dtypes, ops, data, check_only=False)"},
    {"check_columns", pf_check_columns, METH_VARARGS,
     "check_columns(offsets, lengths, dtypes, ops, data_len) -> None or (index, problem)"},
    {"mark_pages", pf_mark_pages, METH_VARARGS,
     "mark_pages(flags, offsets, lengths, ops, page_size): flag every page a diff changes"},
    {"copy_pages", pf_copy_pages, METH_VARARGS,
     "copy_pages(target, source, dirty, page_size) -> bytes copied"},
    {"crc32c", pf_crc32c, METH_VARARGS, "crc32c(data, crc=0) -> int"},
    {"crc32c_combine", pf_crc32c_combine, METH_VARARGS,
     "crc32c_combine(crc_a, crc_b, len_b) -> the CRC32C of a followed by b"},
    {"read_checked", pf_read_checked, METH_VARARGS,
     "read_checked(src_fd, src_offset, length, dest, crc=0, threads=1) -> (copied, crc)"},
    {"delta_encode", pf_delta_encode, METH_VARARGS, "delta_encode(old, new, page_size, xor) -> body"},
    {"delta_apply", pf_delta_apply, METH_VARARGS, "delta_apply(old, body, new_len, xor) -> new"},
    {"delta_check", pf_delta_check, METH_VARARGS,
     "delta_check(state, chunk, old_len, new_len, final): checks a body piece by piece"},
    {"_scribble", pf_scribble, METH_VARARGS,
     "_scribble(address, n_pages, slot, first_seq, count, seed) -> seed: native-speed test writes."},
    {"_write_sequence", pf_write_sequence, METH_VARARGS,
     "_write_sequence(address, count, first, gap_ns, stop) -> writes: a GIL-free writer for tests."},
    {"_set_window_pause", pf_set_window_pause, METH_O,
     "Hold every executor window's merge open this many seconds (tests)."},
    {"segfault_reassert", pf_segfault_reassert, METH_NOARGS,
     "Put the segfault-mode SIGSEGV handler back on top after Python code replaced it."},
    {"compact_encode", pf_compact_encode, METH_VARARGS,
     "compact_encode(offsets, lengths, dtypes, ops) -> token stream"},
    {"compact_decode", pf_compact_decode, METH_VARARGS,
     "compact_decode(tokens, count, data_len) -> (offsets, lengths, dtypes, ops)"},
    {"private_pages", pf_private_pages, METH_VARARGS,
     "private_pages(memory, out) -> count of pages that are the process's own copies"},
    {"maps_covers", pf_maps_covers, METH_VARARGS,
     "maps_covers(address, length, fd) -> whether one private read-write mapping of fd from offset 0 "
     "covers the range (None: the kernel cannot tell)"},
    {"keep_changed", pf_keep_changed, METH_VARARGS,
     "keep_changed(memory, original, flags) -> count: unflags pages equal to the original"},
    {"fold", pf_fold, METH_VARARGS,
     "fold(acc, memory, original, dirty, changed, page_size, starts, ends, dtypes, ops): merge a "
     "thread's order-free reductions into acc, putting them back to the original in memory"},
    {"gather", pf_gather, METH_VARARGS, "gather(source, starts, lengths) -> the runs as bytes"},
    {"pinned_pages", pf_pinned_pages, METH_VARARGS,
     "pinned_pages(address, n_pages) -> [(first, count)]: pages pinned by io_uring fixed buffers"},
    {"new_mappings_locked", pf_new_mappings_locked, METH_NOARGS,
     "Whether memory mapped now is locked and populated at once (mlockall(MCL_FUTURE))."},
    {"segfault_suspend", pf_segfault_suspend, METH_NOARGS,
     "Before Python code replaces the SIGSEGV handler: make segfault-tracked memory writable."},
    {"window", pf_window, METH_VARARGS,
     "window(memory, snapshot, fd, flags, scan, merges, closing, hold): carry, merge and map "
     "main memory again with its other writers held (see window.c)"},
    {"hold_probe", pf_hold_probe, METH_NOARGS,
     "hold_probe() -> (userfaultfd holds writers here, why not, kernel writes held too)"},
    {"_set_uffd_feature_mask", native_set_uffd_feature_mask, METH_O,
     "Hide userfaultfd features (a bit mask to keep); tests use it to act like older kernels."},
    {"_set_pagemap_scan", native_set_pagemap_scan, METH_O,
     "Allow (True) or forbid (False) PAGEMAP_SCAN; tests use it to exercise the fallback."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pagefork._native",
    .m_doc = "pagefork's native core.",
    .m_size = -1,
    .m_methods = native_methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    pf_page_size = (size_t)sysconf(_SC_PAGESIZE);
    /* Once per process (a module is initialized once), in this order. */
    static int hooks_added;
    if (!hooks_added) {
        if (pf_registry_add_fork_hook(pf_uffd_forget_after_fork) < 0 ||
            pf_registry_add_fork_hook(pf_uffd_async_forget_after_fork) < 0 ||
            pf_registry_add_fork_hook(pf_window_forget_after_fork) < 0) {
            PyErr_SetString(PyExc_RuntimeError, "pagefork: too many fork hooks");
            return NULL;
        }
        hooks_added = 1;
    }
    if (PyType_Ready(&PfMappingType) < 0 || PyType_Ready(&PfTrackingType) < 0 ||
        PyType_Ready(&PfBufferType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PfMappingType);
    Py_INCREF(&PfTrackingType);
    if (PyModule_AddObject(m, "Mapping", (PyObject *)&PfMappingType) < 0 ||
        PyModule_AddObject(m, "Tracking", (PyObject *)&PfTrackingType) < 0 ||
        PyModule_AddStringConstant(m, "VERSION", PAGEFORK_NATIVE_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", (long)pf_page_size) < 0 ||
        PyModule_AddIntConstant(m, "DELTA_CHECK_STATE", PF_DELTA_CHECK_STATE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_TRACKED_REGIONS", PF_MAX_RANGES) < 0 ||
        PyModule_AddIntConstant(m, "MAX_THREADS_PER_REGION", PF_MAX_THREADS) < 0 ||
        PyModule_AddIntConstant(m, "MODE_NONE", PF_MODE_NONE) < 0 ||
        PyModule_AddIntConstant(m, "MODE_SOFTPTE", PF_MODE_SOFTPTE) < 0 ||
        PyModule_AddIntConstant(m, "MODE_SEGFAULT", PF_MODE_SEGFAULT) < 0 ||
        PyModule_AddIntConstant(m, "MODE_UFFD", PF_MODE_UFFD) < 0 ||
        PyModule_AddIntConstant(m, "MODE_UFFD_ASYNC", PF_MODE_UFFD_ASYNC) < 0 ||
        PyModule_AddIntConstant(m, "MODE_COW", PF_MODE_COW) < 0 ||
        PyModule_AddIntConstant(m, "UFFD_FEATURE_THREAD_ID", UFFD_FEATURE_THREAD_ID) < 0 ||
        PyModule_AddIntConstant(m, "UFFD_FEATURE_WP_HUGETLBFS_SHMEM", UFFD_FEATURE_WP_HUGETLBFS_SHMEM) < 0 ||
        PyModule_AddIntConstant(m, "UFFD_FEATURE_WP_UNPOPULATED", UFFD_FEATURE_WP_UNPOPULATED) < 0 ||
        PyModule_AddIntConstant(m, "UFFD_FEATURE_WP_ASYNC", UFFD_FEATURE_WP_ASYNC) < 0 ||
        PyModule_AddIntConstant(m, "COLUMN_NEGATIVE", PF_COLUMN_NEGATIVE) < 0 ||
        PyModule_AddIntConstant(m, "COLUMN_OVERFLOW", PF_COLUMN_OVERFLOW) < 0 ||
        PyModule_AddIntConstant(m, "COLUMN_PAST_DATA", PF_COLUMN_PAST_DATA) < 0 ||
        PyModule_AddIntConstant(m, "COLUMN_UNKNOWN_CODE", PF_COLUMN_UNKNOWN_CODE) < 0 ||
        PyModule_AddIntConstant(m, "COLUMN_INVALID_OP", PF_COLUMN_INVALID_OP) < 0 ||
        PyModule_AddIntConstant(m, "COLUMN_PARTIAL_VALUE", PF_COLUMN_PARTIAL_VALUE) < 0 ||
        PyModule_AddIntConstant(m, "COLUMN_DATA_LENGTH", PF_COLUMN_DATA_LENGTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
