"""Run by pytest-django (``pytest --ds=djapp.settings djapp/pt_checks.py``) in a subprocess."""

import json
import urllib.request

import pytest
from django.db import connection, transaction

from djapp.models import Item
from poolguard.django import pool_for


@pytest.mark.django_db
def test_django_db_runs_in_a_rolled_back_transaction() -> None:
    assert connection.settings_dict["NAME"].startswith("test_")
    Item.objects.create(name="p")
    with transaction.atomic():
        assert Item.objects.select_for_update().count() == 1
    assert connection.in_atomic_block
    assert pool_for().name == "django:default"


@pytest.mark.django_db
def test_previous_test_was_rolled_back() -> None:
    assert Item.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_transactional_db_commits(live_server: object) -> None:
    Item.objects.create(name="committed")
    with urllib.request.urlopen(f"{live_server}/items/") as response:
        assert json.loads(response.read()) == {"count": 1}
