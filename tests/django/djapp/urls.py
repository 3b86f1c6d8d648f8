from django.urls import path

from . import views

urlpatterns = [
    path("items/", views.items),
    path("aitems/", views.aitems),
    path("hold/", views.hold),
    path("pid/", views.backend_pid),
    path("pause/", views.pause),
]
