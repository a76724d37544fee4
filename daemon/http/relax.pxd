# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython): its classes become extension types, whose attributes are C fields
# (a fixed layout: every attribute the .py sets must be declared here).

# The state of request.RequestReader, declared on its base class, which reads it too.
cdef class RelaxedLine:
    cdef public object sock
    cdef public object parser
    cdef public Py_ssize_t limit_line
    cdef public Py_ssize_t limit_fields
    cdef public Py_ssize_t limit_field_size
    cdef public Py_ssize_t max_head
    cdef public double read_timeout
    cdef public double header_timeout
    cdef public double head_due
    cdef public double tick
    cdef public object sock_timeout
    cdef public object ready
    cdef public object current
    cdef public bint in_head
    cdef public Py_ssize_t head_bytes
    cdef public list url_parts
    cdef public Py_ssize_t url_len
    cdef public Py_ssize_t nfields
    cdef public object error
    cdef public bint eof
    cdef public bint done
    cdef public object head_chunks
    cdef public Py_ssize_t heads_begun
    cdef public object pending_line
    cdef public object relaxed
    cdef public object on_wait
    cdef public object refusal
    cdef public object poller
    cdef public bint keep_method

    # cpdef: called from Python as before, and straight from C inside the compiled modules.
    cpdef _feed(self, data)
    cpdef _parse_stopped(self, exc)
    cpdef _stop(self, error)
    cpdef _relax(self, url_refused)
    cpdef _relax_pending(self, data)
