"""Run by Django's test runner (``manage.py test djapp.dj_tests``) in test_django_runners.py."""

import json
import urllib.request

from django.db import connection, transaction
from django.test import LiveServerTestCase, TestCase, TransactionTestCase

from poolguard.django import pool_for

from .models import Item


class InTestCase(TestCase):
    def test_atomic_savepoints_select_for_update_on_commit(self) -> None:
        self.assertTrue(connection.settings_dict["NAME"].startswith("test_"))
        self.assertTrue(connection.in_atomic_block)  # TestCase's own transaction
        Item.objects.create(name="x")
        with transaction.atomic():
            self.assertEqual(Item.objects.select_for_update().count(), 1)
        with self.captureOnCommitCallbacks(execute=True) as callbacks:
            transaction.on_commit(lambda: None)
        self.assertEqual(len(callbacks), 1)
        self.assertEqual(pool_for().name, "django:default")
        self.assertEqual(len(pool_for().checkouts()), 1)

    def test_each_test_starts_empty(self) -> None:
        self.assertEqual(Item.objects.count(), 0)


class InTransactionTestCase(TransactionTestCase):
    def test_commit_is_visible_to_another_connection(self) -> None:
        Item.objects.create(name="t")
        other = connection.copy()
        try:
            with other.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM djapp_item")
                self.assertEqual(cursor.fetchone()[0], 1)
        finally:
            other.close()


class InLiveServerTestCase(LiveServerTestCase):
    def test_server_thread_queries_through_the_pool(self) -> None:
        Item.objects.create(name="live")
        with urllib.request.urlopen(self.live_server_url + "/items/") as response:
            self.assertEqual(json.loads(response.read()), {"count": 1})
        self.assertEqual(pool_for().checkouts()[0].owner_name(), "MainThread")
