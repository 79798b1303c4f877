"""GET /docs: Swagger UI for /openapi.json, from the swagger-ui-bundle-v2 wheel's own files."""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Mount, Route
from swagger_ui_bundle import swagger_ui_path

from sparc.openapi_parts import Operations, header_ref, operation

ASSETS_PATH = "/docs/assets"
# The page's own start-up script: a file, not inline, so the policy below needs no
# 'unsafe-inline' for scripts.
START_SCRIPT = "sparc-docs.js"

# Everything the page may load comes from SPARC itself: no CDN, works offline. Swagger UI's
# stylesheet draws its icons as data: images; it needs neither eval nor inline scripts.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

# The only files of the bundle the page uses, with their media types: the rest of the wheel
# (its demo index.html and initializer, which point at a petstore on the internet) is not served.
_BUNDLE_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
_BUNDLE_DIRECTORY = Path(str(swagger_ui_path))

# Served as UTF-8, and said so: the bundle holds non-ASCII text and fails to parse as Latin-1.
_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>SPARC API</title>
<link rel="stylesheet" href="{ASSETS_PATH}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSETS_PATH}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSETS_PATH}/swagger-ui-bundle.js"></script>
<script src="{ASSETS_PATH}/{START_SCRIPT}"></script>
</body>
</html>
"""

# validatorUrl null: by default Swagger UI sends the document to an online validator.
_START = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
  validatorUrl: null,
  deepLinking: true
});
"""


async def docs_page(request: Request) -> Response:
    return HTMLResponse(_PAGE, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


async def docs_asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name == START_SCRIPT:
        return Response(_START, media_type="text/javascript; charset=utf-8")
    media_type = _BUNDLE_FILES.get(name)
    if media_type is None:
        raise HTTPException(404)
    return FileResponse(_BUNDLE_DIRECTORY / name, media_type=media_type)


_page = Route("/docs", docs_page, methods=["GET"])
routes = [_page, Mount(ASSETS_PATH, routes=[Route("/{name}", docs_asset, methods=["GET"])])]
# The assets are the page's parts, not operations of the API: the document describes the page.
described_routes = [_page]
operations: Operations = {
    docs_page: operation(
        "Interactive documentation of this API (Swagger UI)",
        {
            "200": {
                "description": "The page; its scripts and styles come from SPARC itself.",
                "headers": {"Content-Security-Policy": header_ref("DocsContentSecurityPolicy")},
                "content": {"text/html": {"schema": {"type": "string"}}},
            }
        },
    )
}
