/* The one error convention of the native core: a plain OSError carrying errno
 * and naming the failed syscall; pagefork/_errors.py maps it to package
 * exceptions where that means something to the user. */
#include "pagefork.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

PyObject *pf_oserror_errno(int err, const char *syscall_name)
{
    char message[256];
    snprintf(message, sizeof message, "%s: %s", syscall_name, strerror(err));
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, message);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

PyObject *pf_oserror(const char *syscall_name)
{
    return pf_oserror_errno(errno, syscall_name);
}
