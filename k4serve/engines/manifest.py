"""The manifest beside every exported engine: what it was built from, for which shapes, by which tools.

`<engine_dir>/<model>-<format>/manifest.json` (e.g. `engines/dit-onnx/`) records the model, preset, dtype, the
buckets and each graph's file and tensor contract (k4serve.engines.contracts), the weights it carries
(`sha256:<hex>` of the checkpoint files, or `random:<seed>` for seeded random weights), the tool versions, and the
`k4serve export` command that built it. A stage compares it with its own settings before serving, and a mismatch
error quotes the command that builds the right engine.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

from k4serve.engines.contracts import UNSIZED_MODELS, Bucket, GraphSpec

MANIFEST = "manifest.json"
# engine setting -> the artifact format it runs and the `k4serve export` subcommand that builds it
FORMATS = {"onnxruntime": "onnx", "tensorrt": "tensorrt", "aoti": "aoti"}
EXPORT_DTYPES = ("fp32", "fp16", "bf16", "fp8")


class EngineMismatch(ValueError):
    """An exported engine that does not fit the weights, preset or shapes asked of it; the message says the fix."""


def k4serve_version() -> str:
    try:
        return metadata.version("k4serve")
    except metadata.PackageNotFoundError:  # a source checkout that was never pip-installed
        return "unknown"


def weights_id(files: Sequence[Path] | None, seed: int) -> str:
    """`sha256:<hex>` over the checkpoint files' bytes in order, or `random:<seed>` without files."""
    if files is None:
        return f"random:{seed}"
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def engine_path(engine_dir: str | Path, model: str, fmt: str) -> Path:
    """Where the engine of `model` in format `fmt` lives inside an engine directory."""
    return Path(engine_dir) / f"{model}-{fmt}"


def export_command(
    fmt: str,
    model: str,
    preset: str,
    buckets: Iterable[Bucket],
    dtype: str,
    engine_dir: str | Path,
    weights: str | None = None,
    extra: Sequence[str] = (),
    seed: int = 0,
) -> str:
    """The `k4serve export` command line that builds this engine (the sizes x seconds product covers `buckets`;
    without buckets, placeholders)."""
    buckets = list(buckets)
    sizes = sorted({b.size for b in buckets}) or ["HEIGHTxWIDTH"]
    seconds = sorted({b.seconds for b in buckets}) or ["SECONDS"]
    words = ["k4serve", "export", fmt, "--model", model, "--preset", preset]
    words += ["--weights", weights] if weights else ["--seed", str(seed)] if seed else []
    words += [] if model in UNSIZED_MODELS else ["--size", *sizes]
    words += ["--seconds", *map(str, seconds), "--dtype", dtype, *extra, "-o", str(engine_dir)]
    return shlex.join(words)


@dataclass
class GraphEntry:
    """One graph of an engine: its tensor contract and its file in the engine's folder."""

    spec: GraphSpec
    file: str

    def to_json(self) -> dict:
        return {**self.spec.to_json(), "file": self.file}

    @classmethod
    def from_json(cls, raw: dict) -> GraphEntry:
        return cls(GraphSpec.from_json(raw), raw["file"])


@dataclass
class EngineManifest:
    model: str
    preset: str
    format: str  # onnx | tensorrt | aoti
    dtype: str  # fp32 | fp16 | bf16 | fp8
    weights: str  # sha256:<hex> | random:<seed>
    buckets: list[Bucket]
    graphs: list[GraphEntry]
    command: str  # the export command that built it (and rebuilds it)
    tools: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # format-specific: opset, fp8 carrier, AOTI engine, ...
    k4serve: str = field(default_factory=k4serve_version)

    def write(self, folder: str | Path) -> Path:
        """Write `manifest.json` into `folder` (created) and return its path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        raw = asdict(self)
        raw["buckets"] = [asdict(b) for b in self.buckets]
        raw["graphs"] = [g.to_json() for g in self.graphs]
        path = folder / MANIFEST
        path.write_text(json.dumps(raw, indent=1) + "\n")
        return path

    @classmethod
    def read(cls, folder: str | Path) -> EngineManifest:
        """The manifest of an engine folder; a missing or unreadable one is an EngineMismatch naming the folder."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise EngineMismatch(f"no {MANIFEST} in {folder}: this is not an engine folder written by `k4serve export`")
        try:
            raw = json.loads(path.read_text())
            raw["buckets"] = [Bucket(**b) for b in raw["buckets"]]
            raw["graphs"] = [GraphEntry.from_json(g) for g in raw["graphs"]]
            return cls(**raw)
        except (KeyError, TypeError, ValueError) as error:
            raise EngineMismatch(f"{path} is not a k4serve engine manifest ({error}); re-export the engine") from error

    def graph_specs(self) -> list[GraphSpec]:
        return [g.spec for g in self.graphs]

    def check(self, model: str, preset: str, weights: str, fix: str) -> None:
        """Refuse an engine built for another model, preset or weights; `fix`: the command building the right one."""
        wrong = [
            f"{what} {have!r} (this stage: {want!r})"
            for what, have, want in (
                ("model", self.model, model),
                ("preset", self.preset, preset),
                ("weights", self.weights, weights),
            )  # fmt: skip
            if have != want
        ]
        if wrong:
            raise EngineMismatch(
                f"the {self.format} engine was exported for {', '.join(wrong)}; build the right one: {fix}"
            )
