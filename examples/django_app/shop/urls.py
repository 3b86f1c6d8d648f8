from django.urls import path

from . import views

urlpatterns = [
    path("", views.products),
    path("async/", views.products_async),
    path("buy/<int:pk>/", views.buy),
    path("slow/", views.slow),
]
