/* The clock fault of `make chaos` (bench/chaos_broker.py) preloads this into the agent's
 * process only (LD_PRELOAD): its wall clock (clock_gettime CLOCK_REALTIME, gettimeofday,
 * time) runs CHAOS_CLOCK_SHIFT_S seconds behind; monotonic clocks, sleeps and waits are
 * untouched. Debian's libfaketime 0.9.10 cannot do this for Python 3.11: with
 * FAKETIME_DONT_FAKE_MONOTONIC every time.sleep() fails with EINVAL (its clock_nanosleep
 * shifts an absolute CLOCK_MONOTONIC deadline; libfaketime issue 426), without it
 * threading waits hang.
 *
 * With CHAOS_DENY_ADJTIMEX=1 the kernel refuses the process adjtimex and clock_adjtime
 * (seccomp, EPERM), so on a machine whose clock is NTP-synchronised the agent cannot
 * learn that it is (the agent asks with adjtimex through ctypes, which an LD_PRELOAD
 * symbol cannot intercept). Built by the fault with cc (the broker plugin needs it too). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>

static long shift_s;
static int (*real_clock_gettime)(clockid_t, struct timespec *);

#if defined(__x86_64__)
#define CHAOS_ARCH AUDIT_ARCH_X86_64
#elif defined(__aarch64__)
#define CHAOS_ARCH AUDIT_ARCH_AARCH64
#endif

__attribute__((constructor)) static void chaos_init(void) {
    const char *v = getenv("CHAOS_CLOCK_SHIFT_S");
    shift_s = v ? atol(v) : 0;
    real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    v = getenv("CHAOS_DENY_ADJTIMEX");
    if (v && strcmp(v, "1") == 0) {
#ifdef CHAOS_ARCH
        struct sock_filter f[] = {
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, CHAOS_ARCH, 1, 0),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
            BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_adjtimex, 2, 0),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_clock_adjtime, 1, 0),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
            BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)),
        };
        struct sock_fprog prog = {sizeof f / sizeof f[0], f};
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog);
#endif
    }
}

int clock_gettime(clockid_t clk, struct timespec *ts) {
    int rc = real_clock_gettime(clk, ts);
    if (rc == 0 && (clk == CLOCK_REALTIME || clk == CLOCK_REALTIME_COARSE))
        ts->tv_sec -= shift_s;
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    (void)tz;
    if (rc == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *t) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (t != NULL)
        *t = ts.tv_sec;
    return ts.tv_sec;
}
