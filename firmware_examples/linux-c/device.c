/* A Linux sensor device for edge-broker, with Paho C (the synchronous MQTTClient API).
 *
 * Readings go to devices/<id>/telemetry at QoS 1 over a persistent session (MQTT 5 with a
 * Session Expiry Interval, or MQTT 3.1.1 with clean session 0: --mqtt 5|311), a retained
 * "online" birth with an "offline" will on devices/<id>/status, commands from devices/<id>/cmd
 * answered on devices/<id>/event, reconnect with exponential backoff and jitter, and a bounded
 * ring buffer of readings while the broker is away (oldest dropped and counted). A reading
 * leaves the buffer only once its PUBACK arrived: at-least-once, a reading sent again after a
 * lost connection is logged as RESEND.
 *
 * edge-broker-manifest: client_id={id} username={id} clean_session=false keepalive=60 qos=1
 * edge-broker-manifest: publish=devices/{id}/telemetry publish=devices/{id}/event
 * edge-broker-manifest: will=devices/{id}/status retain=true birth=online will_payload=offline
 * edge-broker-manifest: subscribe=devices/{id}/cmd
 */
#include <MQTTClient.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TELEMETRY "devices/%s/telemetry"
#define EVENT "devices/%s/event"
#define STATUS "devices/%s/status"
#define CMD "devices/%s/cmd"
#define EXIT_REBOOT 3 /* the service manager restarts us: Restart=on-failure */
#define MIN_INTERVAL_MS 10
#define MAX_INTERVAL_MS 86400000 /* a day */
#define ANSWERS 8                /* command answers waiting to be published */

struct config {
    const char *host, *id, *password, *cafile;
    int port, mqtt5, interval_ms, buffer_size, max_readings, keepalive;
    int backoff_min_ms, backoff_max_ms;
    long session_expiry_s;
};

/* the ring buffer: readings not yet acknowledged */
static char **ring;
static int *ring_sent; /* published at least once (a second send is a RESEND) */
static int ring_head, ring_len, ring_cap;
static long dropped;

static void ring_push(char *reading) {
    if (ring_len == ring_cap) { /* full: drop the oldest, count it */
        free(ring[ring_head]);
        ring_head = (ring_head + 1) % ring_cap;
        ring_len--;
        dropped++;
    }
    int at = (ring_head + ring_len) % ring_cap;
    ring[at] = reading;
    ring_sent[at] = 0;
    ring_len++;
}

static void ring_pop(void) {
    free(ring[ring_head]);
    ring_head = (ring_head + 1) % ring_cap;
    ring_len--;
}

/* state shared with Paho's callback thread */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile int connected;
static int interval_ms, stopping, rebooting;
static char answers[ANSWERS][128]; /* FIFO: the callback appends, the main loop publishes */
static int answer_head, answer_len;
static volatile sig_atomic_t signalled;

static long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void on_connection_lost(void *ctx, char *cause) {
    (void)ctx;
    (void)cause;
    connected = 0;
}

/* The text after `"key"` and its colon in a flat JSON object (enough for our commands), or NULL */
static const char *json_value(const char *text, const char *key) {
    char quoted[40];
    snprintf(quoted, sizeof quoted, "\"%s\"", key);
    const char *p = strstr(text, quoted);
    if (!p)
        return NULL;
    p += strlen(quoted);
    while (*p == ' ' || *p == '\t' || *p == ':')
        p++;
    return p;
}

static int json_is(const char *value, const char *word) {
    size_t n = strlen(word);
    return value && *value == '"' && !strncmp(value + 1, word, n) && value[n + 1] == '"';
}

/* 1 and the number in *out if `value` is a JSON number (not a string, true, null...) */
static int json_number(const char *value, double *out) {
    char *end;
    if (!value || !(*value == '-' || (*value >= '0' && *value <= '9')))
        return 0;
    *out = strtod(value, &end);
    while (*end == ' ' || *end == '\t' || *end == '\r' || *end == '\n')
        end++;
    return end != value && (*end == ',' || *end == '}');
}

/* queue a command's answer; called with `lock` held */
static void answer(const char *json) {
    if (answer_len == ANSWERS) { /* the broker is not taking them: keep the older ones */
        printf("ANSWER DROPPED %s\n", json);
        return;
    }
    snprintf(answers[(answer_head + answer_len) % ANSWERS], sizeof answers[0], "%s", json);
    answer_len++;
}

/* commands: {"cmd":"interval","ms":N} | {"cmd":"stop"} | {"cmd":"reboot"} */
static int on_message(void *ctx, char *topic, int topic_len, MQTTClient_message *m) {
    (void)ctx;
    (void)topic_len;
    char text[256];
    int n = m->payloadlen < (int)sizeof text - 1 ? m->payloadlen : (int)sizeof text - 1;
    memcpy(text, m->payload, n);
    text[n] = 0;
    char reply[128];
    double ms;
    pthread_mutex_lock(&lock);
    const char *cmd = json_value(text, "cmd");
    if (json_is(cmd, "interval") && json_number(json_value(text, "ms"), &ms)) {
        interval_ms = ms < MIN_INTERVAL_MS   ? MIN_INTERVAL_MS
                      : ms > MAX_INTERVAL_MS ? MAX_INTERVAL_MS
                                             : (int)ms;
        snprintf(reply, sizeof reply, "{\"ack\":\"interval\",\"ms\":%d}", interval_ms);
    } else if (json_is(cmd, "interval")) { /* no ms, or not a number: the interval stays */
        snprintf(reply, sizeof reply,
                 "{\"error\":\"interval: ms must be a number\",\"ms\":%d}", interval_ms);
    } else if (json_is(cmd, "stop")) {
        stopping = 1;
        snprintf(reply, sizeof reply, "{\"ack\":\"stop\"}");
    } else if (json_is(cmd, "reboot")) {
        stopping = rebooting = 1;
        snprintf(reply, sizeof reply, "{\"ack\":\"reboot\"}");
    } else {
        snprintf(reply, sizeof reply, "{\"error\":\"unknown command\"}");
    }
    answer(reply);
    pthread_mutex_unlock(&lock);
    printf("CMD %s\n", text);
    MQTTClient_freeMessage(&m);
    MQTTClient_free(topic);
    return 1;
}

static void on_signal(int sig) {
    (void)sig;
    signalled = 1;
}

/* publish at QoS 1 and wait for the PUBACK; MQTTCLIENT_SUCCESS once acknowledged */
static int publish(MQTTClient client, const struct config *c, const char *topic,
                   const char *payload, int retained) {
    MQTTClient_message msg = MQTTClient_message_initializer;
    MQTTClient_deliveryToken token;
    msg.payload = (void *)payload;
    msg.payloadlen = (int)strlen(payload);
    msg.qos = 1;
    msg.retained = retained;
    int rc;
    if (c->mqtt5) {
        MQTTResponse r = MQTTClient_publishMessage5(client, topic, &msg, &token);
        rc = r.reasonCode >= MQTTREASONCODE_UNSPECIFIED_ERROR ? -1 : MQTTCLIENT_SUCCESS;
        MQTTResponse_free(r);
    } else {
        rc = MQTTClient_publishMessage(client, topic, &msg, &token);
    }
    if (rc == MQTTCLIENT_SUCCESS)
        rc = MQTTClient_waitForCompletion(client, token, 10000L);
    return rc;
}

static int try_connect(MQTTClient client, const struct config *c, const char *status) {
    MQTTClient_connectOptions opts = MQTTClient_connectOptions_initializer;
    MQTTClient_connectOptions opts5 = MQTTClient_connectOptions_initializer5;
    MQTTClient_willOptions will = MQTTClient_willOptions_initializer;
    MQTTClient_SSLOptions ssl = MQTTClient_SSLOptions_initializer;
    char cmd_topic[160];
    int rc;
    if (c->mqtt5) {
        opts = opts5;
        opts.cleanstart = 0; /* resume the session [MQTT-3.1.2-5] (5.0) */
    } else {
        opts.MQTTVersion = MQTTVERSION_3_1_1;
        opts.cleansession = 0; /* persistent session [MQTT-3.1.2-4] (3.1.1) */
    }
    opts.keepAliveInterval = c->keepalive;
    opts.username = c->id;
    opts.password = c->password;
    will.topicName = status;
    will.message = "offline";
    will.retained = 1;
    will.qos = 1;
    opts.will = &will;
    if (c->cafile) {
        ssl.trustStore = c->cafile;
        ssl.enableServerCertAuth = 1;
        ssl.verify = 1; /* check the host name too */
        opts.ssl = &ssl;
    }
    if (c->mqtt5) {
        MQTTProperties props = MQTTProperties_initializer;
        MQTTProperty expiry = {.identifier = MQTTPROPERTY_CODE_SESSION_EXPIRY_INTERVAL};
        expiry.value.integer4 = (unsigned int)c->session_expiry_s;
        MQTTProperties_add(&props, &expiry);
        MQTTResponse r = MQTTClient_connect5(client, &opts, &props, NULL);
        rc = r.reasonCode == MQTTREASONCODE_SUCCESS ? MQTTCLIENT_SUCCESS : (int)r.reasonCode;
        MQTTResponse_free(r);
        MQTTProperties_free(&props);
    } else {
        rc = MQTTClient_connect(client, &opts);
    }
    if (rc != MQTTCLIENT_SUCCESS)
        return rc;
    snprintf(cmd_topic, sizeof cmd_topic, CMD, c->id);
    if (c->mqtt5) {
        MQTTResponse r = MQTTClient_subscribe5(client, cmd_topic, 1, NULL, NULL);
        rc = r.reasonCode == 1 ? MQTTCLIENT_SUCCESS : -1; /* granted QoS 1 */
        MQTTResponse_free(r);
    } else {
        rc = MQTTClient_subscribe(client, cmd_topic, 1);
    }
    if (rc == MQTTCLIENT_SUCCESS)
        rc = publish(client, c, status, "online", 1);
    return rc;
}

static void usage(void) {
    fprintf(stderr, "usage: edge-device --id ID [--host H] [--port P] [--mqtt 5|311] "
                    "[--cafile CA.pem] [--password PW] [--interval-ms N] [--buffer N] "
                    "[--max-readings N] [--session-expiry S] [--backoff-min-ms N] "
                    "[--backoff-max-ms N]\n");
    exit(2);
}

int main(int argc, char **argv) {
    struct config c = {.host = "127.0.0.1", .port = 1883, .mqtt5 = 1, .interval_ms = 10000,
                       .buffer_size = 1000, .keepalive = 60, .backoff_min_ms = 1000,
                       .backoff_max_ms = 60000, .session_expiry_s = 86400};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v) usage();
        i++;
        if (!strcmp(a, "--id")) c.id = v;
        else if (!strcmp(a, "--host")) c.host = v;
        else if (!strcmp(a, "--port")) c.port = atoi(v);
        else if (!strcmp(a, "--mqtt")) c.mqtt5 = !strcmp(v, "5");
        else if (!strcmp(a, "--cafile")) c.cafile = v;
        else if (!strcmp(a, "--password")) c.password = v;
        else if (!strcmp(a, "--interval-ms")) c.interval_ms = atoi(v);
        else if (!strcmp(a, "--buffer")) c.buffer_size = atoi(v);
        else if (!strcmp(a, "--max-readings")) c.max_readings = atoi(v);
        else if (!strcmp(a, "--session-expiry")) c.session_expiry_s = atol(v);
        else if (!strcmp(a, "--backoff-min-ms")) c.backoff_min_ms = atoi(v);
        else if (!strcmp(a, "--backoff-max-ms")) c.backoff_max_ms = atoi(v);
        else usage();
    }
    if (!c.id || c.buffer_size < 1) usage();
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    srand((unsigned)(time(NULL) ^ now_ms()));
    ring_cap = c.buffer_size;
    ring = calloc(ring_cap, sizeof *ring);
    ring_sent = calloc(ring_cap, sizeof *ring_sent);
    interval_ms = c.interval_ms;

    char uri[300], status[160], telemetry[160], event[160];
    snprintf(uri, sizeof uri, "%s://%s:%d", c.cafile ? "ssl" : "tcp", c.host, c.port);
    snprintf(status, sizeof status, STATUS, c.id);
    snprintf(telemetry, sizeof telemetry, TELEMETRY, c.id);
    snprintf(event, sizeof event, EVENT, c.id);

    MQTTClient client;
    MQTTClient_createOptions create = MQTTClient_createOptions_initializer;
    create.MQTTVersion = c.mqtt5 ? MQTTVERSION_5 : MQTTVERSION_3_1_1;
    if (MQTTClient_createWithOptions(&client, uri, c.id, MQTTCLIENT_PERSISTENCE_NONE, NULL,
                                     &create) != MQTTCLIENT_SUCCESS) {
        fprintf(stderr, "cannot create the MQTT client for %s\n", uri);
        return 1;
    }
    MQTTClient_setCallbacks(client, NULL, on_connection_lost, on_message, NULL);

    long seq = 0, acked = 0, resent = 0, next_reading = now_ms(), next_attempt = 0;
    int attempt = 0;
    for (;;) {
        pthread_mutex_lock(&lock);
        int stop_now = stopping || signalled, period = interval_ms;
        char next_answer[sizeof answers[0]] = "";
        if (answer_len) /* the oldest; it leaves the queue once the broker acknowledged it */
            snprintf(next_answer, sizeof next_answer, "%s", answers[answer_head]);
        pthread_mutex_unlock(&lock);
        if (signalled) /* SIGTERM/SIGINT: stop now; unacknowledged readings are lost */
            break;
        int producing = !stop_now && !(c.max_readings && seq >= c.max_readings);
        if (!producing && ring_len == 0 && !next_answer[0]) /* "stop" is answered too */
            break;
        long now = now_ms();
        if (producing && now >= next_reading) {
            char *reading = malloc(128);
            snprintf(reading, 128, "{\"seq\":%ld,\"value\":%.1f,\"dropped\":%ld}", seq,
                     20.0 + (seq % 50) / 10.0, dropped);
            printf("READING %s\n", reading);
            ring_push(reading);
            seq++;
            next_reading = now + period;
        }
        if (!connected) {
            if (now < next_attempt) {
                long wait = next_attempt - now;
                sleep_ms(wait < 20 ? wait : 20);
                continue;
            }
            int rc = try_connect(client, &c, status);
            if (rc == MQTTCLIENT_SUCCESS) {
                connected = 1;
                attempt = 0;
                printf("CONNECTED\n");
            } else {
                /* exponential backoff with equal jitter: half fixed, half random */
                long delay = (long)c.backoff_min_ms << (attempt < 16 ? attempt : 16);
                if (delay > c.backoff_max_ms) delay = c.backoff_max_ms;
                delay = delay / 2 + rand() % (delay / 2 + 1);
                attempt++;
                next_attempt = now + delay;
                printf("OFFLINE buffered=%d dropped=%ld retry_ms=%ld rc=%d\n", ring_len,
                       dropped, delay, rc);
            }
            continue;
        }
        if (next_answer[0]) {
            if (publish(client, &c, event, next_answer, 0) == MQTTCLIENT_SUCCESS) {
                pthread_mutex_lock(&lock);
                answer_head = (answer_head + 1) % ANSWERS;
                answer_len--;
                pthread_mutex_unlock(&lock);
            } else if (!MQTTClient_isConnected(client)) {
                connected = 0;
                continue;
            }
        }
        if (ring_len) {
            if (ring_sent[ring_head]) {
                printf("RESEND %s\n", ring[ring_head]);
                resent++;
            }
            ring_sent[ring_head] = 1;
            if (publish(client, &c, telemetry, ring[ring_head], 0) == MQTTCLIENT_SUCCESS) {
                ring_pop();
                acked++;
            } else if (!MQTTClient_isConnected(client)) {
                connected = 0;
            }
        } else {
            long wait = next_reading - now_ms();
            sleep_ms(wait < 1 ? 1 : wait > 20 ? 20 : wait);
        }
    }
    if (connected) {
        publish(client, &c, status, "offline", 1); /* a clean DISCONNECT does not fire the will */
        if (c.mqtt5)
            MQTTClient_disconnect5(client, 1000, MQTTREASONCODE_NORMAL_DISCONNECTION, NULL);
        else
            MQTTClient_disconnect(client, 1000);
    }
    printf("STOPPED readings=%ld acked=%ld dropped=%ld resent=%ld\n", seq, acked, dropped,
           resent);
    MQTTClient_destroy(&client);
    return rebooting ? EXIT_REBOOT : 0;
}
