# C types for fastpath.py when Cython compiles it (see that module's docstring).
# The .py file stays the source; this file only tells Cython which classes are
# extension types and which fields are C numbers, so Budget._take runs as C code
# without releasing the GIL.
import cython
from cpython.contextvars cimport get_value
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef long long _tick
cdef Py_ssize_t TAG_SIZE
cdef Py_ssize_t MAX_PLAINTEXT
cdef Py_ssize_t MAX_LANES
cdef Py_ssize_t MAX_PREFIX_LENGTHS
cdef Py_ssize_t MAX_KINDS_PER_LANE
cdef long long _NO_LIMIT
cdef Py_ssize_t _COPY_BELOW
cdef object _nonce
cdef object _wall

# The lanes' clock and context-variable read as C (fastpath.py gives their interpreted
# stand-ins): as Python calls they were ~a sixth of what observing a cache hit costs.
cdef inline double _clock() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9

cdef inline object _value_of(object var):
    return get_value(var)

cdef object _join
cdef object _ABSENT
cdef unsigned long long _requests
cdef object _request_lock

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

cdef class EncryptLane:
    cdef public Budget budget
    cdef public bytes out_prefix
    cdef public bytes aad_prefix
    cdef public dict kinds
    cdef public tuple last

cdef class DecryptLane:
    cdef public Budget budget
    cdef public object context
    cdef public tuple required
    cdef public bytes aad_prefix
    cdef public Py_ssize_t prefix_len
    cdef public Py_ssize_t body_start
    cdef public dict kinds

cdef class HitSink:
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size) except *

cdef class Lanes:
    cdef public dict encrypt
    cdef public dict decrypt
    cdef public list lengths
    cdef public bint observed
    cdef public tuple sinks
    cdef public object principal
    cdef double _synced_at
    cdef double _wall_offset
    cdef object _acting
    @cython.locals(t0=double, t1=double, last=tuple)
    cpdef object seal(self, object plaintext, object classification, object context)
    @cython.locals(t0=double, t1=double)
    cpdef object open(self, object raw, object context)
    cdef object _principal(self)
    cdef EncryptLane _encrypt_lane(self, object plaintext, object classification, object context)
    cdef object _seal(self, EncryptLane lane, object plaintext)
    @cython.locals(lane=DecryptLane, n=Py_ssize_t)
    cdef DecryptLane _decrypt_lane(self, object raw, object context)
    @cython.locals(start=Py_ssize_t)
    cdef object _open(self, DecryptLane lane, object raw)
    @cython.locals(sink=HitSink)
    cdef void _record(self, object kind, double t0, double duration, Py_ssize_t size) except *
