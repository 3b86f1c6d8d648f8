"""The Django app ``poolguard.django``: the ``poolguard`` management command and ``migrate``."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class PoolguardConfig(AppConfig):  # type: ignore[misc]
    name = "poolguard.django"
    label = "poolguard"
    verbose_name = "poolguard"
