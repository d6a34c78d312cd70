"""Rules every request body shares: no unknown fields, no non-finite numbers, class names in
one Unicode spelling. One base model and one type, so a new request model gets them by
inheriting, not by remembering."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ml.data.catalog import nfc  # torch-free

__all__ = ["ClassName", "RequestModel", "nfc"]


class RequestModel(BaseModel):
    """A request body: unknown fields are refused, and so are NaN and +-Infinity in float
    fields (JSON has neither; stored, they break every later JSON answer and PostgreSQL's
    JSON columns), so the 422 names the field."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: A class name as clients send it, in NFC: the spelling :func:`ml.data.catalog.scan` registers.
ClassName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(nfc)]
