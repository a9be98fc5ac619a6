"""Users and groups."""

from django.conf import settings
from django.contrib.auth.models import Group
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import permissions, status, viewsets
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from fl_server_api.serializers import GroupSerializer, TrainingSerializer, UserCreateSerializer, UserSerializer
from fl_server_core.selectors import trainings_of, visible_users


class CanRegister(BasePermission):
    """Anyone may read with authentication; registration is open or staff only, per setting."""

    message = "Registration is closed; ask an administrator to create your account."

    def has_permission(self, request: Request, view: APIView) -> bool:
        """Check the request against the registration setting."""
        if request.method == "POST":
            return settings.FL_OPEN_REGISTRATION or bool(request.user and request.user.is_staff)
        return bool(request.user and request.user.is_authenticated)


class UserListView(APIView):
    """`GET` users visible to the caller; `POST` registers a user."""

    permission_classes = [CanRegister]

    @extend_schema(responses=UserSerializer(many=True))
    def get(self, request: Request) -> Response:
        """Users the caller can see."""
        users = visible_users(request.user)
        return Response(UserSerializer(users, many=True, context={"request": request}).data)

    @extend_schema(request=UserCreateSerializer, responses={201: UserSerializer})
    def post(self, request: Request) -> Response:
        """Register a user; the answer carries its token."""
        serializer = UserCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        user = serializer.save()
        request.user = user  # the new user sees its own token
        return Response(UserSerializer(user, context={"request": request}).data, status=status.HTTP_201_CREATED)


class MyselfView(APIView):
    """The caller's own user, with its token."""

    @extend_schema(responses=UserSerializer)
    def get(self, request: Request) -> Response:
        """The authenticated user."""
        return Response(UserSerializer(request.user, context={"request": request}).data)


class UserDetailView(APIView):
    """One user the caller can see."""

    @extend_schema(responses=UserSerializer)
    def get(self, request: Request, pk: str) -> Response:
        """The user with this id."""
        user = get_object_or_404(visible_users(request.user), pk=pk)
        return Response(UserSerializer(user, context={"request": request}).data)


class MyGroupsView(APIView):
    """Groups of the caller."""

    @extend_schema(responses=GroupSerializer(many=True))
    def get(self, request: Request) -> Response:
        """The caller's groups."""
        return Response(GroupSerializer(request.user.groups.all(), many=True).data)


class MyTrainingsView(APIView):
    """Trainings the caller runs or takes part in."""

    @extend_schema(responses=TrainingSerializer(many=True))
    def get(self, request: Request) -> Response:
        """The caller's trainings."""
        trainings = trainings_of(request.user).select_related("model")
        return Response(TrainingSerializer(trainings, many=True).data)


class GroupViewSet(viewsets.ModelViewSet):
    """Groups, managed by staff."""

    queryset = Group.objects.order_by("id")
    serializer_class = GroupSerializer
    permission_classes = [permissions.IsAdminUser]
