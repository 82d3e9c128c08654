"""Settings: defaults, environment and config file, and refusal of invalid values."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings, get_settings, load_settings_or_exit


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Run each test in an empty folder without any GATEKEEPER_* variable and with a fresh cache."""
    for name in list(os.environ):
        if name.startswith("GATEKEEPER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def exit_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Call load_settings_or_exit, expect exit code 2, and return the lines it wrote to stderr."""
    with pytest.raises(SystemExit) as excinfo:
        load_settings_or_exit()
    assert excinfo.value.code == 2
    return capsys.readouterr().err.splitlines()


def test_defaults_need_no_configuration(tmp_path: Path) -> None:
    settings = load_settings_or_exit()
    assert settings.ae_title == "GATEKEEPER"
    assert settings.port == 11112
    assert settings.quiet_period_s == 20
    assert settings.allowed_ae_titles == [] and settings.allowed_networks == []
    assert settings.database_url == f"sqlite:///{tmp_path / 'var' / 'gatekeeper.db'}"
    assert settings.broker_url == f"sqla+sqlite:///{tmp_path / 'var' / 'broker.db'}"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEKEEPER_PORT", "11113")
    monkeypatch.setenv("GATEKEEPER_AE_TITLE", "GK_TEST")
    monkeypatch.setenv("GATEKEEPER_ALLOWED_AE_TITLES", "CT1, CT_2")
    monkeypatch.setenv("GATEKEEPER_ALLOWED_NETWORKS", "10.1.0.0/16,fd00::/8")
    monkeypatch.setenv("GATEKEEPER_LOG_LEVEL", "debug")
    settings = load_settings_or_exit()
    assert settings.port == 11113
    assert settings.ae_title == "GK_TEST"
    assert settings.allowed_ae_titles == ["CT1", "CT_2"]
    assert settings.allowed_networks == [ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("fd00::/8")]
    assert settings.log_level == "DEBUG"


def test_off_target_routing_defaults_to_the_worklist_and_reads_withhold(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings_or_exit().off_target_routing == "worklist"
    get_settings.cache_clear()
    monkeypatch.setenv("GATEKEEPER_OFF_TARGET_ROUTING", " Withhold ")
    assert load_settings_or_exit().off_target_routing == "withhold"


def test_config_file_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "gatekeeper.toml"
    config.write_text('port = 4000\nae_title = "FROM_FILE"\nallowed_networks = ["192.168.0.0/24"]\n')
    monkeypatch.setenv("GATEKEEPER_CONFIG", str(config))
    monkeypatch.setenv("GATEKEEPER_PORT", "5000")
    settings = load_settings_or_exit()
    assert settings.port == 5000
    assert settings.ae_title == "FROM_FILE"
    assert settings.allowed_networks == [ipaddress.ip_network("192.168.0.0/24")]


def test_settings_are_cached() -> None:
    assert get_settings() is get_settings()


def test_database_url_follows_storage_dir(tmp_path: Path) -> None:
    settings = Settings(storage_dir=tmp_path / "store")
    assert settings.database_url == f"sqlite:///{tmp_path / 'store' / 'gatekeeper.db'}"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEKEEPER_PORT", "65536"),
        ("GATEKEEPER_PORT", "0"),
        ("GATEKEEPER_AE_TITLE", "A_TITLE_LONGER_THAN_16"),
        ("GATEKEEPER_AE_TITLE", "BACK\\SLASH"),
        ("GATEKEEPER_AE_TITLE", "    "),
        ("GATEKEEPER_ALLOWED_AE_TITLES", "CT1,BAD\\ONE"),
        ("GATEKEEPER_ALLOWED_NETWORKS", "10.0.0.300/8"),
        ("GATEKEEPER_ALLOWED_NETWORKS", "10.0.0.1/8"),
        ("GATEKEEPER_BIND_ADDRESS", "example.org"),
        ("GATEKEEPER_QUIET_PERIOD_S", "0"),
        ("GATEKEEPER_LOG_LEVEL", "LOUD"),
        ("GATEKEEPER_OFF_TARGET_ROUTING", "send"),
    ],
)
def test_invalid_value_exits_2_with_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    lines = exit_lines(capsys)
    assert len(lines) == 1
    assert lines[0].startswith(f"gatekeeper: invalid setting {variable}: ")


def test_invalid_port_message_states_the_limit(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GATEKEEPER_PORT", "70000")
    assert exit_lines(capsys) == [
        "gatekeeper: invalid setting GATEKEEPER_PORT: Input should be less than or equal to 65535"
    ]


def test_each_bad_field_gets_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GATEKEEPER_PORT", "x")
    monkeypatch.setenv("GATEKEEPER_ALLOWED_NETWORKS", "nonsense,10.0.0.0/33")
    lines = exit_lines(capsys)
    assert [line.split(":")[1] for line in lines] == [
        " invalid setting GATEKEEPER_PORT",
        " invalid setting GATEKEEPER_ALLOWED_NETWORKS",
    ]


def test_unknown_key_in_config_file_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "gatekeeper.toml"
    config.write_text("prot = 4000\n")
    monkeypatch.setenv("GATEKEEPER_CONFIG", str(config))
    assert exit_lines(capsys) == ["gatekeeper: unknown setting 'prot' in the GATEKEEPER_CONFIG file"]


def test_missing_config_file_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setenv("GATEKEEPER_CONFIG", str(tmp_path / "absent.toml"))
    [line] = exit_lines(capsys)
    assert line.startswith("gatekeeper: invalid setting GATEKEEPER_CONFIG: no such file")


def test_malformed_config_file_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "gatekeeper.toml"
    config.write_text("port = \n")
    monkeypatch.setenv("GATEKEEPER_CONFIG", str(config))
    [line] = exit_lines(capsys)
    assert line.startswith("gatekeeper: invalid setting GATEKEEPER_CONFIG:")
    assert "is not valid TOML" in line


@pytest.mark.parametrize(("level", "info_shown"), [("INFO", True), ("WARNING", False)])
def test_log_level_sets_what_a_command_logs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, level: str, info_shown: bool
) -> None:
    """GATEKEEPER_LOG_LEVEL reaches the root logger of every `gatekeeper` command (here: phantom's INFO line)."""
    import logging

    from service.commands.main import main

    monkeypatch.setenv("GATEKEEPER_LOG_LEVEL", level)
    root_level = logging.getLogger().level
    try:
        assert main(["phantom", "--out", str(tmp_path / "p"), "--series", "1", "--slices", "2", "--matrix", "64"]) == 0
    finally:
        logging.getLogger().setLevel(root_level)
    assert ("INFO service.phantom" in capsys.readouterr().err) is info_shown
