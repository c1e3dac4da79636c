// ESP32 (Arduino core) sensor device for edge-broker, over TLS with the gateway's CA.
//
// Libraries: WiFi and WiFiClientSecure (ESP32 Arduino core), "MQTT" by Joel Gaehwiler
// (arduino-mqtt, lwmqtt). PubSubClient is the usual choice, but it publishes at QoS 0 only and
// a reading must be acknowledged (QoS 1), so this sketch keeps PubSubClient's shape
// (begin / connect / loop / publish / callback) on arduino-mqtt, which publishes at QoS 1 and
// waits for the PUBACK. Not compiled in edge-broker's CI (no ESP32 toolchain there).
//
// edge-broker-manifest: client_id={id} username={id} clean_session=false keepalive=60 qos=1
// edge-broker-manifest: publish=devices/{id}/telemetry publish=devices/{id}/event
// edge-broker-manifest: will=devices/{id}/status retain=true birth=online will_payload=offline
// edge-broker-manifest: subscribe=devices/{id}/cmd

#include <MQTT.h>
#include <WiFi.h>
#include <WiFiClientSecure.h>

#include "config.h"  // WIFI_SSID, WIFI_PASSWORD, GATEWAY_HOST, GATEWAY_PORT, DEVICE_PASSWORD,
                     // GATEWAY_CA_PEM: copy config.example.h to config.h and fill it in

static const int BUFFER_SIZE = 200;      // readings kept while offline; oldest dropped
static const int ANSWERS = 4;            // command answers waiting to be published
static const uint32_t BACKOFF_MIN_MS = 1000, BACKOFF_MAX_MS = 60000;
// How long publish() at QoS 1 (and connect, subscribe) waits for the gateway's answer before
// arduino-mqtt gives up and closes the connection (its default: 1 s). edge-broker sends the
// PUBACK once the reading is committed to its store (an fsync), which can take longer on a slow
// SD card; 1 s would then mean a reconnect and the reading sent again, over and over.
static const int MQTT_TIMEOUT_MS = 10000;

WiFiClientSecure net;
MQTTClient mqtt(512);
char deviceId[24];
char topicTelemetry[64], topicStatus[64], topicEvent[64], topicCmd[64];

uint32_t intervalMs = 10000, nextReading = 0, nextAttempt = 0;
uint32_t attempt = 0, seq = 0, dropped = 0;
bool rebootRequested = false;
char ring[BUFFER_SIZE][96];
int ringHead = 0, ringLen = 0;
char answers[ANSWERS][96];  // published from loop(), not from the message callback
int answerHead = 0, answerLen = 0;

void ringPush(const char *reading) {
  if (ringLen == BUFFER_SIZE) {  // full: drop the oldest, count it
    ringHead = (ringHead + 1) % BUFFER_SIZE;
    ringLen--;
    dropped++;
  }
  strncpy(ring[(ringHead + ringLen) % BUFFER_SIZE], reading, sizeof ring[0] - 1);
  ringLen++;
}

// The callback runs inside mqtt.loop() - or inside the telemetry publish() while it waits for
// its PUBACK: a QoS 1 publish from here would nest in that wait (arduino-mqtt's README advises
// against it). So answers are queued here and published by loop().
void reply(const char *json) {
  if (answerLen == ANSWERS) return;  // not being published (offline): keep the older ones
  strlcpy(answers[(answerHead + answerLen) % ANSWERS], json, sizeof answers[0]);
  answerLen++;
}

// {"cmd":"interval","ms":N} | {"cmd":"reboot"}
void onCommand(String &topic, String &payload) {
  if (payload.indexOf("\"interval\"") >= 0) {
    int at = payload.indexOf("\"ms\"");
    String ms = at >= 0 ? payload.substring(payload.indexOf(':', at) + 1) : String();
    ms.trim();
    char answer[96];
    if (ms.length() && isDigit(ms[0])) {  // a number: 10 ms to a day
      long value = ms.toInt();
      intervalMs = value < 10 ? 10 : value > 86400000L ? 86400000L : value;
      snprintf(answer, sizeof answer, "{\"ack\":\"interval\",\"ms\":%lu}",
               (unsigned long)intervalMs);
    } else {  // no ms, or not a number: the interval stays
      snprintf(answer, sizeof answer,
               "{\"error\":\"interval: ms must be a number\",\"ms\":%lu}",
               (unsigned long)intervalMs);
    }
    reply(answer);
  } else if (payload.indexOf("\"reboot\"") >= 0) {
    // not from inside this callback: the command's PUBACK goes out when it returns, and a
    // restart before that would have the broker deliver "reboot" again after the boot
    rebootRequested = true;
    reply("{\"ack\":\"reboot\"}");
  } else {
    reply("{\"error\":\"unknown command\"}");
  }
}

void backoff() {
  // exponential backoff with equal jitter: half fixed, half random
  uint32_t delayMs = min(BACKOFF_MAX_MS, BACKOFF_MIN_MS << min(attempt, (uint32_t)16));
  delayMs = delayMs / 2 + random(delayMs / 2 + 1);
  attempt++;
  nextAttempt = millis() + delayMs;
}

void tryConnect() {
  if (WiFi.status() != WL_CONNECTED) {
    WiFi.reconnect();
    backoff();
    return;
  }
  mqtt.setWill(topicStatus, "offline", true, 1);  // retained, QoS 1
  mqtt.setCleanSession(false);                     // persistent session: cmd queued while away
  mqtt.setKeepAlive(60);
  if (!mqtt.connect(deviceId, deviceId, DEVICE_PASSWORD)) {
    Serial.printf("MQTT connect failed: error %d, return code %d\n", mqtt.lastError(),
                  mqtt.returnCode());
    backoff();
    return;
  }
  attempt = 0;
  mqtt.subscribe(topicCmd, 1);
  mqtt.publish(topicStatus, "online", true, 1);  // retained birth
}

void setup() {
  Serial.begin(115200);
  uint8_t mac[6];
  WiFi.macAddress(mac);
  snprintf(deviceId, sizeof deviceId, "dev-%02x%02x%02x%02x%02x%02x", mac[0], mac[1], mac[2],
           mac[3], mac[4], mac[5]);
  snprintf(topicTelemetry, sizeof topicTelemetry, "devices/%s/telemetry", deviceId);
  snprintf(topicStatus, sizeof topicStatus, "devices/%s/status", deviceId);
  snprintf(topicEvent, sizeof topicEvent, "devices/%s/event", deviceId);
  snprintf(topicCmd, sizeof topicCmd, "devices/%s/cmd", deviceId);
  WiFi.mode(WIFI_STA);
  WiFi.begin(WIFI_SSID, WIFI_PASSWORD);
  net.setCACert(GATEWAY_CA_PEM);  // TLS: only a certificate signed by the gateway's CA
  mqtt.begin(GATEWAY_HOST, GATEWAY_PORT, net);
  mqtt.setTimeout(MQTT_TIMEOUT_MS);
  mqtt.onMessage(onCommand);
  randomSeed(esp_random());
}

void loop() {
  uint32_t now = millis();
  if ((int32_t)(now - nextReading) >= 0) {
    nextReading = now + intervalMs;
    char reading[96];
    snprintf(reading, sizeof reading, "{\"seq\":%lu,\"value\":%.2f,\"dropped\":%lu}",
             (unsigned long)seq++, temperatureRead(), (unsigned long)dropped);
    ringPush(reading);
  }
  if (!mqtt.connected()) {
    if ((int32_t)(now - nextAttempt) >= 0) tryConnect();
    return;
  }
  mqtt.loop();
  // answers first (a failed publish closes the connection: they wait for the next one)
  while (answerLen && mqtt.publish(topicEvent, answers[answerHead], false, 1)) {
    answerHead = (answerHead + 1) % ANSWERS;
    answerLen--;
  }
  if (!mqtt.connected()) return;
  if (rebootRequested) {
    mqtt.publish(topicStatus, "offline", true, 1);  // a clean disconnect does not fire the will
    mqtt.disconnect();
    ESP.restart();
  }
  // publish() with QoS 1 returns once the PUBACK arrived: only then leaves the reading the ring
  if (ringLen && mqtt.publish(topicTelemetry, ring[ringHead], false, 1)) {
    ringHead = (ringHead + 1) % BUFFER_SIZE;
    ringLen--;
  }
  delay(10);
}
