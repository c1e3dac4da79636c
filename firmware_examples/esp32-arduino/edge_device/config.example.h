// Copy to config.h (kept out of version control) and fill in.
#define WIFI_SSID "my-network"
#define WIFI_PASSWORD "my-wifi-password"
#define GATEWAY_HOST "192.168.1.10"  // must match a name/IP in the gateway's certificate
                                     // (an IP address fails with core 2.x: see README)
#define GATEWAY_PORT 8883
#define DEVICE_PASSWORD "this-device's-password"  // from the gateway's password file
// The gateway's CA certificate (PEM), e.g. the ca.crt made in deploy/README.md
#define GATEWAY_CA_PEM \
  "-----BEGIN CERTIFICATE-----\n" \
  "...\n" \
  "-----END CERTIFICATE-----\n"
