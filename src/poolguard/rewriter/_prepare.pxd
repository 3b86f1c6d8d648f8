# Types for the compiled build of _prepare.py (see _compiled.py); the .py is the only source.
cimport cython
from ._pool cimport Backend
from ._replies cimport Exchange, Pending
from ._statements cimport Statement

cdef bint _COMPILED

cdef class Unnamed:
    cdef public object query, types

cdef class ClientStatements:
    cdef public object checking, registry, unnamed
    cdef public dict named
    cdef public Exchange ex
    @cython.locals(portal_end=Py_ssize_t, name_end=Py_ssize_t, length=Py_ssize_t, stmt=Statement)
    cpdef bint bind_prepared(self, Backend backend, bytearray buf, Py_ssize_t start, Py_ssize_t end)
