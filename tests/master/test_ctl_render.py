"""exoctl's pure helpers: totals, JSON documents, tables, task filtering, error messages."""

from __future__ import annotations

import io
import json

import httpx
import msgspec
from rich.console import Console
from rich.table import Table

from exo_master.exoctl import render
from exo_master.exoctl.client import error_message
from protocol.cluster_view import ClusterView, InstanceRow, ModelRow, NodeRow, TaskRow


def instance(
    iid: str, *, model: str = "m", in_flight: int = 0, pending: int = 0, queued: int = 0
) -> InstanceRow:
    return InstanceRow(
        instance_id=iid,
        node_id=iid.split("/")[0],
        model=model,
        kinds=["TextGeneration"],
        status="ready",
        in_flight=in_flight,
        pending=pending,
        queued=queued,
        capacity=1.5,
        max_concurrency=4,
        completed=3,
        failed=1,
    )


def task(tid: str, status: str, instance_id: str | None = "n1/0", error: str | None = None) -> TaskRow:
    return TaskRow(
        task_id=tid,
        kind="TextGeneration",
        model="m",
        status=status,
        instance_id=instance_id,
        node_id=None if instance_id is None else instance_id.split("/")[0],
        age=1.25,
        attempts=1,
        error=error,
    )


def view() -> ClusterView:
    # Two instances of model m share m's queue of 3: each row repeats it.
    return ClusterView(
        policy="least-loaded",
        session="s1",
        nodes=[
            NodeRow(
                node_id="n1",
                address="10.0.0.1",
                alive=True,
                subscribed=True,
                last_heartbeat_age=0.3,
                instances=["n1/0"],
            ),
            NodeRow(
                node_id="n2",
                address="10.0.0.2",
                alive=False,
                subscribed=False,
                last_heartbeat_age=75,
                instances=["n2/0", "n2/1"],
                sequence_gaps=7,
            ),
        ],
        instances=[
            instance("n1/0", in_flight=2, pending=1, queued=3),
            instance("n2/0", in_flight=1, pending=0, queued=3),
            instance("n2/1", model="other", in_flight=0, pending=1, queued=0),
        ],
        models=[
            ModelRow(model="m", instances=2, ready=2, queued=3),
            ModelRow(model="other", instances=1, ready=1, queued=0),
        ],
        tasks=[task("t1", "running"), task("t2", "queued", None), task("t3", "failed", error="boom")],
    )


def text_of(table: Table) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(table)
    return out.getvalue()


def test_format_age() -> None:
    assert render.format_age(0.42) == "0.4s"
    assert render.format_age(-1) == "0.0s"
    assert render.format_age(12.7) == "12s"
    assert render.format_age(185) == "3m05s"
    assert render.format_age(2 * 3600 + 7 * 60 + 9) == "2h07m"


def test_totals_count_each_model_queue_once() -> None:
    totals = render.load_totals(view())
    assert totals == {
        "instances": 3,
        "in_flight": 3,
        "pending": 2,
        "queued": 3,  # not 6: both rows of model m repeat the same queue
        "capacity": 4.5,
        "max_concurrency": 12,
        "completed": 9,
        "failed": 3,
    }


def test_load_json_keeps_the_cluster_view_field_names() -> None:
    doc = render.load_json(view())
    json.dumps(doc)  # serialisable as is
    assert set(doc) == {"policy", "session", "instances", "models", "totals", "affinity"}
    assert doc["affinity"] == {"enabled": False, "lookups": 0, "hits": 0}
    assert set(doc["instances"][0]) == set(InstanceRow.__struct_fields__)
    assert set(doc["models"][0]) == set(ModelRow.__struct_fields__)
    assert doc["instances"][0]["in_flight"] == 2 and doc["instances"][0]["pending"] == 1


def test_load_table_has_one_row_per_instance_and_a_totals_row() -> None:
    text = text_of(render.load_table(view()))
    lines = text.splitlines()
    assert any("n1/0" in line and "ready" in line for line in lines)
    total = next(line for line in lines if "total" in line)
    cells = [c.strip() for c in total.split("│") if c.strip()]
    # total, "2 model(s)", in-flight, pending, queued, capacity, max conc., completed, failed
    assert cells == ["total", "2 model(s)", "3", "2", "3", "4.5", "12", "9", "3"]
    assert "policy least-loaded" in text


def test_load_table_shows_the_prompt_cache_and_prefix_affinity() -> None:
    base = view()
    cached = msgspec.structs.replace(
        base.instances[0],
        prompt_cache_hits=3,
        prompt_cache_misses=1,
        prompt_cache_reused_tokens=270,
        prompt_tokens=360,
    )
    shown = msgspec.structs.replace(
        base,
        instances=[cached, *base.instances[1:]],
        prefix_affinity=True,
        affinity_lookups=8,
        affinity_hits=6,
    )
    text = text_of(render.load_table(shown))
    row = next(line for line in text.splitlines() if "n1/0" in line)
    assert "75%" in row.split("│")[-5] and "75%" in row.split("│")[-4]  # 3 of 4 hits; 270 of 360 tokens
    assert "prefix affinity: 6/8 chats with a known prefix placed on its holder (75%)" in " ".join(
        text.split()
    )
    assert "prefix affinity off" in " ".join(text_of(render.load_table(base)).split())
    assert render.load_json(shown)["affinity"] == {"enabled": True, "lookups": 8, "hits": 6}


def test_nodes_table_and_json() -> None:
    text = text_of(render.nodes_table(view()))
    assert "1/2 alive" in text
    n2 = next(line for line in text.splitlines() if "n2 " in line)
    assert "dead" in n2 and "1m15s ago" in n2 and "n2/0, n2/1" in n2 and "7" in n2
    doc = render.nodes_json(view())
    assert set(doc["nodes"][0]) == set(NodeRow.__struct_fields__)


def test_filter_tasks_by_status_and_limit() -> None:
    tasks = view().tasks
    assert [t.task_id for t in render.filter_tasks(tasks, None, 2)] == ["t1", "t2"]
    assert [t.task_id for t in render.filter_tasks(tasks, "queued", 10)] == ["t2"]
    assert render.filter_tasks(tasks, "cancelled", 10) == []
    assert render.filter_tasks(tasks, None, 0) == []


def test_tasks_table_shows_errors_only_when_there_are_some() -> None:
    tasks = view().tasks
    with_error = text_of(render.tasks_table(tasks))
    assert "error" in with_error and "boom" in with_error
    queued = next(line for line in with_error.splitlines() if "t2" in line)
    assert " - " in queued and "queued" in queued and "1.2s" in queued
    without = text_of(render.tasks_table(render.filter_tasks(tasks, "running", 5), "running"))
    assert "error" not in without and "status running" in without
    assert set(render.tasks_json(tasks)["tasks"][0]) == set(TaskRow.__struct_fields__)


def test_error_message_uses_the_api_error_body() -> None:
    body = {"error": {"message": "no live task x", "type": "invalid_request_error", "code": None}}
    assert error_message(httpx.Response(404, json=body)) == "no live task x (HTTP 404)"
    assert error_message(httpx.Response(502, text="<html>\n bad   gateway</html>")) == (
        "HTTP 502 from the master: <html> bad gateway</html>"
    )
    assert error_message(httpx.Response(500)) == "HTTP 500 from the master: Internal Server Error"
    assert error_message(httpx.Response(400, json=[1, 2])).startswith("HTTP 400 from the master")
