"""The launcher's own line to tritonserver: its loopback HTTP endpoint, every API behind a header key.

tritonserver's HTTP endpoint listens on loopback only, with every API category restricted
(`--http-restricted-api=...:k4serve-control=<key>`): only the launcher, which made up the key, talks to it (the
HTTP front forwards the client APIs; the supervisor and the drain use model control). `restriction_flags` writes
the options; `TritonApi` makes the calls.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Collection
from dataclasses import dataclass

CONTROL_HEADER = "k4serve-control"
# Triton's API categories (RESTRICTED_CATEGORY_NAMES of 2.51). Over gRPC, clients keep inference, health, metadata,
# model configuration and statistics; model control, shared-memory registration, trace and log settings are ours.
HTTP_CATEGORIES = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
GRPC_RESTRICTED_CATEGORIES = ("shared-memory", "model-repository", "trace", "logging")
# Triton prefixes the header key of --grpc-restricted-protocol with this.
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
_SAMPLE = re.compile(r"(\w+)(?:\{(.*)\})? (\S+)")


def restriction_flags(key: str) -> list[str]:
    """tritonserver options that put the HTTP APIs (all) and the gRPC control APIs behind `key`."""
    return [
        f"--http-restricted-api={','.join(HTTP_CATEGORIES)}:{CONTROL_HEADER}={key}",
        f"--grpc-restricted-protocol={','.join(GRPC_RESTRICTED_CATEGORIES)}:{CONTROL_HEADER}={key}",
    ]


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(name, frozenset of (label, value)): value}."""
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.fullmatch(line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def metric_sum(
    samples: dict[tuple[str, frozenset], float], name: str, models: Collection[str] | None = None
) -> float | None:
    """The sum of the series of `name` (of those `models` only, by their `model` label); None when absent."""
    values = [
        value
        for (sample, labels), value in samples.items()
        if sample == name and (models is None or dict(labels).get("model") in models)
    ]
    return sum(values) if values else None


class TritonError(RuntimeError):
    """tritonserver refused a control call; the message is Triton's."""


@dataclass
class TritonApi:
    """Calls to tritonserver's restricted HTTP endpoint and its metrics endpoint."""

    url: str  # http://127.0.0.1:PORT
    key: str
    metrics_url: str

    def request(self, method: str, path: str, body: bytes | None = None, timeout_s: float = 10.0) -> tuple[int, bytes]:
        """(status, body) of one call; connection failures raise OSError."""
        headers = {CONTROL_HEADER: self.key, "Content-Type": "application/json"}
        request = urllib.request.Request(self.url + path, body, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def ready(self) -> bool:
        """Triton's own readiness (every model loaded, with --strict-readiness); False when it does not answer."""
        try:
            return self.request("GET", "/v2/health/ready", timeout_s=5.0)[0] == 200
        except OSError:
            return False

    def model_states(self) -> dict[str, str]:
        """Each model's state in the repository index (READY, LOADING, UNLOADING, UNAVAILABLE)."""
        status, body = self.request("POST", "/v2/repository/index", b"{}")
        if status != 200:
            raise TritonError(f"repository index: HTTP {status}: {body.decode(errors='replace')}")
        return {entry["name"]: entry.get("state", "UNAVAILABLE") for entry in json.loads(body)}

    def load(self, model: str, timeout_s: float) -> None:
        """Load `model` (blocks until loaded; a model loaded already is left as it is)."""
        self._control(model, "load", timeout_s)

    def unload(self, model: str) -> None:
        """Ask Triton to unload `model` (returns at once; the version goes once its requests are done)."""
        self._control(model, "unload", 30.0)

    def _control(self, model: str, action: str, timeout_s: float) -> None:
        status, body = self.request("POST", f"/v2/repository/models/{model}/{action}", b"{}", timeout_s)
        if status != 200:
            raise TritonError(f"{action} {model}: HTTP {status}: {body.decode(errors='replace')}")

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Triton's Prometheus metrics, parsed."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return parse_metrics(response.read().decode())
