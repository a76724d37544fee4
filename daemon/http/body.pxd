# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).
from .request cimport Request, RequestReader

cdef class Input:
    cdef public RequestReader _reader
    cdef public Request _req
    cdef public bytearray _buf
    cdef public bint continue_pending

    # cpdef: called from Python as before, and straight from C inside the compiled modules.
    cpdef _pull(self)
    cpdef _take(self, n)
    cpdef drain(self, limit)
