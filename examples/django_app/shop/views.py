"""Four views: sync, async, a locking transaction, and one that holds its connection too long."""

import time

from django.db import transaction
from django.http import HttpRequest, JsonResponse

from .models import Product


def products(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"products": list(Product.objects.values("name", "stock"))})


async def products_async(request: HttpRequest) -> JsonResponse:
    names = [p.name async for p in Product.objects.order_by("name")]
    return JsonResponse({"products": names})


def buy(request: HttpRequest, pk: int) -> JsonResponse:
    with transaction.atomic():
        product = Product.objects.select_for_update().get(pk=pk)
        product.stock -= 1
        product.save(update_fields=["stock"])
    return JsonResponse({"name": product.name, "stock": product.stock})


def slow(request: HttpRequest) -> JsonResponse:
    """Holds a connection inside a transaction for 8 s: poolguard warns, naming this line."""
    with transaction.atomic():
        count = Product.objects.count()
        time.sleep(8)
    return JsonResponse({"count": count})
