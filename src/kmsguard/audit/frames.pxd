# C types for frames.py when Cython compiles it (see that module's docstring and
# kmsguard/fastpath.pxd): Frames.hit becomes C stores into the memory map.
import cython
from kmsguard.fastpath cimport HitSink, Mutexed, _free, _hold, _lookup, _new_mutex
from libc.string cimport memcpy

cdef extern from *:
    unsigned long long _bswap64 "__builtin_bswap64"(unsigned long long) noexcept nogil
    unsigned int _bswap32 "__builtin_bswap32"(unsigned int) noexcept nogil

# Big-endian stores of whole words (frames.py gives their interpreted stand-ins).
cdef inline void _put64(unsigned char[::1] view, Py_ssize_t at, unsigned long long value) noexcept:
    cdef unsigned long long word = _bswap64(value)
    memcpy(&view[at], &word, 8)

cdef inline void _put32(unsigned char[::1] view, Py_ssize_t at, unsigned int value) noexcept:
    cdef unsigned int word = _bswap32(value)
    memcpy(&view[at], &word, 4)

cdef inline unsigned long long _get64(const unsigned char* view, Py_ssize_t at) noexcept:
    cdef unsigned long long word
    memcpy(&word, view + at, 8)
    return _bswap64(word)

cdef inline unsigned int _get32(const unsigned char* view, Py_ssize_t at) noexcept:
    cdef unsigned int word
    memcpy(&word, view + at, 4)
    return _bswap32(word)

cdef inline void _copy(unsigned char[::1] out, Py_ssize_t to, const unsigned char* view, Py_ssize_t at,
                       Py_ssize_t n) noexcept:
    memcpy(&out[to], view + at, n)

cdef unsigned long long _M64
cdef unsigned long long _M32  # a C constant: a literal this large would be a Python int
cdef unsigned long long _FNV_OFFSET
cdef unsigned long long _FNV_PRIME
cdef Py_ssize_t _FRAME
cdef unsigned int _HEADER_WORD
cdef long long _NOT_WRITTEN
cdef Py_ssize_t _AT_CHECK, _AT_SEQ, _AT_TEMPLATE, _AT_STARTED, _AT_ITEM, _AT_DURATION, _AT_SIZE, _AT_REQUEST, _ITEM
cdef tuple _NO_KIND

@cython.locals(h="unsigned long long")
cpdef unsigned int hit_check(unsigned long long seq, unsigned long long template, unsigned long long started,
                             unsigned long long duration, unsigned long long size, unsigned long long request)

@cython.locals(view="const unsigned char*", out="unsigned char[::1]", size=Py_ssize_t, room=Py_ssize_t,
               count=Py_ssize_t, k=Py_ssize_t, at=Py_ssize_t, latest="unsigned long long", number="unsigned long long",
               named="unsigned long long", started="unsigned long long", duration="unsigned long long",
               nbytes="unsigned long long", request="unsigned long long")
cpdef tuple take_hits(bytes data, Py_ssize_t pos, unsigned long long seq, unsigned long long template,
                      Py_ssize_t limit)

cdef class Frames(Mutexed):
    cdef public object lock
    cdef public Py_ssize_t size
    cdef public long long limit
    cdef public Py_ssize_t pos
    cdef public long long seq
    cdef public long long written
    cdef public bint busy
    cdef public bint closed
    cdef object __weakref__
    cdef public set emitted
    cdef public unsigned long long last_emitted
    cdef unsigned char[::1] view

    cpdef long long hit(self, unsigned long long template, unsigned long long started, unsigned long long duration,
                        unsigned long long size, unsigned long long request)
    @cython.locals(pos=Py_ssize_t, seq="long long", view="unsigned char[::1]")
    cdef long long _hit(self, unsigned long long template, unsigned long long started, unsigned long long duration,
                        unsigned long long size, unsigned long long request) except? -1

cdef class HitWriter(HitSink):
    cdef readonly Frames frames
    cdef readonly dict templates
    cdef readonly object slow
    cdef readonly tuple last
    @cython.locals(old=tuple)
    cpdef void retarget(self, Frames frames, dict templates, object slow) except *
    @cython.locals(at="unsigned long long", took="unsigned long long", last=tuple, template="unsigned long long",
                   frames=Frames, templates=dict)
    cpdef void record(self, object kind, double started, double duration, Py_ssize_t size,
                      unsigned long long request, object caller_id) except *
    @cython.locals(old=tuple)
    cdef void _remember(self, tuple last) except *
    @cython.locals(slow=object)
    cdef void _slow(self, object key, unsigned long long at, unsigned long long took, Py_ssize_t size,
                    unsigned long long request) except *
