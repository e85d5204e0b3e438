"""The embedded amqtt broker (``pip install lepton[broker]``)."""

from lepton.broker._embedded import (
    MAX_PACKET_SIZE,
    BrokerSettings,
    EmbeddedBroker,
    amqtt_config,
    free_port,
    generate_password,
)

__all__ = ["MAX_PACKET_SIZE", "BrokerSettings", "EmbeddedBroker", "amqtt_config", "free_port", "generate_password",
           "write_password_file"]


def write_password_file(path, users, *, append=False):  # noqa: ANN001 - lazy: pwdlib comes with amqtt
    """Write ``{user: password}`` as an argon2 password file for the embedded broker."""
    from lepton.broker._auth import write_password_file as _write

    _write(path, users, append=append)
