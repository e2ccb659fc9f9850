# C types for histogram.py when Cython compiles it (see that module's docstring).
import cython
from kmsguard.fastpath cimport HitSink

cdef class Histogram:
    cdef public double[::1] bounds
    cdef public long long[::1] buckets
    cdef public double total
    cdef object _lock
    cpdef void add(self, double value) except *
    @cython.locals(i=Py_ssize_t, n=Py_ssize_t)
    cdef void _add(self, double value) noexcept

cdef class HitTally(HitSink):
    cdef public object lookup
    cdef public dict by_kind
    cdef public tuple last
    @cython.locals(series=Histogram, last=tuple)
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size,
                      unsigned long long request) except *
