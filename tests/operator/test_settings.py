from __future__ import annotations

import pytest
from sluicegate_operator.__main__ import parse_args


def test_flags_win_over_the_environment_which_wins_over_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLUICEGATE_STORE_TIMEOUT_S", "4")
    monkeypatch.setenv("SLUICEGATE_BROKER_RATE", "7")
    monkeypatch.setenv("KUBECONFIG", "/env/kubeconfig")
    settings = parse_args(["--store-timeout-s=2", "--extra-san", "a.example", "--extra-san", "10.0.0.1"])
    assert settings.store_timeout_s == 2.0
    assert settings.broker_rate == 7.0
    assert settings.broker_burst == 14.0
    assert settings.kubeconfig == "/env/kubeconfig"
    assert settings.extra_san == ("a.example", "10.0.0.1")
    assert settings.hosts[-2:] == ("a.example", "10.0.0.1")
    assert parse_args(["--reuse-port", "--listen=127.0.0.1:9443"]).reuse_port
    monkeypatch.setenv("SLUICEGATE_IDENTITY", "sg-sluicegate-abc12")
    assert parse_args([]).identity == "sg-sluicegate-abc12"
    assert parse_args(["--listen=127.0.0.1:9443"]).listen_port == 9443


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--listen=8443"], "--listen: String should match pattern"),
        (["--presign-ttl-s=0"], "--presign-ttl-s: Input should be greater than or equal to 1"),
        (["--public-url=http://x"], "--public-url: String should match pattern"),
        (["--leader-lease-s=8", "--leader-renew-s=5"], "--leader-renew-s: at most half of --leader-lease-s"),
    ],
)
def test_a_bad_setting_stops_the_operator_with_one_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert says in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err
