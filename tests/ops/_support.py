"""Small readers for the container files, shared by the tests in ``tests/ops``.

These tests check the images and the compose file by reading them (the
container tests in ``tests/containers`` build and run them): a tolerant Dockerfile parser, the
compose file with ``${VAR:-default}`` resolved to its defaults (what
``docker compose`` does with an empty environment), and the matching rules
of ``.dockerignore``. Each is deliberately small: enough for the files of
this repository, not a general implementation.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERIGNORE = REPO / ".dockerignore"


#: Files the images share, in ``container/`` (paths relative to the repository,
#: as the Dockerfiles name them with the repository root as build context).
SHARED_DIR = "container"
ENTRYPOINT_LIB = f"{SHARED_DIR}/lib.sh"
CVMFS_ENTRYPOINT = f"{SHARED_DIR}/cvmfs-entrypoint.sh"
CVMFS_AGENT_CONF = f"{SHARED_DIR}/zabbix_agentd.cvmfs.conf"
CVMFS_WRAPPER = f"{SHARED_DIR}/cvmfs_server"


@dataclass(frozen=True)
class Image:
    """One of the three images: compose service, directory, daemon it runs.

    ``entrypoint`` and ``agent_conf`` are the repository files the image
    installs as its entrypoint and its Zabbix agent configuration: its own
    (in its directory) or the ones the two CVMFS images share (in container/).
    """

    service: str
    directory: str
    daemon: str
    cvmfs: bool
    entrypoint: str
    agent_conf: str

    @property
    def dockerfile(self) -> Path:
        return REPO / self.directory / "Dockerfile"


IMAGES = (
    Image("publisher-consumer", "publisher-consumer", "publisher-consumer", cvmfs=True,
          entrypoint=CVMFS_ENTRYPOINT, agent_conf=CVMFS_AGENT_CONF),
    Image("cvmfs-repo-consumers", "cvmfs-repo-consumers", "cvmfs-repo-consumers", cvmfs=False,
          entrypoint="cvmfs-repo-consumers/entrypoint.sh",
          agent_conf="cvmfs-repo-consumers/zabbix_agentd.conf"),
    Image("sync-publisher", "sync-publisher", "cvmfs-repo-sync", cvmfs=True,
          entrypoint=CVMFS_ENTRYPOINT, agent_conf=CVMFS_AGENT_CONF),
)
CVMFS_IMAGES = tuple(i for i in IMAGES if i.cvmfs)
BY_SERVICE = {i.service: i for i in IMAGES}

#: Files the images COPY that other developers provide; a test skips (and
#: says so) while one is missing instead of failing on someone else's work.
PROVIDED_ELSEWHERE = frozenset({
    "README.md",
    "config/zabbix/userparameters_cvmfs_publisher.conf",
})


# --------------------------------------------------------------------------- compose

_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any) -> Any:
    """Replace every ``${NAME:-default}`` (or ``${NAME}``) by its default."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: m.group("default") or "", value)
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    return value


def load_compose() -> dict[str, Any]:
    """The compose file as ``docker compose`` sees it with no variables set."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, else ``None``."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


@dataclass
class Stage:
    """A build stage: its ``FROM`` and the instructions up to the next one."""

    base: str
    name: str | None
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _instructions(path: Path) -> list[Instruction]:
    """Every instruction of a Dockerfile (comments dropped, ``\\`` continuations joined).

    As in Docker, a comment line inside a continued instruction is skipped.
    """
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not pending and not stripped:
            continue
        if stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        text = " ".join(p for p in pending if p)
        pending = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, f"{path}: ends inside a continued line"
    return out


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile; the ``ARG`` lines before the first ``FROM`` are
    :func:`global_args`, the only instructions Docker allows there."""
    stages: list[Stage] = []
    for instruction in _instructions(path):
        if instruction.keyword == "FROM":
            words = [w for w in instruction.args.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name, instruction.line))
        elif not stages:
            assert instruction.keyword == "ARG", (
                f"{path}:{instruction.line}: {instruction.keyword} before FROM")
        else:
            stages[-1].instructions.append(instruction)
    return stages


def global_args(path: Path) -> dict[str, str]:
    """``ARG NAME=default`` before the first ``FROM`` (what ``FROM ${NAME}`` may use)."""
    args: dict[str, str] = {}
    for instruction in _instructions(path):
        if instruction.keyword == "FROM":
            break
        name, _, default = instruction.args.partition("=")
        args[name.strip()] = default.strip()
    return args


def resolve_base(stage: Stage, path: Path) -> str:
    """The stage's base image with a global ``${ARG}`` replaced by its default."""
    defaults = global_args(path)
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
                  lambda m: defaults.get(m.group(1), m.group(0)), stage.base)


def copy_parts(instruction: Instruction) -> tuple[dict[str, str], list[str], str]:
    """``COPY``/``ADD`` as (options, sources, destination)."""
    form = instruction.exec_form()
    words = form if form is not None else shlex.split(instruction.args)
    options: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        options[key] = value
    assert len(words) >= 2, instruction
    return options, words[:-1], words[-1]


def run_parts(instruction: Instruction) -> tuple[list[dict[str, str]], str]:
    """``RUN`` as (its ``--mount`` options as dicts, the command)."""
    text = instruction.args.strip()
    mounts: list[dict[str, str]] = []
    while text.startswith("--"):
        option, _, text = text.partition(" ")
        text = text.lstrip()
        key, _, value = option[2:].partition("=")
        if key == "mount":
            mounts.append(dict(p.partition("=")[::2] for p in value.split(",")))
    return mounts, text


def run_scripts(stage: Stage) -> list[str]:
    """Repository files bind-mounted into a ``RUN`` of the stage and run by it.

    The build context is the repository root, so a mount's ``source`` is a
    repository path (mounts from another stage or image are not ours).
    """
    scripts = []
    for run in stage.all("RUN"):
        mounts, command = run_parts(run)
        for mount in mounts:
            if (mount.get("type") == "bind" and "from" not in mount
                    and mount.get("target", "\0") in command):
                scripts.append(mount["source"])
    return scripts


def script_commands(path: Path) -> str:
    """A shell script's commands, one logical line each (comments dropped)."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].strip() + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return "\n".join(lines)


def run_texts(stage: Stage) -> list[str]:
    """What the stage runs: each ``RUN`` command and each repository script it runs."""
    texts = [run_parts(r)[1] for r in stage.all("RUN")]
    texts += [script_commands(REPO / s) for s in run_scripts(stage)]
    return texts


def image_build_text(image: Image) -> str:
    """The Dockerfile plus the scripts its ``RUN`` instructions run, as one text."""
    texts = [image.dockerfile.read_text(encoding="utf-8")]
    for stage in parse_dockerfile(image.dockerfile):
        texts += [(REPO / s).read_text(encoding="utf-8") for s in run_scripts(stage)]
    return "\n".join(texts)


def env_of(stage: Stage) -> dict[str, str]:
    """The ``ENV KEY=VALUE ...`` settings of a stage (later ones win)."""
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        for word in shlex.split(instruction.args):
            key, sep, value = word.partition("=")
            assert sep, f"ENV in the legacy 'ENV KEY VALUE' form: {instruction.args}"
            env[key] = value
    return env


def healthcheck_command(instruction: Instruction) -> list[str]:
    """The exec-form command of a ``HEALTHCHECK ... CMD [...]``."""
    match = re.match(r"^(?:--\S+\s+)*CMD\s+(\[.*\])\s*$", instruction.args)
    assert match, f"HEALTHCHECK not in exec form: {instruction.args}"
    return json.loads(match.group(1))


def healthcheck_options(instruction: Instruction) -> dict[str, str]:
    """``--interval=30s`` style options of a ``HEALTHCHECK``."""
    return dict(re.findall(r"--([a-z-]+)=(\S+)", instruction.args.split(" CMD ")[0]))


def apt_packages(stage: Stage) -> set[str]:
    """Package names a stage installs with ``apt-get install`` (versions stripped).

    In its ``RUN`` instructions and in the repository scripts they run.
    """
    packages: set[str] = set()
    for text in run_texts(stage):
        # A package list kept in a shell variable (name="a b c") counts where it is used.
        lists = dict(re.findall(r'^([A-Za-z_][A-Za-z0-9_]*)="([^"$]*)"$', text,
                                flags=re.MULTILINE))
        for chunk in re.split(r"&&|;|\|\||\n", text):
            if "apt-get install" not in chunk:
                continue
            words = shlex.split(chunk)
            if words[:2] != ["apt-get", "install"]:
                continue
            expanded = []
            for word in words[2:]:
                name = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", word)
                if name and name.group(1) in lists:
                    expanded += lists[name.group(1)].split()
                else:
                    expanded.append(word)
            for word in expanded:
                if word.startswith("-") or "/" in word:
                    continue
                packages.add(word.split("=", 1)[0])
    return packages


# --------------------------------------------------------------------------- .dockerignore


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern (Go ``filepath.Match`` plus ``**``) as a regex."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out.append("[" + ("^" + body[1:] if body.startswith(("!", "^")) else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """``(is_exception, regex)`` for every pattern of ``.dockerignore``, in order."""
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        body = line[1:].strip() if negate else line
        body = body.strip("/")
        patterns.append((negate, _pattern_regex(body)))
    return patterns


def is_ignored(relative: str) -> bool:
    """Whether Docker leaves ``relative`` out of the build context.

    The last pattern that matches the path or one of its parent directories
    decides, as in Docker's pattern matcher.
    """
    parts = relative.strip("/").split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for negate, regex in dockerignore_patterns():
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored
