# The board seam for the MicroPython unix port in tests (copied into the device's directory as
# board.py): no Wi-Fi, a fake sensor, and the broker address read from a file the test rewrites
# when the broker restarts on a new port.
import sys


def connect_wifi(config, timeout_ms=0):
    return "127.0.0.1"


def device_id(config):
    return config["device_id"]


def broker_address(config):
    with open("broker.addr") as f:
        host, port = f.read().split()
    return host, int(port)


_count = [0]


def read_sensor():
    _count[0] += 1
    return 20 + (_count[0] % 50) / 10


def reboot():
    print("REBOOT")
    sys.exit(3)
