"""The Celery app, configured from Settings: which broker, and the delivery guarantees the pipeline relies on.

Broker: SIEVE_BROKER_URL (redis://... or amqp://...), else Celery's SQLAlchemy transport on an SQLite file under
SIEVE_HOME, so the embedded default needs no server. Results are not stored (job progress lives in SQL).
"""

from __future__ import annotations

from celery import Celery

from sieve.settings import Settings

QUEUE = "sieve"
PRELOAD_ALIVE_TIMEOUT_S = 600.0  # seconds a prefork child may take to load its models


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    broker = settings.resolved_broker_url()
    if broker.startswith("sqla+sqlite:"):
        settings.home.mkdir(parents=True, exist_ok=True)
    app = Celery("sieve", broker=broker, include=["sieve.workers.tasks"])
    app.conf.update(
        task_default_queue=QUEUE,
        task_ignore_result=True,
        task_acks_late=True,  # a message is acknowledged after its task ran, not when it arrives
        task_reject_on_worker_lost=True,  # a task whose worker died is requeued (where the transport can)
        worker_prefetch_multiplier=1,  # hold one message at a time: the rest stay available to other workers
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,  # the CLI has set up logging (rich, SIEVE_LOG_LEVEL)
        worker_redirect_stdouts=False,  # redirected, our stderr handler would write into the logger itself
        worker_send_task_events=False,
    )
    if settings.worker_preload:
        # a prefork child loads its models before it says it is alive (tasks._on_child_start); within Celery's
        # default 4 s a slow load (a fresh home converts SmolLM2 first) would end the child and start another
        app.conf.worker_proc_alive_timeout = PRELOAD_ALIVE_TIMEOUT_S
    if broker.startswith("sqla+"):
        # The SQLAlchemy transport polls its table, by default once a second (a second added to every wake-up).
        # Its transport options all go to create_engine, so the interval is set on the transport class.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = 0.2
    return app
