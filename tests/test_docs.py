"""GET /docs: Swagger UI served from the wheel's files, UTF-8, under a strict policy, and working
in a real browser: authorize with a token from /auth/login, try GET /auth/me."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import ConsoleMessage, sync_playwright

from sparc.app import create_app
from sparc.docs import ASSETS_PATH, CONTENT_SECURITY_POLICY, START_SCRIPT
from sparc.settings import Settings
from tests.browser import chromium_executable
from tests.conftest import serving
from tests.helpers import PASSWORD
from tests.processes import poll, sparc_env, start_serve, stop


@pytest.fixture
async def unchecked_http(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the app whose answers are not held to the OpenAPI document: the page's
    assets are not operations of the API."""
    async with serving(create_app(settings)) as client:
        yield client


@pytest.mark.anyio
async def test_the_page_is_utf8_html_under_the_policy(http: httpx.AsyncClient) -> None:
    response = await http.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert '<meta charset="utf-8">' in response.text


@pytest.mark.anyio
async def test_the_page_loads_nothing_but_sparcs_own_files(http: httpx.AsyncClient) -> None:
    page = (await http.get("/docs")).text
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert loaded and all(url.startswith(f"{ASSETS_PATH}/") for url in loaded), loaded
    assert "<script>" not in page  # no inline script: the policy allows none
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("name", "media_type"),
    [
        ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
        ("swagger-ui.css", "text/css; charset=utf-8"),
        ("favicon-32x32.png", "image/png"),
        (START_SCRIPT, "text/javascript; charset=utf-8"),
    ],
)
async def test_each_asset_has_its_media_type(
    unchecked_http: httpx.AsyncClient, name: str, media_type: str
) -> None:
    response = await unchecked_http.get(f"{ASSETS_PATH}/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content


@pytest.mark.anyio
async def test_the_start_script_points_at_the_document_and_no_online_validator(
    unchecked_http: httpx.AsyncClient,
) -> None:
    script = (await unchecked_http.get(f"{ASSETS_PATH}/{START_SCRIPT}")).text
    assert 'url: "/openapi.json"' in script
    assert "validatorUrl: null" in script


@pytest.mark.anyio
@pytest.mark.parametrize(
    "name", ["index.html", "swagger-initializer.js", "..%2F__init__.py", "nothing.js"]
)
async def test_files_of_the_wheel_the_page_does_not_use_are_not_served(
    unchecked_http: httpx.AsyncClient, name: str
) -> None:
    response = await unchecked_http.get(f"{ASSETS_PATH}/{name}")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_swagger_ui_authorizes_and_calls_auth_me_in_a_real_browser(
    cli_database: str, tmp_path: Path
) -> None:
    executable = chromium_executable()
    email = "docs@example.org"
    process, base = start_serve(sparc_env(DATABASE_URL=cli_database), cwd=tmp_path)
    try:
        poll(f"{base}/readyz", process=process)
        credentials = {"email": email, "password": PASSWORD}
        assert httpx.post(f"{base}/auth/register", json=credentials).status_code == 201
        token = httpx.post(f"{base}/auth/login", json=credentials).json()["access_token"]

        requested: list[str] = []
        problems: list[str] = []

        def console(message: ConsoleMessage) -> None:
            if message.type == "error":  # a refused load or a policy violation shows here
                problems.append(message.text)

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=executable)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1600})
                page.on("request", lambda request: requested.append(request.url))
                page.on("console", console)
                page.on("pageerror", lambda error: problems.append(str(error)))
                page.goto(f"{base}/docs")

                page.locator("button.authorize").first.click()
                page.locator(".modal-ux input").fill(token)
                page.locator(".modal-ux button[type=submit]").click()
                page.locator(".modal-ux button.btn-done").click()

                operation = page.locator(".opblock-get", has=page.locator('[data-path="/auth/me"]'))
                operation.locator(".opblock-summary").click()
                operation.locator("button.try-out__btn").click()
                operation.locator("button.execute").click()
                answer = operation.locator(".live-responses-table")
                answer.locator(".response-col_status", has_text="200").wait_for()
                assert email in answer.inner_text()

                screenshot = tmp_path / "docs-auth-me.png"
                page.screenshot(path=str(screenshot), full_page=True)
                print(f"screenshot: {screenshot}")
            finally:
                browser.close()
    finally:
        code, stderr = stop(process)
    assert code == 0, stderr
    assert problems == []
    origin = urlsplit(base).netloc
    assert requested and {urlsplit(url).netloc for url in requested} == {origin}, requested
    assert f"{base}/auth/me" in requested
