# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).
from .request cimport RequestReader

cdef class Connection:
    cdef public object sock
    cdef public dict env
    cdef public RequestReader reader
    cdef public Py_ssize_t served
    cdef public object setup
