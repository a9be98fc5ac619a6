"""A record of one object in the model store (the bytes themselves live in the store)."""

from django.db import models


class Blob(models.Model):
    """Key, size and checksum of a stored object; deleting the row deletes the object after commit."""

    key = models.CharField(max_length=512, unique=True)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(size__gte=0), name="blob_size_non_negative")]

    def __str__(self) -> str:
        return self.key
