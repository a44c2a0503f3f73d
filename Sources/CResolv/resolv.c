#include "cresolv.h"

#include <arpa/inet.h>
#include <arpa/nameser.h>
#include <netdb.h>
#include <netinet/in.h>
#include <resolv.h>
#include <string.h>

/// Runs one query with a resolver state of its own (thread-safe), returning the answer's length or a
/// STARLING_DNS_ code.
static int query(const char *name, int type, const char *server, int port, unsigned char *answer, int size) {
    struct __res_state state;
    memset(&state, 0, sizeof state);
    if (res_ninit(&state) != 0) return STARLING_DNS_FAILED;
    if (server != NULL) {
        struct sockaddr_in address;
        memset(&address, 0, sizeof address);
        address.sin_family = AF_INET;
        address.sin_port = htons((unsigned short)port);
        if (inet_pton(AF_INET, server, &address.sin_addr) != 1) {
            res_nclose(&state);
            return STARLING_DNS_FAILED;
        }
        state.nsaddr_list[0] = address;
        state.nscount = 1;
    }
    state.retry = 2;
    state.retrans = 2;
    int length = res_nquery(&state, name, ns_c_in, type, answer, size);
    int failure = state.res_h_errno;
    res_nclose(&state);
    if (length < 0) return (failure == HOST_NOT_FOUND || failure == NO_DATA) ? STARLING_DNS_NO_SUCH_NAME : STARLING_DNS_FAILED;
    return length;
}

int starling_dns_srv(const char *name, const char *server, int port, starling_srv_record *records, int max) {
    unsigned char answer[NS_PACKETSZ * 4];
    int length = query(name, ns_t_srv, server, port, answer, sizeof answer);
    if (length < 0) return length;
    ns_msg message;
    if (ns_initparse(answer, length, &message) != 0) return STARLING_DNS_FAILED;
    int found = 0;
    for (int i = 0; i < ns_msg_count(message, ns_s_an) && found < max; i++) {
        ns_rr record;
        if (ns_parserr(&message, ns_s_an, i, &record) != 0) return STARLING_DNS_FAILED;
        if (ns_rr_type(record) != ns_t_srv || ns_rr_rdlen(record) < 7) continue;
        const unsigned char *data = ns_rr_rdata(record);
        starling_srv_record *out = &records[found];
        out->priority = ns_get16(data);
        out->weight = ns_get16(data + 2);
        out->port = ns_get16(data + 4);
        if (dn_expand(ns_msg_base(message), ns_msg_end(message), data + 6, out->target, sizeof out->target) < 0) continue;
        found++;
    }
    return found;
}

/// Appends the addresses of one record type; returns the new count or a STARLING_DNS_ code.
static int addresses_of_type(const char *name, int type, const char *server, int port, starling_address *addresses, int found, int max) {
    unsigned char answer[NS_PACKETSZ * 4];
    int length = query(name, type, server, port, answer, sizeof answer);
    if (length < 0) return length;
    ns_msg message;
    if (ns_initparse(answer, length, &message) != 0) return STARLING_DNS_FAILED;
    for (int i = 0; i < ns_msg_count(message, ns_s_an) && found < max; i++) {
        ns_rr record;
        if (ns_parserr(&message, ns_s_an, i, &record) != 0) return STARLING_DNS_FAILED;
        if (ns_rr_type(record) == ns_t_a && ns_rr_rdlen(record) == 4) {
            inet_ntop(AF_INET, ns_rr_rdata(record), addresses[found].text, sizeof addresses[found].text);
            found++;
        } else if (ns_rr_type(record) == ns_t_aaaa && ns_rr_rdlen(record) == 16) {
            inet_ntop(AF_INET6, ns_rr_rdata(record), addresses[found].text, sizeof addresses[found].text);
            found++;
        }
    }
    return found;
}

int starling_dns_addresses(const char *name, const char *server, int port, starling_address *addresses, int max) {
    int v4 = addresses_of_type(name, ns_t_a, server, port, addresses, 0, max);
    if (v4 == STARLING_DNS_FAILED) return v4;
    int start = v4 < 0 ? 0 : v4;
    int all = addresses_of_type(name, ns_t_aaaa, server, port, addresses, start, max);
    if (all >= 0) return all;
    return v4 < 0 ? all : v4;
}
