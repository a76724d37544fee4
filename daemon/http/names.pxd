# Declarations for the compiled build of this module (tools/build_speedups.py,
# Cython). The constants are C integers, so `_QUERY in url` on typed bytes is a
# memchr; split_target is called straight from C by wsgi (cimported there).
cdef int _HASH, _PERCENT, _QUERY

cpdef tuple split_target(bytes url)
