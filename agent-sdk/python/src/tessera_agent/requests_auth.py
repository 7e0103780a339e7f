"""`requests` support: `requests.get(url, auth=TesseraRequestsAuth())`."""

from __future__ import annotations

from typing import Any

import requests
from requests.auth import AuthBase

from .auth import _Flow


class TesseraRequestsAuth(_Flow, AuthBase):
    """The same behaviour as `TesseraAuth`, for `requests`."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers.update(self.headers_sync(r.method or "GET", r.url or ""))
        # Marks the request these credentials were made for: requests copies hooks onto
        # redirected requests, which must not get fresh credentials from this hook.
        r._tessera_signed = True  # type: ignore[attr-defined]
        r.register_hook("response", self._on_response)
        return r

    def _on_response(self, resp: requests.Response, **kwargs: Any) -> requests.Response:
        req = resp.request
        url = req.url or ""
        nonce = self._note_nonce(url, resp.status_code, resp.headers)
        if (
            nonce is None
            or self._binding != "dpop"
            or not getattr(req, "_tessera_signed", False)
            or getattr(req, "_tessera_retried", False)
        ):
            return resp
        # Answer the challenge once, on the same connection pool (as requests' digest auth does).
        resp.content  # noqa: B018 - drain so the connection can be reused
        resp.close()
        retry = req.copy()
        retry._tessera_retried = True  # type: ignore[attr-defined]
        retry.headers.update(self.headers_sync(retry.method or "GET", url, nonce))
        again = resp.connection.send(retry, **kwargs)  # type: ignore[attr-defined]
        again.history.append(resp)
        again.request = retry
        return again
