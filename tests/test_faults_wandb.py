"""W&B with credentials but no usable server (issue 9): `auto` falls back to offline with one warning line,
`online` fails at once with a FusionError; never a hang in `wandb.init` or a CommError traceback."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import run_fit, tiny_overrides

from fusion.config import WandbConfig
from fusion.errors import FusionError
from fusion.loggers import wandb_mode

BAD_KEY = "0123456789abcdef0123456789abcdef0bad0key"  # 40 characters, the shape of a real key


def closed_port() -> int:
    """A local port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fake_wandb_server():
    """Starts a local HTTP server answering every POST with (status, JSON body); yields a function giving its URL."""
    servers = []

    def start(status: int, body: dict) -> str:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def credentials(monkeypatch, base_url: str) -> None:
    monkeypatch.setenv("WANDB_API_KEY", BAD_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", base_url)


def test_auto_with_an_unreachable_server_logs_offline_with_one_warning(monkeypatch, capsys):
    credentials(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    assert wandb_mode(WandbConfig(mode="auto")) == "offline"
    assert wandb_mode(WandbConfig(mode="auto")) == "offline"  # asked twice (plan, loggers): warned once
    assert time.monotonic() - start < 10
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "wandb sync" in warnings[0]


def test_online_with_an_unreachable_server_is_a_fusion_error(monkeypatch):
    credentials(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(FusionError, match="wandb.mode") as raised:
        wandb_mode(WandbConfig(mode="online"))
    assert time.monotonic() - start < 10
    assert "\n" not in str(raised.value) and "WANDB_API_KEY" in str(raised.value)


def test_auto_with_a_refused_key_logs_offline(monkeypatch, capsys, fake_wandb_server):
    credentials(monkeypatch, fake_wandb_server(401, {"errors": [{"message": "user is not logged in"}]}))
    assert wandb_mode(WandbConfig(mode="auto")) == "offline"
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "key refused" in warnings[0]


def test_auto_with_a_null_viewer_logs_offline(monkeypatch, capsys, fake_wandb_server):
    credentials(monkeypatch, fake_wandb_server(200, {"data": {"viewer": None}}))
    assert wandb_mode(WandbConfig(mode="auto")) == "offline"
    assert "key refused" in capsys.readouterr().err


def test_online_with_a_refused_key_is_a_fusion_error(monkeypatch, fake_wandb_server):
    credentials(monkeypatch, fake_wandb_server(403, {}))
    with pytest.raises(FusionError, match="wandb.mode=online.*key refused"):
        wandb_mode(WandbConfig(mode="online"))


def test_auto_with_a_server_that_accepts_the_key_is_online(monkeypatch, capsys, fake_wandb_server):
    credentials(monkeypatch, fake_wandb_server(200, {"data": {"viewer": {"id": "x"}}}))
    assert wandb_mode(WandbConfig(mode="auto")) == "online"
    assert wandb_mode(WandbConfig(mode="online")) == "online"
    assert capsys.readouterr().err == ""


def test_offline_and_disabled_do_not_probe(monkeypatch, capsys):
    credentials(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    assert wandb_mode(WandbConfig(mode="offline")) == "offline"
    assert wandb_mode(WandbConfig(mode="disabled")) == "disabled"
    assert capsys.readouterr().err == ""


def test_run_with_credentials_and_no_server_finishes_offline(monkeypatch, tmp_path, zoo_dir, cache_dir):
    credentials(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    out = tmp_path / "run"
    overrides = tiny_overrides(out, zoo_dir, cache_dir, **{"wandb.mode": "auto", "trainer.max_steps": 10,
                                                           "trainer.val_every_n_steps": 10})
    start = time.monotonic()
    result = run_fit("--recipe", "clm.yaml", *overrides, timeout=120)
    elapsed = time.monotonic() - start
    print(f"end-to-end wall time {elapsed:.1f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "CommError" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "wandb.mode=auto logs offline" in line]
    assert len(warnings) == 1 and "unreachable" in warnings[0], result.stderr[-3000:]
    assert list((out / "wandb").glob("offline-run-*")), sorted(p.name for p in (out / "wandb").iterdir())
    assert elapsed < 60
