"""deploy/ keeps what deploy/README.md promises: no affinity anywhere (any replica answers any
request), the shared stores given to every replica, probes on /ready and /health, grace periods
longer than the shutdown timeout, and autoscaling on the Redis stream the server reads. Reads the
files only; `nginx -t` runs where an nginx binary is installed."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from serve.api.body_limit import MAX_BODY_BYTES
from serve.api.images import image_body_bytes
from serve.config import Limits
from serve.engine.config import SchedulerConfig

yaml = pytest.importorskip("yaml")  # PyYAML: installed with transformers and huggingface_hub

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
STREAM, GROUP = "reelserve:queue", "reelserve-workers"
STORE_VARIABLES = ("REELSERVE_JOB_STORE", "REELSERVE_ARTIFACTS", "REELSERVE_S3_ENDPOINT_URL")
AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


# --- helpers -------------------------------------------------------------------------------------


def nginx_text() -> str:
    """deploy/nginx.conf without comments (no `#` appears inside a quoted string there)."""
    return re.sub(r"#[^\n]*", "", (DEPLOY / "nginx.conf").read_text())


def nginx_directives(text: str, name: str) -> list[list[str]]:
    """The arguments of every `name ...;` directive in `text`, at any depth."""
    pattern = rf"(?:^|[;{{}}\s]){name}(?:\s+([^;{{}}]*))?\s*;"
    return [(m.group(1) or "").split() for m in re.finditer(pattern, text)]


def nginx_block(text: str, header: str) -> str:
    """The inside of the one block whose header matches the regex `header` (braces balanced)."""
    matches = list(re.finditer(rf"{header}\s*\{{", text))
    assert len(matches) == 1, f"expected one block {header!r} in nginx.conf, found {len(matches)}"
    start, depth = matches[0].end(), 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    raise AssertionError(f"unbalanced braces after {header!r} in nginx.conf")


def seconds(value: str | int) -> float:
    """An nginx or compose duration ("3700s", "5m30s", "330") in seconds."""
    if isinstance(value, int):
        return float(value)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+)(ms|s|m|h|d)?", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(int(n) * units[u or "s"] for n, u in parts)


def size_bytes(value: str) -> int:
    """An nginx size ("28m", "512k", "1048576") in bytes."""
    m = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert m, f"not a size: {value!r}"
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def compose_replicas() -> dict[str, dict]:
    services = compose()["services"]
    replicas = {name: s for name, s in services.items() if s.get("image", "").split(":")[0] == "reelserve"}
    assert len(replicas) >= 2, "the compose file should run several replicas"
    return replicas


def image_version(image: str) -> tuple[int, ...]:
    """The version in an image tag: `nginx:1.28` -> (1, 28)."""
    return tuple(int(n) for n in image.split(":")[1].split("-")[0].split("."))


def k8s(kind: str) -> list[dict]:
    """Every document of `kind` that `kubectl apply -k` applies, plus the example Secret (a filled-in
    secret.yaml next to it is the operator's, not ours)."""
    names = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    docs = []
    for name in [*names, "secret.example.yaml"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d and d.get("kind") == kind]
    return docs


def the(kind: str) -> dict:
    (doc,) = k8s(kind)
    return doc


def container() -> dict:
    """The reelserve container; KEDA reads `addressFromEnv` from the first one, so it is first."""
    return the("Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


# --- nginx ---------------------------------------------------------------------------------------


def test_nginx_routes_everything_by_least_conn_with_no_affinity():
    text = nginx_text()
    for directive in ("hash", "ip_hash", "sticky", "sticky_cookie_insert", "random"):
        assert not nginx_directives(text, directive), f"nginx.conf routes with `{directive}`"
    assert not re.search(r"(?:^|[;{}\s])map\s", text), "no request attribute should pick a replica"

    upstreams = re.findall(r"upstream\s+(\S+)\s*\{", text)
    assert upstreams == ["reelserve"], f"one upstream for every route, found {upstreams}"
    upstream = nginx_block(text, r"upstream\s+reelserve")
    assert nginx_directives(upstream, "least_conn") == [[]]
    targets = {args[0] for args in nginx_directives(text, "proxy_pass")}
    assert targets == {"http://reelserve"}, f"every location should proxy to the one upstream: {targets}"

    # Compose replicas are found by the network alias through Docker's DNS, re-resolved at run time.
    servers = nginx_directives(upstream, "server")
    assert servers == [["reelserve:8000", "resolve"]], servers
    assert nginx_directives(text, "resolver")[0][0] == "127.0.0.11"
    assert nginx_directives(upstream, "zone"), "`resolve` needs a shared-memory zone"


def test_nginx_never_resends_a_post():
    text = nginx_text()
    for args in nginx_directives(text, "proxy_next_upstream"):
        assert "non_idempotent" not in args, "a POST that reached a replica may have stored its job"


def test_nginx_generate_outlasts_the_server_request_timeout():
    generate = nginx_block(nginx_text(), r"location\s*=\s*/generate")
    (read_timeout,) = nginx_directives(generate, "proxy_read_timeout")
    assert seconds(read_timeout[0]) > SchedulerConfig.model_fields["request_timeout_s"].default


def test_nginx_body_limit_lets_the_server_refuse_images_itself():
    # Above the server's own limit on the image routes (a max_image_bytes image as base64 in JSON
    # plus 1 MiB), so the server answers an oversized image with its JSON error, not nginx's 413.
    limits = nginx_directives(nginx_text(), "client_max_body_size")
    assert limits, "client_max_body_size is 1m unless set"
    server_limit = image_body_bytes(Limits(), MAX_BODY_BYTES)
    for (value,) in limits:
        assert size_bytes(value) >= server_limit, f"client_max_body_size {value} < {server_limit} bytes"
    assert size_bytes(limits[0][0]) <= 2 * server_limit, "and not far above it"


def nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True)
    return tuple(int(n) for n in re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout).groups())


@pytest.mark.skipif(shutil.which("nginx") is None, reason="no nginx binary")
def test_nginx_accepts_the_config(tmp_path: Path):
    binary = shutil.which("nginx")
    conf = (DEPLOY / "nginx.conf").read_text()
    if nginx_version(binary) < (1, 27, 3):
        # An older nginx (Debian 12 has 1.22) knows no `server ... resolve` and resolves the name
        # at start; test everything else against a literal address. The compose file pins 1.28.
        conf = conf.replace("server reelserve:8000 resolve;", "server 127.0.0.1:8000;")
        assert "resolve;" not in conf
    # `nginx -t` binds the listening socket: use a free unprivileged port, not 80.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert conf.count("listen 80;") == 1
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};")
    (tmp_path / "default.conf").write_text(conf)
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log stderr;\nevents {{}}\nhttp {{\n{temp}\n"
        f"    access_log off;\n    include {tmp_path}/default.conf;\n}}\n"
    )
    out = subprocess.run(
        [binary, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


# --- docker compose ------------------------------------------------------------------------------


def test_every_compose_replica_gets_the_shared_stores():
    services = compose()["services"]
    gpus = []
    for name, replica in compose_replicas().items():
        env = replica.get("environment", {})
        assert isinstance(env, dict), f"{name}: environment as a mapping"
        missing = [v for v in STORE_VARIABLES + AWS_VARIABLES if not env.get(v)]
        assert not missing, f"{name} lacks {missing}"
        store = re.fullmatch(r"redis://([^:/]+):(\d+)/(\d+)", env["REELSERVE_JOB_STORE"])
        assert store and store.group(1) in services, f"{name}: job store {env['REELSERVE_JOB_STORE']}"
        assert env["REELSERVE_ARTIFACTS"].startswith("s3://"), name
        endpoint = re.fullmatch(r"http://([^:/]+):(\d+)", env["REELSERVE_S3_ENDPOINT_URL"])
        assert endpoint and endpoint.group(1) in services, f"{name}: S3 endpoint {env['REELSERVE_S3_ENDPOINT_URL']}"
        assert "./models:/models:ro" in replica["volumes"], f"{name}: the model directory, read-only"
        # The name nginx resolves to reach every replica.
        assert "reelserve" in replica["networks"]["default"]["aliases"], name
        # One GPU each, by id: a count would give every replica the host's GPU 0.
        (device,) = replica["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and len(device["device_ids"]) == 1 and "count" not in device, name
        gpus += device["device_ids"]
    assert len(set(gpus)) == len(gpus), f"two replicas on one GPU: {gpus}"


def test_compose_stop_grace_outlasts_the_shutdown_timeout():
    for name, replica in compose_replicas().items():
        drain = seconds(flag_value(replica["command"], "--shutdown-timeout-s"))
        assert seconds(replica["stop_grace_period"]) > drain, f"{name}: Docker would SIGKILL a draining replica"


def test_compose_proxy_and_stores():
    services = compose()["services"]
    nginx = services["nginx"]
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    assert image_version(nginx["image"]) >= (1, 27, 3), "`server ... resolve` needs nginx 1.27.3 or later"
    assert image_version(services["redis"]["image"]) >= (7,), "KEDA's lag count needs Redis 7"
    assert services["s3"]["image"].startswith("chrislusf/seaweedfs:")
    # Replicas start once Redis answers and the bucket exists.
    for name, replica in compose_replicas().items():
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy", name
        assert replica["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully", name
    bucket = compose_replicas()["reelserve-0"]["environment"]["REELSERVE_ARTIFACTS"].split("/")[2]
    assert f"--bucket {bucket}" in services["s3-bucket"]["command"][0]


# --- Kubernetes ----------------------------------------------------------------------------------


def test_deployment_probes_and_gpu():
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    # Generous: loading and warming a 14B-per-expert checkpoint takes minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 15 * 60
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] in ports, probe
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"].get("readOnly") is True


def test_deployment_grace_period_outlasts_the_shutdown_timeout():
    deployment = the("Deployment")
    c = container()
    drain = seconds(flag_value(c["args"], "--shutdown-timeout-s"))
    pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = seconds(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > pause + drain, f"grace {grace} s <= preStop {pause} s + --shutdown-timeout-s {drain} s"


def test_deployment_takes_the_stores_from_the_secret():
    secret = the("Secret")  # secret.example.yaml
    keys = set(secret["stringData"])
    env = env_of(container())
    for variable in STORE_VARIABLES + AWS_VARIABLES:
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in keys, variable
    for variable in ("REELSERVE_JOB_STORE", "REELSERVE_ARTIFACTS"):
        assert not env[variable]["valueFrom"]["secretKeyRef"].get("optional"), f"{variable} is required"
    assert secret["stringData"]["job-store"].startswith(("redis://", "rediss://"))
    assert secret["stringData"]["artifacts"].startswith("s3://")


def test_deployment_leaves_the_replica_count_to_keda():
    # A count here would reset KEDA's on every `kubectl apply` and stop pods mid-job.
    assert "replicas" not in the("Deployment")["spec"]


def test_service_has_no_session_affinity():
    service = the("Service")
    assert service["spec"].get("sessionAffinity", "None") == "None"
    assert service["spec"]["selector"].items() <= the("Deployment")["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"] for p in container()["ports"]}
    assert all(p["targetPort"] in ports for p in service["spec"]["ports"])


def test_scaled_object_scales_the_deployment_on_the_queue():
    scaled = the("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == the("Deployment")["metadata"]["name"]
    assert scaled["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    # Never to 0: the pods are the HTTP front that puts jobs on the queue.
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]

    triggers = scaled["triggers"]
    env = env_of(container())
    metrics = set()
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis-streams"
        assert (meta["stream"], meta["consumerGroup"]) == (STREAM, GROUP)
        # KEDA reads host:port from the scale target's first container.
        assert meta["addressFromEnv"] in env
        metrics |= {key for key in ("pendingEntriesCount", "lagCount") if key in meta}
        ref = trigger.get("authenticationRef")
        if ref:
            (auth,) = [a for a in k8s("TriggerAuthentication") if a["metadata"]["name"] == ref["name"]]
            secret = the("Secret")
            for target in auth["spec"]["secretTargetRef"]:
                assert target["name"] == secret["metadata"]["name"] and target["key"] in secret["stringData"]
    assert metrics == {"pendingEntriesCount", "lagCount"}, "running (pending entries) and waiting (lag)"
    # The modifier's formula adds exactly the named triggers.
    formula = scaled["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[A-Za-z_]\w*", formula)) == {t["name"] for t in triggers}
    assert float(scaled["advanced"]["scalingModifiers"]["target"]) > 0


def test_kustomization_applies_every_manifest_but_the_secret():
    resources = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())["resources"]
    on_disk = {p.name for p in (DEPLOY / "k8s").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(resources) == on_disk - {"secret.example.yaml"}
