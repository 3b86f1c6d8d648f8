# Types for the compiled build of _session.py (see _compiled.py); the .py is the only source.
cimport cython
from ._pool cimport Backend, BackendPool, Borrower
from ._params cimport apply_settings
from ._prepare cimport ClientStatements
from ._replies cimport Exchange, Pending

cdef bint _COMPILED
# Message types as C ints, so the loops compare them without Python objects.
cdef int _E, _Z, _S, _N, _A, _G, _BIND, _EXECUTE, _SYNC, _DESCRIBE, _PARSE, _PORTAL

cdef class Session(Borrower):
    cdef public object proxy, transport, state, login, pair, server_params, params, wanted
    cdef public object wait_started, pins, pid, key, loop
    cdef public object _cleanup_timer, _login_timer, _tls_task
    cdef public bytearray buf
    cdef public Py_ssize_t max_message_size
    cdef public BackendPool pool
    cdef public Exchange ex
    cdef public ClientStatements prep
    cdef public Backend backend
    cdef public bint waiting, held, pinned, server_closing, paused, throttled, gone
    @cython.locals(pos=Py_ssize_t, run=Py_ssize_t, n=Py_ssize_t, end=Py_ssize_t,
                   size=Py_ssize_t, max_size=Py_ssize_t, t=int, ex=Exchange, backend=Backend,
                   out=list)
    cpdef _client_messages(self)
    @cython.locals(pos=Py_ssize_t, run=Py_ssize_t, n=Py_ssize_t, end=Py_ssize_t,
                   size=Py_ssize_t, t=int, ex=Exchange, head=Pending, release=bint, out=list)
    cpdef Py_ssize_t server_data(self, Backend backend, bytes buf)
    cpdef attach(self, Backend backend)
    cpdef _resume(self)
    cpdef _need_backend(self)
    @cython.locals(ex=Exchange, out=list)
    cpdef _flush(self)
    cpdef _detach(self, Backend backend)
    cpdef bint _handle(self, bytes kind, bytes body)
