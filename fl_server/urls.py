"""Root URLs: the admin and the API."""

from django.contrib import admin
from django.urls import include, path, re_path

from fl_server_api.errors import api_not_found

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", include("fl_server_api.urls")),
    re_path(r"^api/", api_not_found),  # unknown API paths answer JSON, with DEBUG on too
]

handler400 = "fl_server_api.errors.json_bad_request"
handler404 = "fl_server_api.errors.json_not_found"
handler500 = "fl_server_api.errors.json_server_error"
