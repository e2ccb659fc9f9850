# C types for fastpath.py when Cython compiles it (see that module's docstring).
# The .py file stays the source; this file only tells Cython which classes are
# extension types and which fields are C numbers, so Budget._take runs as C code
# without releasing the GIL.
import cython

cdef long long _NO_LIMIT
cdef long long _tick
cdef unsigned long long _requests
cdef object _counter_lock

cpdef long long next_tick() noexcept
cpdef unsigned long long next_request() noexcept

cdef class Budget:
    cdef public object aead
    cdef public object clock
    cdef public double expires
    cdef public long long max_messages
    cdef public long long max_bytes
    cdef public long long messages
    cdef public long long nbytes
    cdef public long long hits
    cdef public bint live
    cdef public long long last_used
    cdef object _lock
    cdef object _take(self, long long size, double now)

@cython.freelist(16)
cdef class OperationEvent:
    cdef readonly object kind
    cdef readonly double started_at
    cdef readonly double duration
    cdef readonly Py_ssize_t size
    cdef readonly unsigned long long request

cdef class HitSink:
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size,
                      unsigned long long request) except *

cdef class EventSink(HitSink):
    cdef readonly object observe
    cdef readonly object report
