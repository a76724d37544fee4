# A Flask app behind a TLS-terminating proxy (nginx or an AWS load balancer).
import os

bind = ["0.0.0.0:8443"]
workers = 2
wsgi_app = "gunicorn_apps:flask_app"
forwarded_allow_ips = "127.0.0.1,10.0.0.0/8"
secure_scheme_headers = {"X-FORWARDED-PROTO": "https"}
proxy_protocol = "auto"
proxy_allow_ips = "127.0.0.1"
certfile = os.environ["CERTS"] + "/cert.pem"
keyfile = os.environ["CERTS"] + "/key.pem"
accesslog = os.environ["ACCESS_LOG"]
access_log_format = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %({x-request-id}i)s %(D)s'
