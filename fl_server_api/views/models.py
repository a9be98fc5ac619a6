"""Models: upload, list, download, local updates, metadata, metrics, preprocessing, SWAG statistics."""

import uuid

from django.http import HttpResponse
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fl_server_ai import trainer
from fl_server_api.serializers import DetailSerializer, MetricSerializer, ModelMetadataSerializer, ModelSerializer
from fl_server_api.views.common import (
    MAX_SAMPLE_SIZE,
    fields_of,
    get_int,
    get_list,
    get_model,
    get_text,
    read_upload,
)
from fl_server_core.exceptions import InvalidInputError, PermissionDeniedError
from fl_server_core.models import Model, ModelKind
from fl_server_core.selectors import can_manage_model, can_read_model, visible_models
from fl_server_core.services import models as model_services
from fl_server_core.services.blobs import read_blob

OCTET_STREAM = OpenApiResponse(response={"type": "string", "format": "binary"}, description="Binary file.")

MODEL_UPLOAD = inline_serializer(
    "ModelUpload",
    {
        "name": serializers.CharField(),
        "description": serializers.CharField(required=False),
        "model_file": serializers.FileField(required=False, help_text="TorchScript archive (not for type=MEAN)."),
        "model_preprocessing_file": serializers.FileField(required=False),
        "input_shape": serializers.ListField(child=serializers.CharField(), required=False),
        "type": serializers.ChoiceField(choices=["GLOBAL", "MEAN"], required=False),
        "models": serializers.ListField(child=serializers.UUIDField(), required=False),
    },
)
LOCAL_UPDATE = inline_serializer(
    "LocalUpdateUpload",
    {
        "round": serializers.IntegerField(),
        "sample_size": serializers.IntegerField(),
        "model_file": serializers.FileField(),
        "metric_names": serializers.ListField(child=serializers.CharField(), required=False),
        "metric_values": serializers.ListField(child=serializers.CharField(), required=False),
        "owner": serializers.UUIDField(required=False),
    },
)


def readable_model(request: Request, pk: str) -> Model:
    """The model, if the caller may read it (404 unknown, 403 not allowed)."""
    model = get_model(pk)
    if not can_read_model(request.user, model):
        raise PermissionDeniedError("You are not allowed to access this model.")
    return model


def binary_response(data: bytes, filename: str) -> HttpResponse:
    """A file download."""
    response = HttpResponse(data, content_type="application/octet-stream")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    response["Content-Length"] = str(len(data))
    return response


class ModelListView(APIView):
    """`GET` models visible to the caller; `POST` uploads a global model or creates a mean model."""

    @extend_schema(responses=ModelSerializer(many=True))
    def get(self, request: Request) -> Response:
        """Metadata of the caller's models."""
        models = visible_models(request.user).select_related("weights", "training")
        return Response(ModelSerializer(models, many=True).data)

    @extend_schema(
        request={"multipart/form-data": MODEL_UPLOAD},
        responses={
            201: inline_serializer(
                "ModelUploaded", {"detail": serializers.CharField(), "model_id": serializers.UUIDField()}
            )
        },
    )
    def post(self, request: Request) -> Response:
        """Upload a TorchScript global model (or `type=MEAN` with `models`)."""
        data = fields_of(request)
        name = get_text(data, "name")
        description = get_text(data, "description", required=False, max_length=10_000)
        kind = str(data.get("type") or ModelKind.GLOBAL).strip().upper()
        if kind not in (ModelKind.GLOBAL, ModelKind.MEAN):
            raise InvalidInputError(f"type: must be GLOBAL or MEAN, got {data.get('type')!r}.")
        if kind == ModelKind.MEAN:
            members = [self._member(request, pk) for pk in get_list(data, "models")]
            model = model_services.create_mean_model(request.user, name, description, members)
        else:
            model = model_services.create_global_model(
                request.user,
                name,
                description,
                read_upload(request, "model_file"),
                read_upload(request, "model_preprocessing_file", required=False),
                model_services.parse_input_shape(get_list(data, "input_shape")),
            )
        return Response({"detail": "Model Upload Accepted", "model_id": str(model.id)}, status=status.HTTP_201_CREATED)

    @staticmethod
    def _member(request: Request, pk: str) -> Model:
        try:
            model = Model.objects.get(pk=uuid.UUID(str(pk)))
        except (Model.DoesNotExist, ValueError) as error:
            raise InvalidInputError(f"models: {pk!r} is not a known model id.") from error
        if not can_read_model(request.user, model):
            raise PermissionDeniedError(f"models: you are not allowed to access model {pk}.")
        return model


class _NoFormatOverride:
    """DRF settings with the `?format=` renderer override switched off."""

    URL_FORMAT_OVERRIDE = None


class DownloadFormatNegotiation(DefaultContentNegotiation):
    """Content negotiation that leaves `?format=` to the view, where it picks the download format.

    DRF's default negotiation reads `?format=` as a renderer name and answers 404 for unknown names
    such as `safetensors`.
    """

    settings = _NoFormatOverride()


class ModelDetailView(APIView):
    """Download a model, upload a local update for it, or delete it."""

    parser_classes = [MultiPartParser]
    content_negotiation_class = DownloadFormatNegotiation

    @extend_schema(
        parameters=[
            OpenApiParameter("format", str, enum=["torchscript", "safetensors"], required=False),
            OpenApiParameter("round", int, required=False, description="Weights after this many rounds."),
        ],
        responses={200: OCTET_STREAM},
    )
    def get(self, request: Request, pk: str) -> HttpResponse:
        """The model as a TorchScript archive with its current weights (or `?format=safetensors`)."""
        model = readable_model(request, pk)
        fmt = request.query_params.get("format", "torchscript")
        if fmt not in ("torchscript", "safetensors"):
            raise InvalidInputError("format must be 'torchscript' or 'safetensors'.")
        if model.kind == ModelKind.MEAN:
            raise InvalidInputError("A mean model has no weights of its own; download its member models.")
        weights = model.weights
        if request.query_params.get("round") not in (None, ""):
            weights = model_services.weights_version(model, get_int(request.query_params, "round"))
        if fmt == "safetensors":
            return binary_response(read_blob(weights), f"{model.id}.safetensors")
        return binary_response(model_services.export_torchscript(model, weights), f"{model.id}.pt")

    @extend_schema(
        operation_id="models_local_update_create",
        request={"multipart/form-data": LOCAL_UPDATE},
        responses={201: DetailSerializer},
    )
    def post(self, request: Request, pk: str) -> Response:
        """A participant's local update of this global model for the current round."""
        model = get_model(pk)
        data = fields_of(request)
        owner = data.get("owner")
        if owner not in (None, ""):
            try:
                owner_id = uuid.UUID(str(owner).strip())
            except ValueError:
                raise InvalidInputError(f"owner: {owner!r} is not a valid user id.") from None
            if owner_id != request.user.pk:
                raise PermissionDeniedError("owner: you can only upload your own updates.")
        round_number = get_int(data, "round")
        sample_size = get_int(data, "sample_size", minimum=1, maximum=MAX_SAMPLE_SIZE)
        metrics = model_services.parse_metrics(get_list(data, "metric_names"), get_list(data, "metric_values"))
        update = read_upload(request, "model_file")
        trainer.accept_local_update(model, request.user, round_number, sample_size, update, metrics)
        return Response({"detail": "Model Update Accepted"}, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: DetailSerializer})
    def delete(self, request: Request, pk: str) -> Response:
        """Delete a model (owner, its training's actor, or staff)."""
        model = get_model(pk)
        if not can_manage_model(request.user, model):
            raise PermissionDeniedError("Only the model's owner may delete it.")
        model_services.delete_model(model)
        return Response({"detail": "Model removed!"})


class ModelMetadataView(APIView):
    """Metadata of a model, with parameter count, sizes and tensor names, shapes and dtypes."""

    @extend_schema(responses=ModelMetadataSerializer)
    def get(self, request: Request, pk: str) -> Response:
        """The model's metadata."""
        return Response(ModelMetadataSerializer(readable_model(request, pk)).data)


class ModelMetricsView(APIView):
    """Metrics of a model: read them, or report new ones."""

    @extend_schema(responses=MetricSerializer(many=True))
    def get(self, request: Request, pk: str) -> Response:
        """Every metric of the model."""
        model = readable_model(request, pk)
        return Response(MetricSerializer(model.metrics.all(), many=True).data)

    @extend_schema(
        request={
            "multipart/form-data": inline_serializer(
                "MetricsUpload",
                {
                    "metric_names": serializers.ListField(child=serializers.CharField()),
                    "metric_values": serializers.ListField(child=serializers.CharField()),
                    "step": serializers.IntegerField(required=False),
                },
            )
        },
        responses={201: DetailSerializer},
    )
    def post(self, request: Request, pk: str) -> Response:
        """Report metric values (`metric_names` and `metric_values`, repeated)."""
        model = get_model(pk)
        data = fields_of(request)
        names = get_list(data, "metric_names")
        texts = get_list(data, "metric_values")
        file_slots = [name for name in names if name in request.FILES]
        if len(texts) + len(file_slots) == len(names):
            # a binary metric (a file named like the metric) takes its name's position among the values
            remaining = iter(texts)
            values = [request.FILES[name] if name in request.FILES else next(remaining) for name in names]
        else:  # parse_metrics reports the length mismatch
            values = texts + [request.FILES[name] for name in file_slots]
        pairs = model_services.parse_metrics(names, values)
        step = get_int(data, "step") if data.get("step") not in (None, "") else None
        trainer.report_metrics(model, request.user, pairs, step)
        return Response({"detail": "Model Metrics Upload Accepted", "model_id": str(model.id)}, status=201)


class ModelPreprocessingView(APIView):
    """The TorchScript preprocessing module of a global model."""

    @extend_schema(responses={200: OCTET_STREAM})
    def get(self, request: Request, pk: str) -> HttpResponse:
        """Download the preprocessing module."""
        model = readable_model(request, pk)
        if model.preprocessing_id is None:
            return Response({"detail": "This model has no preprocessing module."}, status=404)
        return binary_response(read_blob(model.preprocessing), f"{model.id}-preprocessing.pt")

    @extend_schema(
        request={
            "multipart/form-data": inline_serializer(
                "PreprocessingUpload", {"model_preprocessing_file": serializers.FileField()}
            )
        },
        responses={202: DetailSerializer},
    )
    def post(self, request: Request, pk: str) -> Response:
        """Attach or replace the preprocessing module (owner or actor)."""
        model = get_model(pk)
        if not can_manage_model(request.user, model):
            raise PermissionDeniedError("Only the model's owner may change its preprocessing module.")
        model_services.set_preprocessing(model, read_upload(request, "model_preprocessing_file"))
        return Response({"detail": "Preprocessing Model Upload Accepted"}, status=status.HTTP_202_ACCEPTED)


class ModelSwagView(APIView):
    """A participant's SWAG statistics for the current SWAG round."""

    parser_classes = [MultiPartParser]

    @extend_schema(
        request={
            "multipart/form-data": inline_serializer(
                "SwagUpload",
                {
                    "round": serializers.IntegerField(),
                    "sample_size": serializers.IntegerField(),
                    "first_moment_file": serializers.FileField(),
                    "second_moment_file": serializers.FileField(),
                },
            )
        },
        responses={201: DetailSerializer},
    )
    def post(self, request: Request, pk: str) -> Response:
        """Upload first and second moments (flat tensors in `model.parameters()` order)."""
        model = get_model(pk)
        data = fields_of(request)
        round_number = get_int(data, "round")
        sample_size = get_int(data, "sample_size", minimum=1, maximum=MAX_SAMPLE_SIZE)
        first = read_upload(request, "first_moment_file")
        second = read_upload(request, "second_moment_file")
        trainer.accept_swag_update(model, request.user, round_number, sample_size, first, second)
        return Response({"detail": "SWAG Statistic Accepted"}, status=status.HTTP_201_CREATED)
