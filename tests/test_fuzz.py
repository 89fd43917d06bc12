"""The served OpenAPI spec against the real service: schemathesis generates requests from /docs.json (valid ones and
broken ones) and every answer must be what the spec says, never a server error; then the 500s found by hand."""

import collections
import io
import json
import time
import uuid
from typing import Any

import pytest
import requests

pytestmark = pytest.mark.slow

EXAMPLES = 140
"""Requests per operation and generation mode: 4 APIs x (valid, invalid) x 140 = 1,120 requests."""
SIDE = 6
"""Most rows, values per row and slices the fuzzer puts in a /denoise request (the spec allows far more)."""


def _small(node: Any) -> Any:
    """A request body's schema with every array capped at SIDE items, so that generated slices stay small (the
    test's choice, not the service's limits: the served spec says those)."""
    if isinstance(node, dict):
        node = {key: _small(value) for key, value in node.items()}
        if node.get("type") == "array":
            node["maxItems"] = min(node.get("maxItems", SIDE), SIDE)
        return node
    if isinstance(node, list):
        return [_small(value) for value in node]
    return node


def _fuzz(url: str) -> tuple[collections.Counter, list[str], float]:
    """Run schemathesis on every API of the spec at ``url``; (operation, mode, status) counts, failures, seconds."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_schema_conformance,
        status_code_conformance,
    )

    spec = requests.get(f"{url}/docs.json", timeout=30).json()
    spec["paths"] = {path: item for path, item in spec["paths"].items() if "x-bentoml-name" in item.get("post", {})}
    for item in spec["paths"].values():
        item["post"]["requestBody"] = _small(item["post"]["requestBody"])
    schema = schemathesis.openapi.from_dict(spec)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    tally: collections.Counter = collections.Counter()
    failures: list[str] = []
    started = time.monotonic()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                _run(operation, mode, url, session, checks, tally, failures)
    return tally, failures, time.monotonic() - started


def _run(operation, mode, url: str, session, checks: list, tally: collections.Counter, failures: list[str]) -> None:
    """EXAMPLES requests generated for one operation in one mode, each answer checked against the spec."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(case=operation.as_strategy(mode))
    def send(case) -> None:
        response = case.call(base_url=url, session=session, timeout=120)
        tally[(operation.path, mode.value, response.status_code)] += 1
        try:
            case.validate_response(response, checks=checks)
        except (Exception, BaseExceptionGroup) as failure:  # noqa: BLE001  (collected: one must not hide the rest)
            failures.append(f"{operation.path} {mode.value} {response.status_code}: {failure}"[:1500])

    send()


def test_the_spec_describes_every_answer_and_no_request_makes_a_server_error(bento_server):
    tally, failures, seconds = _fuzz(bento_server.url)
    total = sum(tally.values())
    by_status = collections.Counter()
    for (_, _, status), count in tally.items():
        by_status[status] += count
    summary = f"{total} requests in {seconds:.0f} s, statuses {dict(sorted(by_status.items()))}"
    print(summary)
    print("\n".join(f"{path} {mode} {status}: {n}" for (path, mode, status), n in sorted(tally.items())))
    assert total >= 1000, summary
    errors = {status: n for status, n in by_status.items() if status >= 500 and status != 503}
    assert not errors, f"server errors: {errors}; {summary}; first failures: {failures[:3]}"
    assert not failures, f"{len(failures)} answers break the spec ({summary}):\n" + "\n".join(failures[:5])
    valid_denoised = sum(n for (path, mode, status), n in tally.items() if path == "/denoise" and status == 200)
    assert valid_denoised >= 10, f"the fuzzer made only {valid_denoised} valid /denoise requests: {summary}"
    spec = requests.get(f"{bento_server.url}/docs.json", timeout=30).json()
    slices = spec["paths"]["/denoise"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert len(slices["properties"]["slices"]["oneOf"]) == 2  # (H, W) or (N, H, W), not BentoML's 2-D list
    assert set(spec["paths"]["/denoise"]["post"]["responses"]) == {"200", "400", "408", "413", "415", "500", "503"}


# ----------------------------------------------------------------------------------- the 500s found by hand


def _multipart(parts: list[tuple[str, Any]]) -> tuple[bytes, str]:
    """multipart/form-data of (name, value) parts in order: a (filename, bytes) value is a file, a str a field."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in parts:
        body.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            body.write(f'Content-Disposition: form-data; name="{name}"; filename="{value[0]}"\r\n\r\n'.encode())
            body.write(value[1] + b"\r\n")
        else:
            body.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, "PNG")
    return buffer.getvalue()


def _json(payload: Any) -> tuple[bytes, str]:
    return json.dumps(payload).encode(), "application/json"


FOUND_500S = {  # each answered 500 with a traceback before; now a 4xx that says why
    "slices an object": ("/denoise", _json({"slices": {}}), 400, "got an object"),
    "a slice of objects": ("/denoise", _json({"slices": [{"a": 1}]}), 400, "could not convert"),
    "a null intensity": ("/denoise", _json({"slices": [[[0.5, None]]]}), 400, "hold null"),
    "ragged rows": ("/denoise", _json({"slices": [[0.5, 0.5], [0.5]]}), 400, "not a rectangular array"),
    "an intensity past float32": ("/denoise", _json({"slices": [[1e300]]}), 400, "must lie in [0, 1]"),
    "20,000 form fields": ("/denoise_image", _multipart([("x", "1")] * 20_000), 400, "Too many fields"),
    "20,000 files": ("/preview", _multipart([("file", ("a.png", b"x"))] * 20_000), 400, "Too many files"),
    "a 2**70 seed": (
        "/preview",
        _multipart([("file", ("a.png", _png())), ("add_noise", "true"), ("seed", str(2**70))]),
        400,
        "less than or equal",
    ),  # fmt: skip
    "a file sent as text": (
        "/denoise_image",
        _multipart([("image", "http://127.0.0.1:1/a.png")]),
        400,
        "must be a file",
    ),
    "a field over 1 MB": (
        "/denoise_image",
        _multipart([("image", ("a.png", _png())), ("size", "x" * (2 << 20))]),
        400,
        "exceeded maximum size",
    ),  # fmt: skip
    "no boundary": ("/denoise_volume", (b"--x\r\n", "multipart/form-data"), 400, "boundary"),
    "not multipart at all": ("/denoise_volume", (b"garbage", "multipart/form-data; boundary=zz"), 400, "multipart"),
    "a file in a plain field": (
        "/preview",
        _multipart([("file", ("a.png", _png())), ("seed", ("s", b"\x89"))]),
        400,
        "must be a plain form field",
    ),  # fmt: skip
    "a file API sent JSON": ("/preview", _json({"file": "/etc/hostname"}), 415, "multipart/form-data"),
    "a pickle": ("/denoise", (b"\x80\x04N.", "application/vnd.bentoml+pickle"), 415, "not allowed"),
}


@pytest.mark.parametrize("case", FOUND_500S, ids=list(FOUND_500S))
def test_malformed_requests_get_a_4xx_with_a_message_in_one_shape(bento_server, case):
    path, (body, content_type), status, message = FOUND_500S[case]
    response = requests.post(bento_server.url + path, data=body, headers={"Content-Type": content_type}, timeout=120)
    assert response.status_code == status, response.text[:500]
    error = response.json()
    assert isinstance(error, dict) and set(error) <= {"error", "detail"} and message in error["error"], error


def test_a_refused_request_logs_one_line_without_a_traceback(bento_server):
    marker = f"bad-{uuid.uuid4().hex}"
    response = requests.post(f"{bento_server.url}/preview", files={marker: (None, "1")}, timeout=60)  # no `file`
    assert response.status_code == 400 and response.json()["error"] == "file: Field required"
    response = requests.post(f"{bento_server.url}/denoise", json={"slices": marker}, timeout=60)
    assert response.status_code == 400 and "got a string" in response.json()["error"]
    deadline = time.monotonic() + 10
    while (
        "got a string" not in (text := bento_server.log_path.read_text(errors="replace"))
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    refused = "POST /denoise from 127.0.0.1 400"
    lines = [line for line in text.splitlines() if refused in line and "got a string" in line]
    assert lines, text[-2000:]
    after = text[text.index("POST /preview from 127.0.0.1 400: file: Field required") :]
    assert "Traceback" not in after and "ValidationError" not in after, after[:3000]
