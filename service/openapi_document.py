"""What the generated OpenAPI document cannot say by itself: the links from each response that
creates an object to the operations that take its id, the upload form's either/or rule, and
the models this deployment serves.

Links let clients (and stateful fuzzers) follow an object from its creation to every operation
on it; without them a tool sees ids only as opaque strings.
"""

from __future__ import annotations

from typing import Any

from worker.encoding import EncodingConfig

OBJECT_ID = "$response.body#/id"

# (path, method) of a creating operation -> the operations its id feeds: (path, method, param)
# where param is a path parameter, or "body.<field>" for a JSON body field.
LINKS: dict[tuple[str, str], list[tuple[str, str, str]]] = {
    ("/v1/roles", "post"): [
        ("/v1/roles/{role_id}", "get", "role_id"),
        ("/v1/roles/{role_id}", "delete", "role_id"),
    ],
    ("/v1/datasets", "post"): [
        ("/v1/datasets/{dataset_id}", "get", "dataset_id"),
        ("/v1/datasets/{dataset_id}", "delete", "dataset_id"),
        ("/v1/scoring_jobs", "post", "body.dataset_id"),
    ],
    ("/v1/scoring_jobs", "post"): [
        ("/v1/scoring_jobs/{job_id}", "get", "job_id"),
        ("/v1/scoring_jobs/{job_id}/events", "get", "job_id"),
        ("/v1/scoring_jobs/{job_id}/subset", "get", "job_id"),
        ("/v1/scoring_jobs/{job_id}/cancel", "post", "job_id"),
        ("/v1/scoring_jobs/{job_id}/samples", "get", "job_id"),
        ("/v1/scoring_jobs/{job_id}/samples/{index}", "get", "job_id"),
        ("/v1/scoring_jobs/{job_id}/samples/{index}/review", "put", "job_id"),
        ("/v1/scoring_jobs/{job_id}/reviews", "post", "job_id"),
        ("/v1/scoring_jobs/{job_id}/curation", "get", "job_id"),
        ("/v1/fine_tuning/jobs", "post", "body.scoring_job_id"),
    ],
    ("/v1/fine_tuning/jobs", "post"): [
        ("/v1/fine_tuning/jobs/{job_id}", "get", "job_id"),
        ("/v1/fine_tuning/jobs/{job_id}/events", "get", "job_id"),
        ("/v1/fine_tuning/jobs/{job_id}/cancel", "post", "job_id"),
        ("/v1/fine_tuning/jobs/{job_id}/adapter", "get", "job_id"),
        ("/v1/fine_tuning/jobs/{job_id}/report", "get", "job_id"),
        ("/v1/fine_tuning/jobs/{job_id}/model", "post", "job_id"),
        ("/v1/fine_tuning/jobs/{job_id}/model", "get", "job_id"),
        ("/v1/fine_tuning/jobs/{job_id}/checkpoints", "get", "job_id"),
    ],
}

# A scoring job's dataset also feeds a fine-tuning job of the same dataset.
BODY_COPIES: dict[tuple[str, str], dict[str, str]] = {
    ("/v1/fine_tuning/jobs", "post"): {"dataset_id": "$response.body#/dataset_id"},
}

# The upload names an existing role, or creates one inline from a name and a profile.
ROLE_EITHER_OR = {
    "oneOf": [
        {"required": ["role_id"], "not": {"anyOf": [{"required": ["role_name"]},
                                                     {"required": ["role_profile"]}]}},
        {"required": ["role_name", "role_profile"], "not": {"required": ["role_id"]}},
    ]
}  # fmt: skip


def complete(
    schema: dict[str, Any], served_models: set[str], safety_sets: set[str]
) -> dict[str, Any]:
    """``schema`` (FastAPI's document) with the links and rules above added."""
    _add_links(schema)
    components = schema["components"]["schemas"]
    upload = schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    ref = upload["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    components[ref].update(ROLE_EITHER_OR)
    # A deployment's settings, not a constant: say which names a scoring job may give.
    model = components["ScoringJobCreate"]["properties"]["model"]
    model["anyOf"] = [{"enum": sorted(served_models)}, {"type": "null"}]
    # A safety set without inline prompts must be one this server has.
    components["SafetySetIn"]["if"] = {"properties": {"prompts": {"type": "null"}}}
    components["SafetySetIn"]["then"] = {"properties": {"name": {"enum": sorted(safety_sets)}}}
    # Fine-tuning encodes as its scoring job did; today every scoring job uses these values.
    encoding = EncodingConfig()
    hyperparameters = components["Hyperparameters"]["properties"]
    for name in ("max_prompt_tokens", "max_response_tokens"):
        hyperparameters[name]["anyOf"] = [{"const": getattr(encoding, name)}, {"type": "null"}]
    return schema


def _add_links(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    for (path, method), targets in LINKS.items():
        source = paths[path][method]
        created = next(code for code in ("201", "200") if code in source["responses"])
        links = source["responses"][created].setdefault("links", {})
        for target_path, target_method, param in targets:
            operation_id = paths[target_path][target_method]["operationId"]
            link: dict[str, Any] = {"operationId": operation_id}
            if param.startswith("body."):
                body = {param.removeprefix("body."): OBJECT_ID}
                body.update(BODY_COPIES.get((target_path, target_method), {}))
                link["requestBody"] = body
            else:
                link["parameters"] = {param: OBJECT_ID}
            links[operation_id] = link
