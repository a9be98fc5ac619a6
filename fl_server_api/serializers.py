"""Explicit serializers of the API's JSON shapes."""

import base64
from typing import Any

from django.contrib.auth.models import Group
from django.contrib.auth.password_validation import validate_password
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.authtoken.models import Token

from fl_server_core.models import (
    AggregationMethod,
    Metric,
    Model,
    Notification,
    RoundArrival,
    Training,
    TrainingRound,
    UncertaintyMethod,
    User,
)
from fl_server_core.services.trainings import MAX_ROUNDS


class UserSerializer(serializers.ModelSerializer):
    """A user; the token is shown only to the user itself."""

    token = serializers.SerializerMethodField()

    class Meta:
        model = User
        fields = ["id", "username", "first_name", "last_name", "email", "actor", "client", "message_endpoint", "token"]

    @extend_schema_field({"type": "string", "nullable": True})
    def get_token(self, user: User) -> str | None:
        """The API token, for the user itself only."""
        request = self.context.get("request")
        if request is None or request.user.pk != user.pk:
            return None
        token = Token.objects.filter(user=user).first()  # an operator may have revoked it
        return token.key if token else None


class UserCreateSerializer(serializers.ModelSerializer):
    """Registration; staff and superuser flags cannot be set through the API."""

    password = serializers.CharField(write_only=True, style={"input_type": "password"})

    class Meta:
        model = User
        fields = ["username", "password", "first_name", "last_name", "email", "actor", "client", "message_endpoint"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Check the password against the configured validators."""
        validate_password(attrs["password"], User(username=attrs.get("username", ""), email=attrs.get("email", "")))
        return attrs

    def create(self, validated_data: dict[str, Any]) -> User:
        """Create the user with a hashed password (its token is created with it)."""
        return User.objects.create_user(**validated_data)


class GroupSerializer(serializers.ModelSerializer):
    """A group of users."""

    class Meta:
        model = Group
        fields = ["id", "name"]


class ModelSerializer(serializers.ModelSerializer):
    """Metadata of a model (never its weights)."""

    type = serializers.CharField(source="kind", read_only=True)
    owner = serializers.UUIDField(source="owner_id", read_only=True)
    base_model = serializers.UUIDField(source="base_model_id", read_only=True, allow_null=True)
    training_id = serializers.SerializerMethodField()
    size_bytes = serializers.SerializerMethodField()
    sha256 = serializers.SerializerMethodField()
    has_preprocessing = serializers.SerializerMethodField()
    members = serializers.SerializerMethodField()

    class Meta:
        model = Model
        fields = [
            "id", "type", "name", "description", "owner", "round", "created_at", "updated_at",
            "training_id", "base_model", "sample_size", "weights_format", "parameter_count",
            "size_bytes", "sha256", "input_shape", "has_preprocessing", "members",
        ]  # fmt: skip

    @extend_schema_field({"type": "string", "format": "uuid", "nullable": True})
    def get_training_id(self, model: Model) -> str | None:
        """The training of a global model."""
        training = getattr(model, "training", None)
        return str(training.pk) if training is not None else None

    def get_size_bytes(self, model: Model) -> int:
        """Size of the stored weights."""
        return model.weights.size if model.weights_id else 0

    @extend_schema_field({"type": "string", "nullable": True})
    def get_sha256(self, model: Model) -> str | None:
        """SHA-256 of the stored weights."""
        return model.weights.sha256 if model.weights_id else None

    def get_has_preprocessing(self, model: Model) -> bool:
        """Whether a preprocessing module is attached."""
        return model.preprocessing_id is not None

    @extend_schema_field({"type": "array", "items": {"type": "string", "format": "uuid"}})
    def get_members(self, model: Model) -> list[str]:
        """Member models of an ensemble."""
        return [str(pk) for pk in model.members.values_list("pk", flat=True)] if model.kind == "MEAN" else []


class ModelMetadataSerializer(ModelSerializer):
    """Metadata including the names, shapes and dtypes of the weights."""

    tensors = serializers.JSONField(source="tensor_spec", read_only=True)
    archive_size_bytes = serializers.SerializerMethodField()

    class Meta(ModelSerializer.Meta):
        fields = [*ModelSerializer.Meta.fields, "tensors", "archive_size_bytes"]

    @extend_schema_field({"type": "integer", "nullable": True})
    def get_archive_size_bytes(self, model: Model) -> int | None:
        """Size of the TorchScript archive of a global model."""
        return model.archive.size if model.archive_id else None


class MetricSerializer(serializers.ModelSerializer):
    """One metric value; binary values are base64 encoded."""

    value = serializers.SerializerMethodField()
    is_binary = serializers.SerializerMethodField()
    reporter = serializers.UUIDField(source="reporter_id", read_only=True, allow_null=True)
    model = serializers.UUIDField(source="model_id", read_only=True)

    class Meta:
        model = Metric
        fields = ["id", "model", "key", "value", "is_binary", "step", "reporter", "created_at"]

    @extend_schema_field({"oneOf": [{"type": "number"}, {"type": "string", "format": "byte"}]})
    def get_value(self, metric: Metric) -> float | str:
        """The float value, or base64 of the binary value."""
        if metric.value_float is not None:
            return metric.value_float
        return base64.b64encode(bytes(metric.value_binary)).decode("ascii")

    def get_is_binary(self, metric: Metric) -> bool:
        """Whether the value is binary data."""
        return metric.value_float is None


class TrainingCreateSerializer(serializers.Serializer):
    """Request body of `POST /api/trainings/`."""

    model_id = serializers.UUIDField()
    target_num_updates = serializers.IntegerField(min_value=1, max_value=MAX_ROUNDS)
    metric_names = serializers.ListField(child=serializers.CharField(max_length=256), default=list)
    aggregation_method = serializers.ChoiceField(choices=AggregationMethod.choices, default=AggregationMethod.FED_AVG)
    uncertainty_method = serializers.ChoiceField(choices=UncertaintyMethod.choices, default=UncertaintyMethod.NONE)
    options = serializers.JSONField(default=dict)
    clients = serializers.ListField(child=serializers.UUIDField(), default=list)


class ClientsSerializer(serializers.Serializer):
    """Request body of `PUT|DELETE /api/trainings/<id>/clients/`."""

    clients = serializers.ListField(child=serializers.UUIDField(), allow_empty=False)


class TrainingSerializer(serializers.ModelSerializer):
    """A training with its progress."""

    model_id = serializers.UUIDField(read_only=True)
    actor = serializers.UUIDField(source="actor_id", read_only=True)
    participants = serializers.SerializerMethodField()
    round = serializers.IntegerField(source="model.round", read_only=True)
    local_models_arrived = serializers.SerializerMethodField()
    local_models_expected = serializers.SerializerMethodField()
    current_round = serializers.SerializerMethodField()

    class Meta:
        model = Training
        fields = [
            "id", "model_id", "actor", "participants", "state", "round", "target_num_updates",
            "aggregation_method", "uncertainty_method", "options", "metric_names", "local_models_arrived",
            "local_models_expected", "current_round", "locked", "error_reason", "created_at", "last_update",
        ]  # fmt: skip

    @extend_schema_field({"type": "array", "items": {"type": "string", "format": "uuid"}})
    def get_participants(self, training: Training) -> list[str]:
        """Ids of the participants."""
        return [str(pk) for pk in training.participants.values_list("pk", flat=True)]

    def get_local_models_arrived(self, training: Training) -> int:
        """Contributions received in the current round."""
        round_ = training.current_round
        return round_.arrivals.count() if round_ is not None else 0

    def get_local_models_expected(self, training: Training) -> int:
        """Contributions the current round waits for."""
        round_ = training.current_round
        return round_.expected.count() if round_ is not None else training.participants.count()

    @extend_schema_field({"type": "object", "nullable": True})
    def get_current_round(self, training: Training) -> dict[str, Any] | None:
        """Kind, number, state and deadline of the current round."""
        round_ = training.current_round
        if round_ is None:
            return None
        return {
            "number": round_.number,
            "kind": round_.kind,
            "state": round_.state,
            "opened_at": round_.opened_at,
            "deadline": round_.deadline,
        }


class DetailSerializer(serializers.Serializer):
    """`{"detail": "..."}`, the shape of every message and error."""

    detail = serializers.CharField()


class NotificationSerializer(serializers.ModelSerializer):
    """A notification as the pull endpoint serves it: the pushed JSON plus its sequence number."""

    seq = serializers.IntegerField(source="id", read_only=True)
    training_uuid = serializers.UUIDField(source="training_id", read_only=True)
    recipient = serializers.UUIDField(source="recipient_id", read_only=True)

    class Meta:
        model = Notification
        fields = ["seq", "notification_type", "training_uuid", "body", "recipient", "created_at", "delivery_state"]


class ArrivalSerializer(serializers.ModelSerializer):
    """A participant's contribution to a round."""

    user = serializers.UUIDField(source="user_id", read_only=True)

    class Meta:
        model = RoundArrival
        fields = ["user", "sample_size", "arrived_at"]


class RoundSerializer(serializers.ModelSerializer):
    """A round with its participants, arrivals and timing."""

    expected = serializers.SerializerMethodField()
    arrivals = ArrivalSerializer(many=True, read_only=True)

    class Meta:
        model = TrainingRound
        fields = [
            "number", "kind", "state", "expected", "arrivals", "total_samples", "opened_at", "deadline",
            "closed_at", "finished_at", "aggregation_seconds", "close_reason", "assignments",
        ]  # fmt: skip

    @extend_schema_field({"type": "array", "items": {"type": "string", "format": "uuid"}})
    def get_expected(self, round_: TrainingRound) -> list[str]:
        """Clients the round waited for."""
        return [str(user.pk) for user in round_.expected.all()]


class TrainingMetricSerializer(serializers.ModelSerializer):
    """A metric of a training as a row `{round, reporter, key, value}`."""

    round = serializers.IntegerField(source="step", read_only=True)
    reporter = serializers.UUIDField(source="reporter_id", read_only=True, allow_null=True)
    model = serializers.UUIDField(source="model_id", read_only=True)
    value = serializers.SerializerMethodField()

    class Meta:
        model = Metric
        fields = ["round", "reporter", "key", "value", "model", "created_at"]

    @extend_schema_field({"oneOf": [{"type": "number"}, {"type": "string", "format": "byte"}]})
    def get_value(self, metric: Metric) -> float | str:
        """The float value, or base64 of the binary value."""
        return MetricSerializer().get_value(metric)
