import os
import subprocess
import sys

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import Settings, load_settings


def test_defaults_are_the_embedded_stack(monkeypatch):
    for name in list(os.environ):
        if name.startswith("PIPELINE_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.embedded_broker and settings.embedded_clickhouse and settings.store == "rocksdb://"
    assert settings.clickhouse_dsn.startswith("chdb://") and settings.clickhouse_dsn.endswith("var/clickhouse")


@pytest.mark.parametrize(("variable", "value", "said"), [
    ("PIPELINE_PARTITIONS", "abc", "valid integer"),
    ("PIPELINE_BROKER", "localhost:9092", "kafka://host:port"),
    ("PIPELINE_STORE", "redis://", "rocksdb:// or memory://"),
    ("PIPELINE_CLOCK", "sundial", "'wall' or 'event'"),
])
def test_a_malformed_setting_names_its_variable(monkeypatch, variable, value, said):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert variable in str(caught.value) and said in str(caught.value)


def test_settings_file_and_its_errors(monkeypatch, tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text('partitions = 8\ntopic_prefix = "acme-"\n')
    monkeypatch.setenv("PIPELINE_CONFIG", str(config))
    settings = load_settings()
    assert settings.partitions == 8 and settings.topic("pos") == "acme-pos"
    monkeypatch.setenv("PIPELINE_PARTITIONS", "2")  # the environment wins over the file
    assert load_settings().partitions == 2
    config.write_text("partitions = [")
    with pytest.raises(ConfigError, match="PIPELINE_CONFIG"):
        load_settings()
    monkeypatch.setenv("PIPELINE_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="no settings file"):
        load_settings()


def test_secrets_never_print(monkeypatch):
    monkeypatch.setenv("PIPELINE_CLICKHOUSE_URL", "https://user:hunter2@ch.example:8443/db")
    monkeypatch.setenv("PIPELINE_API_TOKEN", "t0ken-value")
    settings = load_settings()
    assert "hunter2" not in repr(settings) and "t0ken-value" not in str(settings.model_dump())
    assert settings.clickhouse_dsn.endswith("/db")


def test_cli_says_a_sentence_not_a_traceback():
    run = subprocess.run([sys.executable, "-m", "pipeline", "cohort", "buyers"], capture_output=True, text=True,
                         env={"PIPELINE_PARTITIONS": "0", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert run.returncode == 1
    assert "PIPELINE_PARTITIONS" in run.stderr and "Traceback" not in run.stderr + run.stdout


def test_every_setting_is_documented():
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_broker_security_settings(monkeypatch):
    monkeypatch.setenv("PIPELINE_BROKER_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError, match="PIPELINE_BROKER_SASL_USERNAME"):
        load_settings()
    monkeypatch.setenv("PIPELINE_BROKER_SASL_USERNAME", "svc")
    monkeypatch.setenv("PIPELINE_BROKER_SASL_PASSWORD", "pw-secret")
    monkeypatch.setenv("PIPELINE_BROKER_SASL_MECHANISM", "SCRAM-SHA-512")
    settings = load_settings()
    options = settings.kafka_python_options()
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_password"] == "pw-secret" and options["ssl_context"] is not None
    credentials = settings.faust_credentials()
    assert credentials.username == "svc" and credentials.ssl_context is not None
    assert "pw-secret" not in repr(settings) and "pw-secret" not in str(settings.model_dump())
    monkeypatch.setenv("PIPELINE_BROKER_SECURITY_PROTOCOL", "PLAINTEXT")
    with pytest.raises(ConfigError, match="SASL credentials are set"):
        load_settings()
