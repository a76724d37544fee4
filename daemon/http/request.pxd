# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).
cimport cython

from .relax cimport RelaxedLine

# Module caches, typed: a lookup is a C call, not a method found by name.
cdef dict _VERSIONS
cdef dict _METHODS
cdef set _GOOD_HOSTS
cdef dict _HEADER_KEYS  # names._HEADER_KEYS, the same dict
cdef Py_ssize_t FIELD_FRAMING
cdef Py_ssize_t VERSION_FRAMING
cdef int _DONTWAIT
cdef object _monotonic

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
    # cpdef: called from Python as before, and straight from C inside the compiled
    # modules. httptools calls the parser's callbacks (on_*) by name: def, or cpdef
    # for the typed locals.
    @cython.locals(req=Request, fields=dict)
    cpdef on_header(self, bytes name, bytes value)
    @cython.locals(req=Request, fields=dict)
    cpdef on_headers_complete(self)
    cpdef _check_head(self, req)
    cpdef _other_version(self, version)
    cpdef _check_trailer(self, key)
    cpdef _refuse(self, exc)
    cpdef next_request(self, idle_timeout=*, should_continue=*)
    cpdef fill(self, head=*)
    cpdef read_now(self)
    cpdef _take(self, data)
    cpdef _recv(self, head, timed_out)
    cpdef _readable(self, timeout)
    cpdef head_late(self, now=*)
    cpdef set_timeout(self, timeout)
    cpdef for_sending(self)
    cpdef _wait_idle(self, timeout, should_continue)
