"""The console script: config errors, local infrastructure commands."""

import json
import re
import tempfile

from commands.cli import main
from tools.stack import free_port


def test_bad_config_fails_at_start_with_the_variable_named(monkeypatch, capsys):
    monkeypatch.setenv("NEWSREC_WINDOW_MAX_SIGNALS", "0")
    assert main(["topics"]) == 2
    err = capsys.readouterr().err
    assert "NEWSREC_WINDOW_MAX_SIGNALS" in err and "greater than or equal to 1" in err


def test_worker_without_model_says_how_to_get_one(monkeypatch, tmp_path, kafka_bootstrap, unique_name, capsys):
    monkeypatch.setenv("NEWSREC_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("NEWSREC_APP_ID", unique_name)
    monkeypatch.setenv("NEWSREC_MODEL_DIR", str(tmp_path / "nothing"))
    assert main(["worker"]) == 3
    err = capsys.readouterr().err
    assert f"no model at {tmp_path / 'nothing'}: run `newsrec models bootstrap" in err and "Traceback" not in err


def test_infra_up_status_down(monkeypatch, tmp_path, capsys):
    port = free_port()
    monkeypatch.setenv("NEWSREC_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("NEWSREC_KAFKA_BOOTSTRAP", f"127.0.0.1:{port}")
    try:
        assert main(["infra", "up"]) == 0
        assert f"export NEWSREC_KAFKA_BOOTSTRAP=127.0.0.1:{port}" in capsys.readouterr().out
        assert main(["infra", "status"]) == 0
        assert capsys.readouterr().out.splitlines()[0].split()[:3] == ["broker", "running", f"127.0.0.1:{port}"]
        assert main(["infra", "status", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["broker"]["running"] is True and status["broker"]["url"] == f"127.0.0.1:{port}"
    finally:
        assert main(["infra", "down"]) == 0
    capsys.readouterr()
    main(["infra", "status", "--json"])
    assert not any(service["running"] for service in json.loads(capsys.readouterr().out).values())


def test_demo_runs_end_to_end_on_embedded_defaults(tiny_model_dir, monkeypatch, tmp_path, capsys):
    """The README's main job, with the tiny model standing in for the bootstrap one."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.setenv("NEWSREC_STATE_DIR", str(tmp_path / "state"))
    assert main(["demo", "--users", "2", "--model-dir", str(tiny_model_dir), "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    logs = tmp_path / "state" / "demo"
    assert f"logs: {logs}/worker.log, {logs}/broker.log" in out and (logs / "worker.log").is_file()
    assert "published 240 demo news articles" in out
    assert "all 2 users have recommendations covering their latest signal" in out
    # Each block names the signal that triggered it; nothing is left in the temp dir.
    assert re.search(r"^== demo-\S+  after \[(search|browse|app|news_click)\] ", out, re.MULTILINE)
    assert list(temp.iterdir()) == []
