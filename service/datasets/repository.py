"""Reading a dataset's stored rows back as samples: the one home of that query."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service.models import Dataset, DatasetSample
from worker.formats import DatasetFormat, Sample, sample_from_record


def load_samples(
    session: Session,
    dataset: Dataset,
    *,
    after: int = -1,
    before: int | None = None,
    skip: Select[Any] | None = None,
    limit: int | None = None,
) -> list[Sample]:
    """Samples with ``after < idx < before``, in index order, less the indices ``skip`` selects."""
    stmt = (
        select(DatasetSample.idx, DatasetSample.line, DatasetSample.record)
        .where(DatasetSample.dataset_id == dataset.id, DatasetSample.idx > after)
        .order_by(DatasetSample.idx)
        .limit(limit)
    )
    if before is not None:
        stmt = stmt.where(DatasetSample.idx < before)
    if skip is not None:
        stmt = stmt.where(DatasetSample.idx.not_in(skip))
    fmt = DatasetFormat(dataset.format)
    return [
        sample_from_record(json.loads(record), fmt, idx, line)
        for idx, line, record in session.execute(stmt)
    ]
