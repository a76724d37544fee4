# logging configured with logconfig_dict; the app's prints captured into the error log.
import os

workers = 1
wsgi_app = "gunicorn_apps:whoami"
capture_output = True
errorlog = os.environ["ERROR_LOG"]
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
    "handlers": {
        "app_file": {"class": "logging.FileHandler", "filename": os.environ["APP_LOG"],
                     "formatter": "plain"},
    },
    "loggers": {"shop": {"handlers": ["app_file"], "level": "INFO", "propagate": False}},
}
