# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).
from .names cimport split_target
from .request cimport Request, RequestReader
from .response cimport Response

cdef dict _TEMPLATES  # typed: a lookup is a C call, not a method found by name

# cpdef: called from Python as before, and straight from C inside the compiled
# module; typed arguments read their fields directly.
cpdef dict _base_environ(info)
cpdef _serve(sock, RequestReader reader, Request req, app, dict conn_env, keep_alive, access_log,
             should_continue=*)
cpdef _send_error(Response resp, RequestReader reader, status)
cpdef _linger_close(sock)

cdef class Connection:
    cdef public object sock
    cdef public dict env
    cdef public RequestReader reader
    cdef public Py_ssize_t served
    cdef public object setup

    cpdef serve(self, app, access_log=*, keepalive=*, should_continue=*, on_request=*, park=*, on_wait=*)
    cpdef head_late(self, now=*)
    cpdef refuse(self, exc, access_log=*)
    cpdef close(self, linger=*)
