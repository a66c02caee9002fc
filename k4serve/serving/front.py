"""The HTTP port of `k4serve serve`: honest health, and KServe-v2 requests checked before tritonserver sees them.

Triton 2.51's HTTP frontend sizes an input's buffer from the JSON `shape` before it looks at `data`
(`serialized.resize(element_count * dtype_size)` in src/http_server.cc), so `"shape": [2**40]` with one value
ends the server with std::bad_alloc, and [2**62] overflows to a small buffer and a segfault; the fix
(`--http-max-input-size`, overflow checks) arrived in 2.59. Here every tensor's declared size must match what the
body carries (JSON values or binary bytes) before the request is forwarded to tritonserver, which listens on
loopback only, behind a header key. Malformed JSON is a 400 here (Triton answers 500), and the shared-memory,
model-repository, trace and logging APIs are not served on this port.

/v2/health/ready and /v2/health/live answer from the supervisor: not ready while a stage is down or reloading
and while draining; live while tritonserver runs and the supervisor has not given up.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from k4serve.serving.triton_api import CONTROL_HEADER

# KServe-v2 datatypes -> bytes per element (BYTES: variable, a 4-byte length before each element).
DTYPE_SIZES = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": 4,
}
_MODEL = r"/v2/models/[^/]+(?:/versions/[^/]+)?"
# What clients may reach through this port: metadata, config, readiness, statistics, inference.
_FORWARDED_GET = re.compile(rf"/v2|/v2/models/stats|{_MODEL}(?:/config|/ready|/stats)?")
_INFER = re.compile(rf"{_MODEL}/infer")
_RESTRICTED = re.compile(r"/v2/(?:repository|systemsharedmemory|cudasharedmemory|trace|logging)(?:/.*)?")
DRAINING_MESSAGE = "server is draining; retry on another replica"
UPSTREAM_TIMEOUT_S = 3600.0  # a request may queue behind others for a long time; the client sets its own deadline


class BadRequest(ValueError):
    """A request refused here; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _count_values(data) -> int:
    """The number of scalar values in a (nested) JSON `data` array."""
    count, pending = 0, [data]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        else:
            count += 1
    return count


def _checked_shape(name: str, shape) -> int:
    """The element count of a declared shape; every dimension a whole number >= 0."""
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"input '{name}': shape must be a list of whole numbers, got {json.dumps(shape)[:80]}")
    if any(d < 0 for d in shape):
        raise BadRequest(f"input '{name}': shape {shape} has a negative dimension")
    return math.prod(shape)


def _check_tensor(kind: str, tensor) -> None:
    """An `inputs` / `outputs` entry names itself and uses no shared memory."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise BadRequest(f"each entry of '{kind}' must be an object with a string 'name'")
    parameters = tensor.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"{kind[:-1]} '{tensor['name']}': 'parameters' must be an object")
    if "shared_memory_region" in parameters:
        raise BadRequest(
            f"{kind[:-1]} '{tensor['name']}': shared memory is not served on this port; send the tensor in the "
            "request body (JSON 'data' or binary tensor data)"
        )


def check_infer_request(body: bytes, header_length: int | None) -> None:
    """Refuse (BadRequest) a KServe-v2 infer body whose tensors are not exactly what it declares.

    `header_length` is the Inference-Header-Content-Length header (binary tensor extension): the JSON is the body's
    first `header_length` bytes and the binary tensors follow, in input order.
    """
    if header_length is not None and not 0 <= header_length <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {header_length} is outside the body of {len(body)} bytes")
    header, binary_bytes = (body, 0) if header_length is None else (body[:header_length], len(body) - header_length)
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    except RecursionError:
        raise BadRequest("request JSON is nested too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise BadRequest("request must be a JSON object with a non-empty 'inputs' list (KServe v2 inference)")
    outputs = request.get("outputs", [])
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    for output in outputs:
        _check_tensor("outputs", output)
    declared_binary = 0
    for tensor in request["inputs"]:
        _check_tensor("inputs", tensor)
        name, datatype = tensor["name"], tensor.get("datatype")
        if datatype not in DTYPE_SIZES:
            raise BadRequest(f"input '{name}': datatype {datatype!r} is not one of {', '.join(DTYPE_SIZES)}")
        elements = _checked_shape(name, tensor.get("shape"))
        binary_size = tensor.get("parameters", {}).get("binary_data_size")
        if binary_size is not None:
            if not isinstance(binary_size, int) or isinstance(binary_size, bool) or binary_size < 0:
                raise BadRequest(f"input '{name}': binary_data_size must be a whole number >= 0")
            fixed = datatype != "BYTES"
            needed = elements * DTYPE_SIZES[datatype]
            if (fixed and binary_size != needed) or (not fixed and binary_size < needed):
                raise BadRequest(
                    f"input '{name}': shape {tensor['shape']} of {datatype} needs {'' if fixed else 'at least '}"
                    f"{needed} bytes, binary_data_size says {binary_size}"
                )
            declared_binary += binary_size
        elif "data" in tensor:
            values = _count_values(tensor["data"])
            if values != elements:
                raise BadRequest(
                    f"input '{name}': shape {tensor['shape']} declares {elements} elements, 'data' holds {values}"
                )
        elif elements:
            raise BadRequest(f"input '{name}' has neither 'data' nor binary_data_size")
    if declared_binary != binary_bytes:
        raise BadRequest(f"the inputs declare {declared_binary} bytes of binary data, the body carries {binary_bytes}")


class HttpFront:
    """The HTTP server of `k4serve serve` on `host:port`, forwarding to tritonserver's loopback HTTP endpoint."""

    def __init__(
        self,
        host: str,
        port: int,
        upstream: tuple[str, int],
        key: str,
        ready: Callable[[], bool],
        live: Callable[[], bool],
        draining: Callable[[], bool],
        max_body_bytes: int,
    ):
        self.upstream, self.key, self.max_body_bytes = upstream, key, max_body_bytes
        self.ready, self.live, self.draining = ready, live, draining
        front = self

        class Handler(_Handler):
            owner = front

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="k4serve-http", daemon=True)

    def start(self) -> HttpFront:
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the port."""
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Triton's clients expect
    owner: HttpFront

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """Quiet: tritonserver logs the requests it serves."""

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's naming
        path = self.path.split("?", 1)[0]
        if path in ("/v2/health/ready", "/v2/health/live"):
            healthy = self.owner.ready() if path.endswith("ready") else self.owner.live()
            self._reply(200 if healthy else 503, b"")
        elif _FORWARDED_GET.fullmatch(path):
            self._forward("GET", b"", {})
        else:
            self._refuse(path)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        try:
            body = self._body()
            if not _INFER.fullmatch(path):
                self._refuse(path)
                return
            if self.owner.draining():
                raise BadRequest(DRAINING_MESSAGE, 503)
            length = self.headers.get("Inference-Header-Content-Length")
            if length is not None and not length.isdigit():
                raise BadRequest("Inference-Header-Content-Length must be a whole number")
            check_infer_request(body, None if length is None else int(length))
        except BadRequest as error:
            self._error(error.status, str(error))
            return
        forwarded = {name: self.headers[name] for name in ("Content-Type", "Inference-Header-Content-Length")}
        self._forward("POST", body, {k: v for k, v in forwarded.items() if v is not None})

    def _body(self) -> bytes:
        """The request body, refused before reading when it is chunked, compressed, unsized or too large."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise BadRequest("chunked request bodies are not accepted: send Content-Length", 411)
        if self.headers.get("Content-Encoding", "identity").lower() != "identity":
            self.close_connection = True
            raise BadRequest("compressed request bodies are not accepted: send the body uncompressed", 415)
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True
            raise BadRequest("Content-Length must be a whole number", 411)
        if int(length) > self.owner.max_body_bytes:
            self.close_connection = True
            raise BadRequest(f"request body of {length} bytes exceeds {self.owner.max_body_bytes} bytes", 413)
        return self.rfile.read(int(length))

    def _refuse(self, path: str) -> None:
        if _RESTRICTED.fullmatch(path):
            self._error(403, f"{path} is not served on this port (shared memory, model control, trace, logging)")
        else:
            self._error(404, f"no endpoint {self.command} {path} here; KServe v2 health, metadata and infer are served")

    def _forward(self, method: str, body: bytes, headers: dict[str, str]) -> None:
        connection = http.client.HTTPConnection(*self.owner.upstream, timeout=UPSTREAM_TIMEOUT_S)
        try:
            headers = {**headers, CONTROL_HEADER: self.owner.key}
            connection.request(method, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except OSError as error:
            self._error(503, f"tritonserver did not answer: {error}")
            return
        finally:
            connection.close()
        passed = {name: response.getheader(name) for name in ("Content-Type", "Inference-Header-Content-Length")}
        self._reply(response.status, payload, {k: v for k, v in passed.items() if v is not None})

    def _error(self, status: int, message: str) -> None:
        self._reply(status, json.dumps({"error": message}).encode(), {"Content-Type": "application/json"})

    def _reply(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
