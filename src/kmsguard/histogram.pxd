# C types for histogram.py when Cython compiles it (see that module's docstring).
import cython
from kmsguard.fastpath cimport HitSink, Mutexed, _free, _hold, _lookup, _new_mutex

cdef class Histogram(Mutexed):
    cdef public double[::1] bounds
    cdef public long long[::1] buckets
    cdef public double total
    cpdef void add(self, double value) except *
    @cython.locals(i=Py_ssize_t, n=Py_ssize_t)
    cdef void _add(self, double value) noexcept
    @cython.locals(copy="long long[::1]", total=double)
    cpdef tuple snapshot(self)
    @cython.locals(i=Py_ssize_t, n=Py_ssize_t)
    cdef double _copy(self, long long[::1] into) noexcept

cdef class HitTally(HitSink):
    cdef public object lookup
    cdef public dict by_kind
    @cython.locals(series=Histogram)
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size,
                      unsigned long long request, object caller_id) except *
