# ruff: noqa: UP031  (MicroPython: no contextlib; %-formatting is the idiom there)
# Board seam: everything that differs between an ESP32 / Pico W and the unix port used in tests.
# The tests put their own board.py first on sys.path; firmware keeps this one.

import time


def connect_wifi(config, timeout_ms=20000):
    """Join the Wi-Fi network named in config.json; return when an address is assigned."""
    import network

    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(config["wifi_ssid"], config["wifi_password"])
        start = time.ticks_ms()
        while not wlan.isconnected():
            if time.ticks_diff(time.ticks_ms(), start) > timeout_ms:
                raise OSError("Wi-Fi: no connection to %s" % config["wifi_ssid"])
            time.sleep_ms(100)
    return wlan.ifconfig()[0]


def device_id(config):
    """The client id, username and topic segment: configured, or derived from the MAC."""
    if config.get("device_id"):
        return config["device_id"]
    import binascii

    import machine

    return "dev-" + binascii.hexlify(machine.unique_id()).decode()


def broker_address(config):
    """(host, port) of the gateway; looked up before each connection attempt."""
    return config["host"], config["port"]


def read_sensor():
    """One reading. Replace with the real sensor (here: the ESP32/RP2040 internal temperature)."""
    try:
        import esp32

        return round((esp32.raw_temperature() - 32) / 1.8, 2)
    except ImportError:
        import machine

        adc = machine.ADC(4)  # RP2040 temperature sensor
        volts = adc.read_u16() * 3.3 / 65535
        return round(27 - (volts - 0.706) / 0.001721, 2)


def reboot():
    import machine

    machine.reset()
