# C types for fastpath.py when Cython compiles it (see that module's docstring).
# The .py file stays the source; this file only tells Cython which classes are
# extension types and which fields are C numbers, so Budget._take runs as C code
# without releasing the GIL.

from cpython.buffer cimport PyBUF_WRITE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.memoryview cimport PyMemoryView_FromMemory
from libc.string cimport memcpy

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

cdef class HitSink:
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size) except *

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
