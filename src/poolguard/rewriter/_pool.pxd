# Types for the compiled build of _pool.py (see _compiled.py); the .py is the only source.
from ._statements cimport BackendStatements

cdef class Backend:
    cdef public object pool, transport, pid, key, params, extra, unnamed, owner
    cdef public object created, idle_since, expires, lost, _inbox, _wakeup
    cdef public bytearray buf
    cdef public BackendStatements statements
    cdef public bint closed, retiring
    cpdef write(self, data)

cdef class BackendPool:
    cdef public object upstream, size, max_prepared, idle, waiters, members, connecting
    cdef public object closing, pinned, failing
    cdef public Py_ssize_t served
    cpdef acquire(self, session)
    cpdef release(self, Backend backend)
