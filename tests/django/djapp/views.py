import os
import threading
import time

from django.db import connection, transaction
from django.http import HttpRequest, JsonResponse

from .models import Item

#: The /hold/ view parks here until the test has looked at the pool.
release = threading.Event()
held = threading.Event()


def items(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"count": Item.objects.count()})


async def aitems(request: HttpRequest) -> JsonResponse:
    count = await Item.objects.acount()
    return JsonResponse({"count": count})


def hold(request: HttpRequest) -> JsonResponse:
    alias = request.GET.get("db", "default")
    with transaction.atomic(using=alias):  # HOLD-LINE: atomic() takes the connection
        count = Item.objects.using(alias).select_for_update().filter(value__gte=0).count()
        held.set()
        release.wait(30)
    return JsonResponse({"count": count})


def backend_pid(request: HttpRequest) -> JsonResponse:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return JsonResponse({"pid": cursor.fetchone()[0], "process": os.getpid()})


def pause(request: HttpRequest) -> JsonResponse:
    """A transaction that waits ``seconds`` between two statements (a slow call elsewhere)."""
    alias = request.GET.get("db", "default")
    with transaction.atomic(using=alias):
        Item.objects.using(alias).count()
        time.sleep(float(request.GET["seconds"]))
        count = Item.objects.using(alias).count()
    return JsonResponse({"count": count})
