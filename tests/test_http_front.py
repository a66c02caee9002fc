"""The HTTP front's request check (no server): a KServe-v2 body passes only when every tensor is what it declares."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from k4serve.serving.front import BadRequest, check_infer_request
from k4serve.serving.launcher import REPO_MODEL_REPOSITORY, entry_points, models_to_load
from k4serve.serving.shm import region_prefix, remove_stale_regions
from k4serve.serving.supervisor import _stub
from k4serve.serving.triton_api import metric_sum, parse_metrics, restriction_flags


def tensor(name: str, shape, datatype: str = "INT32", **fields) -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, **fields}


def body(*inputs: dict, **fields) -> bytes:
    return json.dumps({"inputs": list(inputs), **fields}).encode()


def binary_body(named: list[tuple[str, np.ndarray, str]]) -> tuple[bytes, int]:
    """A body in the binary tensor extension, built as tritonclient.http builds it: JSON header, then raw bytes."""
    inputs, raw = [], b""
    for name, value, datatype in named:
        if datatype == "BYTES":
            data = b"".join(struct.pack("<I", len(item)) + item for item in value.reshape(-1))
        else:
            data = value.tobytes()
        inputs.append(tensor(name, list(value.shape), datatype, parameters={"binary_data_size": len(data)}))
        raw += data
    header = json.dumps({"inputs": inputs}).encode()
    return header + raw, len(header)


GOOD = body(
    tensor("PROMPT", [1], "BYTES", data=["a fox"]),
    tensor("HEIGHT", [1], data=[384]),
    tensor("FRAMES", [2, 1, 3], "UINT8", data=[[[1, 2, 3]], [[4, 5, 6]]]),
    tensor("EMPTY", [0, 4], "FP32", data=[]),
)

BAD = {
    "2**40 elements, one value": (body(tensor("HEIGHT", [2**40], data=[384])), "declares 1099511627776 elements"),
    "2**62 elements (overflows int64 bytes)": (body(tensor("HEIGHT", [2**62], data=[1])), "'data' holds 1"),
    "product past 2**64": (body(tensor("HEIGHT", [2**32, 2**32, 2], data=[1])), "declares 36893488147419103232"),
    "negative dimension": (body(tensor("HEIGHT", [-1], data=[1])), "has a negative dimension"),
    "fractional dimension": (body(tensor("HEIGHT", [1.5], data=[1])), "shape must be a list of whole numbers"),
    "boolean dimension": (body(tensor("HEIGHT", [True], data=[1])), "shape must be a list of whole numbers"),
    "shape not a list": (body(tensor("HEIGHT", "1", data=[1])), "shape must be a list of whole numbers"),
    "fewer values than the shape": (body(tensor("HEIGHT", [2, 2], data=[1, 2, 3])), "declares 4 elements"),
    "unknown datatype": (body(tensor("HEIGHT", [1], "INT128", data=[1])), "datatype 'INT128' is not one of"),
    "no data": (body(tensor("HEIGHT", [1])), "has neither 'data' nor binary_data_size"),
    "truncated JSON": (b'{"inputs": [', "request body is not valid JSON"),
    "not UTF-8": (b"\xff\xfe{}", "request body is not valid JSON"),
    "JSON array": (b"[1, 2]", "must be a JSON object with a non-empty 'inputs' list"),
    "no inputs": (b'{"outputs": []}', "must be a JSON object with a non-empty 'inputs' list"),
    "nested 100k deep": (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "input without a name": (body({"shape": [1], "datatype": "INT32", "data": [1]}), "with a string 'name'"),
    "shared-memory input": (
        body(tensor("HEIGHT", [1], parameters={"shared_memory_region": "k4serve_1_2_x"})),
        "shared memory is not served on this port",
    ),
    "shared-memory output": (
        body(tensor("HEIGHT", [1], data=[1]), outputs=[{"name": "MP4", "parameters": {"shared_memory_region": "r"}}]),
        "output 'MP4': shared memory is not served",
    ),
    "binary size short of the shape": (
        body(tensor("HEIGHT", [2**40], parameters={"binary_data_size": 4})),
        "needs 4398046511104 bytes, binary_data_size says 4",
    ),
    "negative binary size": (
        body(tensor("HEIGHT", [1], parameters={"binary_data_size": -4})),
        "binary_data_size must be a whole number >= 0",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_tensor_that_is_not_what_it_declares_is_a_400_naming_it(case):
    payload, message = BAD[case]
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")) as raised:
        check_infer_request(payload, None)
    assert raised.value.status == 400


def test_well_formed_json_and_binary_requests_pass():
    check_infer_request(GOOD, None)
    prompt = np.array([b"a red fox", b"snow"], dtype=np.object_)
    payload, header = binary_body([("PROMPT", prompt, "BYTES"), ("LATENTS", np.zeros((2, 3, 16), np.float32), "FP32")])
    check_infer_request(payload, header)
    with pytest.raises(BadRequest, match="the inputs declare 405 bytes of binary data, the body carries 404"):
        check_infer_request(payload[:-1], header)  # 4 + 9 + 4 + 4 prompt bytes and 96 floats, one byte short
    with pytest.raises(BadRequest, match="outside the body"):
        check_infer_request(payload, len(payload) + 1)


def test_a_binary_bytes_tensor_needs_its_length_prefixes():
    payload, header = binary_body([("PROMPT", np.array([b""] * 3, dtype=np.object_), "BYTES")])
    check_infer_request(payload, header)  # three empty strings: 3 x 4 length bytes
    short = json.dumps({"inputs": [tensor("PROMPT", [4], "BYTES", parameters={"binary_data_size": 12})]}).encode()
    with pytest.raises(BadRequest, match="needs at least 16 bytes"):
        check_infer_request(short + b"\0" * 12, len(short))


def test_restricted_apis_and_metrics_helpers():
    http, grpc = restriction_flags("secret")
    assert http.startswith("--http-restricted-api=health,metadata,inference,") and http.endswith(
        ":k4serve-control=secret"
    )
    assert grpc == "--grpc-restricted-protocol=shared-memory,model-repository,trace,logging:k4serve-control=secret"
    samples = parse_metrics(
        '# HELP x\nk4serve_requests_in_flight{model="t2v"} 2\nk4serve_requests_in_flight{model="s"} 1\n'
    )
    assert metric_sum(samples, "k4serve_requests_in_flight") == 3 and metric_sum(samples, "absent") is None


def test_stub_command_lines_and_stale_regions(tmp_path):
    args = ["/b/python/triton_python_backend_stub", "/r/dit_sampler/1/model.py", "k4serve_7_8_ab", "1048576", "1048576"]
    args += ["99", "/b/python", "336", "dit_sampler_0_0", "DEFAULT"]
    assert _stub(5, args) == (5, "dit_sampler", "dit_sampler_0_0", "k4serve_7_8_ab")
    assert _stub(5, ["/usr/bin/python3", "x"]) is None
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = region_prefix(int(gone.stdout), 1) + "a", region_prefix(os.getpid(), 1) + "a"
    for name in (dead, live, "other_1_2_a"):
        (tmp_path / name).touch()
    assert remove_stale_regions(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, "other_1_2_a"])


def test_entry_points_are_the_models_no_other_calls():
    models = models_to_load(REPO_MODEL_REPOSITORY, None)
    assert entry_points(REPO_MODEL_REPOSITORY, models) == [
        "t2v",
        "t2v_stream",
        "t2va",
        "t2va_stream",
        "v2a",
        "v2a_stream",
    ]
    assert entry_points(REPO_MODEL_REPOSITORY, models_to_load(REPO_MODEL_REPOSITORY, ["v2a"])) == ["v2a"]
