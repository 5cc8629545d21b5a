/*
 * The C side of tcpmgm's application API: a process of the governed cgroup reads the rule and
 * profile tcpmgm recorded for one of its own sockets. A SIP server does this for each new
 * connection, with the pin opened once.
 *
 *   cc -I tcpmgm-common/include tcpmgm-common/examples/socket_profile.c -lbpf -o socket_profile
 *   ./socket_profile /sys/fs/bpf/tcpmgm/sip-slice 192.0.2.10 5060
 *
 * Connects to HOST:PORT (IPv4) and prints `rule_id=N keepidle=S keepintvl=S keepcnt=N`, or
 * `no rule` when none matched. The pin is opened read-only: root may, and so may the members
 * of `tcpmgm run --api-group GROUP` on kernels that let users look up BPF maps (see README).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <bpf/bpf.h>
#include <linux/bpf.h>

#include "tcpmgm.h"

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s PIN_DIR HOST PORT\n", argv[0]);
		return 2;
	}
	char path[4096];
	snprintf(path, sizeof(path), "%s/%s", argv[1], TCPMGM_SOCKETS_PIN);
	LIBBPF_OPTS(bpf_obj_get_opts, ro, .file_flags = BPF_F_RDONLY);
	int records = bpf_obj_get_opts(path, &ro);
	if (records < 0) {
		fprintf(stderr, "opening %s: %s\n", path, strerror(errno));
		return 1;
	}

	struct sockaddr_in peer = { .sin_family = AF_INET, .sin_port = htons(atoi(argv[3])) };
	if (inet_pton(AF_INET, argv[2], &peer.sin_addr) != 1) {
		fprintf(stderr, "%s: not an IPv4 address\n", argv[2]);
		return 2;
	}
	int sock = socket(AF_INET, SOCK_STREAM, 0);
	if (sock < 0 || connect(sock, (struct sockaddr *)&peer, sizeof(peer)) != 0) {
		fprintf(stderr, "connecting to %s:%s: %s\n", argv[2], argv[3], strerror(errno));
		return 1;
	}

	/* The key is the socket's own fd; the value is the record tcpmgm keeps for it. */
	struct tcpmgm_sock_record record;
	if (bpf_map_lookup_elem(records, &sock, &record) != 0) {
		if (errno == ENOENT) {
			printf("no record: the socket is not in a cgroup tcpmgm governs\n");
			return 0;
		}
		fprintf(stderr, "looking the socket up: %s\n", strerror(errno));
		return 1;
	}
	if (record.state != TCPMGM_SOCK_RULE) {
		printf("no rule: the system's settings apply\n");
		return 0;
	}
	const struct tcpmgm_profile *p = &record.profile;
	printf("rule_id=%u keepidle=%u keepintvl=%u keepcnt=%u keepalive=%s\n", p->rule_id,
	       p->keepidle, p->keepintvl, p->keepcnt,
	       p->flags & TCPMGM_FLAG_KEEPALIVE_ON ? "on" : p->flags & TCPMGM_FLAG_KEEPALIVE_OFF ? "off" : "-");
	for (int i = 0; i < TCPMGM_MAX_ATTRS && p->attrs[i].key[0]; i++)
		printf("attr %.*s=%lld\n", TCPMGM_MAX_ATTR_KEY, (const char *)p->attrs[i].key,
		       (long long)p->attrs[i].value);
	close(sock);
	close(records);
	return 0;
}
