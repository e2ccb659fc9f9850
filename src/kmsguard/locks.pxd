# The concurrency primitives of the compiled hot path (fastpath, plans, histogram, nonces,
# audit/frames), so that it is correct without the GIL (free-threaded CPython):
#
# * a one-byte spin lock taken with an atomic test-and-set. It guards the few fields one
#   step reads or changes (a Budget's counts, a plan's lane, a histogram's buckets, a
#   spool segment's write position), so it is held for a handful of C statements that
#   never call Python, and never across anything that could wait. A thread that finds it
#   taken waits with the GIL released (on a free-threaded build: detached), so the holder
#   always runs on. Each module's .py gives the same calls as threading.Lock methods (see
#   fastpath.py's _hold and _free);
# * a dictionary lookup whose result is a reference of its own before any other thread
#   can drop the entry (PyDict_GetItemRef, 3.13+, where free-threaded builds are; a
#   borrowed reference taken while the GIL is held before that). Cython's own ``d.get(k)``
#   takes a borrowed reference on every version. The .py stand-in is ``dict.get``;
# * a double read and stored whole (a relaxed atomic): a value another thread may store
#   at the same time, never torn.
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
    static inline PyObject *kmsguard_lookup(PyObject *d, PyObject *key) {
        PyObject *value;
    #if PY_VERSION_HEX >= 0x030D0000
        if (PyDict_GetItemRef(d, key, &value) < 0) return NULL;
        if (value == NULL) value = Py_NewRef(Py_None);
    #else
        value = PyDict_GetItemWithError(d, key);
        if (value == NULL) {
            if (PyErr_Occurred()) return NULL;
            value = Py_None;
        }
        Py_INCREF(value);
    #endif
        return value;
    }
    static inline double kmsguard_load_double(double *field) {
        double value;
        __atomic_load(field, &value, __ATOMIC_RELAXED);
        return value;
    }
    static inline void kmsguard_store_double(double *field, double value) {
        __atomic_store(field, &value, __ATOMIC_RELAXED);
    }
    """
    void spin_acquire "kmsguard_spin_acquire"(char *flag) noexcept
    void spin_release "kmsguard_spin_release"(char *flag) noexcept
    object lookup "kmsguard_lookup"(dict d, object key)
    double load_double "kmsguard_load_double"(double *field) noexcept
    void store_double "kmsguard_store_double"(double *field, double value) noexcept
