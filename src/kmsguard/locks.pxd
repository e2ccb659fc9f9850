# The lock of the compiled hot path (fastpath, histogram, nonces, audit/frames): a one-byte
# spin lock taken with an atomic test-and-set. It guards the few C fields one step changes
# (a Budget's counts, a histogram's buckets, a spool segment's write position), so it is
# held for a handful of C statements that never call Python, and never across anything
# that could wait. A thread that finds it taken waits with the GIL released (on a
# free-threaded build: detached), so the holder always runs on. Each module's .py gives
# the same calls as threading.Lock methods (see fastpath.py's _hold and _free).
cdef extern from *:
    """
    #include <sched.h>
    static inline void kmsguard_spin_acquire(char *flag) {
        if (!__atomic_test_and_set(flag, __ATOMIC_ACQUIRE)) return;
        Py_BEGIN_ALLOW_THREADS
        while (__atomic_test_and_set(flag, __ATOMIC_ACQUIRE)) sched_yield();
        Py_END_ALLOW_THREADS
    }
    static inline void kmsguard_spin_release(char *flag) {
        __atomic_clear(flag, __ATOMIC_RELEASE);
    }
    """
    void spin_acquire "kmsguard_spin_acquire"(char *flag) noexcept
    void spin_release "kmsguard_spin_release"(char *flag) noexcept
