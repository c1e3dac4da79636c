"""Bridges: the gateway's log forwarded to NATS JetStream, Kafka and upstream MQTT brokers.

A bridge is a cursor over the log (issue 8): a `Sink` takes windows of log entries and says
how many were acknowledged; a `DownlinkSource` yields remote messages to publish locally.
Nothing here imports nats-py or aiokafka: `jetstream.py` and `kafka.py` do, and they are
imported only for a bridge of that kind (see `config.require_extras`). docs/bridges.md.
"""
