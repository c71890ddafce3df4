"""The request bodies read numbers as JSON Schema does: 6511.0 is an integer, 6511.5 is not.

Found by a Schemathesis run with its default configuration: the strict bodies rejected
integer-valued numbers that the document's ``"type": "integer"`` allows. The same run's
third finding, the empty upload's 422, is intended; its documentation is checked here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.json_types import INTEGRAL_FLOAT_AS_INT
from service.fine_tuning.schemas import (
    EvaluationIn,
    FineTuningJobCreate,
    Hyperparameters,
    LoraIn,
)
from service.fine_tuning.service import train_config
from service.scoring_jobs.schemas import ScoringJobCreate
from tests.service.conftest import rolebench_file, upload_rows

Headers = dict[str, str]
FT_IDS = {"dataset_id": "ds_none", "scoring_job_id": "sj_none"}

# (model, field, an integer-valued float in range): plain and nullable integers, nested too.
INTEGER_FIELDS: list[tuple[type[BaseModel], str, float]] = [
    (ScoringJobCreate, "batch_size", 111.0),
    (EvaluationIn, "max_validation", 6511.0),
    (EvaluationIn, "batch_size", 8.0),
    (Hyperparameters, "n_epochs", 3.0),
    (Hyperparameters, "micro_batch_size", 4.0),
    (Hyperparameters, "max_steps", 6511.0),
    (Hyperparameters, "seed", 7.0),
    (LoraIn, "r", 16.0),
    (FineTuningJobCreate, "seed", 42.0),
]
NOT_INTEGERS = [6511.5, True, "7"]


def _body(model: type[BaseModel], field: str, value: Any) -> dict[str, Any]:
    required = {ScoringJobCreate: {"dataset_id": "ds_x"}, FineTuningJobCreate: FT_IDS}
    return {**required.get(model, {}), field: value}


@pytest.mark.parametrize(("model", "field", "value"), INTEGER_FIELDS)
def test_an_integer_valued_number_is_the_integer(
    model: type[BaseModel], field: str, value: float
) -> None:
    # Both ways in: JSON text, and the parsed dict (what FastAPI validates).
    for parsed in (
        model.model_validate_json(json.dumps(_body(model, field, value))),
        model.model_validate(_body(model, field, value)),
    ):
        got = getattr(parsed, field)
        assert got == int(value) and type(got) is int


@pytest.mark.parametrize(("model", "field", "value"), INTEGER_FIELDS)
@pytest.mark.parametrize("bad", NOT_INTEGERS)
def test_fractions_booleans_and_strings_stay_errors(
    model: type[BaseModel], field: str, value: float, bad: Any
) -> None:
    with pytest.raises(ValidationError) as raised:
        model.model_validate_json(json.dumps(_body(model, field, bad)))
    (error,) = raised.value.errors()
    assert error["loc"] == (field,) and "valid integer" in error["msg"], error
    if isinstance(bad, float):
        assert "fractional part" in error["msg"]


def test_bounded_list_items_keep_their_bounds_in_the_schema() -> None:
    class Items(BaseModel):
        model_config = ConfigDict(strict=True)
        indices: list[Annotated[int, Field(ge=0, le=9), INTEGRAL_FLOAT_AS_INT]]

    assert Items.model_validate_json('{"indices": [3.0, 4]}').indices == [3, 4]
    items = Items.model_json_schema()["properties"]["indices"]["items"]
    assert items == {"type": "integer", "minimum": 0, "maximum": 9}
    for bad in ("[10.0]", "[3.5]", "[true]", '["3"]'):
        with pytest.raises(ValidationError):
            Items.model_validate_json(f'{{"indices": {bad}}}')


def test_the_float_reaches_the_trainer_as_an_int() -> None:
    hp = Hyperparameters.model_validate_json('{"batch_size": 8.0, "micro_batch_size": 4.0}')
    config = train_config("sarft", hp)
    assert (config.batch_size, config.micro_batch_size) == (8, 4)
    assert type(config.batch_size) is int and type(config.micro_batch_size) is int


def test_a_scoring_job_stores_the_integer(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = make_key()
    dataset = upload_rows(client, h, rolebench_file(tmp_path / "rows.jsonl", 2))
    created = client.post(
        "/v1/scoring_jobs", json={"dataset_id": dataset, "batch_size": 111.0}, headers=h
    )
    assert created.status_code == 201, created.text
    job = created.json()["id"]
    try:
        stored = client.get(f"/v1/scoring_jobs/{job}", headers=h).json()
        # An int after parsing: the response says 111, not 111.0.
        assert stored["batch_size"] == 111 and type(stored["batch_size"]) is int
    finally:
        # No worker here; a queued job would wait for a later test's.
        client.post(f"/v1/scoring_jobs/{job}/cancel", headers=h)
    for bad in NOT_INTEGERS:
        r = client.post(
            "/v1/scoring_jobs", json={"dataset_id": dataset, "batch_size": bad}, headers=h
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and error["param"] == "batch_size", error
        assert "valid integer" in error["message"], error


def test_a_fine_tuning_body_takes_the_integer(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    h = make_key()

    def post(evaluation: dict[str, Any]) -> Any:
        body = {**FT_IDS, "evaluation": evaluation, "hyperparameters": {"batch_size": 8.0}}
        return client.post("/v1/fine_tuning/jobs", json=body, headers=h)

    # The body validates; the unknown dataset is what stops it.
    accepted = post({"max_validation": 6511.0})
    assert accepted.status_code == 404, accepted.text
    assert accepted.json()["error"]["code"] == "not_found", accepted.text
    for bad in NOT_INTEGERS:
        r = post({"max_validation": bad})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["param"] == "evaluation.max_validation", error
        assert "valid integer" in error["message"], error


def test_an_integer_query_parameter_takes_the_same_numbers(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    # Query values are text, validated in lax mode: "5.0" is 5, "5.5" is no page size.
    h = make_key()
    assert client.get("/v1/datasets?limit=5.0", headers=h).status_code == 200
    assert client.get("/v1/datasets?limit=5.5", headers=h).status_code == 422


def test_the_document_still_says_integer(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    batch = schemas["ScoringJobCreate"]["properties"]["batch_size"]
    assert (batch["type"], batch["minimum"], batch["maximum"]) == ("integer", 1, 512)
    max_validation = schemas["EvaluationIn"]["properties"]["max_validation"]
    assert (max_validation["type"], max_validation["minimum"]) == ("integer", 0)
    # A nullable integer keeps its bounds as minimum and maximum (see JSONIntOrNone).
    micro, null = schemas["Hyperparameters"]["properties"]["micro_batch_size"]["anyOf"]
    assert micro == {"type": "integer", "minimum": 1, "maximum": 4096}
    assert null == {"type": "null"}
    seed = schemas["FineTuningJobCreate"]["properties"]["seed"]["anyOf"][0]
    assert seed == {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def test_the_empty_upload_is_a_documented_422(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    document = client.get("/openapi.json").json()
    upload = document["paths"]["/v1/datasets"]["post"]
    assert "422" in upload["description"] and "invalid_file" in upload["description"]
    documented = upload["responses"]["422"]["description"]
    assert "empty file" in documented and "invalid_file" in documented
    assert "the file is empty (no samples)" in documented
    form = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    file_part = document["components"]["schemas"][form.rsplit("/", 1)[-1]]["properties"]["file"]
    assert file_part["minLength"] == 1  # a zero-byte file is not even schema-valid
    # What the server answers is what the document says, for each kind of empty file.
    h = make_key()
    role = client.post("/v1/roles", json={"name": "Jack", "profile": "A pirate."}, headers=h)
    for content in (b"", b"\n\n", b"[]"):
        r = client.post(
            "/v1/datasets",
            files={"file": ("empty.jsonl", content, "application/jsonl")},
            data={"role_id": role.json()["id"]},
            headers=h,
        )
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_file" and error["param"] == "file", error
        assert error["errors"] == [{"line": 0, "message": "the file is empty (no samples)"}]
