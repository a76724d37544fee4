import os

from django.http import HttpResponse, JsonResponse
from django.urls import path


def home(request):
    return HttpResponse(f"django {os.environ.get('APP_VERSION', 'v1')}\n", content_type="text/plain")


def echo(request):
    return JsonResponse({"method": request.method, "length": len(request.body)})


urlpatterns = [path("", home), path("echo", echo)]
