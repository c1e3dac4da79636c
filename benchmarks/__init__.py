"""edge-broker benchmarks: raw-socket load generator and a runner comparing edge-broker with
mosquitto and amqtt. Run `python -m benchmarks --help`."""
