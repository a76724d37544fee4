"""ASGI 3 on asyncio for the asgi worker (workers/asgi.py).

One job per file:
  server.py     what every connection of one worker shares (app, limits, counters)
  http.py       one HTTP/1.1 connection: httptools parsing, keep-alive, pipelining, deadlines
  cycle.py      one request/response: the ASGI receive/send pair, framing, backpressure
  websocket.py  a connection after a WebSocket upgrade (wsproto)
  lifespan.py   the lifespan protocol (startup before ready, shutdown at stop)
  loading.py    finding the app (module:app, --factory) and the in-process ready check
"""
