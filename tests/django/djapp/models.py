from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=50)
    value = models.IntegerField(default=0)
    data = models.JSONField(default=dict)
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "djapp"
