"""Reads of Label Studio (label-studio-sdk) that the API's webhook and the workers' sync job
share: a client from the settings, an annotation and its author's e-mail as Label Studio holds
them, and the errors that say whether Label Studio was unreachable (retry later) or refused.

The sdk is imported lazily, so importing this module stays cheap for the API.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import Any

import httpx
from sqlalchemy.orm import Session

from service.config import Settings
from service.reviews import refresh_annotation

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Protomed-Secret"  # the webhook's shared secret, set on the hook and checked
# A webhook's reads of Label Studio: short and not retried (the sdk would sleep 1 + 2 s on a
# refused connection), since an unreachable Label Studio turns into a queued pull at once.
WEBHOOK_READ: dict[str, Any] = {"timeout_in_seconds": 10, "max_retries": 0}


class LabelStudioError(Exception):
    """Label Studio could not be read as protomed needs (the message says why)."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio did not answer (or answered 5xx): retry later, nothing is lost."""


def client(settings: Settings) -> Any:
    from label_studio_sdk import LabelStudio

    if not settings.label_studio_url or not settings.label_studio_token:
        raise RuntimeError("PROTOMED_LABEL_STUDIO_URL and PROTOMED_LABEL_STUDIO_TOKEN are not set")
    return LabelStudio(  # type: ignore[no-untyped-call]  # the SDK's constructor is unannotated
        base_url=settings.label_studio_url, api_key=settings.label_studio_token, timeout=30
    )


def current_annotation(
    ls: Any, ann_id: int, options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """Label Studio's own record of an annotation (``GET /api/annotations/{id}/``: id, task,
    project, completed_by as a user id, result, was_cancelled), None when Label Studio says it
    does not exist (404)."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        found = ls.annotations.get(ann_id, request_options=options)
    except ApiError as exc:
        if exc.status_code == 404:
            return None
        raise
    record: dict[str, Any] = found.model_dump(mode="json")
    return record


def user_emails(
    ls: Any, user_ids: Iterable[int] | None = None, options: dict[str, Any] | None = None
) -> dict[int, str]:
    """Label Studio user id -> e-mail: every user of the organisation (one request), or the
    given ones (one request each; for a webhook's one or two annotations)."""
    from label_studio_sdk.core.api_error import ApiError

    if user_ids is None:
        try:
            users = ls.users.list(request_options=options)
        except ApiError as exc:
            if exc.status_code not in (403, 404):
                raise
            log.warning("Label Studio lists no users (%s): no e-mails kept", exc.status_code)
            return {}
        return {u.id: u.email for u in users if u.id is not None and u.email}
    out: dict[int, str] = {}
    for uid in set(user_ids):
        try:
            email = ls.users.get(uid, request_options=options).email
        except ApiError as exc:
            if exc.status_code not in (403, 404):  # a user we may not see: no e-mail, no more
                raise
            continue
        if email:
            out[uid] = email
    return out


def with_email(annotation: dict[str, Any], emails: dict[int, str]) -> dict[str, Any]:
    """The annotation with ``completed_by`` as {id, email}, the form ``apply_annotation``
    stores both from."""
    user = annotation.get("completed_by")
    if isinstance(user, int):
        return {**annotation, "completed_by": {"id": user, "email": emails.get(user)}}
    return annotation


def refresh_annotations(
    session: Session, ann_ids: Iterable[int], settings: Settings
) -> Counter[str]:
    """Re-read each annotation from Label Studio with protomed's token and make the stored
    verdict equal what Label Studio holds: stored, removed (only once Label Studio confirms it
    is gone or cancelled) or ignored (not ours). A webhook names the ids and nothing else counts
    from it, since anyone in Label Studio's organisation can read the webhook's secret. Raises
    :class:`LabelStudioError` when Label Studio cannot be read (nothing is changed then)."""
    counts: Counter[str] = Counter()
    try:
        ls = client(settings)
        found = {i: current_annotation(ls, i, WEBHOOK_READ) for i in dict.fromkeys(ann_ids)}
        users = {a["completed_by"] for a in found.values() if a and a.get("completed_by")}
        emails = user_emails(ls, [u for u in users if isinstance(u, int)], WEBHOOK_READ)
    except Exception as exc:
        if unavailable(exc):
            raise LabelStudioUnavailable(reason(exc)) from exc
        if getattr(exc, "status_code", None) is not None:  # ApiError: 401/403 (wrong token)...
            raise LabelStudioError(reason(exc)) from exc
        raise
    for ann_id, current in found.items():
        counts[refresh_annotation(session, ann_id, current and with_email(current, emails))] += 1
    return counts


def reason(exc: Exception) -> str:
    """Why Label Studio could not be used, in short. Never the sdk's ApiError text: it holds
    Label Studio's response headers, its session cookie among them, and the reason reaches job
    errors (any reader) and webhook answers."""
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"Label Studio answered {status}"
    return str(exc) or type(exc).__name__


def unavailable(exc: Exception) -> bool:
    from label_studio_sdk.core.api_error import ApiError

    if isinstance(exc, (httpx.TransportError, ConnectionError)):
        return True
    return isinstance(exc, ApiError) and (exc.status_code or 500) >= 500
