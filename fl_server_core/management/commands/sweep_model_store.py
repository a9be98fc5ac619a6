"""`manage.py sweep_model_store`: delete model-store objects that no row references."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from fl_server_core.services.blobs import sweep_orphans


class Command(BaseCommand):
    """Remove orphaned objects (left by crashed processes) older than the grace period."""

    help = __doc__

    def add_arguments(self, parser: CommandParser) -> None:
        """`--grace-seconds`: minimum age of an orphan to delete."""
        parser.add_argument("--grace-seconds", type=float, default=settings.FL_SWEEP_GRACE_SECONDS)

    def handle(self, *args: Any, **options: Any) -> None:
        """Sweep and report."""
        removed = sweep_orphans(options["grace_seconds"])
        for key in removed:
            self.stdout.write(f"removed {key}")
        self.stdout.write(f"{len(removed)} orphaned object(s) removed")
