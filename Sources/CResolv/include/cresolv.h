#ifndef STARLING_CRESOLV_H
#define STARLING_CRESOLV_H

/// One SRV record (RFC 2782).
typedef struct {
    unsigned short priority;
    unsigned short weight;
    unsigned short port;
    char target[256];
} starling_srv_record;

/// One address as text (IPv4 or IPv6).
typedef struct {
    char text[46];
} starling_address;

/// What a lookup found: records (>= 0, at most `max` written), STARLING_DNS_NO_SUCH_NAME when the
/// name or its records do not exist (an answer), STARLING_DNS_FAILED when no answer came (timeout,
/// SERVFAIL, no resolver).
#define STARLING_DNS_NO_SUCH_NAME (-1)
#define STARLING_DNS_FAILED (-2)

/// SRV records of `name`. `server` (IPv4 text) and `port` pick a name server instead of
/// /etc/resolv.conf's; NULL for the system's. Blocking: call it off the event loops.
int starling_dns_srv(const char *name, const char *server, int port, starling_srv_record *records, int max);

/// A and AAAA records of `name`, A first.
int starling_dns_addresses(const char *name, const char *server, int port, starling_address *addresses, int max);

#endif
