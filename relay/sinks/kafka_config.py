"""A Kafka sink's settings (``[sinks.NAME] type = "kafka"``), apart from :mod:`.kafka`.

Every configuration is validated against all sink types; keeping this module free of
aiokafka means a relay without a Kafka sink never imports the client.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from relay.config_base import ByteSize, Duration
from relay.sinks.base import SinkConfig

TOPIC_PLACEHOLDER = re.compile(r"\{([a-z_.]+)\}")
TOPIC_FIELDS = {
    "source": "source",
    "provider": "provider",
    "kind": "kind",
    "channel_type": "channel_type",
    "channel.type": "channel_type",
    "type": "type",
}
TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


class KafkaSinkConfig(SinkConfig):
    type: Literal["kafka"]
    bootstrap_servers: str | list[str]
    topic: str = "im.events"
    client_id: str = "im-relay"
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    linger: Duration = 0.005
    max_batch_bytes: ByteSize = 1024 * 1024
    max_request_bytes: ByteSize = 8 * 1024 * 1024
    request_timeout: Duration = 30.0
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    batch_size: int = Field(default=2000, ge=1, le=100_000)
    # Topics the broker does not know: create them (with these settings; -1 = the broker's
    # defaults) instead of dead-lettering their records (templated) or pausing (fixed).
    create_topics: bool = False
    create_topic_partitions: int = Field(default=-1, ge=-1)
    create_topic_replication: int = Field(default=-1, ge=-1)
    # How long to wait for a broker that creates topics on first use to show a new one.
    topic_wait: Duration = Field(default=5.0, gt=0)
    # Transactions: every batch with the sink's cursor, read_committed consumers see each
    # event once. The transactional id and the cursor topic default to names derived from
    # client_id and the sink's name (see transactional_id_of / cursor_topic_of).
    exactly_once: bool = False
    transactional_id: str | None = Field(default=None, min_length=1, max_length=249)
    cursor_topic: str | None = Field(default=None, min_length=1, max_length=249)
    # An open transaction of a relay killed for good holds read_committed consumers back
    # until this; a restarted relay aborts it at once.
    transaction_timeout: Duration = Field(default=60.0, ge=1.0, le=900.0)

    @field_validator("topic")
    @classmethod
    def _topic(cls, topic: str) -> str:
        for name in TOPIC_PLACEHOLDER.findall(topic):
            if name not in TOPIC_FIELDS:
                raise ValueError(f"unknown placeholder {{{name}}} (known: "
                                 f"{', '.join(sorted(TOPIC_FIELDS))})")
        if TOPIC_UNSAFE.search(TOPIC_PLACEHOLDER.sub("x", topic)):
            raise ValueError("a topic may hold only letters, digits, '.', '_' and '-'")
        return topic

    @field_validator("compression")
    @classmethod
    def _codec(cls, codec: str) -> str:
        # Only a Kafka sink's configuration pays for importing aiokafka.
        from aiokafka.codec import has_lz4, has_snappy, has_zstd

        available = {"snappy": has_snappy, "lz4": has_lz4, "zstd": has_zstd}
        if codec in available and not available[codec]():
            raise ValueError(f"{codec} needs the cramjam package")
        return codec

    @model_validator(mode="after")
    def _sasl(self) -> KafkaSinkConfig:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism: required with a SASL security_protocol")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("sasl_username: SASL needs sasl_username and sasl_password")
        return self
