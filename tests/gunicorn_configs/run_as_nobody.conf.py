# Started as root (to bind low ports), serving as an unprivileged user.
user = "nobody"
group = "nogroup"
umask = 0o027
workers = 2
proc_name = "shop-web"
wsgi_app = "gunicorn_apps:whoami"
