# Types for the compiled build of _replies.py (see _compiled.py); the .py is the only source.
cdef class Pending:
    cdef public bytes ends
    cdef public bint copying, extended, hidden, sync
    cdef public object error, on_ok, stmt, synth, undo
    cpdef Pending copy_started(self)

cdef class Exchange:
    cdef public object pending
    cdef public list client_out, server_out
    cdef public bint skipping
    cdef public bytes status
    cpdef to_server(self, data, pending=*)
    cpdef deliver_synth(self)
