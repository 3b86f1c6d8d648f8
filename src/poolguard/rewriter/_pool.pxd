# Types for the compiled build of _pool.py (see _compiled.py); the .py is the only source.
cimport cython
from ._statements cimport BackendStatements

cdef class Backend

cdef class Borrower:
    cpdef attach(self, Backend backend)
    cpdef Py_ssize_t server_data(self, Backend backend, bytes buf)

cdef class Backend:
    cdef public object pool, transport, pid, key, params, extra, unnamed
    cdef public Borrower owner
    cdef public object created, idle_since, expires, lost, _inbox, _wakeup
    cdef public bytearray buf
    cdef public BackendStatements statements
    cdef public bint closed, retiring
    @cython.locals(owner=Borrower, used=Py_ssize_t)
    cpdef data_received(self, data)
    cpdef write(self, data)

cdef class BackendPool:
    cdef public object upstream, size, max_prepared, idle, waiters, members, connecting
    cdef public object closing, pinned, failing
    cdef public Py_ssize_t served
    cpdef acquire(self, session)
    @cython.locals(session=Borrower)
    cpdef release(self, Backend backend)
