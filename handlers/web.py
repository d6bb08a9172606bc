"""The web page and its assets (the page and the JS client module): public static files with
security headers, and JSON errors like every other route."""

from __future__ import annotations

from typing import Any

import tornado.web

from core.errors import error_json

# The page loads only its own files: no inline script or style, no third-party origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class WebAssetHandler(tornado.web.StaticFileHandler):
    route_name = "static"

    def initialize(self, path: str, default_filename: str | None = None,
                   allowed_symlink_directory: str | list[str] | None = None, page: str | None = None) -> None:
        super().initialize(path, default_filename, allowed_symlink_directory)
        # A route for one page of `path` at its own URL (/docs -> docs.html), without the redirect to
        # a trailing slash that `default_filename` makes.
        self.page = page

    def parse_url_path(self, url_path: str) -> str:
        return self.page if self.page is not None else super().parse_url_path(url_path)

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Frame-Options", "DENY")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        code = "not_found" if status_code == 404 else "method_not_allowed" if status_code == 405 else "http_error"
        message = "No such file." if status_code == 404 else self._reason
        self.finish(error_json(code, message))
