"""The deployment files, checked with the real tools.

- ``deploy/systemd``: ``systemd-analyze verify`` and ``security``; the unit's
  sd_notify contract against a real relay process.
- ``deploy/kubernetes``: the Kubernetes JSON schemas (``kubernetes-validate``,
  offline), the ConfigMap's ``relay.toml`` loads as a relay configuration, the
  pieces fit together (ports, paths, secrets, labels), the PrometheusRule equals
  ``deploy/prometheus/alerts.yml``; the kustomization ships no Secret (it would
  overwrite the one created out of band); the examples (the Secret's shape, the
  ``relay erase`` Job) validate and fit the StatefulSet.
- ``deploy/kubernetes/cluster``: the Deployment variant (replicas on a PostgreSQL
  journal) validates, builds alone, mirrors the StatefulSet's Service, monitoring and
  hardening, takes its DSN from a Secret file and its member name from the pod; its
  ConfigMap runs as three pods on a real PostgreSQL and Kafka through a rolling step;
  its ``relay journal copy`` Job moves a real SQLite journal the pods then read.
- ``Dockerfile``: the ``docker`` commands of its header fit the image (port, volume,
  config path, a stop timeout above the shutdown grace; erase with the relay stopped).
- ``deploy/prometheus``: ``promtool check rules / test rules / check config``,
  ``promtool check metrics`` on a running relay's ``/metrics``.
- ``deploy/grafana``: every query parses (``promtool check rules``) and names only
  metrics and labels the relay exports.

Under ``CI=true`` a missing ``promtool`` or ``systemd-analyze`` fails these tests;
elsewhere they are skipped with the reason.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

import httpx
import jsonschema  # type: ignore[import-untyped]  # via kubernetes-validate
import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML, via kubernetes-validate

from relay.config import RelayConfig, config_json_schema, load_config
from relay.config_base import parse_duration
from relay.emulators.rongcloud import RongCloudEmulator, message_key
from tests.support.configs import file_sink, rongcloud_source, write_config
from tests.support.emulators import serving
from tests.support.kafka_broker import KafkaBroker
from tests.support.kafka_read import consume
from tests.support.prometheus_tools import PrometheusToolsUnavailable, ensure_prometheus
from tests.support.relay_process import RelayProcess, wait_for
from tests.test_journal_copy import fill_sqlite

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SYSTEMD_UNIT = DEPLOY / "systemd" / "im-relay.service"
K8S = DEPLOY / "kubernetes"
K8S_EXAMPLES = K8S / "examples"
CLUSTER = K8S / "cluster"  # the Deployment variant: replicas on a PostgreSQL journal
ERASE_JOB = K8S_EXAMPLES / "erase-job.yaml"
USER_PLACEHOLDER = "REPLACE-WITH-THE-USER-ID"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "im-relay.json"
IN_CI = os.environ.get("CI", "").lower() == "true"

# Oldest Kubernetes release the manifests are meant for, and the newest schemas we have.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}
DEFAULT_SHUTDOWN_GRACE = float(RelayConfig.model_fields["shutdown_grace"].default)
# Target labels Prometheus adds to every series of the relay.
TARGET_LABELS = {"job", "instance"}


def unavailable(reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true, so failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


# -- fixtures and helpers -------------------------------------------------------------


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    try:
        return ensure_prometheus()
    except PrometheusToolsUnavailable as exc:
        reason = f"promtool unavailable: {exc}"
    unavailable(reason)


@pytest.fixture(scope="session")
def promtool(prometheus_bin: Path) -> Path:
    return prometheus_bin / "promtool"


@pytest.fixture(scope="session")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        unavailable("systemd-analyze is not installed (Debian package: systemd)")
    return path


def run(command: list[str | Path], *, stdin: bytes | None = None, cwd: Path | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in command], input=stdin, cwd=cwd,
                            capture_output=True, timeout=timeout, check=False)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(errors="replace"),
                                       result.stderr.decode(errors="replace"))


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file, every value of a key in order."""
    settings: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def kustomize_resources(root: Path = K8S) -> list[Path]:
    kustomization = yaml.safe_load((root / "kustomization.yaml").read_text())
    return [root / name for name in kustomization["resources"]]


def all_manifests(root: Path = K8S) -> list[dict[str, Any]]:
    return [doc for path in kustomize_resources(root) for doc in load_yaml_documents(path)]


def manifest(kind: str, root: Path = K8S) -> dict[str, Any]:
    found = [doc for doc in all_manifests(root) if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, found {len(found)}"
    return found[0]


def example_manifests(root: Path = K8S) -> list[dict[str, Any]]:
    """``examples/`` of a variant: applied by hand, never by the kustomization."""
    return [doc for path in sorted((root / "examples").glob("*.yaml"))
            for doc in load_yaml_documents(path)]


def example(kind: str, root: Path = K8S) -> dict[str, Any]:
    found = [doc for doc in example_manifests(root) if doc["kind"] == kind]
    assert len(found) == 1, f"expected exactly one example {kind}, found {len(found)}"
    return found[0]


def only_container(pod_template: dict[str, Any]) -> dict[str, Any]:
    containers = pod_template["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def relay_container() -> dict[str, Any]:
    return only_container(manifest("StatefulSet")["spec"]["template"])


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def namespace(root: Path = K8S) -> str:
    name: str = yaml.safe_load((root / "kustomization.yaml").read_text())["namespace"]
    return name


def configmap_toml(root: Path = K8S) -> dict[str, Any]:
    return tomllib.loads(manifest("ConfigMap", root)["data"]["relay.toml"])


# -- systemd ----------------------------------------------------------------------------


def unit_copy_with_existing_binary(directory: Path) -> Path:
    """The unit, with ExecStart pointing at this virtualenv's relay; everything else identical."""
    relay = Path(sys.executable).parent / "relay"
    assert relay.is_file(), f"{relay}: the package's entry point"
    assert os.access(relay, os.X_OK), f"{relay}: not executable"
    original = SYSTEMD_UNIT.read_text()
    copied = original.replace("ExecStart=/opt/im-relay/bin/relay ", f"ExecStart={relay} ", 1)
    changed = [(a, b) for a, b in zip(original.splitlines(), copied.splitlines(), strict=True)
               if a != b]
    assert len(changed) == 1, changed
    assert changed[0][0].startswith("ExecStart="), changed
    path = directory / SYSTEMD_UNIT.name
    path.write_text(copied)
    return path


def test_systemd_unit_passes_systemd_analyze_verify(systemd_analyze: str, tmp_path: Path) -> None:
    unit = unit_copy_with_existing_binary(tmp_path)
    result = run([systemd_analyze, "verify", "--man=no", "--recursive-errors=no", unit])
    assert result.returncode == 0, describe(result)
    # Unknown keys, bad values and missing executables are warnings with exit 0: none allowed.
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if SYSTEMD_UNIT.name in line]
    assert not complaints, "\n".join(complaints)


def test_systemd_unit_verify_catches_mistakes(systemd_analyze: str, tmp_path: Path) -> None:
    """The check above is not toothless: a misspelt key is reported."""
    unit = unit_copy_with_existing_binary(tmp_path)
    unit.write_text(unit.read_text().replace("WatchdogSec=", "WatchDogSec=", 1))
    result = run([systemd_analyze, "verify", "--man=no", "--recursive-errors=no", unit])
    assert "WatchDogSec" in result.stdout + result.stderr, describe(result)


def test_systemd_unit_is_hardened(systemd_analyze: str, tmp_path: Path) -> None:
    unit = unit_copy_with_existing_binary(tmp_path)
    # Overall exposure at most 2.0 of 10 ("OK"); the threshold is in tenths.
    result = run([systemd_analyze, "security", "--offline=yes", "--threshold=20", unit])
    assert result.returncode == 0, describe(result)
    assert "Overall exposure level" in result.stdout, describe(result)


def test_systemd_unit_settings() -> None:
    s = unit_settings(SYSTEMD_UNIT.read_text())

    def one(key: str) -> str:
        assert len(s.get(key, [])) == 1, f"{key}: {s.get(key)}"
        return s[key][0]

    assert one("ExecStart") == "/opt/im-relay/bin/relay run --config /etc/im-relay/relay.toml"
    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30"
    assert one("Restart") == "on-failure"
    assert parse_duration(one("RestartSec")) > 0
    assert parse_duration(one("TimeoutStopSec")) > DEFAULT_SHUTDOWN_GRACE + 5
    assert one("StateDirectory") == "im-relay"
    assert one("DynamicUser") == "yes"
    assert one("UMask") == "0077"
    assert one("ProtectSystem") == "strict"
    assert one("CapabilityBoundingSet") == ""
    assert one("NoNewPrivileges") == "yes"
    assert one("RestrictAddressFamilies") == "AF_INET AF_INET6 AF_UNIX"
    assert "@system-service" in s["SystemCallFilter"]
    assert one("EnvironmentFile") == "-/etc/im-relay/relay.env"

    environment = dict(item.split("=", 1) for line in s["Environment"] for item in line.split())
    assert environment["RELAY_JOURNAL__PATH"] == "%S/im-relay/relay.db"
    # Every credential the unit loads is handed to the relay through a *_FILE variable.
    credentials = {line.split(":", 1)[0] for line in s["LoadCredential"]}
    referenced = {value.removeprefix("%d/") for key, value in environment.items()
                  if value.startswith("%d/")}
    assert credentials == referenced == {"rongcloud_app_secret"}
    for key, value in environment.items():
        if value.startswith("%d/"):
            assert re.fullmatch(r"RELAY_\w+_FILE", key), key


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """An abstract-namespace datagram socket standing in for systemd's notification socket."""
    name = f"im-relay-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        yield sock, "@" + name
    finally:
        sock.close()


def receive_until(sock: socket.socket, done: Callable[[list[str]], bool], deadline: float,
                  seen: list[str], what: str) -> None:
    """Collect notification fields into ``seen`` until ``done(seen)``; fail at the deadline."""
    while not done(seen):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {what}; got {seen}")
        sock.settimeout(remaining)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        seen.extend(data.decode().split("\n"))


def test_relay_honours_the_units_notify_and_watchdog_contract(
        tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    """Type=notify, WatchdogSec and TimeoutStopSec rely on READY=1, WATCHDOG=1 and STOPPING=1."""
    sock, address = notify_socket
    config = write_config(
        tmp_path,
        sources={"rc": rongcloud_source([f"http://127.0.0.1:{free_port()}"])},
        sinks={"archive": file_sink(tmp_path / "events.jsonl")},
        shutdown_grace="5s",
    )
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    stop_timeout = parse_duration(unit_settings(SYSTEMD_UNIT.read_text())["TimeoutStopSec"][0])
    log_path = tmp_path / "relay.log"
    seen: list[str] = []
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(config)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            receive_until(sock, lambda s: "READY=1" in s, time.monotonic() + 30, seen, "READY=1")
            # The unit says WatchdogSec=30; here 1 s, so a ping every 0.5 s.
            pings = seen.count("WATCHDOG=1")
            receive_until(sock, lambda s: s.count("WATCHDOG=1") >= pings + 3,
                          time.monotonic() + 10, seen, "three watchdog pings")
            proc.send_signal(signal.SIGTERM)
            receive_until(sock, lambda s: "STOPPING=1" in s, time.monotonic() + 10, seen,
                          "STOPPING=1")
            code = proc.wait(timeout=stop_timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert code == 0, log_path.read_text(errors="replace")
    assert seen.index("READY=1") < seen.index("STOPPING=1")


# -- the container image ---------------------------------------------------------------


def dockerfile_examples() -> list[list[str]]:
    """The ``docker ...`` commands of the Dockerfile's header comment, split like a shell."""
    header = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line.removeprefix("#").strip())
    joined = "\n".join(header).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("docker ")]


def docker_mounts(command: list[str]) -> dict[str, str]:
    """Container path -> source of every ``-v SOURCE:TARGET[:ro]``."""
    found = {}
    for option, value in itertools.pairwise(command):
        if option == "-v":
            source, target = value.split(":")[:2]
            found[target] = source
    return found


def test_dockerfile_examples_fit_the_image() -> None:
    text = (REPO / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s+(RELAY_\w+)=(\S+)", text, re.M))
    (exposed,) = re.findall(r"^EXPOSE (\d+)$", text, re.M)
    (volume,) = re.findall(r'^VOLUME \["([^"]+)"\]$', text, re.M)
    commands = dockerfile_examples()
    runs = [c for c in commands if c[:2] == ["docker", "run"]]
    relays = [c for c in runs if "--entrypoint" not in c]
    erases = [c for c in runs if "--entrypoint" in c]
    assert len(relays) == 1, f"one example of running the relay: {relays}"
    assert len(erases) == 1, f"one example of relay erase: {erases}"
    relay, erase = relays[0], erases[0]
    # Read-only root file system, with the /tmp Python and gzip need.
    assert "--read-only" in relay
    assert relay[relay.index("--tmpfs") + 1] == "/tmp"
    # Metrics published, on the host's loopback only, to the port the relay listens on.
    published = relay[relay.index("-p") + 1]
    assert published == f"127.0.0.1:{exposed}:{exposed}"
    assert env["RELAY_METRICS__LISTEN"].rpartition(":")[2] == exposed
    # docker stop must not SIGKILL inside the shutdown grace.
    assert int(relay[relay.index("--stop-timeout") + 1]) >= DEFAULT_SHUTDOWN_GRACE + 10
    mounts = docker_mounts(relay)
    assert Path(env["RELAY_JOURNAL__PATH"]).parent == Path(volume)
    assert volume in mounts
    assert env["RELAY_CONFIG_FILE"] in mounts
    # Erase: the relay stopped first, then relay erase on the same journal and config.
    assert erase[erase.index("--entrypoint") + 1] == "relay"
    assert "--rm" in erase
    assert erase[-3:] == ["erase", "--user", "ID"]
    assert docker_mounts(erase) == mounts
    stop = commands.index(["docker", "stop", relay[relay.index("--name") + 1]])
    assert stop < commands.index(erase)


# -- Kubernetes -------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = {path.name for path in kustomize_resources()}
    present = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    kinds = {doc["kind"] for doc in all_manifests()}
    assert kinds == {"Namespace", "ConfigMap", "Service", "StatefulSet",
                     "ServiceMonitor", "PrometheusRule"}


def test_kustomization_ships_no_secret() -> None:
    """``kubectl apply -k`` must never overwrite the Secret the operator created out of band.

    Any Secret (or secretGenerator) in the kustomization would replace the real values
    with whatever the repository holds: placeholders at best.
    """
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert not kustomization.get("secretGenerator"), "a secretGenerator overwrites the Secret"
    shipped = [f"{doc['kind']} {doc['metadata']['name']}" for doc in all_manifests()
               if doc["kind"] == "Secret"]
    assert not shipped, f"the kustomization applies {shipped}"
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        result = run([kubectl, "kustomize", K8S])
        assert result.returncode == 0, describe(result)
        rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
        assert "Secret" not in {doc["kind"] for doc in rendered}


def test_secret_example_is_outside_the_kustomization_and_its_creation_is_documented() -> None:
    secret = example("Secret")
    name = secret["metadata"]["name"]
    volumes = {v["name"]: v for v in manifest("StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == name
    # Placeholders only: the example is the Secret's shape, never real values.
    assert secret["stringData"], "the example lists the keys relay.toml references"
    assert all(value.startswith("REPLACE-WITH-") for value in secret["stringData"].values())
    assert not {path.resolve() for path in kustomize_resources()} & {
        path.resolve() for path in K8S_EXAMPLES.glob("*.yaml")}
    # The out-of-band step is spelt out where operators look: the kustomization and the README.
    create = re.compile(rf"kubectl -n {re.escape(namespace())} create secret generic "
                        rf"{re.escape(name)}\b[^`]*?--from-file=(\w+)=")
    for where in (K8S / "kustomization.yaml", REPO / "README.md"):
        text = re.sub(r"\s*\\\n\s*#?\s*", " ", where.read_text())  # join continued lines
        keys = set(create.findall(text))
        assert keys, f"{where.name} does not show `kubectl create secret generic {name}`"
        assert keys <= set(secret["stringData"]), f"{where.name}: {keys}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_match_the_schemas(version: str) -> None:
    checked = 0
    for doc in all_manifests():
        if doc["kind"] in MONITORING_KINDS:
            continue  # CRDs: no schema offline; see test_monitoring_resources
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}):"
                        f" {exc.message}", pytrace=False)
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_examples_match_the_schemas(version: str) -> None:
    kinds = []
    for doc in example_manifests():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"example {doc['kind']} {doc['metadata']['name']} (Kubernetes {version}):"
                        f" {exc.message}", pytrace=False)
        # Applied with kubectl apply -f, outside the kustomization: they name the namespace.
        assert doc["metadata"]["namespace"] == namespace(), doc["kind"]
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Job", "Secret"]


def test_kubernetes_validation_is_not_toothless() -> None:
    statefulset = manifest("StatefulSet")
    statefulset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, K8S_VERSIONS[0], strict=True)


def test_kustomize_build_renders_valid_manifests() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    result = run([kubectl, "kustomize", K8S])
    assert result.returncode == 0, describe(result)
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert len(rendered) == len(all_manifests())
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "im-relay", doc["kind"]
        if doc["kind"] not in MONITORING_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def erase_job() -> dict[str, Any]:
    job = example("Job")
    assert job == load_yaml_documents(ERASE_JOB)[0]
    return job


def test_erase_job_works_on_the_statefulsets_journal_volume_and_config() -> None:
    """The one-off ``relay erase`` Job sees exactly what the relay's pod sees."""
    sts = manifest("StatefulSet")
    job = erase_job()
    pod = job["spec"]["template"]["spec"]
    relay_pod = sts["spec"]["template"]["spec"]
    container = only_container(job["spec"]["template"])
    relay = relay_container()
    # The claim a StatefulSet creates for its pod 0: <claim template>-<statefulset>-0.
    (template,) = sts["spec"]["volumeClaimTemplates"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    relay_volumes = {v["name"]: v for v in relay_pod["volumes"]}
    claim = volumes[template["metadata"]["name"]]["persistentVolumeClaim"]
    assert claim == {"claimName": f"{template['metadata']['name']}-{sts['metadata']['name']}-0"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    relay_mounts = {m["name"]: m for m in relay["volumeMounts"]}
    for name in (template["metadata"]["name"], "config", "secrets", "tmp"):
        assert mounts[name] == relay_mounts[name], name
    for name in ("config", "secrets"):
        assert volumes[name] == relay_volumes[name], name
    assert not mounts[template["metadata"]["name"]].get("readOnly"), "erase rewrites the journal"
    # The same journal path, configuration file and image as the relay.
    assert container_env(container)["RELAY_JOURNAL__PATH"] == \
        container_env(relay)["RELAY_JOURNAL__PATH"]
    assert container["image"] == relay["image"]
    assert container["command"] == ["relay", "erase"]
    args = container["args"]
    relay_args = relay["args"]
    assert args[args.index("--config") + 1] == relay_args[relay_args.index("--config") + 1]
    assert args[args.index("--user") + 1] == USER_PLACEHOLDER
    assert "--dry-run" not in args
    # As locked down as the relay (the namespace enforces the restricted profile).
    assert pod["securityContext"] == relay_pod["securityContext"]
    assert container["securityContext"] == relay["securityContext"]
    assert pod["automountServiceAccountToken"] is False
    # Run once: a failure (the relay still running: exit 2) is read, not retried.
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    # VACUUM copies the journal through a temporary file: /tmp must hold a journal.
    assert volumes["tmp"]["emptyDir"]["sizeLimit"] == template["spec"]["resources"]["requests"][
        "storage"]
    # Not one of the relay's pods: the Service (and Prometheus) must not select it.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not manifest("Service")["spec"]["selector"].items() <= labels.items()
    assert not sts["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_erase_job_command_erases_as_the_pod_would(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job's command line, with the ConfigMap's relay.toml and the pod's environment,
    is an erase the real CLI accepts and carries out (paths moved under ``tmp_path``)."""
    container = only_container(erase_job()["spec"]["template"])
    config_file = tmp_path / "relay.toml"
    config_file.write_text(manifest("ConfigMap")["data"]["relay.toml"])
    secrets = example("Secret")["stringData"]
    env = {**os.environ, **container_env(container)}
    env["RELAY_JOURNAL__PATH"] = str(tmp_path / Path(env["RELAY_JOURNAL__PATH"]).name)
    for (section, name, key), path in secret_file_keys(configmap_toml()).items():
        local = tmp_path / Path(path).name
        local.write_text(secrets[Path(path).name])
        env[f"RELAY_{section}__{name}__{key}".upper()] = str(local)
    file_sinks = {name: table for name, table in configmap_toml()["sinks"].items()
                  if table["type"] == "file"}
    for name in file_sinks:
        env[f"RELAY_SINKS__{name}__PATH".upper()] = str(tmp_path / name / "events.jsonl")
    args = [str(config_file) if previous == "--config" else
            "u1" if value == USER_PLACEHOLDER else value
            for previous, value in zip(["", *container["args"]], container["args"], strict=False)]
    command = container["command"]
    assert command[0] == "relay"
    result = subprocess.run([sys.executable, "-m", "relay", *command[1:], *args],
                            capture_output=True, text=True, timeout=60, env=env, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "erased 0 record(s) from events" in result.stdout, result.stdout
    for name in file_sinks:
        assert f"file sink {name}" in result.stdout, result.stdout


def test_statefulset_is_a_single_hardened_writer() -> None:
    sts = manifest("StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 1
    assert spec["podManagementPolicy"] == "OrderedReady"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain",
                                                            "whenScaled": "Retain"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = relay_container()
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert container["resources"] == {"requests": {"cpu": "250m", "memory": "160Mi"},
                                      "limits": {"cpu": "1", "memory": "256Mi"}}
    # The image's user (Dockerfile) is the one the pod runs as.
    dockerfile_user = re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert dockerfile_user is not None
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
        int(dockerfile_user.group(1)), int(dockerfile_user.group(2)))


def test_statefulset_outlasts_the_shutdown_grace() -> None:
    grace = manifest("StatefulSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    configured = parse_duration(configmap_toml().get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE))
    assert grace == 40
    assert grace >= max(configured, DEFAULT_SHUTDOWN_GRACE) + 10


def test_statefulset_journal_metrics_and_probes_fit_together() -> None:
    sts = manifest("StatefulSet")
    container = relay_container()
    env = container_env(container)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    # The journal lives on the claim template's volume.
    claims = {t["metadata"]["name"]: t for t in sts["spec"]["volumeClaimTemplates"]}
    assert set(claims) == {"journal"}
    assert claims["journal"]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert Path(env["RELAY_JOURNAL__PATH"]).parent == Path(mounts["journal"])
    # Metrics listen on all interfaces, on the port the probes, Service and ServiceMonitor use.
    host, _, port = env["RELAY_METRICS__LISTEN"].rpartition(":")
    assert host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": int(port)}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    service = manifest("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert service["spec"]["ports"][0]["port"] == int(port)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    # The config file the relay is told to read is the ConfigMap's key in the config mount.
    args = container["args"]
    config_file = Path(args[args.index("--config") + 1])
    assert config_file.parent == Path(mounts["config"])
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    configmap = manifest("ConfigMap")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_file.name in configmap["data"]


def secret_file_keys(config: dict[str, Any]) -> dict[tuple[str, str, str], str]:
    """``(section, name, key) -> path`` for every ``*_file`` key of the sources and sinks."""
    found = {}
    for section in ("sources", "sinks"):
        for name, table in config.get(section, {}).items():
            for key, value in table.items():
                if key.endswith("_file"):
                    found[(section, name, key)] = value
    return found


def test_secrets_are_mounted_files_referenced_by_file_keys() -> None:
    container = relay_container()
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in manifest("StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    secret = example("Secret")
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert mounts["secrets"]["readOnly"] is True
    # Readable by the pod's group (fsGroup), by nobody else.
    assert volumes["secrets"]["secret"]["defaultMode"] == 0o440
    references = secret_file_keys(configmap_toml())
    assert references, "the ConfigMap's relay.toml references no secret file"
    for path in references.values():
        assert Path(path).parent == Path(mounts["secrets"]["mountPath"])
        assert Path(path).name in secret["stringData"]
    # No secret in the environment or the ConfigMap.
    assert all("SECRET" not in name and "TOKEN" not in name for name in container_env(container))
    assert "app_secret =" not in manifest("ConfigMap")["data"]["relay.toml"]


def test_configmap_relay_toml_is_a_valid_relay_config(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded as the pod would: environment from the StatefulSet, secrets as files."""
    text = manifest("ConfigMap")["data"]["relay.toml"]
    config_file = tmp_path / "relay.toml"
    config_file.write_text(text)
    for name, value in container_env(relay_container()).items():
        monkeypatch.setenv(name, value)
    secrets = example("Secret")["stringData"]
    for (section, name, key), path in secret_file_keys(tomllib.loads(text)).items():
        local = tmp_path / Path(path).name
        local.write_text(secrets[Path(path).name])
        monkeypatch.setenv(f"RELAY_{section}__{name}__{key}".upper(), str(local))
    config = load_config(config_file)
    assert config.journal.path == "/var/lib/relay/relay.db"
    assert config.metrics.listen == "0.0.0.0:9464"
    assert config.journal.max_bytes is not None
    assert config.secret_values() == [secrets["rongcloud_app_secret"]]


def test_configmap_relay_toml_matches_the_config_schema() -> None:
    """What editors and CI validate against (``relay config-schema``) accepts the shipped file."""
    schema = config_json_schema()
    validator = jsonschema.Draft202012Validator(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(configmap_toml())]
    assert not problems, "\n".join(problems)
    wrong = {**configmap_toml(), "journal": {**configmap_toml()["journal"], "retian": "1d"}}
    assert not validator.is_valid(wrong), "the schema must refuse an unknown key"


def test_monitoring_resources() -> None:
    service = manifest("Service")
    monitor = manifest("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
    # The alert rules expect job="im-relay": the operator names the job after the Service.
    assert "jobLabel" not in monitor["spec"]
    assert service["metadata"]["name"] == "im-relay"
    # Metrics matter most when the pod is not ready (a sink down): keep it scrapeable.
    assert service["spec"]["publishNotReadyAddresses"] is True

    rule = manifest("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((PROM / "alerts.yml").read_text())
    assert rule["spec"] == alerts, "prometheusrule.yaml differs from deploy/prometheus/alerts.yml"


# -- Kubernetes: the Deployment variant (replicas on a PostgreSQL journal) -----------------

CLUSTER_KINDS = {"Namespace", "ConfigMap", "Service", "Deployment", "PodDisruptionBudget",
                 "ServiceMonitor", "PrometheusRule"}
# Shared with the StatefulSet variant, file for file: one Service (the job label the alerts
# expect), one scrape config, one set of alerts.
MIRRORED = ("namespace.yaml", "service.yaml", "servicemonitor.yaml", "prometheusrule.yaml")
POD_NAME = "im-relay-7d9c6b5f4-x2x7q"  # what metadata.name looks like for a Deployment's pod


def deployment() -> dict[str, Any]:
    return manifest("Deployment", CLUSTER)


def cluster_container() -> dict[str, Any]:
    return only_container(deployment()["spec"]["template"])


def cluster_pod_labels() -> dict[str, str]:
    labels: dict[str, str] = deployment()["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, "only matchLabels selectors are checked here"
    return bool(selector["matchLabels"].items() <= labels.items())


def cluster_env(container: dict[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """A container's environment: plain values, and ``valueFrom`` sources."""
    values = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    sources = {e["name"]: e["valueFrom"] for e in container.get("env", []) if "valueFrom" in e}
    return values, sources


def pod_environment(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The variables the kubelet would set: the Downward API's metadata.name as ``pod_name``."""
    values, sources = cluster_env(container)
    for name, source in sources.items():
        assert source == {"fieldRef": {"fieldPath": "metadata.name"}}, (name, source)
        values[name] = pod_name
    return values


def test_cluster_kustomization_lists_every_manifest() -> None:
    listed = {path.name for path in kustomize_resources(CLUSTER)}
    present = {path.name for path in CLUSTER.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    assert {doc["kind"] for doc in all_manifests(CLUSTER)} == CLUSTER_KINDS
    assert namespace(CLUSTER) == namespace()


def test_cluster_kustomization_ships_no_secret_and_builds_on_its_own(tmp_path: Path) -> None:
    kustomization = yaml.safe_load((CLUSTER / "kustomization.yaml").read_text())
    assert not kustomization.get("secretGenerator"), "a secretGenerator overwrites the Secret"
    assert "Secret" not in {doc["kind"] for doc in all_manifests(CLUSTER)}
    # Nothing from outside its folder (kustomize refuses that by default anyway).
    for name in kustomization["resources"]:
        assert (CLUSTER / name).resolve().parent == CLUSTER.resolve(), name
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    # A copy of the folder alone renders: `kubectl apply -k deploy/kubernetes/cluster` works
    # without the rest of the repository.
    alone = tmp_path / "cluster"
    shutil.copytree(CLUSTER, alone)
    result = run([kubectl, "kustomize", alone])
    assert result.returncode == 0, describe(result)
    rendered = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert sorted(doc["kind"] for doc in rendered) == sorted(
        doc["kind"] for doc in all_manifests(CLUSTER))
    for doc in rendered:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "im-relay", doc["kind"]
        if doc["kind"] not in MONITORING_KINDS:
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_cluster_manifests_match_the_schemas(version: str) -> None:
    checked = []
    for doc in all_manifests(CLUSTER):
        if doc["kind"] in MONITORING_KINDS:
            continue  # CRDs: no schema offline; they equal the StatefulSet variant's
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']} {doc['metadata']['name']} (Kubernetes {version}):"
                        f" {exc.message}", pytrace=False)
        checked.append(doc["kind"])
    assert sorted(checked) == ["ConfigMap", "Deployment", "Namespace", "PodDisruptionBudget",
                               "Service"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_cluster_examples_match_the_schemas(version: str) -> None:
    kinds = []
    for doc in example_manifests(CLUSTER):
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"example {doc['kind']} {doc['metadata']['name']} (Kubernetes {version}):"
                        f" {exc.message}", pytrace=False)
        assert doc["metadata"]["namespace"] == namespace(CLUSTER), doc["kind"]
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Job", "Secret"]


def test_cluster_validation_is_not_toothless() -> None:
    pdb = manifest("PodDisruptionBudget", CLUSTER)
    pdb["spec"]["maxUnavailabel"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pdb, K8S_VERSIONS[0], strict=True)
    spread = deployment()
    spread["spec"]["template"]["spec"]["topologySpreadConstraints"][0]["maxSkew"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(spread, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("name", MIRRORED)
def test_cluster_mirrors_the_statefulsets_service_monitoring_and_namespace(name: str) -> None:
    """The same objects (comments aside): switching variants changes no scrape or alert."""
    assert load_yaml_documents(CLUSTER / name) == load_yaml_documents(K8S / name)
    if name == "prometheusrule.yaml":
        assert load_yaml_documents(CLUSTER / name)[0]["spec"] == yaml.safe_load(
            (PROM / "alerts.yml").read_text())


def test_deployment_runs_three_replicas_without_a_volume() -> None:
    spec = deployment()["spec"]
    assert spec["replicas"] == 3
    assert "volumeClaimTemplates" not in spec
    assert not [doc for doc in all_manifests(CLUSTER) if doc["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    # Configuration, secrets and a scratch /tmp: nothing that outlives the pod.
    kinds = {name: (set(volume) - {"name"}).pop() for name, volume in volumes.items()}
    assert kinds == {"config": "configMap", "secrets": "secret", "tmp": "emptyDir"}
    mounts = {m["name"]: m["mountPath"] for m in cluster_container()["volumeMounts"]}
    assert mounts["tmp"] == "/tmp"
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "64Mi"}
    # No SQLite path anywhere: with type = "postgres" the relay refuses one (exit 2).
    values, _ = cluster_env(cluster_container())
    assert "RELAY_JOURNAL__PATH" not in values
    assert "path" not in configmap_toml(CLUSTER)["journal"]


def test_deployment_rolls_one_pod_at_a_time_and_spreads_over_nodes() -> None:
    spec = deployment()["spec"]
    # A surge is safe: leases decide who runs what, and an old pod goes once the new is ready.
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    labels = cluster_pod_labels()
    assert selects(spec["selector"], labels)
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in spread, "replicas are not spread over nodes"
    for constraint in spread.values():
        assert constraint["maxSkew"] == 1
        assert selects(constraint["labelSelector"], labels)
        # Each revision spreads on its own during a rolling update.
        assert constraint["matchLabelKeys"] == ["pod-template-hash"]


def test_pdb_takes_one_of_the_deployments_pods_at_a_time() -> None:
    pdb = manifest("PodDisruptionBudget", CLUSTER)
    spec = pdb["spec"]
    assert spec["maxUnavailable"] == 1
    assert "minAvailable" not in spec
    assert spec["selector"] == deployment()["spec"]["selector"]
    assert selects(spec["selector"], cluster_pod_labels())
    # Not the one-off copy Job's pod.
    job_labels = example("Job", CLUSTER)["spec"]["template"]["metadata"]["labels"]
    assert not selects(spec["selector"], job_labels)
    assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_deployment_is_hardened_and_probed_as_the_statefulset() -> None:
    """Same pod, same container, but for the journal's volume and path and the member."""
    pod = deployment()["spec"]["template"]["spec"]
    sts_pod = manifest("StatefulSet")["spec"]["template"]["spec"]
    for key in ("securityContext", "automountServiceAccountToken", "enableServiceLinks",
                "terminationGracePeriodSeconds"):
        assert pod[key] == sts_pod[key], key
    assert pod["automountServiceAccountToken"] is False
    container, relay = cluster_container(), relay_container()
    for key in ("image", "imagePullPolicy", "args", "ports", "startupProbe", "livenessProbe",
                "readinessProbe", "resources", "securityContext"):
        assert container[key] == relay[key], key
    values, _ = cluster_env(container)
    assert values == {k: v for k, v in container_env(relay).items()
                      if k != "RELAY_JOURNAL__PATH"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    relay_mounts = {m["name"]: m for m in relay["volumeMounts"]}
    assert set(mounts) == set(relay_mounts) - {"journal"}
    for name in mounts:
        assert mounts[name] == relay_mounts[name], name
    # The probes, the Service and the ServiceMonitor meet on the metrics port.
    service = manifest("Service", CLUSTER)
    assert selects({"matchLabels": service["spec"]["selector"]}, cluster_pod_labels())
    port = int(values["RELAY_METRICS__LISTEN"].rpartition(":")[2])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": port}
    assert service["spec"]["ports"][0]["port"] == port
    # The config file the relay reads is this variant's ConfigMap.
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmap = manifest("ConfigMap", CLUSTER)
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    args = container["args"]
    config_file = Path(args[args.index("--config") + 1])
    assert config_file.parent == Path(mounts["config"]["mountPath"])
    assert config_file.name in configmap["data"]
    # Its own ConfigMap and Secret: the StatefulSet's stay as they are (a way back).
    assert configmap["metadata"]["name"] != manifest("ConfigMap")["metadata"]["name"]
    assert volumes["secrets"]["secret"]["secretName"] != \
        example("Secret")["metadata"]["name"]


def test_deployment_outlasts_the_shutdown_grace() -> None:
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    configured = parse_duration(configmap_toml(CLUSTER).get("shutdown_grace",
                                                            DEFAULT_SHUTDOWN_GRACE))
    assert grace >= max(configured, DEFAULT_SHUTDOWN_GRACE) + 10
    # A pod killed at the end of its grace holds its leases until they expire: the longest
    # a unit can then wait for a new holder is lease_ttl (plus a tick), far below retention.
    lease_ttl = parse_duration(configmap_toml(CLUSTER)["cluster"]["lease_ttl"])
    assert lease_ttl + 1 < 60


def test_member_is_the_pod_name() -> None:
    _, sources = cluster_env(cluster_container())
    assert sources == {"RELAY_CLUSTER__MEMBER": {"fieldRef": {"fieldPath": "metadata.name"}}}
    # Not in the ConfigMap: every replica reads the same file, and one member name shared
    # by all of them would make them one member.
    assert "member" not in configmap_toml(CLUSTER).get("cluster", {})


def cluster_secret_files() -> dict[str, str]:
    """Every ``*_file`` path of the ConfigMap's relay.toml (the journal's too) -> its key."""
    config = configmap_toml(CLUSTER)
    paths = [config["journal"]["dsn_file"], *secret_file_keys(config).values()]
    return {path: Path(path).name for path in paths}


def test_the_dsn_comes_from_the_secret_as_a_file_only() -> None:
    journal = configmap_toml(CLUSTER)["journal"]
    assert journal["type"] == "postgres"
    assert "dsn" not in journal, "the DSN (with its password) in the ConfigMap"
    container = cluster_container()
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    secret = example("Secret", CLUSTER)
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == secret["metadata"]["name"]
    assert volumes["secrets"]["secret"]["defaultMode"] == 0o440
    assert mounts["secrets"]["readOnly"] is True
    for path, key in cluster_secret_files().items():
        assert Path(path).parent == Path(mounts["secrets"]["mountPath"]), path
        assert key in secret["stringData"], key
    assert secret["stringData"]["journal_dsn"].startswith("postgresql://")
    assert all("REPLACE-WITH-" in value for value in secret["stringData"].values())
    # Nothing secret in the environment (no value at all but the two above) or the ConfigMap.
    values, sources = cluster_env(container)
    assert set(values) | set(sources) == {"RELAY_CLUSTER__MEMBER", "RELAY_METRICS__LISTEN"}
    for entry in container.get("envFrom", []) + [s for s in sources.values()]:
        assert "secretKeyRef" not in entry, entry
        assert "secretRef" not in entry, entry

    def strings(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for item in value.values():
                yield from strings(item)
        elif isinstance(value, list):
            for item in value:
                yield from strings(item)
        elif isinstance(value, str):
            yield value

    assert not [v for v in strings(configmap_toml(CLUSTER))
                if v.startswith(("postgres://", "postgresql://"))]


def test_cluster_secret_example_is_outside_the_kustomization_and_its_creation_is_documented(
        ) -> None:
    secret = example("Secret", CLUSTER)
    name = secret["metadata"]["name"]
    assert not {path.resolve() for path in kustomize_resources(CLUSTER)} & {
        path.resolve() for path in (CLUSTER / "examples").glob("*.yaml")}
    create = re.compile(rf"kubectl -n {re.escape(namespace(CLUSTER))} create secret generic "
                        rf"{re.escape(name)}((?: --from-file=\w+=\S+)+)")
    needed = set(cluster_secret_files().values())
    for where in (CLUSTER / "kustomization.yaml", CLUSTER / "examples" / "journal-copy-job.yaml",
                  REPO / "README.md"):
        text = re.sub(r"\s*\\\n\s*#?\s*", " ", where.read_text())  # join continued lines
        commands = create.findall(text)
        assert commands, f"{where.name} does not show `kubectl create secret generic {name}`"
        for options in commands:
            keys = set(re.findall(r"--from-file=(\w+)=", options))
            assert keys == needed, f"{where.name}: creates {keys}, relay.toml needs {needed}"


def load_cluster_config(directory: Path, monkeypatch: pytest.MonkeyPatch,
                        dsn: str | None = None) -> tuple[Path, dict[str, str]]:
    """The ConfigMap's relay.toml as a pod reads it: the Deployment's environment, and the
    example Secret's values (``dsn`` for its journal_dsn) as files under ``directory``.
    Returns the config file and the environment set."""
    config_file = directory / "relay.toml"
    config_file.write_text(manifest("ConfigMap", CLUSTER)["data"]["relay.toml"])
    env = pod_environment(cluster_container(), POD_NAME)
    secrets = dict(example("Secret", CLUSTER)["stringData"])
    if dsn is not None:
        secrets["journal_dsn"] = dsn
    config = configmap_toml(CLUSTER)
    local_files = {}
    for path, key in cluster_secret_files().items():
        local = directory / key
        local.write_text(secrets[key] + "\n")
        local_files[path] = str(local)
    env["RELAY_JOURNAL__DSN_FILE"] = local_files[config["journal"]["dsn_file"]]
    for (section, name, key), path in secret_file_keys(config).items():
        env[f"RELAY_{section}__{name}__{key}".upper()] = local_files[path]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return config_file, env


def test_cluster_configmap_relay_toml_is_a_valid_relay_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file, _ = load_cluster_config(tmp_path, monkeypatch)
    config = load_config(config_file)
    secrets = example("Secret", CLUSTER)["stringData"]
    assert config.journal.type == "postgres"
    assert config.journal.dsn is not None
    assert config.journal.dsn.get_secret_value() == secrets["journal_dsn"]
    assert config.journal.schema_name == configmap_toml(CLUSTER)["journal"]["schema"]
    assert "REPLACE-WITH-THE-PASSWORD" not in config.journal.describe()
    assert config.cluster.member == POD_NAME
    assert config.cluster.lease_ttl == parse_duration(
        configmap_toml(CLUSTER)["cluster"]["lease_ttl"])
    assert config.metrics.listen == "0.0.0.0:9464"
    assert config.journal.max_bytes is not None
    # The password and the RongCloud secret are redacted wherever they would show.
    found = config.secret_values()
    assert "REPLACE-WITH-THE-PASSWORD" in found
    assert secrets["rongcloud_app_secret"] in found
    # Pods have no volume: no sink may write into the pod.
    assert config.sinks
    assert all(sink.type != "file" for sink in config.sinks.values())


def test_cluster_configmap_relay_toml_matches_the_config_schema() -> None:
    validator = jsonschema.Draft202012Validator(config_json_schema())
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(configmap_toml(CLUSTER))]
    assert not problems, "\n".join(problems)


def journal_copy_job() -> dict[str, Any]:
    return example("Job", CLUSTER)


def test_journal_copy_job_reads_the_statefulsets_journal_into_the_deployments() -> None:
    job = journal_copy_job()
    pod = job["spec"]["template"]["spec"]
    container = only_container(job["spec"]["template"])
    sts = manifest("StatefulSet")
    (template,) = sts["spec"]["volumeClaimTemplates"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    claim = f"{template['metadata']['name']}-{sts['metadata']['name']}-0"
    journal_volume = next(name for name, v in volumes.items() if "persistentVolumeClaim" in v)
    assert volumes[journal_volume]["persistentVolumeClaim"] == {"claimName": claim}
    relay_mounts = {m["name"]: m for m in relay_container()["volumeMounts"]}
    assert mounts[journal_volume]["mountPath"] == relay_mounts["journal"]["mountPath"]
    assert not mounts[journal_volume].get("readOnly"), "the copy opens the journal as its writer"
    # From the StatefulSet's journal file, to the DSN of the Deployment's Secret (as a file).
    assert container["command"] == ["relay", "journal", "copy"]
    args = container["args"]
    assert args[args.index("--from") + 1] == \
        f"sqlite:{container_env(relay_container())['RELAY_JOURNAL__PATH']}"
    assert "--to" not in args, "a DSN on the command line shows in the process list"
    deployment_volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    assert volumes["secrets"] == deployment_volumes["secrets"]
    assert mounts["secrets"] == {m["name"]: m for m in cluster_container()["volumeMounts"]}[
        "secrets"]
    assert args[args.index("--to-dsn-file") + 1] == configmap_toml(CLUSTER)["journal"]["dsn_file"]
    assert args[args.index("--schema") + 1] == configmap_toml(CLUSTER)["journal"]["schema"]
    assert "--replace-target" not in args
    assert container["image"] == cluster_container()["image"]
    assert pod["securityContext"] == deployment()["spec"]["template"]["spec"]["securityContext"]
    assert container["securityContext"] == cluster_container()["securityContext"]
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 0
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not selects({"matchLabels": manifest("Service", CLUSTER)["spec"]["selector"]}, labels)
    assert not selects(deployment()["spec"]["selector"], labels)
    assert not selects(sts["spec"]["selector"], labels)


def test_journal_copy_job_command_moves_a_journal_the_replicas_then_read(
        tmp_path: Path, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Job's command line, run for real on a used SQLite journal (paths moved under
    ``tmp_path``); then `relay status` with the Deployment's relay.toml, as a pod would,
    sees everything that was copied."""
    sqlite_path = tmp_path / "relay.db"
    asyncio.run(fill_sqlite(sqlite_path))
    config_file, env = load_cluster_config(tmp_path, monkeypatch, dsn=postgres_dsn)
    container = only_container(journal_copy_job()["spec"]["template"])
    args = list(container["args"])
    args[args.index("--from") + 1] = f"sqlite:{sqlite_path}"
    args[args.index("--to-dsn-file") + 1] = env["RELAY_JOURNAL__DSN_FILE"]
    command = container["command"]
    assert command[0] == "relay"

    def relay(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", *arguments], capture_output=True,
                              text=True, timeout=120, env={**os.environ, **env}, check=False)

    copied = relay(*command[1:], *args)
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert "events             1200 in the source,      1200 new" in copied.stdout
    password = urlsplit(postgres_dsn).password
    assert password
    assert password not in copied.stdout + copied.stderr
    status = relay("status", "--json", "--config", str(config_file))
    assert status.returncode == 0, status.stdout + status.stderr
    shown = json.loads(status.stdout)
    assert shown["events"] == 1200, shown
    assert {s["sink"] for s in shown["sinks"]} == {"file", "hook"}
    assert shown["path"].startswith("postgresql://"), shown["path"]
    assert password not in status.stdout + status.stderr
    # Again: harmless, nothing new.
    again = relay(*command[1:], *args)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already held a copy of this journal" in again.stdout


@pytest.mark.kafka
def test_deployment_replicas_share_the_work_and_roll_one_at_a_time(
        tmp_path: Path, postgres_dsn: str, kafka_broker: KafkaBroker, kafka_topic: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three pods as the Deployment runs them: the ConfigMap's relay.toml, the pod's
    environment (member = pod name), the DSN from the Secret's file; against a real
    PostgreSQL, a RongCloud emulator and a real Kafka broker (their addresses overriding
    the ConfigMap's). Every pod becomes ready (the readiness probe), `relay status` lists
    the pods, the messages reach Kafka; then a rolling update's step: a fourth pod joins,
    becomes ready, an old one gets SIGTERM and exits within the grace period, and the
    three left are ready and deliver what comes next."""
    config_file, env = load_cluster_config(tmp_path, monkeypatch, dsn=postgres_dsn)
    config = configmap_toml(CLUSTER)
    secrets = example("Secret", CLUSTER)["stringData"]
    rc = RongCloudEmulator(config["sources"]["rc"]["app_key"], secrets["rongcloud_app_secret"],
                           batch_size=100, budget=10, seed=91)
    (sink,) = config["sinks"]
    readiness = cluster_container()["readinessProbe"]["httpGet"]
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    pods: dict[str, tuple[RelayProcess, int]] = {}

    def start(name: str) -> None:
        port = free_port()
        pod_env = {**env, "RELAY_CLUSTER__MEMBER": name,
                   "RELAY_METRICS__LISTEN": f"127.0.0.1:{port}",
                   "RELAY_SOURCES__RC__BASE_URLS": json.dumps(rc_server.urls),
                   f"RELAY_SINKS__{sink.upper()}__BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
                   f"RELAY_SINKS__{sink.upper()}__TOPIC": kafka_topic}
        pods[name] = (RelayProcess(config_file, tmp_path / f"{name}.log", env=pod_env).start(),
                      port)

    def ready(name: str) -> bool:
        process, port = pods[name]
        assert process.running(), process.log_text()
        try:
            return httpx.get(f"http://127.0.0.1:{port}{readiness['path']}",
                             timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def status() -> dict[str, Any]:
        shown = subprocess.run([sys.executable, "-m", "relay", "status", "--json", "--config",
                                str(config_file)], capture_output=True, text=True, timeout=60,
                               env={**os.environ, **env}, check=False)
        assert shown.returncode == 0, shown.stderr
        result: dict[str, Any] = json.loads(shown.stdout)
        return result

    def spread_over(names: set[str]) -> bool:
        shown = status()
        members = {m["member"] for m in shown["members"]}
        holders = {lease["holder"] for lease in shown["leases"]}
        return members == names and len(shown["leases"]) == 2 and holders <= names \
            and len(holders) == 2

    def delivered(expected: set[str]) -> bool:
        records = consume(kafka_broker.bootstrap, kafka_topic, len(expected), timeout=10)
        return {message_key(json.loads(r.value)["native"]) for r in records} >= expected

    first = [f"im-relay-7d9c6b5f4-{suffix}" for suffix in ("x2x7q", "b8kzt", "m4wfn")]
    with serving(rc) as (rc_loop, rc_server):
        try:
            for name in first:
                start(name)
            for name in first:
                wait_for(lambda name=name: ready(name), 60, interval=0.5,
                         message=f"pod {name} ready")
            # Two units (the RongCloud source, the Kafka sink) over three pods.
            wait_for(lambda: spread_over(set(first)), 60, interval=0.5,
                     message="relay status listing the pods, two of them holding a unit")
            expected = set(rc_loop.call(lambda: rc.generate(300)))
            wait_for(lambda: delivered(expected), 60, interval=1,
                     message="the first messages in Kafka")

            # A rolling update's step: surge one, then stop an old one holding a unit.
            new = "im-relay-5f8d4c7b9-q7r2s"
            start(new)
            wait_for(lambda: ready(new), 60, interval=0.5, message="the new pod ready")
            holder = next(lease["holder"] for lease in status()["leases"]
                          if lease["holder"] in first)
            process, _ = pods.pop(holder)
            stopped_at = time.monotonic()
            assert process.terminate(timeout=grace) == 0, process.log_text()
            assert time.monotonic() - stopped_at < grace
            left = (set(first) - {holder}) | {new}
            wait_for(lambda: spread_over(left), 30, interval=0.5,
                     message="the leases on the three pods left")
            for name in left:
                assert ready(name), name
            more = set(rc_loop.call(lambda: rc.generate(300)))
            wait_for(lambda: delivered(expected | more), 60, interval=1,
                     message="the messages after the rolling step in Kafka")
        finally:
            for process, _ in pods.values():
                process.stop()
    assert rc.snapshot()["over_budget"] == 0


# -- Prometheus rules -------------------------------------------------------------------


def test_promtool_check_rules(promtool: Path) -> None:
    result = run([promtool, "check", "rules", PROM / "alerts.yml"])
    assert result.returncode == 0, describe(result)
    assert "SUCCESS" in result.stdout


def test_promtool_rule_unit_tests(promtool: Path) -> None:
    result = run([promtool, "test", "rules", PROM / "alerts_test.yml"], cwd=PROM)
    assert result.returncode == 0, describe(result)
    assert "SUCCESS" in result.stdout


def test_promtool_check_example_config(promtool: Path) -> None:
    result = run([promtool, "check", "config", PROM / "prometheus.example.yml"], cwd=PROM)
    assert result.returncode == 0, describe(result)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_has_severity_annotations_and_both_unit_test_outcomes() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    stays_quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert fires == set(names), f"never seen firing: {set(names) - fires}"
    assert stays_quiet == set(names), f"never seen not firing: {set(names) - stays_quiet}"


def test_alerts_cover_the_operational_signals() -> None:
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    for needed in ("relay_source_data_age_seconds", "relay_source_last_success_timestamp_seconds",
                   "relay_source_retention_seconds", "relay_source_config_error",
                   "relay_source_requests_total", "relay_source_possible_loss_total",
                   "relay_sink_up", "relay_sink_oldest_pending_age_seconds",
                   "relay_journal_size_bytes", "relay_journal_limit_bytes",
                   "relay_journal_disk_full", "relay_journal_up",
                   "relay_sink_dead_letters_total", 'up{job="im-relay"}'):
        assert needed in exprs, needed


# -- metric names and labels used by the rules and the dashboard --------------------------

# Gives every metric of relay.metrics one series, so that every family shows up in the
# exposition with its labels. Runs in a child process: the test process's registry is
# shared with other tests.
SAMPLE_ALL_METRICS = """
import sys
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from relay import metrics

for collector in vars(metrics).values():
    if isinstance(collector, metrics.BatchHistogram):
        collector.observe_many(tuple("x" for _ in collector.labelnames), [0.01, 2.0, 1e6])
    elif isinstance(collector, Counter | Gauge | Histogram):
        names = collector._labelnames
        child = collector.labels(*["x"] * len(names)) if names else collector
        if isinstance(collector, Counter):
            child.inc()
        elif isinstance(collector, Gauge):
            child.set(1)
        else:
            child.observe(0.01)
sys.stdout.buffer.write(generate_latest(metrics.REGISTRY))
"""


@pytest.fixture(scope="module")
def all_metrics_exposition() -> bytes:
    result = subprocess.run([sys.executable, "-c", SAMPLE_ALL_METRICS], capture_output=True,
                            timeout=60, check=False, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def exposition_labels(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from Prometheus text exposition."""
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*?)\})?\s", line)
        assert match, line
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', match.group(2) or ""))
        found.setdefault(match.group(1), set()).update(labels)
    return found


def check_promql_references(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Problems with the relay metric and label names a PromQL expression uses."""
    problems = []
    names = set(re.findall(r"\b(relay_[a-z0-9_]+)\b", expr))
    for name in sorted(names - exported.keys()):
        problems.append(f"unknown metric {name}")
    for name, matchers in re.findall(r"\b(relay_[a-z0-9_]+)\{([^}]*)\}", expr):
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers):
            if name in exported and label not in exported[name] | TARGET_LABELS:
                problems.append(f"{name} has no label {label}")
    known = set(TARGET_LABELS)
    for name in names & exported.keys():
        known |= exported[name]
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in clause.split(","))):
            if label not in known:
                problems.append(f"grouping by unknown label {label}")
    return problems


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in
            panel.get("targets", [])]


def as_plain_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Prometheus would receive it."""
    expr = expr.replace("$__rate_interval", "5m")
    return re.sub(r"\$(instance|source|sink)\b", ".*", expr)


def test_alert_rules_use_only_exported_metrics_and_labels(all_metrics_exposition: bytes) -> None:
    exported = exposition_labels(all_metrics_exposition.decode())
    problems = [f"{rule['alert']}: {p}" for rule in alert_rules()
                for p in check_promql_references(rule["expr"], exported)]
    assert not problems, "\n".join(problems)


def test_dashboard_uses_only_exported_metrics_and_labels(all_metrics_exposition: bytes) -> None:
    exported = exposition_labels(all_metrics_exposition.decode())
    variables = [v["query"]["query"] for v in dashboard()["templating"]["list"]
                 if v["type"] == "query"]
    problems = [f"{expr}: {p}" for expr in dashboard_exprs() + variables
                for p in check_promql_references(as_plain_promql(expr), exported)]
    assert not problems, "\n".join(problems)


def test_reference_check_is_not_toothless(all_metrics_exposition: bytes) -> None:
    exported = exposition_labels(all_metrics_exposition.decode())
    assert check_promql_references('relay_sink_up{source="x"}', exported)
    assert check_promql_references("relay_sink_pending_total", exported)
    assert check_promql_references("sum by (endpoint) (relay_sink_up)", exported)
    assert not check_promql_references(
        'sum by (sink, le) (rate(relay_sink_delivery_latency_seconds_bucket{sink=~".*"}[5m]))',
        exported)


def test_dashboard_queries_parse(promtool: Path, tmp_path: Path) -> None:
    """Every panel query, as a recording rule, through promtool's PromQL parser."""
    exprs = dashboard_exprs()
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": as_plain_promql(expr)}
        for i, expr in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool, "check", "rules", path])
    assert result.returncode == 0, describe(result)
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout, describe(result)


def test_dashboard_structure_and_signals() -> None:
    board = dashboard()
    assert board["uid"] == "im-relay"
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "instance", "source", "sink"} <= variables
    exprs = " ".join(dashboard_exprs())
    for needed in ("relay_source_requests_total", "relay_source_events_total",
                   "relay_source_data_age_seconds", "relay_source_retention_seconds",
                   "relay_sink_pending_events", "relay_sink_oldest_pending_age_seconds",
                   "relay_journal_size_bytes", "relay_sink_dead_letters_total"):
        assert needed in exprs, needed
    assert re.search(r"histogram_quantile\(0\.99, sum by \(sink, le\) \(rate\("
                     r"relay_sink_delivery_latency_seconds_bucket", exprs)


# -- the relay's own /metrics -------------------------------------------------------------


@pytest.fixture(scope="module")
def running_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real relay process: a RongCloud source nobody answers, a file sink, metrics on."""
    directory = tmp_path_factory.mktemp("relay-metrics")
    port = free_port()
    config = write_config(
        directory,
        sources={"rc": rongcloud_source([f"http://127.0.0.1:{free_port()}"])},
        sinks={"archive": file_sink(directory / "events.jsonl")},
        metrics={"enabled": True, "listen": f"127.0.0.1:{port}"},
    )
    relay = RelayProcess(config, directory / "relay.log").start()
    base = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        assert relay.running(), relay.log_text()
        try:
            return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answering, 30, message="the relay's /healthz")
        yield base
    finally:
        relay.stop()


def test_relay_metrics_pass_promtool_check_metrics(running_relay: str, promtool: Path) -> None:
    # Wait until every source endpoint has made a request, so its series exist.
    def scraped() -> str | None:
        text = httpx.get(f"{running_relay}/metrics", timeout=5).text
        return text if text.count("relay_source_requests_total{") >= 3 else None

    text: str = wait_for(scraped, 30, message="requests of every RongCloud endpoint in /metrics")
    assert 'relay_sink_up{sink="archive"} 1.0' in text
    result = run([promtool, "check", "metrics"], stdin=text.encode())
    assert result.returncode == 0, describe(result)
    assert not (result.stdout + result.stderr).strip(), describe(result)


def test_every_metric_family_passes_promtool_check_metrics(all_metrics_exposition: bytes,
                                                           promtool: Path) -> None:
    """Also the families a quiet relay has no series for (histograms, loss, dead letters)."""
    result = run([promtool, "check", "metrics"], stdin=all_metrics_exposition)
    assert result.returncode == 0, describe(result)
    assert not (result.stdout + result.stderr).strip(), describe(result)


def test_promtool_check_metrics_is_not_toothless(promtool: Path) -> None:
    bad = b"# HELP relay_requests Requests.\n# TYPE relay_requests counter\nrelay_requests 1\n"
    result = run([promtool, "check", "metrics"], stdin=bad)
    assert result.returncode != 0, describe(result)


def test_health_endpoints_used_by_the_probes(running_relay: str) -> None:
    health = httpx.get(f"{running_relay}/healthz", timeout=5)
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = httpx.get(f"{running_relay}/readyz", timeout=5)
    body = ready.json()
    assert ready.status_code == (200 if body["ready"] else 503)
    assert body["checks"]["journal"] == "open"
    assert {"source rc/person", "source rc/group", "source rc/chatroom",
            "sink archive"} <= body["checks"].keys()


# -- a real Prometheus scraping the real relay ---------------------------------------------


@pytest.fixture(scope="module")
def prometheus_server(running_relay: str, prometheus_bin: Path,
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus with the example config, pointed at the running relay, scraping every second."""
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((PROM / "prometheus.example.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROM / name) for name in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"][0]["targets"] = [running_relay.removeprefix("http://")]
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [str(prometheus_bin / "prometheus"), f"--config.file={config_file}",
             f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=directory)
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            try:
                return httpx.get(f"{base}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for(ready, 30, message="Prometheus to be ready")
            yield base
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def instant_query(base: str, expr: str) -> dict[str, Any]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": expr}, timeout=10)
    body: dict[str, Any] = response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body


def test_prometheus_scrapes_the_relay_and_evaluates_every_alert_rule(
        prometheus_server: str) -> None:
    def scraped_twice() -> bool:
        # Two samples in a window are what rate() and increase() need.
        result = instant_query(prometheus_server,
                               'count(rate(relay_source_requests_total{job="im-relay"}[1m]))')
        return bool(result["data"]["result"])

    wait_for(scraped_twice, 30, message="two scrapes of the relay")
    up = instant_query(prometheus_server, 'up{job="im-relay"}')["data"]["result"]
    assert [sample["value"][1] for sample in up] == ["1"]
    # The relay's counters moved between scrapes (it keeps trying its source).
    moved = wait_for(lambda: instant_query(
        prometheus_server, 'sum(increase(relay_source_requests_total{job="im-relay"}[1m])) > 0'
    )["data"]["result"], 30, message="relay counters to move")
    assert float(moved[0]["value"][1]) > 0

    def evaluated() -> list[dict[str, Any]] | None:
        response = httpx.get(f"{prometheus_server}/api/v1/rules", timeout=10).json()
        rules = [rule for group in response["data"]["groups"] for rule in group["rules"]]
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = wait_for(evaluated, 30, message="a first evaluation of every rule")
    assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
    broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not broken
    # A healthy relay (sources merely unreachable for seconds) raises no alert yet.
    firing = [r["name"] for r in rules if r["state"] == "firing"]
    assert not firing


def test_dashboard_queries_run_on_real_data(prometheus_server: str) -> None:
    def scraped_twice() -> bool:
        result = instant_query(prometheus_server,
                               'count(rate(relay_source_requests_total{job="im-relay"}[1m]))')
        return bool(result["data"]["result"])

    wait_for(scraped_twice, 30, message="two scrapes of the relay")
    empty = []
    for expr in dashboard_exprs():
        plain = as_plain_promql(expr).replace("[5m]", "[1m]")
        if not instant_query(prometheus_server, plain)["data"]["result"]:
            empty.append(expr)
    # What a relay with an unreachable source and an idle file sink has data for.
    for signal_name in ("relay_source_requests_total", "relay_sink_pending_events",
                        "relay_sink_oldest_pending_age_seconds", "relay_journal_size_bytes",
                        "relay_source_retention_seconds", "up{"):
        assert any(signal_name in expr for expr in dashboard_exprs() if expr not in empty), \
            f"no dashboard query on {signal_name} returned data"
