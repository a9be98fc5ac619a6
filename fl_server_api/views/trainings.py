"""Trainings: create, list, detail, delete, participants, start, models."""

import time

from django.db.models import Q
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fl_server_ai import trainer
from fl_server_api.serializers import (
    ClientsSerializer,
    DetailSerializer,
    ModelSerializer,
    NotificationSerializer,
    RoundSerializer,
    TrainingCreateSerializer,
    TrainingMetricSerializer,
    TrainingSerializer,
)
from fl_server_api.views.common import MAX_INT64, get_int, get_model, get_training
from fl_server_core.exceptions import InvalidInputError, PermissionDeniedError
from fl_server_core.models import Metric, Model, Notification, Training
from fl_server_core.selectors import is_participant
from fl_server_core.services import trainings as training_services


def managed_training(request: Request, pk: str) -> Training:
    """The training, if the caller is its actor."""
    training = get_training(pk)
    if training.actor_id != request.user.pk and not request.user.is_staff:
        raise PermissionDeniedError("Only the training's actor may do this.")
    return training


def readable_training(request: Request, pk: str) -> Training:
    """The training, if the caller is its actor or a participant."""
    training = get_training(pk)
    user = request.user
    if training.actor_id != user.pk and not user.is_staff and not is_participant(user, training):
        raise PermissionDeniedError("Only the training's actor and participants may see it.")
    return training


class TrainingListView(APIView):
    """`GET` the caller's trainings (as actor); `POST` creates one."""

    @extend_schema(responses=TrainingSerializer(many=True))
    def get(self, request: Request) -> Response:
        """Trainings the caller runs."""
        trainings = Training.objects.filter(actor=request.user).select_related("model")
        return Response(TrainingSerializer(trainings, many=True).data)

    @extend_schema(
        request=TrainingCreateSerializer,
        responses={
            201: inline_serializer(
                "TrainingCreated", {"detail": serializers.CharField(), "training_id": serializers.UUIDField()}
            )
        },
    )
    def post(self, request: Request) -> Response:
        """Create a training of a global model."""
        serializer = TrainingCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        model = get_model(data.pop("model_id"))
        training = training_services.create_training(request.user, model, **data)
        return Response(
            {"detail": "Training created successfully!", "training_id": str(training.id)},
            status=status.HTTP_201_CREATED,
        )


class TrainingDetailView(APIView):
    """One training: its state and progress, or its deletion."""

    @extend_schema(responses=TrainingSerializer)
    def get(self, request: Request, pk: str) -> Response:
        """The training with its progress."""
        return Response(TrainingSerializer(readable_training(request, pk)).data)

    @extend_schema(responses=DetailSerializer)
    def delete(self, request: Request, pk: str) -> Response:
        """Delete the training (its model stays)."""
        managed_training(request, pk).delete()
        return Response({"detail": "Training removed!"})


class TrainingClientsView(APIView):
    """Register (`PUT`) or remove (`DELETE`) participants."""

    @extend_schema(request=ClientsSerializer, responses={202: DetailSerializer})
    def put(self, request: Request, pk: str) -> Response:
        """Register users as participants."""
        training = managed_training(request, pk)
        serializer = ClientsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        training_services.add_participants(training, serializer.validated_data["clients"])
        return Response({"detail": "Users registered as participants!"}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=ClientsSerializer, responses={200: DetailSerializer})
    def delete(self, request: Request, pk: str) -> Response:
        """Remove users from the participants."""
        training = managed_training(request, pk)
        serializer = ClientsSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        training_services.remove_participants(training, serializer.validated_data["clients"])
        return Response({"detail": "Users removed from training participants!"})


class TrainingStartView(APIView):
    """Start a training."""

    @extend_schema(request=None, responses={202: DetailSerializer})
    def post(self, request: Request, pk: str) -> Response:
        """INITIAL -> ONGOING."""
        trainer.start_training(managed_training(request, pk))
        return Response({"detail": "Training started!"}, status=status.HTTP_202_ACCEPTED)


class TrainingModelsView(APIView):
    """Every model of a training: its global model, then the local updates, newest first."""

    @extend_schema(responses=ModelSerializer(many=True))
    def get(self, request: Request, pk: str) -> Response:
        """Metadata of the training's models."""
        training = readable_training(request, pk)
        locals_ = Model.objects.filter(base_model=training.model).select_related("weights").order_by("-round")
        return Response(ModelSerializer([get_model(training.model_id), *locals_], many=True).data)


class TrainingLatestModelsView(APIView):
    """The current global model of a training and the updates of its latest round."""

    @extend_schema(
        responses=inline_serializer(
            "LatestModels",
            {
                "global_model": ModelSerializer(),
                "round": serializers.IntegerField(),
                "local_models": ModelSerializer(many=True),
            },
        )
    )
    def get(self, request: Request, pk: str) -> Response:
        """The global model and the local updates of the most recent round that has any."""
        training = readable_training(request, pk)
        updates = Model.objects.filter(base_model=training.model)
        latest = updates.order_by("-round").values_list("round", flat=True).first()
        latest_updates = updates.filter(round=latest).select_related("weights") if latest is not None else []
        return Response(
            {
                "global_model": ModelSerializer(get_model(training.model_id)).data,
                "round": training.model.round,
                "local_models": ModelSerializer(latest_updates, many=True).data,
            }
        )


class TrainingAbortView(APIView):
    """Abort a training."""

    @extend_schema(request=None, responses={200: DetailSerializer})
    def post(self, request: Request, pk: str) -> Response:
        """Any unfinished state -> ERROR (aborted); participants are told."""
        trainer.abort_training(managed_training(request, pk))
        return Response({"detail": "Training aborted!"})


class TrainingEventsView(APIView):
    """The training's notifications for the caller (all of them for the actor), for clients that pull."""

    MAX_WAIT_SECONDS = 30.0

    @extend_schema(
        parameters=[
            OpenApiParameter("after", int, required=False, description="Only events with a larger `seq`."),
            OpenApiParameter("wait", float, required=False, description="Hold the request up to this many seconds."),
        ],
        responses=NotificationSerializer(many=True),
    )
    def get(self, request: Request, pk: str) -> Response:
        """Events after `after`, waiting up to `wait` seconds for the first one."""
        training = get_training(pk)
        user = request.user
        events = Notification.objects.filter(training=training).order_by("id")
        if training.actor_id != user.pk and not user.is_staff:
            if not events.filter(recipient=user).exists() and not is_participant(user, training):
                raise PermissionDeniedError("Only the training's actor and participants may read its events.")
            events = events.filter(recipient=user)
        after = get_int(request.query_params, "after", maximum=MAX_INT64) if "after" in request.query_params else 0
        wait = self._wait(request)
        deadline = time.monotonic() + wait
        while True:
            found = list(events.filter(id__gt=after)[:500])
            if found or time.monotonic() >= deadline:
                return Response(NotificationSerializer(found, many=True).data)
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _wait(self, request: Request) -> float:
        value = request.query_params.get("wait", "0") or "0"
        try:
            wait = float(value)
        except ValueError:
            raise InvalidInputError(f"wait: {value!r} is not a number of seconds.") from None
        if not 0 <= wait <= self.MAX_WAIT_SECONDS:
            raise InvalidInputError(f"wait: must be between 0 and {self.MAX_WAIT_SECONDS:g} seconds.")
        return wait


class TrainingRoundsView(APIView):
    """Round history: who was expected, who arrived with how many samples, when rounds opened and closed."""

    @extend_schema(responses=RoundSerializer(many=True))
    def get(self, request: Request, pk: str) -> Response:
        """Every round of the training, oldest first."""
        training = readable_training(request, pk)
        rounds = training.rounds.prefetch_related("expected", "arrivals").order_by("opened_at", "id")
        return Response(RoundSerializer(rounds, many=True).data)


class TrainingMetricsView(APIView):
    """Every metric of the training (global model and updates) as rows `{round, reporter, key, value}`."""

    @extend_schema(responses=TrainingMetricSerializer(many=True))
    def get(self, request: Request, pk: str) -> Response:
        """Metrics, ordered by round."""
        training = readable_training(request, pk)
        metrics = Metric.objects.filter(Q(model=training.model) | Q(model__base_model=training.model))
        return Response(TrainingMetricSerializer(metrics.order_by("step", "created_at", "id"), many=True).data)
