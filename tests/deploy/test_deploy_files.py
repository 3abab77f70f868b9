"""Static checks of deploy/ (no Docker engine or Kubernetes here, DESIGN §3): the files parse, and the
names, settings, ports and tables they use agree with the code (Settings, the CLI, the migrations)."""

from __future__ import annotations

import json
import os
import re
import tomllib
import typing
from pathlib import Path
from unittest import mock
from urllib.parse import urlsplit

import pytest
import sqlglot
import typer
import yaml
from pydantic import SecretStr
from sqlglot import exp

import pipeline
from pipeline import schemas
from pipeline.cli import app as cli_app
from pipeline.settings import CONFIG_FILE_VAR, ENV_PREFIX, Settings
from pipeline.sinks.clickhouse import migrate, migrations

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_REGISTRY = DEPLOY / "compose.schema-registry.yaml"
PROMETHEUS = DEPLOY / "prometheus.yml"
CLUSTER_SQL = DEPLOY / "clickhouse" / "cluster.sql"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

FIELD_OF_VAR = {f"{ENV_PREFIX}{name.upper()}": name for name in Settings.model_fields}


def _is_secret(annotation: object) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


SECRET_VARS = {var for var, name in FIELD_OF_VAR.items() if _is_secret(Settings.model_fields[name].annotation)}
DEFAULT_HTTP_PORT = Settings.model_fields["http_port"].default
DEFAULT_DATABASE = Settings.model_fields["clickhouse_database"].default
WORKER_IMAGE = f"{PYPROJECT['project']['name']}:{PYPROJECT['project']['version']}"


def settings_from_env(env: dict[str, str]) -> Settings:
    """Settings exactly as a worker with this environment (and nothing else of ours) would build them."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return Settings()


def check_env(env: dict[str, str], where: str) -> Settings:
    unknown = sorted(set(env) - set(FIELD_OF_VAR))
    assert not unknown, f"{where}: not settings of pipeline.settings.Settings: {unknown}"
    settings = settings_from_env(env)
    assert settings.http_port != 0, f"{where}: PIPELINE_HTTP_PORT=0 disables the HTTP API the probes need"
    return settings


def env_values(raw: object, where: str) -> dict[str, str]:
    """A compose/k8s environment (mapping or KEY=VALUE list) as strings; rejects what compose rejects."""
    if raw is None:
        return {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    assert isinstance(raw, dict), f"{where}: environment must be a mapping or a list"
    out = {}
    for key, value in raw.items():
        assert not isinstance(value, bool) and isinstance(value, str | int | float), \
            f"{where}: {key} must be a string (quote it), got {value!r}"
        out[str(key)] = str(value)
    return out


# Every file -----------------------------------------------------------------------------------------------

def deploy_text_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def test_the_deliverables_exist():
    for path in (DOCKERFILE, COMPOSE, PROMETHEUS, CLUSTER_SQL, DEPLOY / "README.md", K8S / "kustomization.yaml"):
        assert path.is_file(), f"missing {path.relative_to(ROOT)}"


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents, f"{path} holds no document"
    for document in documents:
        assert isinstance(document, dict), f"{path}: a document is not a mapping"


def test_every_pipeline_variable_named_in_deploy_is_a_setting():
    known = set(FIELD_OF_VAR) | {CONFIG_FILE_VAR}
    for path in deploy_text_files():
        names = set(re.findall(r"\bPIPELINE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
        assert names <= known, f"{path.relative_to(ROOT)}: unknown settings {sorted(names - known)}"


# Dockerfile -------------------------------------------------------------------------------------------------

def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """Instructions (UPPER name, arguments) per stage, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current, "the Dockerfile ends with a continuation"
    stages: list[list[tuple[str, str]]] = []
    for line in logical:
        name, _, args = line.strip().partition(" ")
        if name.upper() == "FROM":
            stages.append([])
        assert stages, f"instruction before FROM: {line}"
        stages[-1].append((name.upper(), args.strip()))
    return stages


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instr, args in stage if instr == name]


def exec_form(args: str, what: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"{what} must use the exec (JSON) form, got {args!r}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), what
    return value


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions(dockerfile_stages()[-1], "ENV"):
        for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S*)", args):
            env[key] = value.strip('"')
    return env


def dockerfile_uid() -> int:
    users = instructions(dockerfile_stages()[-1], "USER")
    assert users, "the final stage has no USER: the worker would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {user}: use a numeric uid (Kubernetes runAsNonRoot cannot check names)"
    assert int(user) != 0, "USER 0 is root"
    return int(user)


def test_dockerfile_bases_are_python_311_slim():
    stages = dockerfile_stages()
    for stage in stages:
        image = instructions(stage, "FROM")[0].split()[0]
        assert re.fullmatch(r"python:3\.11(\.\d+)*-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", image), image


def test_dockerfile_runs_the_worker_as_non_root():
    assert dockerfile_uid() >= 1000


def test_dockerfile_entrypoint_is_the_console_script_and_cmd_is_worker():
    final = dockerfile_stages()[-1]
    entrypoint = exec_form(instructions(final, "ENTRYPOINT")[-1], "ENTRYPOINT")
    cmd = exec_form(instructions(final, "CMD")[-1], "CMD")
    assert entrypoint == ["pipeline"]
    assert entrypoint[0] in PYPROJECT["project"]["scripts"]
    assert cmd == ["worker"]
    assert cmd[0] in typer.main.get_command(cli_app).commands  # type: ignore[attr-defined]


def test_dockerfile_env_is_valid_settings_with_a_data_volume_and_the_http_port():
    final = dockerfile_stages()[-1]
    env = {k: v for k, v in dockerfile_env().items() if k.startswith(ENV_PREFIX)}
    settings = check_env(env, "Dockerfile ENV")
    assert str(settings.data_dir) == "/data"
    volumes = [v for args in instructions(final, "VOLUME")
               for v in (exec_form(args, "VOLUME") if args.startswith("[") else args.split())]
    assert str(settings.data_dir) in volumes, "no VOLUME for the RocksDB state under PIPELINE_DATA_DIR"
    exposed = {int(p.split("/")[0]) for args in instructions(final, "EXPOSE") for p in args.split()}
    assert settings.http_port in exposed
    for check in instructions(final, "HEALTHCHECK"):
        default = re.search(r"PIPELINE_HTTP_PORT['\"], ['\"](\d+)", check)
        ports = {int(default.group(1))} if default else {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", check)}
        assert ports == {settings.http_port}, f"HEALTHCHECK port {ports} is not the http_port"


def test_dockerfile_copies_what_the_package_reads_at_run_time():
    build_copies = [args for stage in dockerfile_stages() for args in instructions(stage, "COPY")
                    if not args.startswith("--from")]
    sources = [src for args in build_copies for src in args.split()[:-1] if not src.startswith("--")]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository (the build context is its root)"
    ignore = DEPLOY / "Dockerfile.dockerignore"
    if ignore.exists():
        patterns = ignore.read_text().splitlines()
        if "**" in patterns:
            for src in sources:
                assert f"!{src}" in patterns or f"!{src}/**" in patterns, f"{ignore.name} hides {src}"
    package_dir = Path(pipeline.__file__).resolve().parent
    if not schemas.SCHEMAS_DIR.is_relative_to(package_dir):
        # pipeline/schemas.py reads <source root>/schemas, which a regular wheel does not carry.
        assert "schemas" in sources, "the image must carry schemas/"
        runs = " ".join(args for stage in dockerfile_stages() for args in instructions(stage, "RUN"))
        assert re.search(r"pip install (\S+ )*-e ", runs), "install editable so that schemas/ is found"


# Compose ----------------------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def workers(services: dict) -> dict[str, dict]:
    return {name: s for name, s in services.items() if "build" in s or s.get("image") == WORKER_IMAGE}


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def kafka_listeners(service: dict) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """(advertised listener name -> (host, port), bound listener name -> port) of a Kafka service."""
    env = env_values(service.get("environment"), "kafka")
    key = next(k for k in env if k.endswith("ADVERTISED_LISTENERS"))
    advertised = {name: hostport(rest.lstrip("/")) for name, _, rest in
                  (item.partition(":") for item in env[key].split(","))}
    bound_key = key.replace("ADVERTISED_", "")
    bound = {name: hostport(rest.lstrip("/"))[1] for name, _, rest in
             (item.partition(":") for item in env[bound_key].split(","))}
    return advertised, bound


def test_compose_runs_two_workers_of_the_image_built_from_the_dockerfile():
    services = compose()["services"]
    found = workers(services)
    assert len(found) == 2, f"expected two workers, found {sorted(found)}"
    for name, service in found.items():
        assert service["image"] == WORKER_IMAGE, name
        build = service["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT, f"{name}: the build context must be the repository root"
        assert (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE.resolve()
        assert service.get("entrypoint") is None, f"{name}: keep the image's ENTRYPOINT"
        assert service.get("command") in (None, ["worker"], "worker"), name


def test_compose_worker_settings_validate_and_agree():
    services = compose()["services"]
    settings = {name: check_env(env_values(s.get("environment"), name), name) for name, s in workers(services).items()}
    for name, s in settings.items():
        assert not s.embedded_broker, f"{name}: the service needs PIPELINE_BROKER=kafka://…"
        assert s.store == "rocksdb://", name
        assert not s.embedded_clickhouse, f"{name}: PIPELINE_CLICKHOUSE_URL must point at the ClickHouse service"
    assert len({(s.app_id, s.broker, s.topic_prefix, s.partitions) for s in settings.values()}) == 1, \
        "the workers must be one consumer group on one broker"


def test_compose_workers_reach_kafka_on_its_advertised_listener_in_kraft_mode():
    services = compose()["services"]
    for name, service in workers(services).items():
        settings = settings_from_env(env_values(service["environment"], name))
        for server in settings.bootstrap_servers:
            host, port = hostport(server)
            assert host in services, f"{name}: broker host {host} is not a compose service"
            kafka = services[host]
            advertised, bound = kafka_listeners(kafka)
            matches = [listener for listener, address in advertised.items() if address == (host, port)]
            assert matches, f"{name}: {server} is none of Kafka's advertised listeners {advertised}"
            assert bound[matches[0]] == port, f"{name}: listener {matches[0]} is not bound on {port}"
            env = env_values(kafka["environment"], host)
            assert "controller" in env["KAFKA_PROCESS_ROLES"] and "broker" in env["KAFKA_PROCESS_ROLES"]
            assert not any("ZOOKEEPER" in key for key in env), "KRaft mode: no ZooKeeper"
            assert "healthcheck" in kafka
    assert not any("zookeeper" in str(s.get("image", "")) for s in services.values())


def test_compose_workers_reach_clickhouse_with_its_credentials_and_database():
    services = compose()["services"]
    for name, service in workers(services).items():
        settings = settings_from_env(env_values(service["environment"], name))
        url = urlsplit(settings.clickhouse_dsn)
        assert url.scheme == "http" and url.hostname in services, f"{name}: {url.hostname} is not a service"
        clickhouse = services[url.hostname]
        assert clickhouse["image"].startswith("clickhouse/clickhouse-server:")
        assert url.port == 8123, "clickhouse-connect speaks ClickHouse's HTTP interface (8123)"
        env = env_values(clickhouse.get("environment"), url.hostname)
        assert (url.username, url.password) == (env.get("CLICKHOUSE_USER"), env.get("CLICKHOUSE_PASSWORD"))
        assert url.path.strip("/") == settings.clickhouse_database == env.get("CLICKHOUSE_DB")
        assert "healthcheck" in clickhouse


def test_compose_workers_have_distinct_data_volumes_health_checks_and_dependencies():
    document = compose()
    services = document["services"]
    sources = []
    for name, service in workers(services).items():
        settings = settings_from_env(env_values(service["environment"], name))
        mounts = [v.split(":") for v in service.get("volumes", [])]
        data = [m[0] for m in mounts if len(m) > 1 and m[1] == str(settings.data_dir)]
        assert data, f"{name}: no volume at PIPELINE_DATA_DIR={settings.data_dir}"
        assert data[0] in (document.get("volumes") or {}), f"{name}: {data[0]} is not a named volume"
        sources += data
        for dependency in ("kafka", "clickhouse"):
            assert service["depends_on"][dependency]["condition"] == "service_healthy", name
        assert "healthcheck" in service, name
    assert len(sources) == len(set(sources)), f"workers share a RocksDB volume: {sources}"


def test_compose_worker_ports_and_health_checks_use_the_http_port():
    services = compose()["services"]
    for name, service in workers(services).items():
        port = settings_from_env(env_values(service["environment"], name)).http_port
        test = " ".join(service["healthcheck"]["test"])
        assert re.findall(r"127\.0\.0\.1:(\d+)/(?:health|ready)\b", test) == [str(port)], f"{name}: {test}"
        for mapping in service.get("ports", []):
            assert int(str(mapping).split(":")[-1].split("/")[0]) == port, f"{name}: publishes {mapping}"


def test_prometheus_scrapes_metrics_on_every_worker_http_port():
    services = compose()["services"]
    prometheus = next(s for s in services.values() if str(s.get("image", "")).startswith("prom/prometheus"))
    mounted = [v.split(":") for v in prometheus["volumes"]]
    config_mount = next(m for m in mounted if m[1] == "/etc/prometheus/prometheus.yml")
    assert (COMPOSE.parent / config_mount[0]).resolve() == PROMETHEUS.resolve()
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        targets |= {t for static in job.get("static_configs", []) for t in static["targets"]}
    expected = {f"{service.get('hostname', name)}:"
                f"{settings_from_env(env_values(service['environment'], name)).http_port}"
                for name, service in workers(services).items()}
    assert targets == expected


def test_the_schema_registry_is_optional_and_wired_to_kafka_and_the_workers():
    services = compose()["services"]
    name, registry = next((n, s) for n, s in services.items() if "schema-registry" in str(s.get("image", "")))
    assert registry.get("profiles"), "the Schema Registry must be optional (a compose profile)"
    env = env_values(registry["environment"], name)
    bootstrap = env["SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS"].split("://")[-1]
    host, port = hostport(bootstrap)
    assert (host, port) in kafka_listeners(services[host])[0].values()
    registry_port = hostport(env["SCHEMA_REGISTRY_LISTENERS"].split("://")[-1])[1]
    override = yaml.safe_load(COMPOSE_REGISTRY.read_text())["services"]
    assert set(override) == set(workers(services)), "the override must configure every worker"
    for worker_name, extra in override.items():
        merged = {**env_values(services[worker_name]["environment"], worker_name),
                  **env_values(extra.get("environment"), worker_name)}
        url = urlsplit(check_env(merged, worker_name).schema_registry_url or "")
        assert (url.hostname, url.port) == (name, registry_port), worker_name


# Kubernetes ------------------------------------------------------------------------------------------------

def k8s_documents() -> list[dict]:
    return [d for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"
            for d in yaml.safe_load_all(path.read_text()) if d is not None]


def k8s_one(kind: str) -> dict:
    found = [d for d in k8s_documents() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def k8s_worker_env() -> dict[str, str]:
    statefulset = k8s_one("StatefulSet")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(by_name[("ConfigMap", source["configMapRef"]["name"])]["data"])
        if "secretRef" in source:
            env.update(by_name[("Secret", source["secretRef"]["name"])]["stringData"])
    for item in container.get("env", []):
        assert "value" in item, f"env {item['name']}: take values from the ConfigMap or Secret"
        env[item["name"]] = item["value"]
    return env_values(env, "StatefulSet")


def resolve_port(port: int | str, container: dict) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    assert port in named, f"port {port!r} names no container port"
    return named[port]


def test_k8s_manifests_are_namespace_agnostic_and_listed_in_the_kustomization():
    for document in k8s_documents():
        assert {"apiVersion", "kind", "metadata"} <= set(document), document
        assert "namespace" not in document["metadata"], f"{document['kind']}: drop metadata.namespace"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    assert "namespace" not in kustomization


def test_k8s_secret_holds_exactly_the_secret_settings_as_placeholders():
    secret = k8s_one("Secret")
    assert "data" not in secret, "use stringData placeholders"
    assert set(secret["stringData"]) == SECRET_VARS
    for key, value in secret["stringData"].items():
        assert "CHANGE_ME" in value, f"{key}: a placeholder only, never a real value"


def test_k8s_configmap_holds_only_non_secret_settings_as_strings():
    data = k8s_one("ConfigMap")["data"]
    assert not set(data) & SECRET_VARS, "secrets belong in the Secret"
    assert set(data) <= set(FIELD_OF_VAR)
    for key, value in data.items():
        assert isinstance(value, str), f"ConfigMap values must be strings: {key}={value!r}"


def test_k8s_worker_settings_validate():
    settings = check_env(k8s_worker_env(), "StatefulSet env")
    assert not settings.embedded_broker and not settings.embedded_clickhouse
    assert settings.store == "rocksdb://"
    assert settings.clickhouse_database == DEFAULT_DATABASE, "deploy/clickhouse/cluster.sql creates this database"


def test_k8s_statefulset_runs_two_non_root_workers_with_persistent_state():
    statefulset = k8s_one("StatefulSet")
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    settings = settings_from_env(k8s_worker_env())
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert container["image"] == WORKER_IMAGE
    assert "command" not in container, "keep the image's ENTRYPOINT"
    assert container.get("args", ["worker"]) == ["worker"]
    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get(str(settings.data_dir)) in claims, "PIPELINE_DATA_DIR must be a persistent volume claim"
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_uid()
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] > 30, "longer than Kubernetes' default, to flush the sink"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind


def test_k8s_probes_ports_and_services_use_the_http_port():
    documents = k8s_documents()
    statefulset = k8s_one("StatefulSet")
    template = statefulset["spec"]["template"]
    container = template["spec"]["containers"][0]
    port = settings_from_env(k8s_worker_env()).http_port
    assert port in {p["containerPort"] for p in container["ports"]}
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert resolve_port(get["port"], container) == port, probe
    if "startupProbe" in container:
        assert resolve_port(container["startupProbe"]["httpGet"]["port"], container) == port
    annotations = template["metadata"].get("annotations", {})
    if "prometheus.io/port" in annotations:
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"
    services = [d for d in documents if d["kind"] == "Service"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert [s["metadata"]["name"] for s in headless] == [statefulset["spec"]["serviceName"]]
    assert len(services) == 2, "a headless Service and one for the HTTP API"
    for service in services:
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        for service_port in service["spec"]["ports"]:
            assert resolve_port(service_port.get("targetPort", service_port["port"]), container) == port


# ClickHouse cluster DDL -----------------------------------------------------------------------------------

def create_statements(statements: list[str]) -> dict[str, exp.Create]:
    """table name -> parsed CREATE TABLE."""
    out = {}
    for statement in statements:
        parsed = sqlglot.parse_one(statement, read="clickhouse")
        if isinstance(parsed, exp.Create) and parsed.args.get("kind") == "TABLE":
            table = parsed.find(exp.Table)
            assert table is not None
            out[table.name] = parsed
    return out


def migration_tables() -> dict[str, exp.Create]:
    return create_statements([s for _, _, statements in migrations("x") for s in statements])


def bookkeeping_tables() -> dict[str, exp.Create]:
    """Tables migrate() creates outside migrations() (schema_migrations), recorded with a fake client."""
    class Recorder:
        def __init__(self) -> None:
            self.commands: list[str] = []

        def command(self, sql: str) -> None:
            self.commands.append(sql)

        def query(self, sql: str) -> object:
            return type("Result", (), {"result_rows": []})()

        def insert(self, *args: object, **kwargs: object) -> None:
            pass

    recorder = Recorder()
    migrate(recorder, "x")
    tables = create_statements(recorder.commands)
    return {name: create for name, create in tables.items() if name not in migration_tables()}


def cluster_statements() -> list[exp.Expression]:
    parsed = sqlglot.parse(CLUSTER_SQL.read_text(), read="clickhouse", error_level=sqlglot.ErrorLevel.RAISE)
    return [e for e in parsed if e is not None]


def cluster_tables() -> dict[str, exp.Create]:
    out = {}
    for statement in cluster_statements():
        if isinstance(statement, exp.Create) and statement.args.get("kind") == "TABLE":
            table = statement.find(exp.Table)
            assert table is not None
            assert table.db == DEFAULT_DATABASE, f"{table.sql()}: the workers' database is {DEFAULT_DATABASE}"
            assert table.name not in out, f"{table.name} created twice"
            out[table.name] = statement
    return out


def engine(create: exp.Create) -> tuple[str, list[exp.Expression]]:
    prop = create.find(exp.EngineProperty)
    assert prop is not None, f"no ENGINE in {create.sql('clickhouse')[:80]}"
    call = prop.this
    if isinstance(call, exp.Anonymous):
        return call.name, list(call.expressions)
    return call.sql("clickhouse"), []


def on_cluster(create: exp.Create) -> str | None:
    prop = create.find(exp.OnCluster)
    return prop.this.name if prop is not None else None


def columns(create: exp.Create) -> list[str]:
    schema = create.this
    assert isinstance(schema, exp.Schema), "expected a column list"
    return [c.sql("clickhouse", identify=True) for c in schema.expressions]


def clause(create: exp.Create, kind: type[exp.Expression]) -> str | None:
    properties = create.args.get("properties")
    found = [p for p in properties.expressions if isinstance(p, kind)] if properties else []
    return found[0].sql("clickhouse", identify=True) if found else None


def test_cluster_ddl_parses_and_creates_the_database_on_the_cluster():
    statements = cluster_statements()
    assert statements
    databases = [s for s in statements if isinstance(s, exp.Create) and s.args.get("kind") in ("DATABASE", "SCHEMA")]
    assert [d.find(exp.Table).name for d in databases] == [DEFAULT_DATABASE]  # type: ignore[union-attr]
    assert on_cluster(databases[0]) == "{cluster}"


@pytest.mark.parametrize("name", sorted(migration_tables()))
def test_cluster_ddl_has_every_migration_table_replicated_and_distributed(name):
    original = migration_tables()[name]
    tables = cluster_tables()
    local_name = f"{name}_local"
    assert local_name in tables, f"no replicated {local_name} in {CLUSTER_SQL.name}"
    assert name in tables, f"no Distributed {name} in {CLUSTER_SQL.name}"
    local, distributed = tables[local_name], tables[name]

    assert on_cluster(local) == "{cluster}"
    assert columns(local) == columns(original), f"{local_name}: columns differ from the migration"
    base_engine, base_args = engine(original)
    assert base_engine == "ReplacingMergeTree", f"update this test for {base_engine}"
    local_engine, local_args = engine(local)
    assert local_engine == "ReplicatedReplacingMergeTree"
    path, replica = (a.name for a in local_args[:2])
    assert "{shard}" in path and "{replica}" in replica
    assert [a.sql("clickhouse") for a in local_args[2:]] == [a.sql("clickhouse") for a in base_args], \
        f"{local_name}: the version column differs from the migration"
    for kind in (exp.Order, exp.PartitionedByProperty):
        assert clause(local, kind) == clause(original, kind), f"{local_name}: {kind.__name__} differs"

    assert on_cluster(distributed) == "{cluster}"
    source = distributed.args.get("expression")
    assert isinstance(source, exp.Table) and (source.db, source.name) == (DEFAULT_DATABASE, local_name), \
        f"{name}: expected AS {DEFAULT_DATABASE}.{local_name}"
    dist_engine, dist_args = engine(distributed)
    assert dist_engine == "Distributed"
    assert [a.name for a in dist_args[:3]] == ["{cluster}", DEFAULT_DATABASE, local_name]
    assert len(dist_args) == 4, f"{name}: a sharding key keeps a customer's rows on one shard"


def test_cluster_ddl_creates_nothing_the_migrations_do_not_know():
    expected = set(migration_tables()) | {f"{n}_local" for n in migration_tables()} | set(bookkeeping_tables())
    assert set(cluster_tables()) == expected


def test_cluster_ddl_has_the_migration_bookkeeping_and_records_every_version():
    tables = cluster_tables()
    for name, original in bookkeeping_tables().items():
        assert name in tables, f"no {name} in {CLUSTER_SQL.name}"
        assert columns(tables[name]) == columns(original)
        assert on_cluster(tables[name]) == "{cluster}"
        assert engine(tables[name])[0].startswith("Replicated")
    recorded = set()
    for statement in cluster_statements():
        if isinstance(statement, exp.Insert) and statement.find(exp.Table).name == "schema_migrations":  # type: ignore[union-attr]
            values = statement.find(exp.Values)
            assert values is not None
            # sqlglot's ClickHouse dialect wraps each value of a row in a tuple: the version is the first literal
            recorded |= {int(next(row.find_all(exp.Literal)).name) for row in values.expressions}
    assert recorded == {version for version, _, _ in migrations("x")}, \
        "cluster.sql must record exactly the migrations whose tables it creates"


# deploy/clickhouse/cluster.sql is generated, never edited: the settings a cluster deployment would use.
CLUSTER_SQL_ENV = {"PIPELINE_CLICKHOUSE_URL": "http://clickhouse:8123", "PIPELINE_CLICKHOUSE_CLUSTER": "{cluster}"}
REGENERATE = ("PIPELINE_CLICKHOUSE_URL=http://clickhouse:8123 PIPELINE_CLICKHOUSE_CLUSTER='{cluster}' "
              "pipeline clickhouse migrate --print > deploy/clickhouse/cluster.sql")


def test_cluster_sql_is_what_migrate_print_generates():
    from typer.testing import CliRunner

    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **CLUSTER_SQL_ENV}, clear=True):
        result = CliRunner().invoke(cli_app, ["clickhouse", "migrate", "--print"])
    assert result.exit_code == 0, result.output
    assert result.stdout == CLUSTER_SQL.read_text(), f"{CLUSTER_SQL.name} is stale; regenerate it: {REGENERATE}"


def test_cluster_sql_names_the_cluster_by_the_macro_every_server_defines():
    settings = settings_from_env(CLUSTER_SQL_ENV)
    assert settings.clickhouse_cluster == "{cluster}"
    assert settings.clickhouse_database == DEFAULT_DATABASE
