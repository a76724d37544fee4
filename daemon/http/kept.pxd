# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).
from .request cimport RequestReader
from .wsgi cimport Connection

cdef object _monotonic

cdef class Tap:
    cdef public object sock
    cdef public object pending
    cdef public bytearray raw
    cdef public bint overflow

    cpdef recv(self, size, flags=*)
    cpdef restart(self)

cdef class Service:
    cdef public object app
    cdef public object access_log
    cdef public object keepalive
    cdef public object header_timeout
    cdef public object on_request
    cdef public object should_continue
    cdef public object still_serving

cdef class Kept:
    cdef public Connection connection
    cdef public RequestReader reader
    cdef public Tap tap
    cdef public object listener
    cdef public object idle_until
    cdef public object head_until
    cdef public bint transferable
    cdef public bint plain
    cdef public int fd

    # cpdef: called from the worker (Python) as before, and straight from C here.
    cpdef request_ready(self)
    cpdef woken(self)
    cpdef turn(self, Service service)
    cpdef more_to_serve(self)
    cpdef read_waiting(self)
    cpdef input_waiting(self)
    cpdef wants_turn(self)
    cpdef idle_for_thread(self)
    cpdef hold(self, now, keepalive, header_timeout)
    cpdef head_started(self, now, header_timeout)
    cpdef expired(self, now)
    cpdef unread(self)
    cpdef close(self)
