# C types for plans.py when Cython compiles it (see that module's docstring and
# fastpath.pxd). The .py file stays the source; this file only tells Cython which
# classes are extension types and which fields are C numbers.
import cython
from cpython.contextvars cimport get_value

from kmsguard.fastpath cimport (Budget, HitSink, Mutexed, _clock, _free, _hold, _lookup, _new_mutex, next_request,
                                next_tick, sealed)
from kmsguard.locks cimport load_double, store_double

cdef Py_ssize_t MAX_KINDS_PER_LANE
cdef Py_ssize_t _TAG_SIZE
cdef Py_ssize_t _NONCE_SIZE
cdef Py_ssize_t _COMMITMENT_SIZE
cdef Py_ssize_t _MAX_PLAINTEXT
cdef Py_ssize_t _COPY_BELOW
cdef Py_ssize_t _INTO_FROM
cdef object _ABSENT
cdef object _NO_CONTEXT
cdef object _nonce
cdef object _wall
cdef object _join
cdef object _binding

# The context-variable read as C (plans.py gives its interpreted stand-in).
cdef inline object _value_of(object var):
    return get_value(var)

cpdef object context_error(DecryptPlan plan, object given)

cdef class Lane:
    cdef public Budget budget
    cdef public tuple key_refs
    cdef public bytes out_prefix
    cdef public bytes aad_prefix
    cdef public dict kinds
    cdef public Py_ssize_t bound

# A plan's lane and last use, under the plan's lock.
cdef class _Planned(Mutexed):
    cdef Lane _lane
    cdef long long _last_used
    @cython.locals(lane=Lane)
    cpdef Lane use(self, long long tick)
    @cython.locals(tick="long long")
    cpdef long long used(self) noexcept
    @cython.locals(old=Lane)
    cpdef Lane install(self, Lane lane)

cdef class EncryptPlan(_Planned):
    cdef public object policy
    cdef public object context
    cdef public object request
    cdef public bytes header
    cpdef bytes seal(self, Lane lane, object aead, bytes plaintext)

cdef class DecryptPlan(_Planned):
    cdef public object policy
    cdef public object context
    cdef public tuple required
    cdef public tuple wrapped
    cdef public object request
    cdef public bytes commitment
    cdef public bytes aad_prefix
    cdef public Py_ssize_t prefix_len
    cdef public Py_ssize_t body_start
    @cython.locals(start=Py_ssize_t)
    cpdef object open(self, object aead, bytes raw)

cdef class Plans:
    cdef object _policy
    cdef public object encrypt
    cdef public object decrypt
    cdef dict _encrypt
    cdef dict _decrypt
    cdef object _lock
    cdef public bint observed
    cdef public tuple sinks
    cdef public object principal
    cdef object _acting
    cdef object _served
    cdef double _synced_at
    cdef double _wall_offset
    @cython.locals(plan=EncryptPlan, lane=Lane, t0=double, t1=double)
    cpdef object seal(self, object plaintext, object classification, object context)
    @cython.locals(plan=DecryptPlan, lane=Lane, n=Py_ssize_t, t0=double, t1=double, pairs=tuple, pair=tuple)
    cpdef object open(self, object raw, object context)
    cdef object _principal(self)
    @cython.locals(sink=HitSink, request="unsigned long long", served=object, caller_id=object)
    cdef void _record(self, object kind, double t0, double duration, Py_ssize_t size) except *

@cython.locals(end=Py_ssize_t, pos=Py_ssize_t, count=Py_ssize_t, keys=Py_ssize_t, _i=Py_ssize_t)
cdef Py_ssize_t _prefix_len(bytes raw) noexcept

@cython.locals(i=Py_ssize_t)
cdef bint _same_items(object given, tuple items) except -1

# Plans' wall-clock offset and the time it was read: each read and stored whole, as hits on
# every thread read them and one stores them (plans.py gives the stand-ins).
cdef inline double _synced_at(Plans plans) noexcept:
    return load_double(&plans._synced_at)

cdef inline double _wall_offset(Plans plans) noexcept:
    return load_double(&plans._wall_offset)

cdef inline void _sync(Plans plans, double at, double offset) noexcept:
    store_double(&plans._synced_at, at)
    store_double(&plans._wall_offset, offset)
