"""The README's commands, run as printed against a sim cluster that serves the default model name.

Every `exoctl` and `curl` line of the README's sh blocks, and its Python SDK snippet, is run with
the cluster's URL in place of the default one, only where the README uses the default (a bare
`exoctl` gets it through $EXO_API, as a user's shell would give the default), with the installed
commands on PATH as `source .venv/bin/activate` puts them. A `--watch` without `--count` gets one
so that it ends.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exo_master.devtools.launcher import ClusterSpec, LocalCluster, wait_for
from tests.e2e.conftest import ClusterFactory

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
DEFAULT_URL = "http://127.0.0.1:52415"
BIN = Path(sys.prefix) / "bin"


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)]


def _without_comment(line: str) -> str:
    """The command without a trailing `  # comment` (one outside any quotes)."""
    head, sep, _ = line.partition(" # ")
    if sep and head.count("'") % 2 == 0 and head.count('"') % 2 == 0:
        return head.rstrip()
    return line


def shell_commands(text: str) -> list[str]:
    """The exoctl and curl commands of the sh blocks, continuation lines joined."""
    commands = []
    for language, body in fenced_blocks(text):
        if language not in ("sh", "bash", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith(("exoctl", "curl")):
                commands.append(_without_comment(line))
    return list(dict.fromkeys(commands))  # a command printed in two sections runs once


def python_snippets(text: str) -> list[str]:
    return [body for language, body in fenced_blocks(text) if language == "python" and "OpenAI(" in body]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    # The sim workers also hold a "smollm2" the master can place (exoctl instances place smollm2).
    spec = ClusterSpec(
        workers=3,  # the sharding section places 3 shards
        engine="sim",
        model="smollm2",
        log_dir=tmp_path_factory.mktemp("readme"),
        worker_args=["--sim-model", "smollm2=100MiB:0.2"],
    )
    with LocalCluster(spec) as started:
        started.start()
        yield started


def _env(cluster: LocalCluster) -> dict[str, str]:
    return {
        **os.environ,
        "EXO_API": cluster.api_url,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        # `exoctl keys generate` writes under $XDG_CONFIG_HOME/exo/keys: never the user's own.
        "XDG_CONFIG_HOME": str(cluster.spec.log_dir),
        # `exoctl service ...` looks under $HOME: never the user's own services.
        "HOME": str(cluster.spec.log_dir),
    }


def test_the_readme_has_what_this_walk_runs() -> None:
    text = README.read_text()
    commands = shell_commands(text)
    assert sum(c.startswith("exoctl") for c in commands) >= 5
    assert any(c.startswith("curl") and "/v1/chat/completions" in c for c in commands)
    assert len(python_snippets(text)) >= 1
    # Usage synopses with [optional] parts or placeholders live in text blocks, not sh blocks.
    assert not [c for c in commands if "[" in c.split("-d")[0] or "TASK_ID" in c]


@pytest.mark.parametrize("command", shell_commands(README.read_text()))
def test_each_readme_command_works_as_printed(cluster: LocalCluster, command: str) -> None:
    command = command.replace(DEFAULT_URL, cluster.api_url)
    if command.startswith("exoctl") and "--watch" in command and "--count" not in command:
        command += " --count 2 --interval 0.1"
    if command.startswith("curl"):
        command += " --silent --show-error --fail-with-body"  # exit 22 on any HTTP error
    if command.startswith("exoctl service install"):
        command += " --print"  # the file it would write, without starting a service on this machine
    if command.startswith("exoctl discover"):
        command += " --interface 127.0.0.1 --timeout 1"  # this host only: no mDNS on the LAN
    result = subprocess.run(
        ["bash", "-c", command], env=_env(cluster), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    assert result.stdout.strip(), command
    if command.startswith("curl") and '"stream": true' in command:
        assert result.stdout.rstrip().endswith("data: [DONE]")
    if "--json" in command:
        json.loads(result.stdout)


@pytest.mark.parametrize("snippet", python_snippets(README.read_text()))
def test_the_readme_sdk_snippet_prints_the_answer(cluster: LocalCluster, snippet: str) -> None:
    code = snippet.replace(DEFAULT_URL, cluster.api_url)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the sim engine's words: the snippet prints the reply


def test_task_age_is_time_since_submission_for_ended_tasks_too(cluster: LocalCluster) -> None:
    def finished() -> list[dict[str, object]]:
        result = subprocess.run(
            [str(BIN / "exoctl"), "tasks", "--status", "finished", "--json"],
            env=_env(cluster),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        tasks: list[dict[str, object]] = json.loads(result.stdout)["tasks"]
        return tasks

    curl = next(c for c in shell_commands(README.read_text()) if c.startswith("curl"))
    subprocess.run(
        ["bash", "-c", curl.replace(DEFAULT_URL, cluster.api_url)], capture_output=True, timeout=60
    )
    first = wait_for(finished, 30, "a finished task")[0]
    wait_for(
        lambda: any(t["task_id"] == first["task_id"] and t["age"] > first["age"] for t in finished()),
        30,
        "the ended task's age to keep growing",
    )


def test_watch_into_a_pipe_prints_a_line_per_refresh(cluster: LocalCluster) -> None:
    exoctl = [str(BIN / "exoctl"), "--api", cluster.api_url]
    # Every instance ready (the workers' own and what the README's commands placed), every node alive.
    checks = ((["load"], r"ready (\d+)/\1 "), (["load", "--json"], '"totals"'), (["nodes"], "alive 3/3"))
    for extra, check in checks:
        command = [*exoctl, *extra, "--watch", "--count", "3", "--interval", "0.05"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        lines = result.stdout.splitlines()
        assert len(lines) == 3 and all(re.search(check, line) for line in lines), result.stdout
    shell = f"set -o pipefail; {shlex.join(exoctl)} load --watch --interval 0.05 | head -n 2"
    piped = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    # A reader sees lines as they come; when it stops reading, the watch ends quietly with 0.
    assert len(piped.stdout.splitlines()) == 2
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr


def test_the_load_table_says_why_an_instance_is_not_ready(start_cluster: ClusterFactory) -> None:
    cluster = start_cluster(workers=2, heartbeat_interval=0.2)
    cluster.stop_process(cluster.workers["node2"])  # a worker this test started, by PID

    def table() -> str | None:
        result = subprocess.run(
            # --wide: the full table, whose `why not ready` column this checks, at any width
            # (pytest's children inherit COLUMNS=80, which would pick the compact layout).
            [str(BIN / "exoctl"), "load", "--wide", "--api", cluster.api_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return result.stdout if "no heartbeat for" in result.stdout else None

    text = wait_for(table, 30, "the dead node's instance to say why it is not ready")
    assert "why not ready" in text
    row = next(line for line in text.splitlines() if "node2/0" in line)
    assert "dead" in row and "node node2: no heartbeat for" in row
