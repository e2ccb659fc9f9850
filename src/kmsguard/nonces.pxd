# C types for nonces.py when Cython compiles it (see that module's docstring): a
# nonce's offset is taken under the pool's spin lock (kmsguard/fastpath.pxd), and its
# 12 bytes are copied out of the draw as C (the sizes are C numbers).
import cython
from kmsguard.fastpath cimport Mutexed, _free, _hold, _new_mutex

cdef Py_ssize_t _SIZE

cdef class _Pool(Mutexed):
    cdef readonly bytes data
    cdef Py_ssize_t offset
    @cython.locals(data=bytes, start=Py_ssize_t)
    cdef bytes next(self)
    cdef void refill(self, bytes spent, bytes fresh) noexcept

cdef _Pool _pool

@cython.locals(pool=_Pool, value=bytes)
cpdef bytes nonce()
