"""Label Studio users made as a study's readers make them (the organisation's invite link, then
their own token), shared by the study tests and ``bench.study_toy``: a read counts in a study
only when its named reader wrote it, so each reader must post with a token of their own."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import httpx


@dataclass
class Reader:
    email: str
    api: httpx.Client  # with the reader's own Label Studio token


def invite_token(url: str, admin_token: str) -> str:
    """The organisation's invite token (what the invite link carries)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Token {admin_token}"}) as admin:
        token: str = admin.get("/api/invite").json()["token"]
    return token


def sign_up(url: str, invite: str, prefix: str = "reader") -> Reader:
    """A Label Studio user made as a reader makes one: the invite link, then their token."""
    email, password = f"{prefix}-{uuid.uuid4().hex[:8]}@protomed.local", uuid.uuid4().hex
    with httpx.Client(base_url=url, timeout=30) as browser:
        browser.get("/user/signup/")
        form = {
            "email": email,
            "password": password,
            "csrfmiddlewaretoken": browser.cookies.get("csrftoken"),
        }
        r = browser.post(
            f"/user/signup/?token={invite}", data=form, headers={"Referer": f"{url}/user/signup/"}
        )
        if r.status_code != 302:
            raise RuntimeError(f"Label Studio sign-up failed ({r.status_code}): {r.text[-500:]}")
        token = browser.get("/api/current-user/token").json()["token"]
    api = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=30)
    return Reader(email, api)
