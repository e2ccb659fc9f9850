# C types for fastpath.py when Cython compiles it (see that module's docstring).
# The .py file stays the source; this file only tells Cython which classes are
# extension types and which fields are C numbers, so a claim or a tick runs as C code
# under the owner's spin lock (kmsguard/locks.pxd).
import cython
from kmsguard.locks cimport lookup, spin_acquire, spin_release

from cpython.buffer cimport PyBUF_WRITE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

cdef long long _NO_LIMIT
cdef bint _SAME_CLOCK

# time.monotonic's clock (CLOCK_MONOTONIC, on Linux) read as C (fastpath.py: time.monotonic).
cdef inline double _clock() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9

cdef class Mutexed:
    cdef char _mutex

# The lock of a Mutexed (fastpath.py gives their interpreted stand-ins).
cdef inline void _hold(Mutexed owner) noexcept:
    spin_acquire(&owner._mutex)

cdef inline void _free(Mutexed owner) noexcept:
    spin_release(&owner._mutex)

cdef inline void _new_mutex(Mutexed owner) noexcept:
    spin_release(&owner._mutex)  # unlocked (as a new Mutexed is: allocated zeroed)

# A dictionary lookup that owns its result (kmsguard/locks.pxd; fastpath.py: dict.get).
cdef inline object _lookup(dict d, object key):
    return lookup(d, key)

cdef class _Counters(Mutexed):
    cdef long long tick
    cdef unsigned long long requests

cdef _Counters _counters

@cython.locals(counters=_Counters, tick="long long")
cpdef long long next_tick() noexcept
@cython.locals(counters=_Counters, number="unsigned long long")
cpdef unsigned long long next_request() noexcept

cdef class Budget(Mutexed):
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
    cdef readonly bint monotonic
    cpdef object claim(self, long long size)
    cpdef object claim_at(self, long long size, double now)
    cdef object _take(self, long long size, double now)
    cpdef long long used(self) noexcept

# Made per observed hit: from a free list, not tracked by the cycle collector (the
# decorators are on the class in fastpath.py, where Cython reads them).
cdef class OperationEvent:
    cdef readonly object kind
    cdef readonly double started_at
    cdef readonly double duration
    cdef readonly Py_ssize_t size
    cdef readonly unsigned long long request
    cdef readonly object caller_id

cdef class HitSink(Mutexed):
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size,
                      unsigned long long request, object caller_id) except *

cdef class EventSink(HitSink):
    cdef readonly object observe
    cdef readonly object report
    @cython.locals(event=OperationEvent)
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size,
                      unsigned long long request, object caller_id) except *

# prefix || nonce || AES-GCM(plaintext) built in the one bytes object returned: AESGCM
# encrypts straight into it (encrypt_into), through a writable view of the new object's
# memory, which nothing else can see until it is returned (fastpath.py: sealed).
cdef inline bytes _into(object aead, bytes prefix, bytes nonce, bytes plaintext, bytes aad):
    cdef Py_ssize_t head = len(prefix) + len(nonce)
    cdef Py_ssize_t body = len(plaintext) + 16
    cdef bytes out = PyBytes_FromStringAndSize(NULL, head + body)
    cdef char* buf = PyBytes_AS_STRING(out)
    memcpy(buf, <char*>prefix, len(prefix))
    memcpy(buf + len(prefix), <char*>nonce, len(nonce))
    aead.encrypt_into(nonce, plaintext, aad, PyMemoryView_FromMemory(buf + head, body, PyBUF_WRITE))
    return out

cpdef bytes sealed(object aead, bytes prefix, bytes nonce, bytes plaintext, bytes aad)
