/* ESP-IDF sensor device for edge-broker with esp-mqtt, over TLS with the gateway's CA.
 * Not compiled in edge-broker's CI (no ESP-IDF toolchain there): `idf.py build flash monitor`.
 *
 * edge-broker-manifest: client_id={id} username={id} clean_session=false keepalive=60 qos=1
 * edge-broker-manifest: publish=devices/{id}/telemetry publish=devices/{id}/event
 * edge-broker-manifest: will=devices/{id}/status retain=true birth=online will_payload=offline
 * edge-broker-manifest: subscribe=devices/{id}/cmd
 */
#include <stdio.h>
#include <stdlib.h>
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
#include "freertos/queue.h"
#include "freertos/task.h"
#include "mqtt_client.h"
#include "nvs_flash.h"

#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 60000
#define NOTE_RESEND_HEAD (-2) /* notes to the sensor task; a positive note is a PUBACKed msg id */
#define NOTE_WAKE (-3)

static const char *TAG = "edge-device";
extern const char gateway_ca_pem_start[] asm("_binary_gateway_ca_pem_start");

static char device_id[24], topic_telemetry[64], topic_status[64], topic_event[64], topic_cmd[64];
static esp_mqtt_client_handle_t client;
static esp_timer_handle_t reconnect_timer, wifi_timer;
static QueueHandle_t notes; /* from the MQTT event handler to the sensor task */
static volatile bool connected, reboot_requested, notes_lost;
static volatile uint32_t interval_ms = CONFIG_EDGE_READING_INTERVAL_MS;
static uint32_t attempt, wifi_attempt, seq, dropped;

/* The ring buffer of readings belongs to the sensor task alone: the MQTT event handler only
 * sends it notes (a PUBACK's msg id, "resend the head"). So no lock of ours is ever held while
 * calling esp-mqtt, whose task runs the handler with its own API lock held (a lock taken in
 * both places, in opposite orders, could deadlock). The head is in flight (msg id in_flight)
 * until its PUBACK. */
static char ring[CONFIG_EDGE_BUFFER_SIZE][96];
static int ring_head, ring_len, in_flight = -1;

static void ring_push(const char *reading) {
    if (ring_len == CONFIG_EDGE_BUFFER_SIZE) { /* full: drop the oldest, count it */
        ring_head = (ring_head + 1) % CONFIG_EDGE_BUFFER_SIZE;
        ring_len--;
        dropped++;
        in_flight = -1; /* the head changed: a late PUBACK must not pop the next one */
    }
    strlcpy(ring[(ring_head + ring_len) % CONFIG_EDGE_BUFFER_SIZE], reading, sizeof ring[0]);
    ring_len++;
}

static void send_head(void) { /* sensor task only */
    if (connected && ring_len && in_flight < 0) {
        int msg_id = esp_mqtt_client_publish(client, topic_telemetry, ring[ring_head], 0, 1, 0);
        in_flight = msg_id > 0 ? msg_id : -1; /* -1, -2 (outbox full): tried again later */
    }
}

/* From the MQTT event handler, never blocking it. A PUBACK that arrives before the sensor task
 * has set in_flight waits in the queue until it has: no race between the two. */
static void note(int32_t what) {
    if (xQueueSend(notes, &what, 0) != pdTRUE)
        notes_lost = true; /* queue full: the sensor task sends its head again (at-least-once)
                            * rather than wait for ever for a PUBACK note that was lost */
}

static uint32_t backoff_ms(uint32_t *attempts) {
    /* exponential backoff with equal jitter: half fixed, half random */
    uint32_t delay = BACKOFF_MIN_MS << (*attempts < 16 ? *attempts : 16);
    if (delay > BACKOFF_MAX_MS) delay = BACKOFF_MAX_MS;
    delay = delay / 2 + esp_random() % (delay / 2 + 1);
    ++*attempts;
    return delay;
}

static void schedule_reconnect(void) {
    esp_timer_stop(reconnect_timer); /* if already running (else ESP_ERR_INVALID_STATE) */
    esp_timer_start_once(reconnect_timer, (uint64_t)backoff_ms(&attempt) * 1000);
}

static void reconnect(void *arg) { esp_mqtt_client_reconnect(client); }

static void reply(const char *json) {
    esp_mqtt_client_publish(client, topic_event, json, 0, 1, 0);
}

/* {"cmd":"interval","ms":N} | {"cmd":"reboot"} */
static void on_command(const char *data, int len) {
    char text[128], answer[96];
    snprintf(text, sizeof text, "%.*s", len, data);
    const char *ms = strstr(text, "\"ms\"");
    if (ms && (ms = strchr(ms, ':')))
        ms += strspn(ms + 1, " \t") + 1;
    if (strstr(text, "\"interval\"")) {
        if (ms && *ms >= '0' && *ms <= '9') { /* a number; a day at most */
            long value = strtol(ms, NULL, 10);
            interval_ms = value < 10 ? 10 : value > 86400000 ? 86400000 : value;
            snprintf(answer, sizeof answer, "{\"ack\":\"interval\",\"ms\":%lu}",
                     (unsigned long)interval_ms);
        } else { /* no ms, or not a number: the interval stays */
            snprintf(answer, sizeof answer,
                     "{\"error\":\"interval: ms must be a number\",\"ms\":%lu}",
                     (unsigned long)interval_ms);
        }
        reply(answer);
    } else if (strstr(text, "\"reboot\"")) {
        /* not from this handler: the command's PUBACK must go out first, or the broker
         * delivers "reboot" again after the boot */
        reboot_requested = true;
        reply("{\"ack\":\"reboot\"}");
        note(NOTE_WAKE);
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
        note(NOTE_RESEND_HEAD); /* esp-mqtt resends its outbox; our head is sent again too */
        break;
    case MQTT_EVENT_DISCONNECTED:
        connected = false;
        schedule_reconnect();
        break;
    case MQTT_EVENT_PUBLISHED: /* PUBACK for a QoS 1 message: ours, or a status or answer */
        note(event->msg_id);
        break;
    case MQTT_EVENT_DATA:
        on_command(event->data, event->data_len);
        break;
    default:
        break;
    }
}

static void sensor_task(void *arg) {
    int64_t next_reading = esp_timer_get_time();
    for (;;) {
        if (reboot_requested) {
            esp_mqtt_client_publish(client, topic_status, "offline", 0, 1, 1);
            vTaskDelay(pdMS_TO_TICKS(1000)); /* the PUBACK and "offline" go out meanwhile */
            esp_restart();
        }
        if (esp_timer_get_time() >= next_reading) {
            next_reading = esp_timer_get_time() + (int64_t)interval_ms * 1000;
            char reading[96];
            float value = 20.0f + (esp_random() % 100) / 10.0f; /* replace with the real sensor */
            snprintf(reading, sizeof reading, "{\"seq\":%lu,\"value\":%.2f,\"dropped\":%lu}",
                     (unsigned long)seq++, value, (unsigned long)dropped);
            ring_push(reading);
        }
        if (notes_lost) {
            notes_lost = false;
            in_flight = -1;
        }
        send_head();
        /* until the next reading is due (at most 1 s, at least a tick: no busy loop), or a
         * note from the MQTT event handler */
        int64_t wait_ms = (next_reading - esp_timer_get_time()) / 1000;
        TickType_t ticks = pdMS_TO_TICKS(wait_ms < 0 ? 0 : wait_ms > 1000 ? 1000 : wait_ms) + 1;
        int32_t what;
        if (xQueueReceive(notes, &what, ticks) == pdTRUE) {
            if (what == NOTE_RESEND_HEAD) {
                in_flight = -1;
            } else if (what > 0 && what == in_flight && ring_len) { /* the head's PUBACK */
                ring_head = (ring_head + 1) % CONFIG_EDGE_BUFFER_SIZE;
                ring_len--;
                in_flight = -1;
            }
        }
    }
}

/* Wi-Fi: esp_wifi_connect() makes one attempt. Connect at start, and after every disconnection
 * (the access point rebooted, or none in range at power-up) again after a backoff - from a
 * timer, as waiting here would hold up the default event loop. esp-mqtt's attempts fail with
 * their own backoff until the network is back. */
static void wifi_connect(void *arg) {
    if (esp_wifi_connect() != ESP_OK) /* no attempt made, so no disconnection event: later */
        esp_timer_start_once(wifi_timer, (uint64_t)backoff_ms(&wifi_attempt) * 1000);
}

static void on_wifi(void *arg, esp_event_base_t base, int32_t id, void *data) {
    if (base == WIFI_EVENT && id == WIFI_EVENT_STA_START) {
        esp_wifi_connect();
    } else if (base == WIFI_EVENT && id == WIFI_EVENT_STA_DISCONNECTED) {
        uint32_t delay = backoff_ms(&wifi_attempt);
        ESP_LOGW(TAG, "Wi-Fi disconnected (reason %d), next attempt in %lu ms",
                 ((wifi_event_sta_disconnected_t *)data)->reason, (unsigned long)delay);
        esp_timer_stop(wifi_timer); /* if already running (else ESP_ERR_INVALID_STATE) */
        esp_timer_start_once(wifi_timer, (uint64_t)delay * 1000);
    } else if (base == IP_EVENT && id == IP_EVENT_STA_GOT_IP) {
        wifi_attempt = 0;
    }
}

static void wifi_start(void) {
    ESP_ERROR_CHECK(esp_netif_init());
    esp_netif_create_default_wifi_sta();
    wifi_init_config_t init = WIFI_INIT_CONFIG_DEFAULT();
    ESP_ERROR_CHECK(esp_wifi_init(&init));
    const esp_timer_create_args_t timer = {.callback = wifi_connect, .name = "wifi-connect"};
    ESP_ERROR_CHECK(esp_timer_create(&timer, &wifi_timer));
    ESP_ERROR_CHECK(esp_event_handler_instance_register(WIFI_EVENT, ESP_EVENT_ANY_ID, on_wifi,
                                                        NULL, NULL));
    ESP_ERROR_CHECK(esp_event_handler_instance_register(IP_EVENT, IP_EVENT_STA_GOT_IP, on_wifi,
                                                        NULL, NULL));
    wifi_config_t wifi = {0};
    strlcpy((char *)wifi.sta.ssid, CONFIG_EDGE_WIFI_SSID, sizeof wifi.sta.ssid);
    strlcpy((char *)wifi.sta.password, CONFIG_EDGE_WIFI_PASSWORD, sizeof wifi.sta.password);
    ESP_ERROR_CHECK(esp_wifi_set_mode(WIFI_MODE_STA));
    ESP_ERROR_CHECK(esp_wifi_set_config(WIFI_IF_STA, &wifi));
    ESP_ERROR_CHECK(esp_wifi_start()); /* WIFI_EVENT_STA_START: on_wifi connects */
}

void app_main(void) {
    ESP_ERROR_CHECK(nvs_flash_init());
    ESP_ERROR_CHECK(esp_event_loop_create_default());
    notes = xQueueCreate(32, sizeof(int32_t));
    wifi_start();
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
