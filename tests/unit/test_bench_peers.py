"""benchmarks/bench_peers.py: the pure parts (percentiles, targets, CPU trees, tables) and one short
real cell against the naive FastAPI peer, serving a tiny ONNX model built here."""

import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from benchmarks import bench_peers as bp

from cxr_triage.repository.models import InputSpec


def cell(
    peer: str,
    input: str = "png",
    concurrency: int = 16,
    req_s: float = 10.0,
    p95: float = 100.0,
    stat_p95: float | None = None,
    other_s: float = 0.0,
) -> bp.Cell:
    """A 10 s cell with ``req_s`` * 10 replies, 95% of them at ``p95`` / 2 ms and the rest at ``p95``."""
    n = round(req_s * 10)
    fast = round(n * 0.9)
    latencies = {"routine": [p95 / 2] * fast + [p95] * (n - fast)}
    status = {"routine": {"200": n}}
    if stat_p95 is not None:
        latencies["stat"] = [stat_p95] * 20
        status["stat"] = {"200": 20}
    return bp.Cell(
        peer=peer,
        input=input,
        concurrency=concurrency,
        seconds=10.0,
        latencies_ms=latencies,
        status=status,
        server_cpu_s=18.0,
        client_cpu_s=1.0,
        other_cpu_s=other_s,
        wall_s=10.0,
        priority=stat_p95 is not None,
    )


def test_percentile_is_numpy_linear_and_nan_when_empty() -> None:
    assert bp.percentile(list(range(1, 101)), 50) == pytest.approx(50.5)
    assert bp.percentile([3.0], 99) == 3.0
    assert math.isnan(bp.percentile([], 95))


def test_cell_figures() -> None:
    c = cell("naive-t1", req_s=20.0, p95=200.0)
    c.status["routine"]["ReadTimeout"] = 2
    assert c.ok() == 200 and c.errors() == 2
    assert c.throughput() == pytest.approx(20.0)
    assert c.p(50) == 100.0 and c.p(99) == 200.0
    assert not c.busy
    assert cell("naive-t1", other_s=3.0).busy  # 0.3 cores of other work > BUSY_OTHER_CORES
    assert c.summary()["classes"]["routine"]["req_s"] == pytest.approx(20.0)


def test_peer_names_expand_and_unknown_ones_are_refused() -> None:
    assert bp.expand_peers(["naive", "cxr-triage", "naive-t1"]) == ("naive-t1", "naive-t2", "cxr-triage")
    with pytest.raises(ValueError, match="unknown peer"):
        bp.expand_peers(["triton"])


def test_arguments_make_a_short_smoke_possible() -> None:
    plan = bp.parse_args(["--duration", "3", "--concurrency", "1,4", "--inputs", "png", "--peers", "naive"])
    assert plan.smoke and plan.warmup == 1.0
    assert plan.concurrency == (1, 4) and plan.inputs == ("png",) and plan.peers == ("naive-t1", "naive-t2")
    full = bp.parse_args([])
    assert not full.smoke and full.concurrency == (1, 4, 16) and full.inputs == ("png", "jpeg", "j2k")
    peers = ("naive-t1", "naive-t2", "litserve", "litserve-cores", "ray", "bentoml", "cxr-triage")
    assert full.peers == peers
    with pytest.raises(SystemExit):
        bp.parse_args(["--inputs", "tiff"])


def full_cells(ours_png: float, ours_big: float, ours_stat_p95: float, busy: bool = False) -> list[bp.Cell]:
    cells = []
    for kind in ("png", "jpeg", "j2k"):
        for c in (4, 16):
            big = kind != "png"
            cells += [
                cell("naive-t1", kind, c, req_s=8.0 if big else 30.0, p95=120.0),
                cell("naive-t2", kind, c, req_s=10.0 if big else 40.0, p95=100.0),  # the best naive
                cell("litserve", kind, c, req_s=99.0),  # not naive: never the reference
                cell(
                    "cxr-triage",
                    kind,
                    c,
                    req_s=ours_big if big else ours_png,
                    p95=90.0,
                    other_s=3.0 if busy else 0.0,
                ),
            ]
    cells += [
        cell("naive-t1", concurrency=16, stat_p95=900.0),
        cell("naive-t2", concurrency=16, stat_p95=800.0),  # the lower naive stat p95 is the reference
        cell("cxr-triage", concurrency=16, stat_p95=ours_stat_p95),
    ]
    return cells


def test_targets_pass_against_the_best_naive_configuration() -> None:
    verdicts = bp.targets(full_cells(ours_png=39.0, ours_big=13.0, ours_stat_p95=200.0), bare_img_s=42.0)
    assert [v.ok for v in verdicts] == [True] * 8
    assert "naive-t2 40.0" in verdicts[0].measured  # 39 / 40 = 0.975 >= 0.95
    assert verdicts[2].measured.startswith("0.93")  # 39 / 42
    assert verdicts[3].measured.startswith("1.30x")
    assert verdicts[-1].measured.startswith("0.25x")  # 200 / 800
    assert all(v.word == "PASS" for v in verdicts)


def test_targets_miss_and_busy_and_missing_cells_are_said() -> None:
    verdicts = bp.targets(full_cells(ours_png=37.0, ours_big=12.0, ours_stat_p95=201.0), bare_img_s=42.0)
    assert [v.ok for v in verdicts] == [False, True, False, False, False, False, False, False]
    assert verdicts[0].word == "MISS"
    busy = bp.targets(full_cells(39.0, 13.0, 200.0, busy=True), bare_img_s=42.0)
    assert busy[0].word == "PASS (machine busy: not valid)"
    nothing = bp.targets([cell("cxr-triage")], bare_img_s=None)
    assert all(v.ok is None and v.word == "not measured" for v in nothing)


def test_a_target_above_the_zero_overhead_ceiling_is_said_to_be_out_of_reach() -> None:
    cells = full_cells(ours_png=37.0, ours_big=12.0, ours_stat_p95=201.0)
    # jpeg: best naive 10 req/s (full_cells); a ceiling of 12 req/s is 1.2x: 1.3x is out of reach
    verdicts = bp.targets(cells, bare_img_s=42.0, ceilings={"png": 41.0, "jpeg": 12.0, "j2k": 20.0})
    jpeg, j2k = verdicts[3], verdicts[5]
    assert "ceiling here 12.0 req/s = 1.20x" in jpeg.measured
    assert jpeg.word == "MISS (out of reach on this machine)"
    assert j2k.ok is False and j2k.reachable is True and j2k.word == "MISS"
    assert verdicts[0].word == "MISS" and verdicts[0].reachable is True  # 41 / 40 >= 0.95
    plan = bp.parse_args(["--duration", "3", "--peers", "naive,cxr-triage"])
    run = bp.Run(plan, datetime(2026, 1, 2, tzinfo=UTC), 0.1, cells=cells, cores=2)
    assert run.ceiling("png") is None and run.ceiling_alone("png") is None  # nothing measured yet
    run.bare = [bp.Throughput("2 x 1 thread", 1, 100, 2.0, [20.0] * 100)]  # 50 img/s: 40 ms CPU each
    run.decode_cpu_ms = {"png": 10.0}
    assert run.ceiling_alone("png") == pytest.approx(40.0)  # 2000 ms / (40 + 10) ms
    assert run.ceiling("png") is None  # the ceiling is the side-by-side pipeline, measured
    run.pipeline_req_s = {"png": 36.0}
    assert run.ceiling("png") == 36.0


def test_process_tree_takes_descendants_and_the_session_not_the_rest() -> None:
    procs = {  # pid: (ppid, pgid, sid, cpu)
        100: (1, 100, 100, 1.0),  # the server, started in its own session
        101: (100, 100, 100, 2.0),  # a worker
        102: (101, 102, 100, 4.0),  # an actor leading its own group, same session
        103: (102, 103, 103, 8.0),  # a grandchild that left the session: still a descendant
        200: (1, 200, 200, 16.0),  # something else
        300: (1, 300, 300, 32.0),  # a daemon given as a second root (embedded Redis)
    }
    assert bp.tree_cpu([100], procs) == {100: 1.0, 101: 2.0, 102: 4.0, 103: 8.0}
    assert sum(bp.tree_cpu([100, 300], procs).values()) == 47.0
    assert bp.tree_cpu([999], procs) == {}


def test_report_tables_are_well_formed() -> None:
    plan = bp.parse_args(["--duration", "3", "--peers", "naive,cxr-triage", "--concurrency", "4,16"])
    run = bp.Run(plan, datetime(2026, 1, 2, tzinfo=UTC), 0.1, cells=full_cells(39.0, 13.0, 200.0))
    text = bp.render(run)
    assert "smoke run" in text and "## Targets" in text and "## Priority under saturation" in text
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if line.startswith("|"):
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    tables = [b for b in blocks if b]
    assert len(tables) >= 6  # machine, targets, png / jpeg results, priority, bare engine, peers
    for rows in tables:  # every row has its header's number of columns (no stray "|" in a cell)
        assert {row.count("|") for row in rows} == {rows[0].count("|")}, rows
    rows = bp.result_rows(run.cells, "jpeg", (4, 16), ("naive-t1", "cxr-triage"))
    assert [r[:3] for r in rows] == [
        ["4", "naive FastAPI, ORT 1 thread", "8.0"],
        ["4", "cxr-triage", "**13.0**"],
        ["16", "naive FastAPI, ORT 1 thread", "8.0"],
        ["16", "cxr-triage", "**13.0**"],
    ]


def test_cpu_breakdown_splits_our_cpu_by_process_against_the_peers_and_the_budget() -> None:
    plan = bp.parse_args(["--duration", "3", "--inputs", "png", "--concurrency", "16"])
    ours = cell("cxr-triage", req_s=30.0)  # 300 replies, 18 CPU s
    ours.roles_cpu_s = {
        "cxr-worker": 10.0,
        "cxr-lane": 1.0,
        "cxr-http": 3.0,
        "cxr-decoder": 1.5,
        "redis-server": 0.9,
        "cxr-main": 0.6,
        "python3": 1.0,  # multiprocessing's resource tracker: "other"
    }
    ours.engine_cpu_s = 9.0
    cells = [cell("naive-t2", req_s=40.0), cell("litserve", req_s=30.0), ours]
    run = bp.Run(plan, datetime(2026, 1, 2, tzinfo=UTC), 0.1, cells=cells, cores=2)
    run.bare = [bp.Throughput("bare", 1, 100, 2.0, [])]  # 50 img/s on 2 cores: 40 ms per image
    # total 60 ms/reply: engine 30, the rest 30 = workers (10 + 1 - 9 s) 6.7, HTTP 10, decoders 5,
    # Redis 3, main 2, other 3.3; naive 45 ms/reply and LitServe 60, less the bare 40; the
    # budget: 1.8 cores / (0.95 x 40 req/s) = 47.4 ms, less 40
    assert bp.cpu_rows(run) == [
        [
            "png c16",
            "30.0",
            "60.0",
            "30.0",
            "30.0",
            "6.7",
            "10.0",
            "5.0",
            "3.0",
            "2.0",
            "3.3",
            "5.0",
            "20.0",
            "7.4",
        ]
    ]
    text = "\n".join(bp.cpu_section(run))
    assert "## Where cxr-triage's CPU goes" in text and "40.0 ms" in text
    # The Redis-queue floor: Redis 3.0 ms/reply + the naive's 5.0 = 8.0 > the 7.4 left
    floor = bp.durable_floor(run)
    assert floor is not None and floor.ms == pytest.approx(8.0) and not floor.reachable
    png_c16 = png_c16_throughput_row(run)
    assert "Redis-queue floor 8.0 vs 7.4 ms left" in png_c16
    assert "MISS (out of reach on this machine)" in png_c16
    ours.roles_cpu_s["redis-server"] = 0.3  # 1.0 + 5.0 <= 7.4: a miss this server could still win
    png_c16 = png_c16_throughput_row(run)
    assert "floor 6.0 vs 7.4" in png_c16 and "**MISS**" in png_c16
    ours.engine_cpu_s = None  # no engine figure (an older server): no breakdown rather than a wrong one
    assert bp.cpu_section(run) == []


def png_c16_throughput_row(run: bp.Run) -> str:
    return next(row for row in bp.targets_section(run) if row.startswith("| 224 px PNG, c16: throughput"))


def round_of(c: bp.Cell, r: int) -> bp.Cell:
    c.round = r
    return c


def test_interleaved_rounds_pool_and_the_targets_compare_them_beside_the_first_pass(tmp_path: Path) -> None:
    plan = bp.parse_args(["--duration", "3", "--peers", "naive,cxr-triage", "--results-dir", str(tmp_path)])
    assert plan.rounds == 2 and bp.parse_args(["--rounds", "0"]).rounds == 0
    with pytest.raises(SystemExit):
        bp.parse_args(["--rounds", "-1"])
    first = full_cells(ours_png=37.0, ours_big=13.0, ours_stat_p95=200.0)  # PNG c16: 37 / 40 = 0.925x
    run = bp.Run(plan, datetime(2026, 1, 2, tzinfo=UTC), 0.1, cells=first)
    run.interleaved = [
        round_of(cell("naive-t2", req_s=40.0, p95=100.0), 1),
        round_of(cell("cxr-triage", req_s=40.0, p95=80.0), 1),
        round_of(cell("cxr-triage", req_s=38.0, p95=120.0), 2),
        round_of(cell("naive-t2", req_s=38.0, p95=200.0), 2),
        round_of(cell("naive-t1", req_s=30.0), 1),
        round_of(cell("naive-t1", req_s=30.0), 2),
    ]
    ours = bp.find(bp.pooled(run.interleaved), "cxr-triage", "png", 16)
    assert ours is not None and ours.seconds == 20.0 and ours.ok() == 780
    assert ours.throughput() == pytest.approx(39.0) and ours.round is None
    assert ours.p(99) == 120.0 and ours.status == {"routine": {"200": 780}}  # every reply of both rounds
    cells = bp.target_cells(run)
    assert bp.find(cells, "naive-t2", "png", 16).throughput() == pytest.approx(39.0)  # type: ignore[union-attr]
    assert bp.find(cells, "cxr-triage", "png", 4) in first  # not measured again: the first pass
    assert len([c for c in cells if c.priority]) == 3
    row = png_c16_throughput_row(run)
    assert "1.00x (39.0 vs naive-t2 39.0 req/s)" in row and "first pass 0.93x (37.0 vs naive-t2 40.0" in row
    assert "**PASS**" in row  # the interleaved rounds decide
    text = bp.render(run)
    assert "*Interleaved*: the throughput targets' cells were measured again" in text
    assert "## Interleaved rounds" in text
    assert "| 224 px PNG | 16 | 2 | 10 | cxr-triage | **38.0** | 60 | 120 | 120 | 380 / 0 |" in text
    summary = json.loads(next(p for p in bp.write_outputs(run, text) if p.suffix == ".json").read_text())
    assert [c["round"] for c in summary["interleaved"]] == [1, 1, 2, 2, 1, 2]
    assert all("round" not in c for c in summary["cells"])


def test_served_over_bare_compares_the_bare_engines_turns_in_the_rounds_beside_the_first_pass() -> None:
    """The bare engine timed at the start of a run and cells timed 40 minutes later differ by the
    machine's drift; its turns in the interleaved PNG c16 rounds do not."""
    plan = bp.parse_args(["--peers", "naive,cxr-triage"])
    run = bp.Run(plan, datetime(2026, 1, 2, tzinfo=UTC), 0.1, cells=full_cells(37.0, 13.0, 200.0))
    run.bare = [bp.Throughput("2 x 1 thread", 1, 960, 20.0, [41.0] * 960)]  # 48 img/s at the start
    run.interleaved = [
        round_of(cell("cxr-triage", req_s=40.0), 1),
        round_of(cell("naive-t2", req_s=40.0), 1),
        round_of(cell("naive-t2", req_s=40.0), 2),
        round_of(cell("cxr-triage", req_s=40.0), 2),
    ]
    run.bare_rounds = [
        bp.Throughput("2 x 1 thread", 1, 880, 20.0, [45.0] * 880),
        bp.Throughput("2 x 1 thread", 1, 860, 20.0, [46.0] * 860),
    ]
    assert run.bare_rounds_img_s == pytest.approx(43.5)
    row = next(r for r in bp.targets_section(run) if r.startswith("| 224 px PNG, c16: served"))
    assert "0.92 (40.0 vs 43.5 img/s); best naive 0.92; first pass 0.77 (37.0 vs 48.0 img/s)" in row
    assert "**PASS**" in row
    text = bp.render(run)
    assert "*served ÷ bare engine* compares those PNG c16 rounds with the bare engine's turns" in text
    assert "| 2 x 1 thread, PNG c16 round 2 | 1 | 43.0 |" in text
    run.bare_rounds = []  # none taken: the start's figure
    row = next(r for r in bp.targets_section(run) if r.startswith("| 224 px PNG, c16: served"))
    assert "0.83 (40.0 vs 48.0 img/s)" in row and "**MISS**" in row


def test_an_interleaved_cell_measures_long_enough_for_its_slowest_peer() -> None:
    plan = bp.parse_args([])
    assert (plan.duration, plan.min_replies) == (20.0, 100)
    assert bp.window_s(plan, [cell("naive-t1", req_s=40.0), cell("cxr-triage", req_s=38.0)]) == 20.0
    j2k = [cell("naive-t1", req_s=1.8), cell("cxr-triage", req_s=2.4)]
    assert bp.window_s(plan, j2k) == pytest.approx(100 / 1.8)  # the slowest peer's 100 replies
    assert bp.window_s(plan, [cell("naive-t1", req_s=0.5)]) == 60.0  # at most 3x --duration
    assert bp.window_s(plan, []) == 20.0  # no first pass: --duration
    assert bp.window_s(bp.parse_args(["--min-replies", "0"]), j2k) == 20.0
    with pytest.raises(SystemExit):
        bp.parse_args(["--min-replies", "-1"])


@pytest.mark.timeout(30)
def test_a_frozen_server_takes_no_cpu_until_it_is_let_go() -> None:
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        server = bp.Running(bp.PEERS["naive-t1"], "http://127.0.0.1:1/predict", [spin.pid])
        time.sleep(0.3)
        with bp.frozen([server]):
            time.sleep(0.1)
            before = sum(bp.tree_cpu([spin.pid]).values())
            time.sleep(0.5)
            assert sum(bp.tree_cpu([spin.pid]).values()) == before
        time.sleep(0.5)
        assert sum(bp.tree_cpu([spin.pid]).values()) > before + 0.2  # running again
    finally:
        spin.kill()
        spin.wait()


def test_metric_sums_add_a_series_over_its_labels_and_only_that_series() -> None:
    text = "\n".join(
        [
            "# HELP cxr_triage_engine_cpu_seconds_total CPU time in engine runs",
            "# TYPE cxr_triage_engine_cpu_seconds_total counter",
            'cxr_triage_engine_cpu_seconds_total{backend="cpu",model="a",version="1"} 1.5',
            'cxr_triage_engine_cpu_seconds_total{backend="cpu",model="a",version="2"} 2.25',
            'cxr_triage_engine_cpu_seconds_created{backend="cpu",model="a",version="1"} 1.7e9',
            'cxr_triage_queue_depth{priority="stat"} 3.0',
        ]
    )
    name = "cxr_triage_engine_cpu_seconds_total"
    assert bp.metric_sums(text, [name]) == {name: 3.75}
    assert bp.metric_sums(text, ["cxr_triage_jobs_scored_total"]) == {}  # no sample: absent


def test_a_partial_run_leaves_the_latest_whole_comparison_alone(tmp_path: Path) -> None:
    assert not bp.parse_args([]).partial
    assert bp.parse_args(["--inputs", "png"]).partial and bp.parse_args(["--no-priority"]).partial
    plan = bp.parse_args(["--inputs", "png", "--concurrency", "16", "--results-dir", str(tmp_path)])
    run = bp.Run(plan, datetime(2026, 1, 2, tzinfo=UTC), 0.1, cells=[cell("naive-t1")])
    written = bp.write_outputs(run, "# partial\n")
    assert {p.name for p in written} == {p.name for p in tmp_path.iterdir()}
    assert all(p.name.endswith(("-partial.md", "-partial.json")) for p in written) and len(written) == 2


def tiny_model(path: Path, size: int) -> None:
    """(N, 3, size, size) -> 14 sigmoid outputs: global average pool and one linear layer."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(3, 14)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(14, dtype=np.float32), "b")
    nodes = [
        helper.make_node("GlobalAveragePool", ["x"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, size, size])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", 14])],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


@pytest.mark.timeout(60)
def test_a_short_real_cell_against_the_naive_peer(tmp_path: Path) -> None:
    engine = tmp_path / "model.onnx"
    tiny_model(engine, 32)
    config = SimpleNamespace(input=InputSpec(size=32))
    bodies = bp.input_bodies("png")[:2]
    files = []
    for i, body in enumerate(bodies):
        (tmp_path / f"png-{i}").write_bytes(body)
        files.append(str(tmp_path / f"png-{i}"))
    plan = bp.parse_args(["--duration", "1", "--warmup", "0.3"])
    ref = bp.reference(engine, config, {"png": bodies[0]})  # type: ignore[arg-type]
    with bp.start_peer(bp.PEERS["naive-t1"], engine, config) as running:  # type: ignore[arg-type]
        assert bp.probe(running, {"png": bodies[0]}, ref) < 1e-5
        c = bp.measure_cell(running, "png", files, 2, plan)
        roots = running.roots
    assert c.ok() > 0 and c.errors() == 0
    assert c.server_cpu_s > 0 and c.client_cpu_s > 0 and c.wall_s == pytest.approx(1.0, abs=0.3)
    assert c.p(50) <= c.p(95) <= c.p(99)
    assert bp.tree_cpu(roots) == {}  # nothing of the server is left


@pytest.mark.timeout(120)
def test_the_bare_pipeline_decodes_and_scores_in_one_process_per_core(tmp_path: Path) -> None:
    engine = tmp_path / "model.onnx"
    tiny_model(engine, 32)
    config = SimpleNamespace(input=InputSpec(size=32))
    req_s, other = bp.bare_pipeline("png", engine, config, 2, 0.5)  # type: ignore[arg-type]
    assert 4.0 < req_s < 1e5  # at least 2 uploads per process in about half a second
    assert 0.0 <= other < 1.5  # its own processes are not counted as other processes' CPU
    with pytest.raises(RuntimeError, match="failed"):  # a process that cannot run is said, not 0 req/s
        bp.bare_pipeline("png", tmp_path / "missing.onnx", config, 2, 0.5)  # type: ignore[arg-type]


@pytest.mark.timeout(120)
def test_interleaved_rounds_take_turns_between_real_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tmp_path / "model.onnx"
    tiny_model(engine, 32)
    config = SimpleNamespace(input=InputSpec(size=32))
    (tmp_path / "png-0").write_bytes(bp.input_bodies("png")[0])
    # a second naive server stands in for cxr-triage: the turns, not the server, are under test
    monkeypatch.setitem(bp.PEERS, "cxr-triage", replace(bp.PEERS["naive-t1"], id="cxr-triage", naive=False))
    args = ["--duration", "1", "--warmup", "0.3", "--inputs", "png", "--concurrency", "4,16"]
    plan = bp.parse_args([*args, "--peers", "naive-t1,cxr-triage"])
    run = bp.Run(plan, datetime(2026, 1, 2, tzinfo=UTC), 0.1)
    bp.bench_interleaved(engine, config, {"png": [str(tmp_path / "png-0")]}, plan, run)  # type: ignore[arg-type]
    order = [("naive-t1", 1), ("cxr-triage", 1), ("cxr-triage", 2), ("naive-t1", 2)]
    assert [(c.peer, c.round) for c in run.interleaved] == order  # PNG c16 only: c4 is no target
    assert len(run.bare_rounds) == 2 and all(t.img_s > 0 for t in run.bare_rounds)  # its turn each round
    assert all(c.ok() > 0 and c.errors() == 0 and c.concurrency == 16 for c in run.interleaved)
    assert not [
        p for p in Path("/proc").glob("[0-9]*/cmdline") if b"naive_fastapi" in _read(p)
    ]  # all stopped
    none = bp.Run(replace(plan, rounds=0), datetime(2026, 1, 2, tzinfo=UTC), 0.1)
    bp.bench_interleaved(engine, config, {}, none.plan, none)  # type: ignore[arg-type]
    assert none.interleaved == []


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
