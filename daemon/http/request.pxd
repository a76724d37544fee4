# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).
from .relax cimport RelaxedLine

cdef class Request:
    cdef public object method
    cdef public object url
    cdef public object version
    cdef public dict fields
    cdef public bint keep_alive
    cdef public bint expect_continue
    cdef public object content_length
    cdef public object body
    cdef public Py_ssize_t received
    cdef public bint complete
    cdef public bint broken

cdef class RequestReader(RelaxedLine):
    pass
