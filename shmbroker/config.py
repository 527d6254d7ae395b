"""The YAML pipeline schema (pydantic) and loading with errors that name the file, the key path and what was expected.

Only the file: whether a stage's code imports and which devices its workers
get is ``plan.py``'s to find out (it asks a process like the workers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from broker.arena import host_memory_limit
from broker.client import array_spec
from broker.errors import ConfigError, UnsupportedArray, format_bytes
from broker.protocol import BFLOAT16, StageSettings
from broker.security import is_loopback
from workers.spec import StageSpec

__all__ = ["PipelineConfig", "StageConfig", "ClusterConfig", "load_config", "parse_size", "apply_overrides"]

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")
_FN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_dtype(v: str) -> str:
    """A numeric dtype NumPy knows, or ``bfloat16`` (stored as its raw bits); else ``ValueError``."""
    if v == BFLOAT16:
        return v
    try:
        array_spec(v)
    except (TypeError, UnsupportedArray) as e:
        why = "unsupported" if isinstance(e, UnsupportedArray) else "unknown"
        raise ValueError(f"{why} dtype {v!r} (a numeric NumPy dtype such as float32, uint8, or "
                         f"bfloat16)") from None
    return v


def parse_size(value: Any) -> int:
    """``'512MiB' -> 536870912``; ints pass through."""
    from pydantic import TypeAdapter

    return int(TypeAdapter(ByteSize).validate_python(value))


class CurveConfig(_Strict):
    """CURVE keys (``zmq.auth`` certificate files; ``shmbroker keys DIR`` makes them)."""

    server_secret: str = Field(description="the broker's NAME.key_secret")
    authorized: str = Field(description="directory of authorized clients' NAME.key files")
    server_public: str = Field(description="the broker's NAME.key, for clients")
    client_secret: str = Field(description="the clients' NAME.key_secret")

    def broker_args(self) -> dict[str, str]:
        return {"secret": self.server_secret, "authorized": self.authorized}

    def client_args(self) -> tuple[str, str]:
        return (self.server_public, self.client_secret)


class BrokerConfig(_Strict):
    capacity: ByteSize = Field(default=ByteSize(256 * 2**20), description="arena size, e.g. 512MiB")
    endpoint: str | None = Field(default=None, description="ipc://PATH or tcp://127.0.0.1:PORT")
    allow_remote: bool = False
    max_inflight: int = Field(default=64, ge=1, description="items the source may have in flight")
    wait_timeout: float = Field(default=60.0, gt=0, description="seconds to wait for arena space")
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    hwm: int = Field(default=10_000, ge=100, description="ZeroMQ high-water mark: messages queued per peer")
    curve: CurveConfig | None = None
    rings: bool = Field(default=False, description="tasks travel in queues in the arena, no broker "
                        "message per task (docs/pipelines.md, 'Tasks in rings')")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(ipc://.+|tcp://[^:]+:\d+)$", v):
            raise ValueError("expected ipc://PATH or tcp://HOST:PORT")
        return v

    @model_validator(mode="after")
    def _loopback(self) -> BrokerConfig:
        ep = self.endpoint or ""
        if not is_loopback(ep) and not self.allow_remote:
            raise ValueError(f"tcp endpoint {ep} is not loopback; set allow_remote: true to expose it")
        if self.allow_remote and self.curve is None:
            raise ValueError("allow_remote: true needs curve keys (server_secret, authorized, "
                             "server_public, client_secret): remote endpoints are authenticated")
        return self


class SyntheticSource(_Strict):
    type: Literal["synthetic"]
    count: int = Field(ge=0)
    shape: list[Annotated[int, Field(ge=0)]]
    dtype: str = "float32"
    seed: int = 0

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v == BFLOAT16:
            raise ValueError("a synthetic source makes NumPy arrays: bfloat16 is a stage's dtype only")
        return check_dtype(v)


class NpySource(_Strict):
    type: Literal["npy"]
    path: str = Field(description="a glob of .npy files, sorted; item index = position")


class PythonSource(_Strict):
    type: Literal["python"]
    fn: str
    args: dict[str, Any] = Field(default_factory=dict)


class NpySink(_Strict):
    type: Literal["npy"]
    path: str


class NullSink(_Strict):
    type: Literal["null"]


class PythonSink(_Strict):
    type: Literal["python"]
    fn: str
    args: dict[str, Any] = Field(default_factory=dict)


Source = Annotated[SyntheticSource | NpySource | PythonSource, Field(discriminator="type")]
Sink = Annotated[NpySink | NullSink | PythonSink, Field(discriminator="type")]


class StageConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    fn: str | None = None
    factory: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    device: str = "cpu"
    devices: Literal["all"] | list[Annotated[int, Field(ge=0)]] | None = None
    replicas: int = Field(default=1, ge=0)
    replicas_per_device: int | None = Field(default=None, ge=1)
    batch: int = Field(default=1, ge=1)
    dtype: str | None = None
    credits: int = Field(default=2, ge=1, le=64)
    threads: int | None = Field(default=None, ge=1)
    on_error: Literal["fail", "skip", "retry"] = "fail"
    retries: int = Field(default=2, ge=0)
    batch_timeout: float = Field(default=0.05, ge=0)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError("expected cpu, cuda, cuda:N or auto")
        return v

    @field_validator("fn", "factory")
    @classmethod
    def _fn(cls, v: str | None) -> str | None:
        if v is not None and not _FN.match(v):
            raise ValueError("expected module:function, e.g. workers.stages:normalize")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        return None if v is None else check_dtype(v)

    @model_validator(mode="after")
    def _one_callable(self) -> StageConfig:
        if (self.fn is None) == (self.factory is None):
            raise ValueError("a stage names exactly one of fn or factory")
        return self

    def to_broker(self) -> StageSettings:
        """What the broker needs to know of this stage."""
        return StageSettings(name=self.name, batch=self.batch, on_error=self.on_error,
                             retries=self.retries, batch_timeout=self.batch_timeout)

    def worker_spec(self, index: int, search_path: tuple[str, ...] = (),
                    after: StageConfig | None = None) -> StageSpec:
        """What this stage's workers need to know of it (``after``: the next stage, if any)."""
        return StageSpec(name=self.name, index=index, fn=self.fn, factory=self.factory,
                         args=dict(self.args), batch=self.batch, dtype=self.dtype,
                         credits=self.credits, threads=self.threads, search_path=search_path,
                         next_batch=after.batch if after else 1, next_name=after.name if after else "",
                         on_error=self.on_error, retries=self.retries, batch_timeout=self.batch_timeout)


class ClusterConfig(_Strict):
    """``cluster:``: run the pipeline on a Ray cluster (``docs/cluster.md``); absent: one host."""

    engine: Literal["ray"] = "ray"
    address: str = Field(default="auto", description="auto (the running cluster), HOST:PORT of its "
                         "head, or ray://HOST:10001 (Ray Client)")
    worker_cpus: float = Field(default=1.0, ge=0, description="Ray CPUs each worker actor asks for")
    runtime_env: dict[str, Any] = Field(default_factory=dict, description="more of Ray's runtime_env "
                                        "for the workers (pip, env_vars, working_dir, py_modules)")
    start_timeout: float = Field(default=120.0, gt=0, description="seconds for the agents and "
                                 "workers to start on their nodes")


class PipelineConfig(_Strict):
    name: str = "pipeline"
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    source: Source
    stages: list[StageConfig] = Field(min_length=1)
    sink: Sink = Field(default_factory=lambda: NullSink(type="null"))
    failures: str | None = Field(default=None, description="JSON-lines file of skipped items "
                                 "(default: failures.jsonl in an npy sink's directory)")
    cluster: ClusterConfig | None = None
    _origins: dict[str, str] = PrivateAttr(default_factory=dict)  # key path -> the --set that wrote it

    def origin(self, key_path: str, path: str | Path | None) -> str:
        """What a problem at ``key_path`` comes from, for its message: the ``--set`` that wrote
        it, else the file ``path``."""
        return _origin(Path(str(path)), key_path, self._origins)

    @model_validator(mode="before")
    @classmethod
    def _null_sink(cls, raw: Any) -> Any:
        # YAML reads an unquoted `type: null` as None; it means the null sink
        if isinstance(raw, dict) and isinstance(raw.get("sink"), dict) and raw["sink"].get("type", 0) is None:
            raw = {**raw, "sink": {**raw["sink"], "type": "null"}}
        return raw

    @model_validator(mode="after")
    def _unique(self) -> PipelineConfig:
        names = [s.name for s in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"stage names must be unique; repeated: {sorted(dup)}")
        if self.cluster is not None and self.broker.rings:
            raise ValueError("broker.rings: tasks in rings run on one host for now; on a cluster "
                             "they travel as messages (leave broker.rings out of a config with cluster:)")
        return self

    def worker_spec(self, index: int, search_path: tuple[str, ...] = ()) -> StageSpec:
        """What the workers of stage ``index`` need to know of it."""
        after = self.stages[index + 1] if index + 1 < len(self.stages) else None
        spec = self.stages[index].worker_spec(index, search_path, after)
        return dataclasses.replace(spec, pipeline=self.pipeline_id())

    def pipeline_id(self) -> str:
        """``name@hash`` of what the broker and the workers of this pipeline must agree on: the
        stages' names, code, args, dtypes and batch sizes (not resources such as replicas)."""
        stages = [{k: getattr(s, k) for k in ("name", "fn", "factory", "args", "dtype", "batch")}
                  for s in self.stages]
        digest = hashlib.sha256(json.dumps(stages, sort_keys=True, default=str).encode()).hexdigest()
        return f"{self.name}@{digest[:12]}"

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"no stage named {name!r}; the stages are {[s.name for s in self.stages]}")


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("synthetic", "npy", "python", "null") and out in ("source", "sink"):
            continue  # the discriminator pydantic inserts
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set key.path=value`` (``stages.infer.batch=8`` or ``stages[1].batch=8``);
    a value of ``null`` (or ``~``) unsets the key, so its default applies."""
    _apply(raw, overrides)
    return raw


def _apply(raw: dict[str, Any], overrides: list[str]) -> dict[str, str]:
    """``apply_overrides``; returns ``{key path as errors name it (stages[1].batch): the --set}``."""
    origins = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        parts = [p for p in re.split(r"\.|\[(\d+)\]", key) if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: the value is not valid YAML: {e}") from None
        node: Any = raw
        where = ""
        for i, part in enumerate(parts[:-1]):
            node, where = _step(node, part, key, parts[i + 1], where)
        last = parts[-1]
        if parsed is None and last == "type" and where == "sink":
            parsed = "null"  # the null sink, not an unset type
        if isinstance(node, list):
            idx = _index(node, last, key)
            where += f"[{idx}]"
            if parsed is None:
                del node[idx]
            else:
                node[idx] = parsed
        else:
            where += f"{'.' if where else ''}{last}"
            if parsed is None:
                node.pop(last, None)
            else:
                node[last] = parsed
        origins[where] = item
    return origins


def _index(node: list[Any], part: str, key: str) -> int:
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for i, x in enumerate(node):
        if isinstance(x, dict) and x.get("name") == part:
            return i
    raise ConfigError(f"--set {key}: no list entry {part!r}")


def _step(node: Any, part: str, key: str, nxt: str, where: str) -> tuple[Any, str]:
    """One step down the key path: the node there (made if missing) and its path so far."""
    if isinstance(node, list):
        idx = _index(node, part, key)
        return node[idx], f"{where}[{idx}]"
    if not isinstance(node, dict):
        raise ConfigError(f"--set {key}: {part!r} is not inside a map")
    return node.setdefault(part, [] if nxt.isdigit() else {}), f"{where}{'.' if where else ''}{part}"


def _origin(path: Path, key_path: str, origins: dict[str, str]) -> str:
    """What an error at ``key_path`` comes from: the ``--set`` that wrote it (or a key above or
    below it), else the file."""
    for written, item in origins.items():
        if key_path == written or key_path.startswith((written + ".", written + "[")) or \
                written.startswith((key_path + ".", key_path + "[")):
            return f"--set {item}"
    return str(path)


def load_config(path: str | Path, overrides: list[str] | None = None,
                check_host: bool = True) -> PipelineConfig:
    """Read, override, validate; every problem is a ``ConfigError`` naming file and key path."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a map of name, broker, source, stages, sink")
    origins = _apply(raw, overrides or [])
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key_path = _key_path(err["loc"])
            lines.append(f"{_origin(path, key_path, origins)}: {key_path}: {err['msg']}"
                         + (f" (got {err['input']!r:.60})" if err["type"] != "missing" else ""))
        raise ConfigError("\n".join(lines)) from None
    cfg._origins = origins
    if check_host and cfg.cluster is None:  # on a cluster, each node's arena is checked there
        limit, where = host_memory_limit()
        if cfg.broker.capacity > limit:
            raise ConfigError(
                f"{_origin(path, 'broker.capacity', origins)}: broker.capacity: "
                f"{format_bytes(cfg.broker.capacity)} is more than the "
                f"{format_bytes(limit)} available ({where}); lower it or raise the limit")
    return cfg
