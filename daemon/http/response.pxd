# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).
from .body cimport Input
from .request cimport Request

# Module caches, typed: a lookup is a C call, not a method found by name.
cdef dict _STATUS_LINES
cdef dict _MEANINGS
cdef dict _KINDS
cdef dict _HEADER_LINES

cpdef str _date_line()
cpdef tuple _status_line(status)
cpdef tuple _header_line(header)
cdef int _DONTWAIT
cdef object _time

cdef class Response:
    cdef public object sock
    cdef public Request req
    cdef public Input input
    cdef public bint keep_alive
    cdef public object should_continue
    cdef public bint head_only
    cdef public object status
    cdef public object headers
    cdef public bint headers_sent
    cdef public bint chunked
    cdef public object content_length
    cdef public Py_ssize_t sent
    cdef public bint client_gone

    # cpdef: called from Python as before, and straight from C inside the
    # compiled module (no attribute lookup, no Python call per step).
    cpdef _sendall(self, data)
    cpdef send_head(self, first, known_length)
    cpdef _scan_headers(self, list parts)
    cpdef _choose_framing(self, list parts, known_length)
    cpdef _choose_persistence(self, list parts)
    cpdef _send_with_head(self, head, first, body)
    cpdef _frame(self, data)
    cpdef send_body(self, data)
    cpdef done(self)
    cpdef send_result(self, result)
    cpdef finish(self, known=*)
    cpdef _try_sendfile(self, wrapper)
