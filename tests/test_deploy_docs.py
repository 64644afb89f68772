"""deploy/README.md against the code: the environment variables the code reads and the table that
documents them, both ways; the systemd units against the process table. No servers needed."""

import ast
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
# A name the deployment sets: ours, Dagster's, AWS's, ClickHouse's.
ENV_NAME = re.compile(r"(EVENT_REPLAY|DAGSTER|AWS|CLICKHOUSE)_[A-Z0-9_]*")
# Documented families that libraries read, not our code (the AWS credential chain: boto3, pyarrow, deltalake).
READ_BY_LIBRARIES = {"AWS_*"}
# The systemd unit of each process of the table, and where the units find the venv.
UNITS = {
    "code server": "event-replay-code-server.service",
    "webserver": "event-replay-webserver.service",
    "daemon": "event-replay-daemon.service",
}
VENV_BIN = "/opt/event-replay/.venv/bin/"


# ---- what the code reads -------------------------------------------------------------------------


def code_files() -> list[Path]:
    """The deployed code: the packages pyproject.toml installs."""
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    tops = sorted({pattern.rstrip("*") for pattern in include})
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def family(prefix: str) -> str:
    return prefix + "<…>"


def read_in_python(path: Path, root: Path = ROOT) -> dict[str, str]:
    """{variable or family: where} for every environment variable name in the module's code: a
    string that is exactly such a name (whatever reads it: `os.environ`, `os.getenv`, `EnvVar`,
    `deployed((…))`, a sink's `settings`, a constant passed on), and the literal start of an f-string
    such as f"EVENT_REPLAY_SINK__{name}" (a family, as is a constant ending in `__`). Dict keys and
    assigned subscripts are left out: those name options of a library (deltalake's `AWS_REGION`
    storage option), not variables read."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            skip.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            skip.add(id(node.slice))
        elif isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    found = {}
    where = path.relative_to(root).as_posix()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            first = node.values[0] if node.values else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and ENV_NAME.fullmatch(first.value):
                found.setdefault(family(first.value), f"{where}:{node.lineno}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if ENV_NAME.fullmatch(node.value):
                name = family(node.value) if node.value.endswith("__") else node.value
                found.setdefault(name, f"{where}:{node.lineno}")
    return found


def read_in_yaml(path: Path) -> dict[str, str]:
    """`{env: NAME}` values of a Dagster YAML file (dagster.yaml, workspace.yaml)."""
    found = {}

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {"env"}:
                found.setdefault(node["env"], path.relative_to(ROOT).as_posix())
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(yaml.safe_load(path.read_text()))
    return found


def variables_read() -> dict[str, str]:
    found = {}
    for path in code_files():
        for name, where in read_in_python(path).items():
            found.setdefault(name, where)
    for path in sorted(DEPLOY.glob("*.yaml")):
        for name, where in read_in_yaml(path).items():
            found.setdefault(name, where)
    return found


# ---- what deploy/README.md documents ---------------------------------------------------------------


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def table_rows(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in `text` (without its header and rule)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows[2:]]


def documented(readme: str) -> set[str]:
    """The variables of the env table's first column: `NAME`, families `NAME__<PIPELINE>` (any
    `<…>` placeholder) and library-read wildcards (`AWS_*`)."""
    names = set()
    for row in table_rows(section(readme, "Configuration by environment")):
        for name in re.findall(r"`([^`]+)`", row[0]):
            names.add(re.sub(r"<[^>]*>$", "<…>", name))
    return names


def problems(read: dict[str, str], docs: set[str]) -> list[str]:
    """Each variable read but not documented, and each documented one nothing reads, with where."""
    out = [
        f"{name} is read by the code ({where}) but missing from the env table of deploy/README.md "
        f"('Configuration by environment'): add a row `{name.replace('<…>', '<PIPELINE>')}`"
        for name, where in sorted(read.items())
        if name not in docs
    ]
    out += [
        f"{name} is in the env table of deploy/README.md but nothing reads it (scanned: the packages of "
        "pyproject.toml and deploy/*.yaml): remove its row, or fix its spelling"
        for name in sorted(docs - set(read) - READ_BY_LIBRARIES)
    ]
    return out


def test_every_variable_the_code_reads_is_documented_and_every_documented_one_is_read():
    found = variables_read()
    # The scan sees each way a variable is read (else it would pass by finding nothing).
    assert found["EVENT_REPLAY_LAKE"].startswith("replay_defs/deployment.py")  # deployed((…))
    assert found["EVENT_REPLAY_KAFKA_BOOTSTRAP"].startswith("replay_defs/sinks/kafka.py")  # a sink's settings
    assert "EVENT_REPLAY_STAGING_DIR" in found  # os.environ.get
    assert "EVENT_REPLAY_SINK__<…>" in found  # a family
    assert found["DAGSTER_POSTGRES_URL"] == "deploy/dagster.yaml"  # {env: …} in the instance's YAML
    mismatches = problems(found, documented((DEPLOY / "README.md").read_text()))
    assert not mismatches, "\n".join(mismatches)


def test_the_comparison_names_the_variable_missing_on_either_side():
    readme = (DEPLOY / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `EVENT_REPLAY_STAGING_DIR`"))
    tampered = readme.replace(row + "\n", "").replace(
        "| `EVENT_REPLAY_OUTBOX` |", "| `EVENT_REPLAY_NOBODY` | nothing |\n| `EVENT_REPLAY_OUTBOX` |"
    )
    read = dict(variables_read())
    read["EVENT_REPLAY_FUTURE__<…>"] = "replay_defs/x.py:1"  # a family nobody documented yet
    found = problems(read, documented(tampered))
    assert len(found) == 3, found
    assert found[0].startswith("EVENT_REPLAY_FUTURE__<…> is read by the code (replay_defs/x.py:1)")
    assert "add a row `EVENT_REPLAY_FUTURE__<PIPELINE>`" in found[0]
    assert found[1].startswith("EVENT_REPLAY_STAGING_DIR is read by the code (replay_defs/core/lake.py:")
    assert found[2].startswith("EVENT_REPLAY_NOBODY is in the env table of deploy/README.md but nothing reads it")


def test_storage_option_keys_are_not_taken_for_variables(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        'import os\nopts = {"AWS_REGION": "x"}\nopts["AWS_ALLOW_HTTP"] = "true"\n'
        'a = os.environ.get("EVENT_REPLAY_A")\nb = f"EVENT_REPLAY_FAM__{a}"\n'
    )
    assert read_in_python(module, tmp_path) == {"EVENT_REPLAY_A": "m.py:4", "EVENT_REPLAY_FAM__<…>": "m.py:5"}


# ---- supervision ---------------------------------------------------------------------------------------


def process_commands() -> dict[str, str]:
    """process -> command, from the process table at the top of deploy/README.md."""
    rows = table_rows((DEPLOY / "README.md").read_text())
    return {row[0]: re.fullmatch(r"`([^`]+)`", row[1]).group(1) for row in rows if row[0] in UNITS}


def unit(name: str) -> dict[str, str]:
    out = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


@pytest.mark.parametrize("process", sorted(UNITS))
def test_each_systemd_unit_runs_the_documented_command_with_the_shared_environment(process):
    commands = process_commands()
    assert set(commands) == set(UNITS), f"deploy/README.md's process table lists {sorted(commands)}"
    u = unit(UNITS[process])
    exec_start = u["ExecStart"]
    assert exec_start.startswith(VENV_BIN), f"{UNITS[process]}: ExecStart should run {VENV_BIN}…: {exec_start}"
    assert exec_start.removeprefix(VENV_BIN) == commands[process], (
        f"{UNITS[process]} runs `{exec_start.removeprefix(VENV_BIN)}`, deploy/README.md says `{commands[process]}`"
    )
    assert u["EnvironmentFile"] == "/etc/event-replay/event-replay.env"
    assert u["WorkingDirectory"] == "/opt/event-replay"  # where deploy/workspace.yaml resolves
    assert u["Restart"] == "always"


def test_the_environment_file_template_sets_only_documented_variables():
    docs = documented((DEPLOY / "README.md").read_text())
    names = [
        line.split("=", 1)[0]
        for line in (DEPLOY / "event-replay.env").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert names and {"DAGSTER_HOME", "DAGSTER_POSTGRES_URL", "EVENT_REPLAY_LAKE"} <= set(names)
    undocumented = [n for n in names if n not in docs]
    assert not undocumented, f"deploy/event-replay.env sets {undocumented}, which deploy/README.md does not document"
