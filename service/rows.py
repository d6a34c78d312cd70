"""Looking a row up by the id a caller gave, the way every action words a miss."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.orm import Session

from ml.errors import NotFound

Row = TypeVar("Row")


def get_row(
    session: Session, model: type[Row], id_: int, noun: str | None = None, hint: str = ""
) -> Row:
    """The row of ``model`` with this primary key, else :class:`NotFound` "no <noun> with id
    <id><hint>" (the noun defaults to the class name in lower case): the API answers 404 with
    it, the CLI prints it, and both word it as ``api.deps.get_or_404`` does."""
    row = session.get(model, id_)
    if row is None:
        raise NotFound(f"no {noun or model.__name__.lower()} with id {id_}{hint}")
    return row
