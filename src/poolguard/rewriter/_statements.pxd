# Types for the compiled build of _statements.py (see _compiled.py); the .py is the only source.
cdef class Statement:
    cdef object __weakref__
    cdef public object key, result
    cdef public bytes name
    cdef public bint stale, verified

cdef class BackendStatements:
    cdef public object capacity, _lru
    cpdef bint touch(self, Statement stmt)
