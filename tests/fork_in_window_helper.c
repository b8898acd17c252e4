/* For tests/test_window_forks.py: a fork(2) that lands inside an executor
 * window. Called through ctypes (which lets go of the GIL), it sleeps, so
 * the window begins meanwhile, then forks; the child, which can run no
 * Python (the window's thread has the GIL), writes one value into main
 * memory and exits 0 if it reads it back. alarm(): a write that waits for
 * ever ends the child with SIGALRM instead. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

int fork_and_write(volatile long *address, long value, unsigned sleep_us, unsigned alarm_s)
{
    usleep(sleep_us);
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        alarm(alarm_s);
        *address = value;
        _exit(*address == value ? 0 : 3);
    }
    int status = -1;
    while (waitpid(pid, &status, 0) < 0)
        ;
    return status;
}
