/* ESP-IDF sensor device for edge-broker with esp-mqtt, over TLS with the gateway's CA.
 * Not compiled in edge-broker's CI (no ESP-IDF toolchain there): `idf.py build flash monitor`.
 *
 * edge-broker-manifest: client_id={id} username={id} clean_session=false keepalive=60 qos=1
 * edge-broker-manifest: publish=devices/{id}/telemetry publish=devices/{id}/event
 * edge-broker-manifest: will=devices/{id}/status retain=true birth=online will_payload=offline
 * edge-broker-manifest: subscribe=devices/{id}/cmd
 */
#include <stdio.h>
#include <string.h>

#include "esp_event.h"
#include "esp_log.h"
#include "esp_mac.h"
#include "esp_netif.h"
#include "esp_random.h"
#include "esp_system.h"
#include "esp_timer.h"
#include "esp_wifi.h"
#include "freertos/FreeRTOS.h"
#include "freertos/semphr.h"
#include "freertos/task.h"
#include "mqtt_client.h"
#include "nvs_flash.h"

#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000

static const char *TAG = "edge-device";
extern const char gateway_ca_pem_start[] asm("_binary_gateway_ca_pem_start");

static char device_id[24], topic_telemetry[64], topic_status[64], topic_event[64], topic_cmd[64];
static esp_mqtt_client_handle_t client;
static esp_timer_handle_t reconnect_timer;
static SemaphoreHandle_t lock;
static volatile bool connected, reboot_requested;
static volatile uint32_t interval_ms = CONFIG_EDGE_READING_INTERVAL_MS;
static uint32_t attempt, seq, dropped;

/* ring buffer of readings; the head is in flight (msg id in_flight) until its PUBACK */
static char ring[CONFIG_EDGE_BUFFER_SIZE][96];
static int ring_head, ring_len, in_flight = -1;

static void ring_push(const char *reading) {
    xSemaphoreTake(lock, portMAX_DELAY);
    if (ring_len == CONFIG_EDGE_BUFFER_SIZE) { /* full: drop the oldest, count it */
        ring_head = (ring_head + 1) % CONFIG_EDGE_BUFFER_SIZE;
        ring_len--;
        dropped++;
        in_flight = -1; /* the head changed: a late PUBACK must not pop the next one */
    }
    strlcpy(ring[(ring_head + ring_len) % CONFIG_EDGE_BUFFER_SIZE], reading, sizeof ring[0]);
    ring_len++;
    xSemaphoreGive(lock);
}

static void send_head(void) {
    xSemaphoreTake(lock, portMAX_DELAY);
    if (connected && ring_len && in_flight < 0)
        in_flight = esp_mqtt_client_publish(client, topic_telemetry, ring[ring_head], 0, 1, 0);
    xSemaphoreGive(lock);
}

static void schedule_reconnect(void) {
    /* exponential backoff with equal jitter: half fixed, half random */
    uint32_t delay = BACKOFF_MIN_MS << (attempt < 16 ? attempt : 16);
    if (delay > BACKOFF_MAX_MS) delay = BACKOFF_MAX_MS;
    delay = delay / 2 + esp_random() % (delay / 2 + 1);
    attempt++;
    esp_timer_start_once(reconnect_timer, (uint64_t)delay * 1000);
}

static void reconnect(void *arg) { esp_mqtt_client_reconnect(client); }

static void reply(const char *json) {
    esp_mqtt_client_publish(client, topic_event, json, 0, 1, 0);
}

/* {"cmd":"interval","ms":N} | {"cmd":"reboot"} */
static void on_command(const char *data, int len) {
    char text[128];
    snprintf(text, sizeof text, "%.*s", len, data);
    const char *ms = strstr(text, "\"ms\"");
    if (strstr(text, "\"interval\"") && ms && (ms = strchr(ms, ':'))) {
        int value = atoi(ms + 1);
        interval_ms = value < 10 ? 10 : value;
        char answer[64];
        snprintf(answer, sizeof answer, "{\"ack\":\"interval\",\"ms\":%lu}",
                 (unsigned long)interval_ms);
        reply(answer);
    } else if (strstr(text, "\"reboot\"")) {
        /* not from this handler: the command's PUBACK must go out first, or the broker
         * delivers "reboot" again after the boot */
        reboot_requested = true;
        reply("{\"ack\":\"reboot\"}");
    } else {
        reply("{\"error\":\"unknown command\"}");
    }
}

static void on_mqtt(void *arg, esp_event_base_t base, int32_t id, void *data) {
    esp_mqtt_event_handle_t event = data;
    switch ((esp_mqtt_event_id_t)id) {
    case MQTT_EVENT_CONNECTED:
        connected = true;
        attempt = 0;
        esp_mqtt_client_subscribe(client, topic_cmd, 1);
        esp_mqtt_client_publish(client, topic_status, "online", 0, 1, 1); /* retained birth */
        xSemaphoreTake(lock, portMAX_DELAY);
        in_flight = -1; /* esp-mqtt resends its outbox; our head is sent again (at-least-once) */
        xSemaphoreGive(lock);
        send_head();
        break;
    case MQTT_EVENT_DISCONNECTED:
        connected = false;
        schedule_reconnect();
        break;
    case MQTT_EVENT_PUBLISHED: /* PUBACK for a QoS 1 message */
        xSemaphoreTake(lock, portMAX_DELAY);
        if (event->msg_id == in_flight && ring_len) {
            ring_head = (ring_head + 1) % CONFIG_EDGE_BUFFER_SIZE;
            ring_len--;
            in_flight = -1;
        }
        xSemaphoreGive(lock);
        send_head();
        break;
    case MQTT_EVENT_DATA:
        on_command(event->data, event->data_len);
        break;
    default:
        break;
    }
}

static void sensor_task(void *arg) {
    for (;;) {
        if (reboot_requested) {
            esp_mqtt_client_publish(client, topic_status, "offline", 0, 1, 1);
            vTaskDelay(pdMS_TO_TICKS(1000)); /* the PUBACK and "offline" go out meanwhile */
            esp_restart();
        }
        char reading[96];
        float value = 20.0f + (esp_random() % 100) / 10.0f; /* replace with the real sensor */
        snprintf(reading, sizeof reading, "{\"seq\":%lu,\"value\":%.2f,\"dropped\":%lu}",
                 (unsigned long)seq++, value, (unsigned long)dropped);
        ring_push(reading);
        send_head();
        vTaskDelay(pdMS_TO_TICKS(interval_ms));
    }
}

static void wifi_start(void) {
    ESP_ERROR_CHECK(esp_netif_init());
    esp_netif_create_default_wifi_sta();
    wifi_init_config_t init = WIFI_INIT_CONFIG_DEFAULT();
    ESP_ERROR_CHECK(esp_wifi_init(&init));
    wifi_config_t wifi = {0};
    strlcpy((char *)wifi.sta.ssid, CONFIG_EDGE_WIFI_SSID, sizeof wifi.sta.ssid);
    strlcpy((char *)wifi.sta.password, CONFIG_EDGE_WIFI_PASSWORD, sizeof wifi.sta.password);
    ESP_ERROR_CHECK(esp_wifi_set_mode(WIFI_MODE_STA));
    ESP_ERROR_CHECK(esp_wifi_set_config(WIFI_IF_STA, &wifi));
    ESP_ERROR_CHECK(esp_wifi_start());
    ESP_ERROR_CHECK(esp_wifi_connect()); /* esp-mqtt retries until the network is up */
}

void app_main(void) {
    ESP_ERROR_CHECK(nvs_flash_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    wifi_start();
    lock = xSemaphoreCreateMutex();
    uint8_t mac[6];
    esp_read_mac(mac, ESP_MAC_WIFI_STA);
    snprintf(device_id, sizeof device_id, "dev-%02x%02x%02x%02x%02x%02x", mac[0], mac[1], mac[2],
             mac[3], mac[4], mac[5]);
    snprintf(topic_telemetry, sizeof topic_telemetry, "devices/%s/telemetry", device_id);
    snprintf(topic_status, sizeof topic_status, "devices/%s/status", device_id);
    snprintf(topic_event, sizeof topic_event, "devices/%s/event", device_id);
    snprintf(topic_cmd, sizeof topic_cmd, "devices/%s/cmd", device_id);

    const esp_mqtt_client_config_t config = {
        .broker.address.uri = CONFIG_EDGE_BROKER_URI,
        .broker.verification.certificate = gateway_ca_pem_start, /* TLS: the gateway's CA */
        .credentials.client_id = device_id,
        .credentials.username = device_id,
        .credentials.authentication.password = CONFIG_EDGE_DEVICE_PASSWORD,
        .session.protocol_ver = MQTT_PROTOCOL_V_3_1_1,
        .session.disable_clean_session = true, /* persistent session */
        .session.keepalive = 60,
        .session.last_will = {.topic = topic_status, .msg = "offline", .qos = 1, .retain = 1},
        .network.disable_auto_reconnect = true, /* our backoff with jitter instead */
    };
    const esp_timer_create_args_t timer = {.callback = reconnect, .name = "mqtt-reconnect"};
    ESP_ERROR_CHECK(esp_timer_create(&timer, &reconnect_timer));
    client = esp_mqtt_client_init(&config);
    esp_mqtt_client_register_event(client, ESP_EVENT_ANY_ID, on_mqtt, NULL);
    ESP_ERROR_CHECK(esp_mqtt_client_start(client));
    ESP_LOGI(TAG, "device %s, gateway %s", device_id, CONFIG_EDGE_BROKER_URI);
    xTaskCreate(sensor_task, "sensor", 4096, NULL, 5, NULL);
}
